"""The denoisers: shared transformer building blocks and the source backbones, then L2P's pixel model.

Read top to bottom: shared blocks (configs from the hub's `config.json`, norms, attention, RoPE, timestep
embedding, patchify), then the Z-Image backbone ("S3-DiT", the source model L2P was built on), then the
MMDiT backbones (SD3 / SD3.5 and FLUX.1), then the Detailer Head and the pixel model. Module and parameter
names mirror the diffusers layout so hub safetensors load with `assign=True` and no renaming.

Every backbone speaks the project's time convention (see the top of sample.py): it is called with
`sigma` (1 = pure noise, 0 = data) and returns the velocity `noise - x0`. A source model's native
convention is adapted in its own `forward`, in one place, and nowhere else.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Shared building blocks


class HubConfig:
    """from_dict / to_dict for config dataclasses built from a hub config.json: unknown bookkeeping keys
    (`_class_name`, `_diffusers_version`, ...) are ignored, JSON lists become tuples and back."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


class RMSNorm(nn.Module):
    """RMS norm computed in float32 then cast back, as diffusers' RMSNorm and transformers' Qwen3RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


@dataclass(frozen=True)
class AttentionSettings:
    """How `attention` runs. query_chunk: at most this many queries per SDPA call (None: all at once), which
    bounds the score matrix a non-fused backend materialises to chunk x keys per head; the result is exact."""

    query_chunk: int | None = None


ATTENTION = AttentionSettings()


@contextmanager
def attention_settings(**changes):
    """Temporarily change how every `attention` call runs (sample.py sets it from flags or a memory budget)."""
    global ATTENTION
    previous, ATTENTION = ATTENTION, replace(ATTENTION, **changes)
    try:
        yield ATTENTION
    finally:
        ATTENTION = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention. q, k, v: (B, heads, S, head_dim); mask: bool (B, 1, 1|S, S), True = attend.

    With a query chunk, queries are processed in slices: each query's softmax only involves its own scores,
    so slicing the queries changes nothing but peak memory."""
    chunk = ATTENTION.query_chunk
    if chunk is None or q.shape[2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    outputs = []
    for start in range(0, q.shape[2], chunk):
        part = mask if mask is None or mask.shape[2] == 1 else mask[:, :, start:start + chunk]
        outputs.append(F.scaled_dot_product_attention(q[:, :, start:start + chunk], k, v, attn_mask=part))
    return torch.cat(outputs, dim=2)


def key_padding_mask(lengths: torch.Tensor, total: int) -> torch.Tensor | None:
    """(B,) valid lengths -> bool (B, 1, 1, total) attention mask, or None when nothing is padded."""
    if bool((lengths == total).all()):
        return None
    return (torch.arange(total, device=lengths.device)[None] < lengths[:, None])[:, None, None, :]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first then sin, frequencies exp(-ln(max_period) * i / half) (all our sources)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, out_dim: int, mid_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def rope_frequencies(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """Multi-axis RoPE: integer positions (..., n_axes) -> complex rotations (..., sum(axes_dims) / 2).

    Each axis owns a slice of the head dimension. Angles are computed in float64 and rounded to float32
    before `polar`, which reproduces the reference's precomputed tables bit for bit at any position.
    """
    parts = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles = (positions[..., axis, None].double() * inv_freq).float()
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]). x: (B, S, heads, head_dim); freqs: complex (B, S, head_dim/2)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs[:, :, None]).flatten(-2).type_as(x)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), rows first, channels last inside a patch (ph, pw, c)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, H/p * W/p, p * p * C) -> (B, C, H, W)."""
    B, _, D = tokens.shape
    C = D // (patch * patch)
    x = tokens.reshape(B, height // patch, width // patch, patch, patch, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, height, width)


# ----------------------------------------------------------------------------------------------------
# Z-Image single-stream DiT (Tongyi-MAI/Z-Image, Z-Image-Turbo; diffusers ZImageTransformer2DModel)

ZIMAGE_ADALN_DIM = 256  # width of the timestep condition (min(dim, 256) in the reference)
ZIMAGE_T_MID_DIM = 1024  # hidden width of the timestep MLP, fixed in the reference
ZIMAGE_SEQ_MULTIPLE = 32  # image and caption sequences are each padded to a multiple of 32 tokens
ZIMAGE_QK_NORM_EPS = 1e-5  # the reference hard-codes this for q/k norms, independent of norm_eps
ZIMAGE_FINAL_NORM_EPS = 1e-6
TRAIN_TIMESTEPS = 1000  # the schedulers' num_train_timesteps: a timestep is sigma x 1000
TIMESTEP_RULES = ("exact", "official")


@dataclass(frozen=True)
class ZImageConfig(HubConfig):
    """Fields and defaults of the hub's transformer/config.json (Z-Image-Turbo values)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # stored by the hub config; the reference attends with n_heads for k and v too
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    # diffusers' default; Z-Image-Turbo's config.json says (1536, 512, 512). Only the size of the reference's RoPE
    # tables: we compute any position, so a config inferred from shapes may keep the default.
    axes_lens: tuple[int, ...] = (1024, 512, 512)
    # How sigma becomes the model's time (`zimage_time`): "exact" as diffusers computes it, or "official" as the
    # released L2P code does, in bfloat16. Not a hub field: a pixel model records the rule it was trained with.
    timestep_rule: str = "exact"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ZIMAGE_ADALN_DIM)

    @classmethod
    def from_dict(cls, d: dict) -> "ZImageConfig":
        if d.get("siglip_feat_dim") is not None:
            raise ValueError("Z-Image Omni (siglip_feat_dim) is not supported: only text-to-image Z-Image")
        cfg = super().from_dict(d)
        if cfg.timestep_rule not in TIMESTEP_RULES:
            raise ValueError(f"Z-Image config: timestep_rule {cfg.timestep_rule!r}, expected one of {TIMESTEP_RULES}")
        return cfg


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow shift: sigma' = s * sigma / (1 + (s - 1) * sigma); s > 1 spends more steps at high noise. The
    training grid (train.py) and the samplers' schedules (sample.py) are both shifted uniform grids."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def zimage_time(sigma: torch.Tensor, t_scale: float, rule: str = "exact") -> torch.Tensor:
    """Z-Image's native time t = (1 - sigma) * t_scale (t_scale 1000: 0 = noise, 1000 = clean image).

    "official" computes it as the released L2P inference and training code do (DiffSynth's model_fn): the
    scheduler's float32 timestep sigma * 1000 is cast to bfloat16, then (1000 - t) / 1000 and the model's
    t * t_scale are each rounded to bfloat16. At 30 steps the model then sees t = 0, 12, 24, 36, 48, 64, ...
    where the exact rule gives 0, 11.36, 23.26, 35.71, 48.78, 62.50, ...: the released weights only ever saw
    the rounded values, so they are sampled with them."""
    if rule == "exact":
        return (1 - sigma) * t_scale
    t = (sigma.float() * TRAIN_TIMESTEPS).to(torch.bfloat16)
    return ((TRAIN_TIMESTEPS - t) / TRAIN_TIMESTEPS * t_scale).float()


class ZImageAttention(nn.Module):
    """Multi-head self-attention with RMS q/k norms and RoPE; no biases."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # a list only to match hub key names
        self.norm_q = RMSNorm(dim // n_heads, ZIMAGE_QK_NORM_EPS) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim // n_heads, ZIMAGE_QK_NORM_EPS) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # (B, S, dim) -> (B, S, heads, head_dim)
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.n_heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.n_heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, heads, S, hd)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """Sandwich-normed block; when modulated, tanh-gated residuals and (1 + scale) inputs from the timestep.

    Unlike DiT's adaLN there are no shifts and no SiLU before the modulation Linear.
    """

    def __init__(self, cfg: ZImageConfig, modulated: bool):
        super().__init__()
        dim = cfg.dim
        self.attention = ZImageAttention(dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * dim)) if modulated else None

    def forward(self, x, rope, mask, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        attn_out = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn_out)
        ffn_out = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn_out)


class ZImageFinalLayer(nn.Module):
    """LayerNorm without affine, scaled by 1 + Linear(SiLU(c)), then the output projection."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (x.shape[-1],), eps=ZIMAGE_FINAL_NORM_EPS)
        return self.linear(x * (1 + self.adaLN_modulation(c)[:, None]))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def run_block(block: nn.Module, use_checkpoint: bool, *args) -> torch.Tensor:
    """Call a block, recomputing its activations in the backward pass when checkpointing (training only)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ZImageDiT(nn.Module):
    """Z-Image S3-DiT: image tokens and caption tokens are refined apart, then joined in one stream.

    Sequence layout per sample (reference `patchify_and_embed`): image tokens padded with the learned
    `x_pad_token` to a multiple of 32, then caption tokens padded with `cap_pad_token` to a multiple of
    32. Pad tokens take part in attention; only the padding that batches samples of different caption
    lengths is masked. RoPE positions (axis 0, row, col): caption token j -> (1 + j, 0, 0); image token
    -> (padded caption length + 1, row, col); image pad tokens -> (0, 0, 0).
    """

    VELOCITY_SIGN = -1.0  # Z-Image natively predicts x0 - noise; the project's velocity is noise - x0

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        if cfg.head_dim != sum(cfg.axes_dims) or cfg.dim % cfg.n_heads:
            raise ValueError(f"Z-Image config: head_dim {cfg.dim}/{cfg.n_heads} must equal sum(axes_dims) {cfg.axes_dims}")
        self.cfg = cfg
        patches = list(zip(cfg.all_patch_size, cfg.all_f_patch_size))
        self.all_x_embedder = nn.ModuleDict(
            {f"{p}-{f}": nn.Linear(f * p * p * cfg.in_channels, cfg.dim) for p, f in patches}
        )
        self.all_final_layer = nn.ModuleDict(
            {f"{p}-{f}": ZImageFinalLayer(cfg.dim, cfg.adaln_dim, f * p * p * cfg.in_channels) for p, f in patches}
        )
        self.noise_refiner = nn.ModuleList([ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, ZIMAGE_T_MID_DIM)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_layers)])
        self.gradient_checkpointing = False

    def condition(self, sigma: torch.Tensor, captions=None) -> torch.Tensor:
        """Timestep condition. Z-Image's native time runs the other way: t = 1 - sigma (1 = clean image)."""
        return self.t_embedder(zimage_time(sigma, self.cfg.t_scale, self.cfg.timestep_rule))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, captions: list[torch.Tensor], patch: int | None = None):
        """Velocity `noise - x0` for latents x (B, C, H, W), sigma (B,), captions [(L_i, cap_feat_dim)] * B."""
        patch = patch or self.cfg.all_patch_size[0]
        key = f"{patch}-1"
        c = self.condition(sigma)
        tokens = self.all_x_embedder[key](patchify(x, patch))
        h = self.transform(tokens, (x.shape[2] // patch, x.shape[3] // patch), c, captions)
        return self.VELOCITY_SIGN * unpatchify(self.all_final_layer[key](h, c), patch, x.shape[2], x.shape[3])

    def transform(self, tokens: torch.Tensor, grid: tuple[int, int], c: torch.Tensor, captions: list[torch.Tensor]):
        """Embedded image tokens (B, h*w, dim) -> the last main block's image tokens (B, h*w, dim)."""
        B, n_image, dim = tokens.shape
        device = tokens.device
        n_image_padded = round_up(n_image, ZIMAGE_SEQ_MULTIPLE)
        x = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(B, n_image_padded - n_image, dim)], dim=1)

        # Captions: embed, pad each to a multiple of 32 with the pad token, then batch-pad to the longest.
        # Lengths are decided on the host from Python ints: no device sync, and train.py's memory plan can run this
        # on fake tensors (whose values are unknown).
        cap_lens = [len(cap) for cap in captions]
        padded_lens = [round_up(n, ZIMAGE_SEQ_MULTIPLE) for n in cap_lens]
        cap_padded_lens = torch.tensor(padded_lens, device=device)
        n_cap, batch_padded = max(padded_lens), min(padded_lens) < max(padded_lens)
        embedded = self.cap_embedder(torch.cat(captions).to(tokens.dtype)).split(cap_lens)
        cap = torch.zeros(B, n_cap, dim, dtype=tokens.dtype, device=device)
        for i, e in enumerate(embedded):
            cap[i, : len(e)] = e
        slot = torch.arange(n_cap, device=device)[None]  # (1, n_cap)
        cap_pad = self.cap_pad_token.to(cap.dtype)
        cap = torch.where((slot >= torch.tensor(cap_lens, device=device)[:, None])[..., None], cap_pad, cap)

        # RoPE positions: see the class docstring.
        cap_pos = torch.zeros(B, n_cap, 3, dtype=torch.long, device=device)
        cap_pos[..., 0] = torch.where(slot < cap_padded_lens[:, None], slot + 1, 0)
        rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
        img_pos = torch.zeros(B, n_image_padded, 3, dtype=torch.long, device=device)
        img_pos[:, :n_image, 0] = (cap_padded_lens + 1)[:, None]
        img_pos[:, :n_image, 1] = rows.flatten()
        img_pos[:, :n_image, 2] = cols.flatten()
        img_rope = rope_frequencies(img_pos, self.cfg.axes_dims, self.cfg.rope_theta)
        cap_rope = rope_frequencies(cap_pos, self.cfg.axes_dims, self.cfg.rope_theta)

        ckpt = self.gradient_checkpointing
        for block in self.noise_refiner:
            x = run_block(block, ckpt, x, img_rope, None, c)
        cap_mask = key_padding_mask(cap_padded_lens, n_cap) if batch_padded else None
        for block in self.context_refiner:
            cap = run_block(block, ckpt, cap, cap_rope, cap_mask)

        # One stream: [image | caption]; batch padding sits at the end, so masking it is a length mask.
        h = torch.cat([x, cap], dim=1)
        rope = torch.cat([img_rope, cap_rope], dim=1)
        mask = key_padding_mask(n_image_padded + cap_padded_lens, h.shape[1]) if batch_padded else None
        for block in self.layers:
            h = run_block(block, ckpt, h, rope, mask, c)
        return h[:, :n_image]


# ----------------------------------------------------------------------------------------------------
# MMDiT: SD3 / SD3.5 (diffusers SD3Transformer2DModel) and FLUX.1 (diffusers FluxTransformer2DModel)
#
# Both are double-stream transformers: image and text tokens keep their own weights (adaLN modulation,
# q/k/v/out projections, MLP) and meet in one joint attention; FLUX then joins them in single-stream blocks.
# Both natively predict the project's velocity noise - x0 (their pipelines step x += (sigma_next - sigma) * v).

MMDIT_NORM_EPS = 1e-6  # the affine-free LayerNorms around every modulation and the q/k RMS norms, SD3 and FLUX alike
MMDIT_MLP_RATIO = 4
TIME_FEATURES = 256  # width of the sinusoidal timestep (and FLUX guidance) features (docs/formats.md, "Timestep embedding")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, named as diffusers' TimestepEmbedding and PixArtAlphaTextProjection."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The adaLN condition: MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text embedding)
    (diffusers CombinedTimestepTextProjEmbeddings, and CombinedTimestepGuidanceTextProjEmbeddings for FLUX-dev)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_FEATURES, dim)
        self.guidance_embedder = MLPEmbedder(TIME_FEATURES, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.text_embedder.linear_1.weight.dtype
        c = self.timestep_embedder(timestep_embedding(t, TIME_FEATURES).to(dtype))
        if guidance is not None:
            c = c + self.guidance_embedder(timestep_embedding(guidance, TIME_FEATURES).to(dtype))
        return c + self.text_embedder(pooled.to(dtype))


class Modulation(nn.Module):
    """adaLN: Linear(SiLU(c)) split into `n` vectors of (B, 1, dim); named `linear` as diffusers' adaptive norms."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c))[:, None].chunk(self.n, dim=-1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The affine-free LayerNorm the modulations act on."""
    return F.layer_norm(x, (x.shape[-1],), eps=MMDIT_NORM_EPS)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return normed * (1 + scale) + shift


class GELUTanh(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' GELU module, hence the `proj` name)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, keyed as diffusers' FeedForward: net.0.proj, net.2 (net.1 was its dropout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(GELUTanh(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MMDiTAttention(nn.Module):
    """The projections of MMDiT attention, keyed as diffusers' Attention: to_q/k/v and to_out for the image
    stream; with `text`, add_q/k/v_proj for the text stream and, unless the block is the last of SD3's
    (context_pre_only), to_add_out; per-head RMS q/k norms when `qk_norm`. FLUX's single blocks have no
    output projection of their own (`out=False`): it is fused into the block's proj_out."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, text: bool = False, text_out: bool = False,
                 out: bool = True):
        super().__init__()
        self.heads = heads
        norm = (lambda: RMSNorm(dim // heads, MMDIT_NORM_EPS)) if qk_norm else nn.Identity
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = norm(), norm()
        if out:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only to match hub key names
        if text:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = norm(), norm()
            if text_out:
                self.to_add_out = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image-stream q, k, v: (B, S, dim) -> 3 x (B, S, heads, head_dim), q and k normed."""
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        return self.norm_q(split(self.to_q(x))), self.norm_k(split(self.to_k(x))), split(self.to_v(x))

    def added_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text-stream q, k, v, as `qkv`."""
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        q, k = self.norm_added_q(split(self.add_q_proj(x))), self.norm_added_k(split(self.add_k_proj(x)))
        return q, k, split(self.add_v_proj(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v (B, S, heads, head_dim), optionally rotated -> (B, S, heads * head_dim), through `attention`."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2).flatten(2)


class JointBlock(nn.Module):
    """Double-stream block: SD3's JointTransformerBlock and FLUX's FluxTransformerBlock (same keys in diffusers).

    Each stream is modulated by its own adaLN-Zero (shift, scale, gate for attention and for the MLP); the joint
    attention runs over [text, image]. (SD3 orders [image, text]; without positions inside attention the order only
    permutes the softmax sum, so one order serves both.) MMDiT-X layers (SD3.5-Medium, `dual_attention`) add an
    image-only self-attention `attn2` whose shift/scale/gate are vectors 7-9 of a 9-vector modulation, applied to the
    block's input. The last SD3 block is `context_pre_only`: its text only gives keys and values, so it has no text
    output projection or MLP, and its text modulation is AdaLayerNormContinuous (scale, shift)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_pre_only: bool = False,
                 dual_attention: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = MMDiTAttention(dim, heads, qk_norm, text=True, text_out=not context_pre_only)
        self.attn2 = MMDiTAttention(dim, heads, qk_norm) if dual_attention else None
        self.ff = FeedForward(dim, MMDIT_MLP_RATIO * dim)
        self.ff_context = None if context_pre_only else FeedForward(dim, MMDIT_MLP_RATIO * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None):
        """x (B, N, dim) image tokens, context (B, L, dim) text tokens, c (B, dim); rope: complex (1, L + N, hd/2).
        Returns the new (x, context); context is None after a context_pre_only block."""
        mod = self.norm1(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_normed = layer_norm(x)
        if self.context_pre_only:
            c_scale_msa, c_shift_msa = self.norm1_context(c)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c)
        q, k, v = self.attn.qkv(modulate(x_normed, shift_msa, scale_msa))
        cq, ck, cv = self.attn.added_qkv(modulate(layer_norm(context), c_shift_msa, c_scale_msa))
        n_text = context.shape[1]
        out = attend(torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1), rope)  # (B, L + N, dim)
        x = x + gate_msa * self.attn.to_out[0](out[:, n_text:])
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            q2, k2, v2 = self.attn2.qkv(modulate(x_normed, shift_msa2, scale_msa2))
            x = x + gate_msa2 * self.attn2.to_out[0](attend(q2, k2, v2))
        x = x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa * self.attn.to_add_out(out[:, :n_text])
        context = context + c_gate_mlp * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


def final_layer(norm_out: Modulation, proj_out: nn.Linear, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """SD3's and FLUX's output: AdaLayerNormContinuous (scale, then shift) and a per-token Linear."""
    scale, shift = norm_out(c)
    return proj_out(modulate(layer_norm(h), shift, scale))


# SD3 / SD3.5 ----------------------------------------------------------------------------------------

SD3_TIME_SCALE = 1000.0  # SD3 is called with timestep = sigma * 1000 (its scheduler's num_train_timesteps)
SINCOS_MAX_PERIOD = 10000.0  # of the 2-D sin-cos position table
# The stored position table is rebuilt from the sin-cos formula to extend it (SD3PatchEmbed.table); checking the
# formula against the stored first row must allow for fp16 / bf16 storage (values in [-1, 1], bf16 step 2^-8).
SD3_TABLE_TOLERANCE = 1e-2


class MMDiTConfig(HubConfig):
    """What SD3's and FLUX's configs derive alike from their diffusers fields."""

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


@dataclass(frozen=True)
class SD3Config(MMDiTConfig):
    """Fields and defaults of diffusers' SD3Transformer2DModel config.json. The defaults are that class's own, so a
    config.json that omits a field (the original SD3-Medium one has no dual_attention_layers or qk_norm) means what
    it means to diffusers. Real values (docs/formats.md, "SD3"): SD3-Medium 24 layers, 24 heads, P 192; SD3.5-Medium
    adds qk_norm "rms_norm", dual_attention_layers 0..12, P 384; SD3.5-Large 38 layers, 38 heads, qk_norm, P 192."""

    sample_size: int = 128  # diffusers builds the position table from it; we load the stored table instead
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = 16  # None: = in_channels
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None


def sincos_table(dim: int, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' get_2d_sincos_pos_embed at float positions: rows (h,), cols (w,) -> (h * w, dim), rows first.
    The first half of the channels encodes the column, the second the row (its meshgrid puts w first); each half
    is [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim / 4)), computed in float64 as the reference."""
    quarter = dim // 4
    omega = SINCOS_MAX_PERIOD ** -(torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)

    def axis(positions: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, dim / 2)
        angles = positions.double()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)

    h, w = len(rows), len(cols)
    table = torch.cat([axis(cols)[None].expand(h, w, -1), axis(rows)[:, None].expand(h, w, -1)], dim=-1)
    return table.reshape(h * w, dim)


class SD3PatchEmbed(nn.Module):
    """Conv patch embedding, and the stored P x P sin-cos position table (diffusers PatchEmbed with
    pos_embed_max_size P): a grid of h x w tokens gets the centre crop starting at ((P - h) // 2, (P - w) // 2).

    Past P, where diffusers (and SAI's reference) refuse, we continue the same grid outward: the crop formula with a
    negative start, at the stored table's spacing, the positions that do not exist computed from the sin-cos formula.
    The trained table's frequencies and token spacing are kept, so nearby tokens relate as in training; only the
    outermost positions are new, extrapolated rather than squeezed (interpolating would change every spacing)."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.max_size = cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, dim, h, w) -> (B, h * w, dim)

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, h * w, dim) of an h x w token grid."""
        P, (h, w) = self.max_size, grid
        top, left = (P - h) // 2, (P - w) // 2
        if h <= P and w <= P:
            return self.pos_embed.unflatten(1, (P, P))[:, top:top + h, left:left + w].flatten(1, 2)
        spacing = self.spacing()
        device = self.pos_embed.device
        rows = (top + torch.arange(h, device=device)) * spacing
        cols = (left + torch.arange(w, device=device)) * spacing
        return sincos_table(self.pos_embed.shape[-1], rows, cols, self.pos_embed.dtype)[None]

    def spacing(self) -> float:
        """The distance between neighbouring positions of the stored table. diffusers builds it at positions
        arange(P) * base / P, base = sample_size // patch_size an integer (SD3: 64 / 192), so base is read from the
        angle at column 1 of the unit frequency (sin, cos in channels 0 and dim / 4) and rounded; the whole first row
        is then checked against the formula, so a table built otherwise is refused rather than extended wrongly."""
        P, dim = self.max_size, self.pos_embed.shape[-1]
        stored = self.pos_embed[0, :P].float()  # row 0, columns 0 .. P-1
        spacing = round(P * math.atan2(stored[1, 0], stored[1, dim // 4])) / P
        zero, columns = torch.zeros(1, device=stored.device), torch.arange(P, device=stored.device) * spacing
        error = float((sincos_table(dim, zero, columns, torch.float32) - stored).abs().max())
        if spacing <= 0 or error > SD3_TABLE_TOLERANCE:
            raise ValueError(f"SD3 position table: not the sin-cos grid diffusers builds (first row differs by "
                             f"{error:.3g}), so it cannot be extended past its {P} x {P} tokens")
        return spacing


class SD3MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT(-X): patch embedding + stored position table, joint blocks, adaLN output layer."""

    VELOCITY_SIGN = 1.0  # SD3 natively predicts noise - x0, the project's velocity

    def __init__(self, cfg: SD3Config):
        super().__init__()
        if cfg.caption_projection_dim != cfg.dim:
            raise ValueError(f"SD3 config: caption_projection_dim {cfg.caption_projection_dim} must equal "
                             f"num_attention_heads x attention_head_dim = {cfg.dim}")
        if cfg.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3 config: qk_norm {cfg.qk_norm!r} is not supported (None or 'rms_norm')")
        if any(not 0 <= i < cfg.num_layers for i in cfg.dual_attention_layers):
            raise ValueError(f"SD3 config: dual_attention_layers {cfg.dual_attention_layers} "
                             f"outside 0..{cfg.num_layers - 1}")
        self.cfg = cfg
        dim = cfg.dim
        self.pos_embed = SD3PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim, guidance=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(dim, cfg.num_attention_heads, cfg.qk_norm is not None, context_pre_only=i == cfg.num_layers - 1,
                       dual_attention=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)
        ])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.output_channels)
        self.gradient_checkpointing = False

    def condition(self, sigma: torch.Tensor, text, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """adaLN vector (B, dim) from sigma (B,) and the pooled CLIP embedding text.pooled (B, pooled_projection_dim)."""
        if guidance is not None:
            raise ValueError("SD3 has no guidance embedding: guidance is classifier-free, applied by the sampler")
        return self.time_text_embed(sigma * SD3_TIME_SCALE, text.pooled)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity `noise - x0` for latents x (B, C, H, W), sigma (B,) and text: tokenizer.PooledText, its context
        (B, L, joint_attention_dim) and pooled (B, pooled_projection_dim)."""
        patch, (H, W) = self.cfg.patch_size, x.shape[-2:]
        if H % patch or W % patch:
            raise ValueError(f"SD3 latents {H}x{W}: height and width must be multiples of the patch size {patch}")
        c = self.condition(sigma, text, guidance)
        h = self.transform(self.pos_embed(x.to(c.dtype)), (H // patch, W // patch), c, text)
        return self.VELOCITY_SIGN * unpatchify(final_layer(self.norm_out, self.proj_out, h, c), patch, H, W)

    def transform(self, tokens: torch.Tensor, grid: tuple[int, int], c: torch.Tensor, text):
        """Embedded image tokens (B, h*w, dim) -> the last block's image tokens (B, h*w, dim)."""
        x = tokens + self.pos_embed.table(grid).to(tokens.dtype)
        context = self.context_embedder(text.context.to(tokens.dtype))
        for block in self.transformer_blocks:
            x, context = run_block(block, self.gradient_checkpointing, x, context, c)
        return x


# FLUX.1 ---------------------------------------------------------------------------------------------

FLUX_TIME_SCALE = 1000.0  # FLUX is called with t = sigma and multiplies time and guidance by 1000 inside
FLUX_ROPE_THETA = 10000.0
FLUX_PACK = 2  # latents are packed 2 x 2 into tokens before the model (diffusers' patch_size 1 acts after that)
FLUX_RELEASED_AXES = (16, 56, 56)  # RoPE split of FLUX.1's head_dim 128: (index, row, col)


@dataclass(frozen=True)
class FluxConfig(MMDiTConfig):
    """Fields and defaults of diffusers' FluxTransformer2DModel config.json (its defaults are FLUX.1's values;
    guidance_embeds: false for schnell, true for dev)."""

    patch_size: int = 1
    in_channels: int = 64  # 16 latent channels x 2 x 2 packing
    out_channels: int | None = None  # None: = in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = FLUX_RELEASED_AXES


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX packing: (B, C, H, W) -> (B, H/2 * W/2, C * 4), channel index c * 4 + ph * 2 + pw (BFL and diffusers)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // FLUX_PACK, FLUX_PACK, W // FLUX_PACK, FLUX_PACK)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // FLUX_PACK) * (W // FLUX_PACK), C * FLUX_PACK**2)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h * w, C * 4) -> (B, C, 2h, 2w)."""
    B, _, D = tokens.shape
    (h, w), C = grid, D // FLUX_PACK**2
    x = tokens.reshape(B, h, w, C, FLUX_PACK, FLUX_PACK)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * FLUX_PACK, w * FLUX_PACK)


class SingleBlock(nn.Module):
    """FLUX single-stream block (diffusers FluxSingleTransformerBlock) over the joined [text, image] sequence:
    one modulation (shift, scale, gate), attention and MLP in parallel from the same input, one fused output
    projection of [attention ‖ GELU(mlp)]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, MMDIT_MLP_RATIO * dim)
        self.attn = MMDiTAttention(dim, heads, qk_norm=True, out=False)
        self.proj_out = nn.Linear(dim + MMDIT_MLP_RATIO * dim, dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.norm(c)
        normed = modulate(layer_norm(h), shift, scale)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        return h + gate * self.proj_out(torch.cat([attend(*self.attn.qkv(normed), rope), mlp], dim=-1))


class FluxDiT(nn.Module):
    """FLUX.1 [schnell, dev]: packed latent tokens, double-stream then single-stream blocks, adaLN output layer.

    RoPE (diffusers FluxPosEmbed, BFL EmbedND): ids (index, row, col) per token, text tokens all zeros, image token
    (0, row, col); the head dimension is split over the axes as axes_dims_rope, rotating adjacent channel pairs."""

    VELOCITY_SIGN = 1.0  # FLUX natively predicts noise - x0, the project's velocity

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        if cfg.patch_size != 1 or cfg.in_channels % FLUX_PACK**2:
            raise ValueError(f"FLUX config: patch_size {cfg.patch_size} and in_channels {cfg.in_channels} must be 1 and "
                             f"a multiple of {FLUX_PACK**2} (2 x 2 packed latents), as in FLUX.1")
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim or any(a % 2 for a in cfg.axes_dims_rope):
            raise ValueError(f"FLUX config: axes_dims_rope {cfg.axes_dims_rope} must be even and sum to "
                             f"attention_head_dim {cfg.attention_head_dim}")
        self.cfg = cfg
        dim, heads = cfg.dim, cfg.num_attention_heads
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim, guidance=cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([JointBlock(dim, heads, qk_norm=True) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(dim, heads) for _ in range(cfg.num_single_layers)])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.output_channels)
        self.gradient_checkpointing = False

    def condition(self, sigma: torch.Tensor, text, guidance: torch.Tensor | float | None = None):
        """adaLN vector (B, dim) from sigma (B,), the pooled CLIP embedding text.pooled (B, pooled_projection_dim) and, for
        guidance-distilled models (dev), the guidance scale. As both references do, time and guidance are rounded
        to the model's dtype before the x1000 (in bfloat16 that quantises them)."""
        dtype = self.context_embedder.weight.dtype
        if self.cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (guidance_embeds, like FLUX.1-dev): pass guidance")
        if not self.cfg.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX model has no guidance embedding (like FLUX.1-schnell): guidance must be None")
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=sigma.device).expand(sigma.shape).to(dtype) * FLUX_TIME_SCALE
        return self.time_text_embed(sigma.to(dtype) * FLUX_TIME_SCALE, text.pooled, guidance)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text, guidance: torch.Tensor | float | None = None):
        """Velocity `noise - x0` for latents x (B, C, H, W), sigma (B,) and text: tokenizer.PooledText, its context
        (B, L, joint_attention_dim) and pooled (B, pooled_projection_dim)."""
        H, W = x.shape[-2:]
        if H % FLUX_PACK or W % FLUX_PACK:
            raise ValueError(f"FLUX latents {H}x{W}: height and width must be even (2 x 2 packing)")
        c = self.condition(sigma, text, guidance)
        grid = (H // FLUX_PACK, W // FLUX_PACK)
        h = self.transform(self.x_embedder(pack_latents(x.to(c.dtype))), grid, c, text)
        return self.VELOCITY_SIGN * unpack_latents(final_layer(self.norm_out, self.proj_out, h, c), grid)

    def rope(self, grid: tuple[int, int], n_text: int, device) -> torch.Tensor:
        """Rotations (1, n_text + h*w, head_dim / 2) for the sequence [text, image]."""
        rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                    indexing="ij")
        image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1)  # (h*w, 3): (0, row, col)
        ids = torch.cat([torch.zeros(n_text, 3, dtype=image.dtype, device=device), image])
        return rope_frequencies(ids[None], self.cfg.axes_dims_rope, FLUX_ROPE_THETA)

    def transform(self, tokens: torch.Tensor, grid: tuple[int, int], c: torch.Tensor, text):
        """Embedded image tokens (B, h*w, dim) -> the last single block's image tokens (B, h*w, dim)."""
        context = self.context_embedder(text.context.to(tokens.dtype))
        n_text, ckpt = context.shape[1], self.gradient_checkpointing
        rope = self.rope(grid, n_text, tokens.device)
        x = tokens
        for block in self.transformer_blocks:
            x, context = run_block(block, ckpt, x, context, c, rope)
        h = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            h = run_block(block, ckpt, h, c, rope)
        return h[:, n_text:]


# ----------------------------------------------------------------------------------------------------
# L2P: the Detailer Head and the pixel-space model (paper section 3.3, Table 3; released code)

RGB_CHANNELS = 3
HEAD_WIDTHS = (64, 128, 256, 512)  # paper Table 3: 3 -> 64 -> 128 -> 256 -> 512, pooled 16x


@dataclass(frozen=True)
class HeadLevel:
    """One level of the Detailer Head's U-Net: its modules are enc{name} (Conv3x3 + SiLU to `enc` channels, then
    a 2x max-pool), up{name} (nearest 2x upsample, Conv3x3 to `up` channels) and dec{name} (Conv3x3 + SiLU of
    [up output, enc output] to `dec` channels). Names follow the releases: "1".."4" at 1K; "0", "0b" and the
    outer wrappers "_8k", "_10k_a" of the high-resolution heads."""

    name: str
    enc: int
    up: int
    dec: int


def unet_levels(widths: tuple[int, ...], names: tuple[str, ...] | None = None) -> tuple[HeadLevel, ...]:
    """Plain U-Net levels from their widths, full resolution first (the 1K head: 64, 128, 256, 512, named "1".."4"):
    level i encodes to w_i, its up conv keeps w_i, its decoder narrows to w_(i-1), the first keeping w_1 for the
    output conv."""
    names = names or tuple(str(i + 1) for i in range(len(widths)))
    return tuple(HeadLevel(name, w, w, widths[max(i - 1, 0)]) for i, (name, w) in enumerate(zip(names, widths)))


@dataclass(frozen=True)
class HeadConfig:
    """The Detailer Head: its levels from full resolution down, and the bottleneck's width. The bottleneck sits at
    1 / 2^len(levels) of the image, where the DiT's token features join (nearest-resized if their grid differs)."""

    levels: tuple[HeadLevel, ...] = unet_levels(HEAD_WIDTHS)
    bottleneck: int = HEAD_WIDTHS[-1]

    @classmethod
    def from_widths(cls, widths: tuple[int, ...]) -> "HeadConfig":
        return cls(unet_levels(tuple(widths)), widths[-1])

    @property
    def cell(self) -> int:
        """Pixels per bottleneck cell: every image side and tile must be a multiple of it."""
        return 2 ** len(self.levels)

    @property
    def halo(self) -> int:
        """Context a tile needs on each side for the tiled head to equal the untiled one: the receptive field of
        the 3x3 convs (one per level going down and two coming up, each at its level's scale: 3 x (cell - 1) px),
        rounded up to whole cells so pooling windows line up, plus a cell to spare. 1K: 45 -> 48 + 16 = 64 px; 4K
        and 10K 256 px, 8K 512 px. At every released depth 3 cells is the least that is exact on random weights
        and 2 cells is not (tests/test_highres.py)."""
        return round_up(3 * (self.cell - 1), self.cell) + self.cell

    @property
    def layout(self) -> str | None:
        """The released layout (HEAD_LAYOUTS) its level names follow, or None."""
        names = tuple(level.name for level in self.levels)
        return next((layout for layout in HEAD_LAYOUTS
                     if names == tuple(level.name for level in head_layout(layout).levels)), None)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(tuple(HeadLevel(*level) for level in d["levels"]), d["bottleneck"])

    def to_dict(self) -> dict:
        return {"levels": [[lv.name, lv.enc, lv.up, lv.dec] for lv in self.levels], "bottleneck": self.bottleneck}


# The released heads, by the resolution of their model. Each keeps the DiT at a 64 x 64 token grid and pools the
# image down to (about) that grid: 1K 16x, 4K 64x, 8K 128x, 10K 64x to 160 x 160 (the authors' high-resolution
# code, HaojunChen663/PixVerve-95K L2P-ZImage-HR: MicroDiffusionModel in z_image_dit_L2P.py).
HEAD_LAYOUTS = ("1k", "4k", "8k", "10k")
HIGH_RES_LEVELS = ("0", "0b", "1", "2", "3", "4")  # the 4K head's levels, full resolution first


def head_layout(layout: str, widths: tuple[int, ...] = HEAD_WIDTHS) -> HeadConfig:
    """A released head layout, built from the 1K head's widths w1..w4 (64, 128, 256, 512 in every release, which
    gives each release's channel counts exactly; the toy world divides them by 4):

    1k   levels "1".."4" (unet_levels), bottleneck w4 at 1/16.
    4k   levels "0" (w1/4) and "0b" (w1/2) above them, the decoders of "1", "0b" and "0" narrowed to w1/2, w1/4
         and w1/4: bottleneck w4 at 1/64.
    8k   the 4k head inside an outer level "_8k" (a 3-channel conv on the RGB input before the first pool, w1/4 on
         the way up): bottleneck at 1/128.
    10k  an outer level "_10k_a" over the 4k head without its level "4": bottleneck w4 at 1/64, where the DiT's
         64 x 64 features of a 10240-px image are resized to 160 x 160 (DetailerHead.forward)."""
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"head layout {layout!r}: expected one of {', '.join(HEAD_LAYOUTS)}")
    if len(widths) != len(HEAD_WIDTHS) or min(widths) < 1:
        raise ValueError(f"head widths {widths}: expected {len(HEAD_WIDTHS)} positive integers (w1..w4)")
    w1, bottleneck = widths[0], widths[-1]
    if layout == "1k":
        return HeadConfig(unet_levels(widths), bottleneck)
    if w1 % 4:
        raise ValueError(f"head widths {widths}: the {layout} layout's outer levels are w1/4 and w1/2 wide, so w1 "
                         "must be a multiple of 4")
    levels = unet_levels((w1 // 4, w1 // 2, *widths), HIGH_RES_LEVELS)
    wrapper = {"8k": "_8k", "10k": "_10k_a"}.get(layout)
    if wrapper:
        levels = (HeadLevel(wrapper, RGB_CHANNELS, w1 // 4, w1 // 4),) + levels[: 6 if layout == "8k" else 5]
    return HeadConfig(levels, bottleneck)


def conv_silu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    # in place: at 4K each activation the SiLU would otherwise copy is a full-resolution map (the conv's
    # output is not needed again, and autograd keeps what SiLU's backward needs)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.SiLU(inplace=True))


class DetailerHead(nn.Module):
    """Full-image conv U-Net that turns the DiT's token features into a full-resolution prediction.

    Encoder: per level Conv3x3 + SiLU, then MaxPool 2 (1K: H -> H/16). Bottleneck: concat with the last main
    block's raw image tokens as a (B, dim, H/16, W/16) map, Conv1x1 + SiLU. Decoder: per level nearest x2 upsample
    + Conv3x3, concat the pre-pool skip, Conv3x3 + SiLU. Output: Conv1x1 -> 3. No norms and no time input: the DiT
    features carry the timestep. Layer names follow the released `MicroDiffusionModel` (`local_decoder.*`).
    Stages are checkpointed when `gradient_checkpointing` is set: full-resolution activations dominate.
    """

    def __init__(self, cfg: HeadConfig, feature_dim: int, channels: int = RGB_CHANNELS):
        super().__init__()
        self.cfg = cfg
        c = channels
        for level in cfg.levels:
            self.add_module(f"enc{level.name}", conv_silu(c, level.enc, 3))
            c = level.enc
        self.bottleneck = conv_silu(c + feature_dim, cfg.bottleneck, 1)
        c = cfg.bottleneck
        for level in reversed(cfg.levels):
            self.add_module(f"up{level.name}", nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                             nn.Conv2d(c, level.up, 3, padding=1)))
            self.add_module(f"dec{level.name}", conv_silu(level.up + level.enc, level.dec, 3))
            c = level.dec
        self.out_conv = nn.Conv2d(c, channels, 1)
        self.gradient_checkpointing = False
        self.use_channels_last()
        # loading with assign=True puts fresh (NCHW) tensors in place, so the layout is restored after each load
        self.register_load_state_dict_post_hook(DetailerHead.use_channels_last)

    def use_channels_last(self, *_) -> None:
        """NHWC conv weights make every conv (and its input) run in that layout: measured 1.5x faster sampling
        and 1.7x faster training steps of the toy head on CPU (oneDNN); cuDNN's fastest kernels use it too."""
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x: noisy image (B, C, H, W), H and W multiples of cfg.cell; features: (B, dim, h, w), nearest-resized
        to the bottleneck grid (H, W) / cell when it differs (the 10K head's 64 -> 160, a 1K head at 4K)."""
        ckpt = self.gradient_checkpointing
        skips = []
        for level in self.cfg.levels:
            x = run_block(getattr(self, f"enc{level.name}"), ckpt, x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        if features.shape[-2:] != x.shape[-2:]:
            features = F.interpolate(features, size=x.shape[-2:], mode="nearest")
        x = self.bottleneck(torch.cat([x, features.to(x.dtype)], dim=1))
        for level, skip in zip(reversed(self.cfg.levels), reversed(skips)):
            x = run_block(getattr(self, f"up{level.name}"), ckpt, x)
            x = run_block(getattr(self, f"dec{level.name}"), ckpt, torch.cat([x, skip], dim=1))
        return self.out_conv(x)


def nearest_indices(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """The source index of each of n_out positions under F.interpolate(mode="nearest"), computed by it."""
    source = torch.arange(n_in, dtype=torch.float32, device=device)[None, None]
    return F.interpolate(source, size=n_out, mode="nearest")[0, 0].long()


def tiled_head(head: DetailerHead, x: torch.Tensor, features: torch.Tensor, tile: int) -> torch.Tensor:
    """The Detailer Head run on tile x tile output regions, each with a cfg.halo margin of real context, so its
    full-resolution activations stay bounded; the result equals head(x, features) (see HeadConfig.halo). Each
    tile gets the feature cells the untiled head's nearest resize would give it."""
    cell, halo = head.cfg.cell, head.cfg.halo
    if tile % cell:
        raise ValueError(f"head tile {tile} must be a multiple of {cell}")
    (B, _, H, W), device = x.shape, x.device
    rows = nearest_indices(features.shape[-2], H // cell, device)
    cols = nearest_indices(features.shape[-1], W // cell, device)
    out = torch.empty(B, head.out_conv.out_channels, H, W, dtype=x.dtype, device=device)
    for top in range(0, H, tile):
        for left in range(0, W, tile):
            y0, x0 = max(top - halo, 0), max(left - halo, 0)
            y1, x1 = min(top + tile + halo, H), min(left + tile + halo, W)
            crop = features[:, :, rows[y0 // cell:y1 // cell]][:, :, :, cols[x0 // cell:x1 // cell]]
            # in training each tile is recomputed in the backward pass, so only one tile's activations live
            part = run_block(head, head.gradient_checkpointing, x[:, :, y0:y1, x0:x1], crop)
            bottom, right = min(top + tile, H), min(left + tile, W)
            out[:, :, top:bottom, left:right] = part[:, :, top - y0:bottom - y0, left - x0:right - x0]
    return out


BACKBONES = {"zimage": (ZImageConfig, ZImageDiT), "sd3": (SD3Config, SD3MMDiT), "flux": (FluxConfig, FluxDiT)}
# What a pixel model drops from each source (paper 3.3): the latent patch embedder and the per-patch final layer,
# as (parent module or None, name).
LATENT_LAYERS = {"zimage": ((None, "all_x_embedder"), (None, "all_final_layer")),
                 "sd3": (("pos_embed", "proj"), (None, "norm_out"), (None, "proj_out")),
                 "flux": ((None, "x_embedder"), (None, "norm_out"), (None, "proj_out"))}


def backbone_family(cfg) -> str:
    """"zimage", "sd3" or "flux" for a backbone config."""
    return next(name for name, (config_class, _) in BACKBONES.items() if isinstance(cfg, config_class))


@dataclass(frozen=True)
class PixelConfig:
    """The pixel model: the source's own backbone config, the RGB patch sizes it has embedders for, and the
    Detailer Head (or, output "linear", the ablation with a per-patch linear final layer; Z-Image only)."""

    backbone: ZImageConfig | SD3Config | FluxConfig
    patches: tuple[int, ...] = (16,)
    head: HeadConfig = HeadConfig()
    output: str = "detailer"

    @property
    def family(self) -> str:
        return backbone_family(self.backbone)

    @property
    def timestep_rule(self) -> str:
        """How the model turns sigma into its time input (zimage_time); SD3 and FLUX always exactly."""
        return getattr(self.backbone, "timestep_rule", "exact")

    @classmethod
    def from_dict(cls, d: dict) -> "PixelConfig":
        backbone = BACKBONES[d["family"]][0].from_dict(d["backbone"])
        return cls(backbone, tuple(d["patches"]), HeadConfig.from_dict(d["head"]), d["output"])

    def to_dict(self) -> dict:
        return {"family": self.family, "backbone": self.backbone.to_dict(), "patches": list(self.patches),
                "head": self.head.to_dict(), "output": self.output}


class PixelDiT(nn.Module):
    """L2P's pixel-space model: RGB patches -> the source backbone's blocks -> Detailer Head -> velocity.

    One mechanism for every family: the source backbone (built from its config, or a given copy of the source
    module with its weights) loses its latent patch embedder and final layer (LATENT_LAYERS), gains RGB patch
    embedders at `backbone.all_x_embedder.{P}-1` (the release's names) and the Detailer Head. It keeps the
    source's native time and output sign (paper: the frozen blocks stay in their native optimisation manifold),
    so `forward` speaks the project convention exactly as the backbone does.
    """

    def __init__(self, cfg: PixelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        family, dim = cfg.family, cfg.backbone.dim
        if cfg.output == "linear" and family != "zimage":
            raise ValueError(f"pixel config: the linear-output ablation is built for Z-Image only, not {family}")
        self.backbone = BACKBONES[family][1](cfg.backbone) if backbone is None else backbone
        self.backbone.cfg = cfg.backbone  # a given source module keeps its weights, takes the pixel model's config
        for parent, name in LATENT_LAYERS[family]:
            delattr(getattr(self.backbone, parent) if parent else self.backbone, name)
        self.backbone.all_x_embedder = nn.ModuleDict(
            {f"{p}-1": nn.Linear(p * p * RGB_CHANNELS, dim) for p in cfg.patches})
        if cfg.output == "linear":
            self.backbone.all_final_layer = nn.ModuleDict(
                {f"{p}-1": ZImageFinalLayer(dim, cfg.backbone.adaln_dim, p * p * RGB_CHANNELS) for p in cfg.patches})
        else:
            self.detailer_head = DetailerHead(cfg.head, dim)
        self.head_tile: int | None = None  # sample.py / train.py set it to bound full-resolution memory

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text, patch: int | None = None,
                guidance: torch.Tensor | float | None = None):
        """Velocity `noise - x0` for images x (B, 3, H, W) in [-1, 1], sigma (B,) and the source's text
        conditioning (Z-Image: [(L_i, cap_dim)]; SD3 / FLUX: tokenizer.PooledText). guidance: FLUX-dev's
        embedded guidance scale, as the source takes it."""
        patch = patch or self.cfg.patches[0]
        if self.cfg.output == "linear":
            return self.backbone(x, sigma, text, patch)
        grid = (x.shape[2] // patch, x.shape[3] // patch)
        c = self.backbone.condition(sigma, text) if guidance is None else self.backbone.condition(sigma, text, guidance)
        tokens = self.backbone.all_x_embedder[f"{patch}-1"](patchify(x.to(c.dtype), patch))
        h = self.backbone.transform(tokens, grid, c, text)
        features = h.unflatten(1, grid).permute(0, 3, 1, 2)  # (B, h*w, dim) -> (B, dim, h, w)
        x = x.to(c.dtype)
        head = self.detailer_head(x, features) if self.head_tile is None else \
            tiled_head(self.detailer_head, x, features, self.head_tile)
        return self.backbone.VELOCITY_SIGN * head
