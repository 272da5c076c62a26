"""Sampling: the Euler ODE sampler with classifier-free guidance, in pixel space (L2P) and in latent space (the
source), the schedules, the patch and shift at any size, and the CLI that writes PNGs.

The project's one time convention, used by every file:
    sigma = 1 is pure noise, sigma = 0 is data;  x_sigma = (1 - sigma) * x0 + sigma * noise;
    the model predicts the velocity v = noise - x0 = dx/dsigma, so an Euler step is x += (sigma_next - sigma) * v.
Each source model's native convention is adapted inside its backbone's `forward` (model.py), nowhere else.

Noise is drawn per image from a CPU generator seeded with that image's seed (`--seed` + image index), so
an image depends on its own seed only: not on batch size, world size or device (`--noise-device cuda` draws it
as the official L2P inference does instead).

    python sample.py --ckpt runs/l2p --prompt "a red fox in snow" --out fox.png                   # L2P, pixel space
    python sample.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompt "a red fox in snow" --out fox.png  # the latent source
    python sample.py --ckpt HaojunChen/PixVerve-L2P/l2p_4k_sft.safetensors --prompt "a red fox" --out fox-4k.png
"""

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

# PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when this is set, so a 4K step on a CPU
# pays one page fault per 2 MiB instead of per 4 KiB of every fresh activation (docs/performance.md, "CPU
# allocator"). PyTorch reads it once, so it is set before torch is imported; a user's value wins.
if __name__ == "__main__":
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

import hub
import runtime
import transfer
from model import RGB_CHANNELS, TRAIN_TIMESTEPS, attention_settings, backbone_family, shift_sigmas
from runtime import non_negative_float, non_negative_int, positive_float, positive_int

# The released L2P inference defaults (inference.py / app.py): 30 Euler steps, CFG 2.0, shift 3.
PIXEL_STEPS = 30
PIXEL_GUIDANCE = 2.0
PIXEL_SHIFT = 3.0
PIXEL_DEFAULTS = {"steps": PIXEL_STEPS, "guidance": PIXEL_GUIDANCE, "shift": PIXEL_SHIFT}
# The 4K, 8K and 10K releases' inference (their README's "Inference" and batch script): 50 Euler steps,
# CFG 4.0, shift 3, at the model's own size; they draw the noise on the GPU (--noise-device cuda).
HIGH_RES_DEFAULTS = {"steps": 50, "guidance": 4.0, "shift": PIXEL_SHIFT}


# ----------------------------------------------------------------------------------------------------
# The pixel sampler (L2P): noise -> Euler steps of the guided velocity -> the image, no VAE

def initial_noise(seeds: list[int], shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """(len(seeds), *shape) float32 standard normal noise, one generator per image on `device`.

    The CPU generator (the default) makes an image depend on its seed alone, on any machine. device="cuda"
    draws on the GPU's generator as the official L2P inference does (rand_device="cuda", float32): the only
    way to reproduce its example images, and only on a CUDA machine."""
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--noise-device {device}: this machine has no CUDA device to draw that noise on")
    return torch.stack([torch.randn(shape, generator=torch.Generator(device).manual_seed(s), device=device)
                        for s in seeds]).cpu()


def pixel_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) sigmas of the released L2P sampler (DiffSynth's Z-Image schedule): shift(linspace(1, 0,
    steps + 1)[:-1]), then 0. diffusers writes the same grid as linspace(1, 1/steps, steps); in float32 half of
    the 30 values differ in their last bit from this form, enough to move a bfloat16-rounded timestep."""
    return torch.cat([shift_sigmas(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift), torch.zeros(1)])


def guided_velocity(model, x, sigma: float, cond: list, uncond: list | None, guidance: float, /,
                    **model_kwargs) -> torch.Tensor:
    """v = v_uncond + guidance * (v_cond - v_uncond), both halves in one batch; guidance 1 runs cond only.
    model_kwargs go to the model (positional-only parameters above, so FLUX-dev's `guidance` input can be one).

    This is the convention of the L2P code (cfg 2.0) and of diffusers' StableDiffusion3Pipeline, whose
    guidance_scale is our guidance (it guides only above 1). diffusers' ZImagePipeline writes pos + g (pos - neg),
    so its guidance_scale g is our guidance 1 + g.
    """
    dtype = next(model.parameters()).dtype
    if guidance == 1.0 or uncond is None:
        return model(x.to(dtype), torch.full((len(x),), sigma, device=x.device), cond, **model_kwargs).float()
    x = x.to(dtype)
    both = torch.cat([x, x])
    sigmas = torch.full((len(both),), sigma, device=x.device)
    v_cond, v_uncond = model(both, sigmas, cond + uncond, **model_kwargs).chunk(2)
    # one pass over the (possibly 4K) images instead of three: lerp(a, b, w) = a + w (b - a)
    return torch.lerp(v_uncond.float(), v_cond.float(), guidance)


def euler_sample(velocity, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Integrate dx/dsigma = velocity(x, sigma) from sigmas[0] to sigmas[-1], in float32."""
    x = x.float()
    start = time.time()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = torch.add(x, velocity(x, sigma), alpha=sigma_next - sigma)
        if progress:
            print(f"\r  step {i + 1}/{len(sigmas) - 1}  {time.time() - start:.1f}s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return x


def takes_guidance(model) -> bool:
    """Whether a latent backbone or pixel model is guidance-distilled (FLUX-dev): guidance is one of its inputs."""
    return getattr(getattr(model.cfg, "backbone", model.cfg), "guidance_embeds", False)


def denoise(model, text, prompts: list[str], x: torch.Tensor, sigmas: torch.Tensor, guidance: float,
            negative_prompt: str = "", progress: bool = False, **model_kwargs) -> torch.Tensor:
    """Encode the prompts with `text` (a source's text side, hub.LatentPipeline.text), and the negative prompt
    when guiding, then integrate from noise x to data. A guidance-distilled model (FLUX-dev) gets `guidance` as
    its input instead: no CFG batch."""
    if takes_guidance(model):
        model_kwargs["guidance"], guidance = guidance, 1.0
    cond = text(prompts)
    uncond = text([negative_prompt] * len(prompts)) if guidance != 1 else None
    x = x.to(next(model.parameters()).device)
    velocity = lambda x, s: guided_velocity(model, x, s, cond, uncond, guidance, **model_kwargs)  # noqa: E731
    return euler_sample(velocity, x, sigmas, progress)


@torch.no_grad()
def sample_pixels(model, text, prompts: list[str], seeds: list[int], height: int, width: int,
                  steps: int = PIXEL_STEPS, guidance: float = PIXEL_GUIDANCE, shift: float = PIXEL_SHIFT,
                  negative_prompt: str = "", noise: torch.Tensor | None = None, progress: bool = False,
                  patch: int | None = None, noise_device: str = "cpu") -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from an L2P pixel model: Euler directly on RGB, no VAE."""
    patch = patch or model.cfg.patches[0]
    runtime.check_size(height, width, patch, f"the pixel patch size {patch}")
    x = initial_noise(seeds, (3, height, width), noise_device) if noise is None else noise
    x = denoise(model, text, prompts, x, pixel_sigmas(steps, shift), guidance, negative_prompt, progress,
                patch=patch)
    return (x / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# Latent sources, as their diffusers pipelines sample them (synth.py makes the corpus with these)

# diffusers FlowMatchEulerDiscreteScheduler defaults for the resolution-dependent shift (mu)
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
UNSUPPORTED_SCHEDULER_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                                 "invert_sigmas", "stochastic_sampling")


def resolution_mu(image_seq_len: int, scheduler: dict) -> float:
    """The pipeline's resolution-dependent shift exp(mu): mu linear in the token count up to the scheduler's
    max_image_seq_len (FLUX.1: 4096 tokens, 1024^2 px), exactly as diffusers and BFL compute it.

    Past that size the line is not followed: it reaches mu = 11.5 at 65,536 tokens, where every step but the last
    sits at sigma > 0.99 (pure noise). There the shift grows as our pixel models' does (high_resolution_shift:
    x (tokens / max_len) ^ HIGH_RES_SHIFT_EXPONENT) and stops at MAX_PIXEL_SHIFT, so FLUX samples sizes it never
    saw with a spread schedule."""
    base_len = scheduler.get("base_image_seq_len", BASE_SEQ_LEN)
    max_len = scheduler.get("max_image_seq_len", MAX_SEQ_LEN)
    base_shift = scheduler.get("base_shift", BASE_SHIFT)
    max_shift = scheduler.get("max_shift", MAX_SHIFT)
    slope = (max_shift - base_shift) / (max_len - base_len)
    if image_seq_len <= max_len:
        return image_seq_len * slope + base_shift - slope * base_len
    grown = max_shift + HIGH_RES_SHIFT_EXPONENT * math.log(image_seq_len / max_len)
    return min(grown, max(max_shift, math.log(MAX_PIXEL_SHIFT)))


def source_sigmas(steps: int, scheduler: dict, image_seq_len: int, from_training_table: bool = False) -> torch.Tensor:
    """(steps + 1,) sigmas exactly as a pipeline + FlowMatchEulerDiscreteScheduler.set_timesteps compute them.

    ZImagePipeline and FluxPipeline pass sigmas = linspace(1, 1/steps, steps). StableDiffusion3Pipeline passes
    none (`from_training_table`): set_timesteps then spaces `steps` sigmas evenly from the first to the last sigma
    of the scheduler's training table (1/1000 .. 1, already shifted unless the shift is dynamic), so the last one
    is shifted twice (docs/formats.md, "Schedulers": shift 3, 4 steps -> ..., 0.008929). Then each is shifted by `shift` or,
    with dynamic shifting, by exp(mu) of the image token count; a final 0 is appended."""
    used = [k for k in UNSUPPORTED_SCHEDULER_OPTIONS if scheduler.get(k)]
    if used:
        raise ValueError(f"scheduler_config.json: options {used} are not supported by this sampler")
    dynamic, shift = scheduler.get("use_dynamic_shifting"), scheduler.get("shift", 1.0)
    if from_training_table:
        last = torch.tensor(1 / scheduler.get("num_train_timesteps", TRAIN_TIMESTEPS))  # float32, as the table
        last = last if dynamic else shift_sigmas(last, shift)
        sigmas = torch.linspace(1.0, float(last), steps, dtype=torch.float64)  # numpy's float64 linspace
    else:
        sigmas = torch.linspace(1.0, 1.0 / steps, steps)
    if dynamic:
        mu = resolution_mu(image_seq_len, scheduler)
        scale = math.exp(mu) if scheduler.get("time_shift_type", "exponential") == "exponential" else mu
        sigmas = scale / (scale + (1 / sigmas - 1))
    else:
        sigmas = shift_sigmas(sigmas, shift)
    return torch.cat([sigmas.float(), torch.zeros(1)])


@torch.no_grad()
def sample_latent(pipe: hub.LatentPipeline, prompts: list[str], seeds: list[int], height: int, width: int,
                  steps: int, guidance: float = 1.0, negative_prompt: str = "",
                  latents: torch.Tensor | None = None, progress: bool = False, noise_device: str = "cpu"
                  ) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from a latent source: encode text, Euler in latent space, VAE decode.

    Each family as its diffusers pipeline samples it: the schedule (SD3's from the training table, see
    source_sigmas), classifier-free guidance for Z-Image and SD3 (and FLUX-schnell, as FluxPipeline's
    true_cfg_scale with an empty negative prompt), and for FLUX-dev `guidance` into its guidance embedding
    instead. latents: (B, 16, H/8, W/8) for every family (FLUX packs them inside its forward)."""
    vae, dit = pipe.vae, pipe.transformer
    channels, patch = hub.latent_layout(dit.cfg)
    runtime.check_size(height, width, vae.cfg.downsample * patch, f"VAE factor {vae.cfg.downsample} x {patch} latent "
                                                          "pixels per token")
    shape = (channels, height // vae.cfg.downsample, width // vae.cfg.downsample)
    x = initial_noise(seeds, shape, noise_device) if latents is None else latents
    sigmas = source_sigmas(steps, pipe.scheduler, (shape[1] // patch) * (shape[2] // patch),
                           from_training_table=hub.source_family(dit.cfg) == "sd3")
    x = denoise(dit, pipe.text, prompts, x, sigmas, guidance, negative_prompt, progress)
    images = vae.decode(x.to(next(vae.parameters()).dtype)).float()
    return (images / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# Patch and shift at any size (paper 3.4: the patch grows so the token grid stays, the shift rises)

MAX_PIXEL_SHIFT = 6.0  # sigma <= 0.5 for raw sigma <= 1 / (shift + 1): a 7th of the steps at any size
HIGH_RES_SHIFT_EXPONENT = math.log(4 / 3) / math.log(16)  # shift 3 at the native size -> 4 at 16x the pixels


def high_resolution_shift(height: int, width: int, native: int = hub.DEFAULT_SIZE, base: float = PIXEL_SHIFT) -> float:
    """The flow shift for a pixel model at any size: `base` at its native size, growing with the pixel count
    (not the token count, which large patches keep at the native grid), bounded by MAX_PIXEL_SHIFT.

    The paper raises the shift at 4K and found about 4 best (Fig. 12: 1 -> 4 better, 5 slightly worse). With
    base 3 at 1024^2 the exponent makes 4096^2 (16x the pixels) exactly 4. The bound keeps the schedule spread
    at any size; a rule linear in the token count (FLUX's mu) reaches mu = 11.5 at 65,536 tokens, where every
    step but the last sits at sigma > 0.99, i.e. pure noise.
    """
    ratio = max(height * width / native**2, 1.0)
    return min(MAX_PIXEL_SHIFT, base * ratio**HIGH_RES_SHIFT_EXPONENT)


DERIVABLE_PATCHES = (32, 64)  # larger patches a model without them can derive from its 16-px embedder

# Up to this many times the native side a model samples with a patch it was trained with, as the official code
# samples the release (patch 16, shift 3) at every size; beyond it the 16-px grid would hold 4x the trained
# tokens or more, so a larger patch is derived from the 16-px embedder instead (an extrapolation, said aloud).
DERIVE_PATCH_ABOVE = 2


def choose_patch(patches: tuple[int, ...], height: int, width: int, native: int = hub.DEFAULT_SIZE) -> int:
    """The patch a pixel model samples (height, width) with when none is asked for: the smallest trained patch
    that keeps the token grid at most the native one (16 px at the native size; 64 px at 4x for a model trained
    there); else, up to DERIVE_PATCH_ABOVE x the native side, the largest trained patch that divides the size
    (1280 x 768 or 1536^2 with the release: its 16-px embedder); beyond, the smallest derivable patch that keeps
    the native grid, or the largest one."""
    trained = [p for p in sorted(patches) if height % p == 0 and width % p == 0]
    needed = transfer.PIXEL_PATCH * max(height, width) / native
    if any(p >= needed for p in trained):
        return next(p for p in trained if p >= needed)
    if trained and max(height, width) <= DERIVE_PATCH_ABOVE * native:
        return trained[-1]
    derivable = [p for p in DERIVABLE_PATCHES if height % p == 0 and width % p == 0]
    return next((p for p in derivable if p >= needed), max(derivable + trained, default=transfer.PIXEL_PATCH))


def patch_and_shift(patches: tuple[int, ...], height: int, width: int, native: int, base_shift: float,
                    patch: int | None = None, shift: float | None = None) -> tuple[int, float]:
    """The patch and shift a pixel model samples (height, width) with: given, else chosen for the size
    (choose_patch). The shift is the model's base shift with its smallest trained patch, and grows with the
    pixel count (high_resolution_shift) when a larger patch keeps the token grid small at a large size."""
    patch = patch or choose_patch(patches, height, width, native)
    grown = base_shift if patch == min(patches) else high_resolution_shift(height, width, native, base_shift)
    return patch, shift or grown


# ----------------------------------------------------------------------------------------------------
# Loading any model this project samples

def sampling_defaults(ckpt: str, source: str | None = None) -> tuple[str, dict, dict]:
    """(kind, recipe card, defaults) of a checkpoint, from metadata and configs alone: kind "latent" for a source
    pipeline, "pixel" for an L2P checkpoint; defaults h, w, steps, guidance and shift (hub.recipe_defaults) are the
    source's recipe card's, else the L2P release's for a pixel model (shift: its base shift, see patch_and_shift),
    else the source family's for a latent one (which has no shift to choose).

    A high-resolution pixel model (no 16-px embedder: the 4K, 8K and 10K releases and the models train.py --head
    makes) samples by default at its own size, the native one times its patch / 16 (4096, 8192, 10240 px: the
    native 64 x 64 token grid), where its patch is the trained one and its shift the base shift, with the
    high-resolution releases' steps and guidance (HIGH_RES_DEFAULTS) unless the recipe card names them."""
    root = hub.resolve(ckpt, ["model_index.json", "transformer/config.json", hub.RECIPE_CARD])
    if root.is_dir() and (root / "model_index.json").is_file():
        cfg = hub.pipeline_transformer_config(root / "transformer", hub.read_pipeline_index(root)["_class_name"])
        card = hub.recipe_card(ckpt)
        family = hub.SOURCE_DEFAULTS[hub.source_family(cfg)]
        return "latent", card, hub.recipe_defaults(card, "synth", hub.SIZE_DEFAULTS | family | {"shift": None})
    patches = transfer.peek_config(ckpt).patches
    card = hub.recipe_card(source or transfer.source_of(ckpt))
    high_res = transfer.PIXEL_PATCH not in patches
    built_in = hub.SIZE_DEFAULTS | (HIGH_RES_DEFAULTS if high_res else PIXEL_DEFAULTS)
    defaults = hub.recipe_defaults(card, "sample", built_in)
    if high_res:
        scale = min(patches) // transfer.PIXEL_PATCH
        defaults["h"], defaults["w"] = defaults["h"] * scale, defaults["w"] * scale
    return "pixel", card, defaults


@dataclass
class ImageModel:
    """A loaded text-to-image model, latent source or L2P pixel model, with its sampling defaults."""

    kind: str  # "latent" or "pixel"
    defaults: dict  # sampling_defaults
    pipe: hub.LatentPipeline  # latent: everything; pixel: the source's text encoder and tokenizer
    pixel_model: object = None

    @property
    def native(self) -> int:
        return max(self.defaults["h"], self.defaults["w"])

    def settings(self, height: int, width: int, shift: float | None = None, patch: int | None = None) -> dict:
        """The patch and shift a pixel model samples (height, width) with (patch_and_shift); an untrained
        patch gets an embedder derived from the 16-px one."""
        if self.kind == "latent":
            return {"patch": None, "shift": None}
        patches = self.pixel_model.cfg.patches
        patch, shift = patch_and_shift(patches, height, width, self.native, self.defaults["shift"], patch, shift)
        if patch not in patches:
            print(f"patch {patch}: no trained embedder, derived from a smaller trained one (area-downsampled pixels): "
                  "an extrapolation the model was not trained for", file=sys.stderr)
            self.pixel_model = transfer.add_patch_sizes(self.pixel_model, (patch,)).eval()
        return {"patch": patch, "shift": shift}

    def __call__(self, prompts: list[str], seeds: list[int], height: int, width: int, steps: int, guidance: float,
                 shift: float | None = None, negative_prompt: str = "", progress: bool = False,
                 patch: int | None = None, noise_device: str = "cpu") -> torch.Tensor:
        if self.kind == "latent":
            return sample_latent(self.pipe, prompts, seeds, height, width, steps, guidance, negative_prompt,
                                 progress=progress, noise_device=noise_device)
        chosen = self.settings(height, width, shift, patch)
        return sample_pixels(self.pixel_model, self.pipe.text, prompts, seeds, height,
                             width, steps, guidance, chosen["shift"], negative_prompt, progress=progress,
                             patch=chosen["patch"], noise_device=noise_device)


def load_model(ckpt: str, dtype=torch.float32, device="cpu", *, source: str | None = None,
               transformer: str | None = None, ema: bool = True) -> ImageModel:
    """A latent source (hub id or diffusers folder) or any L2P checkpoint, ready to sample."""
    kind, _, defaults = sampling_defaults(ckpt, source)
    if kind == "latent":
        return ImageModel(kind, defaults, hub.load_pipeline(ckpt, dtype, device, transformer=transformer))
    model, meta = transfer.load_pixel_model(ckpt, dtype, device, source=source, ema=ema)
    source = source or meta["source"]["id"]  # --source: where the recorded source lives now
    return ImageModel(kind, defaults, hub.load_pipeline(source, dtype, device, parts=("text",)), model)


# ----------------------------------------------------------------------------------------------------
# Memory: what sampling a pixel model holds at its peak, to choose tiles and chunks, refuse what cannot fit, and
# print for --dry-run

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
BLOCK_ACTIVATIONS = 12  # (tokens x dim) tensors alive inside a block: residual, norm, q, k, v, attention, 2 x 8/3 MLP
HEAD_SHARE = 0.25  # of the memory budget, for the Detailer Head's full-resolution activations (and attention's)
TILE_CHOICES = (4096, 2048, 1024, 512, 256, 128)

# On a CPU the head tile stays at most this, whatever the memory budget allows: larger tiles were slower there, as
# every large block is mapped fresh, and smaller ones recompute more of the halo (docs/performance.md, "Memory").
CPU_HEAD_TILE = 1024


def sampler_image_bytes(batch: int, pixels: int, dtype: torch.dtype, guided: bool) -> int:
    """Full-size images alive at the peak of a sampling step (guided_velocity inside euler_sample).

    Guided, at the lerp: Euler's float32 x, its compute-dtype copy, the CFG batch (2) and the model's output (2),
    the two output halves cast to float32 and the lerp's result. Unguided, while the head writes its output: x, its
    compute-dtype copy and the output (Euler's update then holds x, v and the new x, but by then the head's
    activations, the larger part, are freed). In float32 the casts are no-ops.
    """
    rgb = batch * 3 * pixels
    if not guided:
        return rgb * (4 + (BYTES[dtype] if dtype != torch.float32 else 0) + BYTES[dtype])
    cast = dtype != torch.float32
    float32_copies = 2 + (2 if cast else 0)
    compute_copies = 4 + (1 if cast else 0)
    return rgb * (4 * float32_copies + BYTES[dtype] * compute_copies)


def head_activation_bytes(head, area: int, batch: int, dtype_bytes: int) -> int:
    """The head's peak on `area` pixels: every encoder skip (level i's channels at 1/4^i of the area), the input,
    and the last decoder stage's upsampled map, its concatenation with the skip and its output."""
    skips = sum(level.enc * area / 4**i for i, level in enumerate(head.levels))
    first = head.levels[0]
    last_stage = (2 * first.up + first.enc + first.dec) * area
    return int(batch * dtype_bytes * (RGB_CHANNELS * area + skips + last_stage))


def attention_heads(backbone_cfg) -> int:
    return backbone_cfg.n_heads if backbone_family(backbone_cfg) == "zimage" else backbone_cfg.num_attention_heads


def memory_estimate(cfg, params: int, height: int, width: int, patch: int, batch: int, guided: bool,
                    caption_tokens: int, tile: int | None, chunk: int | None, dtype: torch.dtype,
                    math_attention: bool = False) -> dict[str, int]:
    """Bytes per component of a pixel model's sampling step, each at its own peak (summed: an upper bound).

    Attention scores count only under SDPA's math backend: the fused kernels that `auto` picks (flash on CPU;
    flash, cuDNN or efficient on CUDA) never hold the (queries x keys) matrix (measured on CPU: 8192 tokens
    x 8 heads x batch 2 with a padding mask added 0.02 GiB, where the scores would be 4 GiB)."""
    from model import ZIMAGE_SEQ_MULTIPLE, round_up

    b, size = batch * (2 if guided else 1), BYTES[dtype]
    bb = cfg.backbone
    image_tokens = (height // patch) * (width // patch)
    if cfg.family == "zimage":  # Z-Image pads each sequence to a multiple of 32 tokens
        image_tokens, caption_tokens = round_up(image_tokens, ZIMAGE_SEQ_MULTIPLE), round_up(caption_tokens, 32)
    tokens = image_tokens + caption_tokens
    halo, cell = cfg.head.halo, cfg.head.cell
    area = height * width if not tile else min(tile + 2 * halo, height) * min(tile + 2 * halo, width)
    return {
        "weights": params * size,
        "images": sampler_image_bytes(batch, height * width, dtype, guided),
        "transformer": b * tokens * bb.dim * size * BLOCK_ACTIVATIONS,
        "attention scores": (b * attention_heads(bb) * min(tokens, chunk or tokens) * tokens * 4
                             if math_attention else 0),
        "feature map": b * bb.dim * (height // cell) * (width // cell) * size,
        "head": head_activation_bytes(cfg.head, area, b, size),  # its full-size output is one of "images"
    }


def auto_memory_settings(cfg, params, height, width, patch, batch, guided, caption_tokens, dtype, budget: int,
                         tile: int | None = None, chunk: int | None = None, math_attention: bool = False
                         ) -> tuple[int | None, int | None]:
    """Head tile and attention query chunk that fit HEAD_SHARE of `budget` each; given values are kept
    (0 means off). A chunk is only ever needed under the math backend (see memory_estimate)."""
    def estimate(t, c):
        return memory_estimate(cfg, params, height, width, patch, batch, guided, caption_tokens, t, c, dtype,
                               math_attention)

    share = HEAD_SHARE * budget
    if tile is None and estimate(None, None)["head"] > share:
        tile = next((t for t in TILE_CHOICES if t < max(height, width) and estimate(t, None)["head"] <= share),
                    TILE_CHOICES[-1])
    if chunk is None and estimate(None, None)["attention scores"] > share:
        b = batch * (2 if guided else 1)
        tokens = (height // patch) * (width // patch) + caption_tokens
        chunk = max(256, int(share // (b * attention_heads(cfg.backbone) * tokens * 4)))
    return tile or None, chunk or None


def memory_budget(device: torch.device, gigabytes: float | None) -> int:
    """--memory-budget, else 90% of the GPU's memory or 80% of the memory the system has available."""
    if gigabytes:
        return int(gigabytes * 2**30)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    available = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    return int(0.8 * int(available.split()[1]) * 1024)


def print_memory(parts: dict[str, int], baseline: int, measured: int | None = None) -> None:
    total = sum(parts.values()) + baseline
    rows = [(name, v) for name, v in parts.items()] + [("process baseline (measured)", baseline), ("total", total)]
    for name, v in rows:
        print(f"  {name:<28} {v / 2**30:8.3f} GiB", file=sys.stderr)
    if measured is not None:
        print(f"  {'measured peak':<28} {measured / 2**30:8.3f} GiB ({measured / total:.0%} of the estimate)",
              file=sys.stderr)


def text_parameters(root: Path) -> int:
    """Parameters of a pipeline's text encoders, built on the meta device from their config.json files."""
    import tokenizer as tk

    builders = {"qwen3": (tk.Qwen3Config, tk.Qwen3TextEncoder), "clip_text_model": (tk.CLIPTextConfig, tk.CLIPTextEncoder),
                "t5": (tk.T5Config, tk.T5Encoder)}
    total = 0
    for folders in hub.text_folders(root, hub.read_pipeline_index(root)):
        if folders is None:
            continue
        config = hub.read_json(folders[0] / "config.json")
        if config.get("model_type") not in builders:
            raise hub.CheckpointError(f"{folders[0]}/config.json: model_type {config.get('model_type')!r}, expected "
                                      f"one of {', '.join(builders)}")
        config_class, encoder_class = builders[config["model_type"]]
        with torch.device("meta"):
            total += sum(p.numel() for p in encoder_class(config_class.from_dict(config)).parameters())
    return total


def plan_pixel_sampling(args, native: int, base_shift: float, prompts: list[str], device, dtype) -> dict:
    """Patch, shift, head tile, attention chunk and the memory estimate at (args.h, args.w), from configs alone
    (no weights), with the verdict on the memory budget."""
    from model import PixelDiT

    cfg = transfer.peek_config(args.ckpt)
    source = args.source or transfer.source_of(args.ckpt)
    text_root = hub.resolve(source, ["model_index.json", "transformer/config.json", "text_encoder*/config.json",
                                     "tokenizer*/*"])
    height, width = args.h, args.w
    if args.head_tile and args.head_tile % cfg.head.cell:
        raise ValueError(f"--head-tile {args.head_tile}: must be a multiple of this head's {cfg.head.cell}-px cell")
    if args.patch is not None and args.patch not in cfg.patches and all(args.patch % p for p in cfg.patches):
        raise ValueError(f"--patch {args.patch}: the model has no embedder for it (trained: {list(cfg.patches)}), "
                         "and only multiples of a trained patch derive from one")
    check_high_res_size(cfg, height, width, native)
    with torch.device("meta"):
        params = sum(p.numel() for p in PixelDiT(cfg).parameters()) + text_parameters(text_root)
    caption_tokens = hub.text_tokens(cfg.backbone)
    if caption_tokens is None:  # Z-Image: the longest prompt's valid tokens
        caption_tokens = int(hub.load_tokenizer(text_root / "tokenizer")(prompts)[1].sum(1).max())
    guided = args.guidance != 1 and not getattr(cfg.backbone, "guidance_embeds", False)  # FLUX-dev: no CFG batch
    budget = memory_budget(device, args.memory_budget)
    baseline = 0 if device.type == "cuda" else runtime.peak_memory(device)
    math_attention = args.sdpa_backend == "math"

    def plan_at(height: int, width: int, patch: int | None) -> dict:
        patch, shift = patch_and_shift(cfg.patches, height, width, native, base_shift, patch, args.shift)
        tile, chunk = auto_memory_settings(cfg, params, height, width, patch, args.batch_size, guided,
                                           caption_tokens, dtype, budget, args.head_tile, args.attention_chunk,
                                           math_attention)
        if args.head_tile is None and device.type == "cpu" and max(height, width) > CPU_HEAD_TILE:
            tile = min(tile or CPU_HEAD_TILE, CPU_HEAD_TILE)  # for speed, see CPU_HEAD_TILE
        parts = memory_estimate(cfg, params, height, width, patch, args.batch_size, guided, caption_tokens, tile,
                                chunk, dtype, math_attention)
        return {"patch": patch, "shift": shift, "tile": tile, "chunk": chunk, "parts": parts, "baseline": baseline,
                "budget": budget}

    plan = plan_at(height, width, args.patch)
    plan["verdict"] = memory_verdict(plan, height, width, plan_at, args.patch)
    return plan


def check_high_res_size(cfg, height: int, width: int, native: int) -> None:
    """Refuse sizes a high-resolution model (no 16-px embedder) cannot sample: sides that are not multiples of its
    patch and of its head's cell (4K any multiple of 64, 8K of 128, as the official code), and for the 10K layout
    any size but its own (10240 x 10240), as the official code, which resizes
    the 64 x 64 token features to a hard-coded 160 x 160 grid (z_image_dit_L2P.py of the high-resolution code)."""
    if transfer.PIXEL_PATCH in cfg.patches:
        return
    if cfg.head.layout == "10k" and (height, width) != (native, native):
        raise ValueError(f"--h {height} --w {width}: a 10K model samples exactly {native}x{native}: its head resizes "
                         f"the {native // cfg.patches[0]} x {native // cfg.patches[0]}-token features to the fixed "
                         f"{native // cfg.head.cell} x {native // cfg.head.cell} grid of that size")
    multiple = math.lcm(min(cfg.patches), cfg.head.cell)
    runtime.check_size(height, width, multiple, f"this {cfg.head.layout or 'high-resolution'} model's "
                                                f"{min(cfg.patches)}-px patch and {cfg.head.cell}-px head cell: with "
                                                "no 16-px embedder, its sizes follow its own patch")


def plan_fits(plan: dict) -> bool:
    return sum(plan["parts"].values()) + plan["baseline"] <= plan["budget"]


FIT_SEARCH_STEP = 0.9  # the size search shrinks both sides by this factor per try


def memory_verdict(plan: dict, height: int, width: int, plan_at, patch: int | None) -> str:
    """Whether the estimate fits the budget; if not, by how much, and the largest size of the same aspect
    (sides multiples of 16) whose own plan fits."""
    total, budget = sum(plan["parts"].values()) + plan["baseline"], plan["budget"]
    if total <= budget:
        return f"fits: about {total / 2**30:.2f} GiB of the {budget / 2**30:.2f} GiB budget"
    verdict = (f"{height}x{width} needs about {total / 2**30:.2f} GiB, {(total - budget) / 2**30:.2f} GiB more than the "
               f"{budget / 2**30:.2f} GiB budget (--memory-budget; default 90% of the GPU or 80% of free RAM)")
    scale = FIT_SEARCH_STEP
    while min(height, width) * scale >= transfer.PIXEL_PATCH:
        h, w = (max(transfer.PIXEL_PATCH, int(side * scale) // transfer.PIXEL_PATCH * transfer.PIXEL_PATCH)
                for side in (height, width))
        if patch is None or (h % patch == 0 and w % patch == 0):
            if plan_fits(plan_at(h, w, patch)):
                return f"{verdict}; {h}x{w} would fit"
        scale *= FIT_SEARCH_STEP
    return f"{verdict}; no size of this aspect fits (the weights alone take {plan['parts']['weights'] / 2**30:.2f} GiB)"


# ----------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(transfer.DEFAULT_RUN),
                   help="an L2P checkpoint (train.py run folder or one of its step-NNNNNN folders, trained-tensor or "
                        "standalone file, or the official release, e.g. zhen-nan/L2P/model-1k-merge.safetensors), or a "
                        "latent source pipeline (hub id or diffusers folder); default: runs/l2p, where train.py writes")
    p.add_argument("--source", help="L2P: where base weights and the text encoder come from (default: as recorded)")
    p.add_argument("--transformer", help="latent source: replace its transformer with this folder or single file")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts", type=Path, help="prompt file: plain text, one per line, or JSONL with 'prompt'")
    p.add_argument("--negative-prompt", default="", help="negative prompt for guidance (default: empty)")
    p.add_argument("--h", type=positive_int, help=f"image height (default: the source's recipe card, else {hub.DEFAULT_SIZE})")
    p.add_argument("--w", type=positive_int, help=f"image width (default: the source's recipe card, else {hub.DEFAULT_SIZE})")
    p.add_argument("--steps", type=positive_int, help=f"Euler steps (default: recipe card, else {PIXEL_STEPS} for L2P, "
                                                      f"for a source {hub.defaults_help('steps')})")
    p.add_argument("--guidance", type=non_negative_float,
                   help=f"classifier-free guidance, 1 = off; FLUX-dev: its embedded guidance (default: recipe card, "
                        f"else {PIXEL_GUIDANCE} for L2P, for a source {hub.defaults_help('guidance')})")
    p.add_argument("--shift", type=positive_float,
                   help=f"L2P: flow shift of the schedule (default: the model's, {PIXEL_SHIFT} for the release, "
                        "raised only when a larger patch than the trained one is used at a large size)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image i uses seed + i")
    p.add_argument("--noise-device", default="cpu", choices=("cpu", "cuda"),
                   help="where the initial noise is drawn: cpu (default: the same image on any machine) or cuda "
                        "(the official L2P inference's rand_device, 1K and high-resolution, to reproduce its images "
                        "on a GPU)")
    p.add_argument("--images-per-prompt", type=positive_int, default=1, help="images per prompt (consecutive seeds)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward batch")
    p.add_argument("--no-ema", action="store_true", help="L2P run or step folder: use the raw weights, not the EMA")
    p.add_argument("--patch", type=positive_int,
                   help=f"L2P: patch size (default: a trained one; above {DERIVE_PATCH_ABOVE}x the native size the "
                        "smallest that keeps the native token grid, derived from the 16-px embedder if untrained)")
    p.add_argument("--head-tile", type=non_negative_int,
                   help=f"L2P: Detailer Head tile in pixels, a multiple of 16; 0 = untiled (default: from the memory "
                        f"budget; on CPU at most {CPU_HEAD_TILE}, which is faster)")
    p.add_argument("--attention-chunk", type=non_negative_int,
                   help="queries per attention call, 0 = all (default: from the memory budget under --sdpa-backend "
                        "math, else all: the fused kernels hold no score matrix)")
    p.add_argument("--sdpa-backend", default="auto", choices=("auto", "flash", "cudnn", "efficient", "math"),
                   help="restrict scaled_dot_product_attention to one backend (all but math need CUDA)")
    p.add_argument("--memory-budget", type=positive_float,
                   help="GiB sampling may use: tiles and chunks are chosen for it, and a size that cannot fit is "
                        "refused before any weight loads (default: 90%% of the GPU, 80%% of available RAM)")
    p.add_argument("--dry-run", action="store_true",
                   help="L2P: print the chosen patch, shift, tile and chunk, the estimated peak memory and whether it "
                        "fits the budget; read no weights")
    p.add_argument("--out", type=Path, help="a .png file (one image) or a folder (default: sample.png or samples/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                   help="auto (bf16 on CUDA and on CPUs with native bf16: AMX or AVX512-BF16; else fp32), bf16, fp16 "
                        "or fp32")
    return p.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    kind, card, defaults = sampling_defaults(args.ckpt, args.source)
    native = max(defaults["h"], defaults["w"])
    base_shift = defaults.pop("shift")  # the pixel model's own: patch_and_shift raises it where a size needs it
    runtime.fill_unset(args, defaults)
    prompts = (args.prompt or []) + ([r["prompt"] for r in runtime.read_prompt_file(args.prompts)] if args.prompts else [])
    prompts = prompts or card.get("sample", {}).get("prompts", [])
    if not prompts:
        raise ValueError("give --prompt or --prompts")
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.images_per_prompt))]
    out = args.out or (Path("sample.png") if len(jobs) == 1 else Path("samples"))
    single = out.suffix == ".png"
    if single and len(jobs) > 1:
        raise ValueError(f"--out {out} is one file but there are {len(jobs)} images: give a folder")
    if single and out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a new file name, or the folder without .png")
    if args.head_tile and args.head_tile % transfer.PIXEL_PATCH:  # and of the head's cell: plan_pixel_sampling
        raise ValueError(f"--head-tile {args.head_tile}: must be a multiple of {transfer.PIXEL_PATCH} (0 = untiled)")
    height, width = args.h, args.w
    if kind == "latent":
        runtime.check_size(height, width, hub.latent_pixel_multiple(hub.resolve(args.ckpt), args.transformer),
                   "pixels per latent token")
    else:
        runtime.check_size(height, width, transfer.PIXEL_PATCH, "the pixel patch size")
    if args.patch and kind == "pixel":
        runtime.check_size(height, width, args.patch, f"--patch {args.patch}")
    # sampling only makes pictures, so bf16 where the CPU has it natively: a 4K step 2.6x faster (README)
    device, dtype = runtime.pick_device_dtype(args.device, args.dtype, bf16_on_cpu=True)
    plan = plan_pixel_sampling(args, native, base_shift, prompts, device, dtype) if kind == "pixel" else None
    if args.dry_run:
        if plan is None:
            raise ValueError("--dry-run estimates L2P pixel sampling; give an L2P checkpoint")
        print(f"{height}x{width}, patch {plan['patch']}, shift {plan['shift']:.3f}, head tile {plan['tile']}, "
              f"attention chunk {plan['chunk']}, batch {args.batch_size}", file=sys.stderr)
        print_memory(plan["parts"], plan["baseline"])
        print(plan["verdict"], file=sys.stderr)
        return []
    if plan and not plan_fits(plan):
        raise ValueError(plan["verdict"])
    folder = runtime.writable_folder(out.parent if single else out)
    model = load_model(args.ckpt, dtype, device, source=args.source, transformer=args.transformer, ema=not args.no_ema)
    steps, guidance = args.steps, args.guidance
    if plan:
        model.pixel_model.head_tile = plan["tile"]
    patch, shift = (plan["patch"], plan["shift"]) if plan else (None, None)
    print(f"sampling {len(jobs)} image(s) at {height}x{width}: {steps} steps, guidance {guidance:g}"
          + (f", patch {patch}, shift {shift:.3g}, {model.pixel_model.cfg.timestep_rule} timesteps" if plan else "")
          + f", noise drawn on {args.noise_device}", file=sys.stderr)
    backend = sdpa_backend(args.sdpa_backend, device)
    written = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        with attention_settings(query_chunk=plan["chunk"] if plan else None), backend:
            images = model([p for p, _ in batch], [s for _, s in batch], height, width, steps, guidance, shift,
                           args.negative_prompt, progress=True, patch=patch, noise_device=args.noise_device)
        for i, ((prompt, seed), image) in enumerate(zip(batch, images)):
            path = out if single else folder / f"{start + i:05d}.png"
            settings = dict(prompt=prompt, seed=seed, ckpt=args.ckpt, steps=steps, guidance=guidance,
                            negative_prompt=args.negative_prompt, height=height, width=width, patch=patch,
                            shift=shift, noise_device=args.noise_device)
            runtime.save_png(image, path, settings)
            written.append(path)
            print(f"wrote {path}", file=sys.stderr)
        del images, image  # or the next batch samples with these alive (0.19 GiB per 4K image)
    if plan:
        print("peak memory:", file=sys.stderr)
        print_memory(plan["parts"], plan["baseline"], runtime.peak_memory(device))
    return written


def sdpa_backend(name: str, device: torch.device):
    """A context restricting scaled_dot_product_attention to one backend (CUDA), or a no-op for auto."""
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda" and name != "math":
        raise ValueError(f"--sdpa-backend {name} needs CUDA (on CPU: auto or math)")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([backends[name]])


if __name__ == "__main__":
    runtime.run_cli(main)
