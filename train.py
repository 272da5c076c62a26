"""Train the pixel model with the source's own objective (paper section 3.3, Eq. 5), on many GPUs.

    torchrun --nproc_per_node 8 train.py --ckpt Tongyi-MAI/Z-Image-Turbo --data data --out runs/l2p

Objective: x_sigma = (1 - sigma) x0 + sigma noise, target noise - x0, plain MSE in float32. sigma is uniform
over the released 500-point grid linspace(1, 0, 501)[:-1], shifted by 3. Each image keeps one noise tensor
across epochs, as the released code does (`--fresh-noise` draws new noise each step); it is seeded from the
image's metadata seed through a salt, so it is independent of the noise the source synthesised the image from.

`--head 4k`, `8k` or `10k` trains the authors' high-resolution models (their head layout, their patch, a
1000-point grid, fresh noise, images cropped to the model's size), from a latent source or, with --init, from a
lower-resolution L2P model:

    torchrun --nproc_per_node 8 train.py --ckpt Tongyi-MAI/Z-Image --head 4k --data hr.csv --out runs/l2p-4k

Every random choice is a pure function of (--seed, step, position in the global batch): the data order
(one permutation per epoch), each sample's sigma and fresh noise. So 2 ranks at batch 1 draw exactly what
1 rank at batch 2 draws (their losses agree to float precision; the weights drift apart at the 1e-3 level over
many AdamW steps, as the gradient all-reduce sums in another order), and a resumed run continues bit for bit
where it stopped. A checkpoint folder `step-NNNNNN/` holds the trained tensors (model.safetensors, the EMA in
ema.safetensors) and the optimizer state, step and RNG states (state.safetensors); `latest` names the newest.
Rerunning the same command resumes. SIGINT / SIGTERM save a checkpoint at the end of the current step, then
the script exits with status 128 + the signal's number, so `train.py && sample.py` does not go on.

Parallelism (--parallel): ddp replicates everything on every GPU; fsdp (PyTorch's FSDP2) shards it, each transformer
block its own unit: trained tensors keep float32 master weights, sharded with their gradients and AdamW moments,
frozen tensors are sharded in the compute dtype, and a block is gathered in the compute dtype only while it runs
(gradients are reduced in float32). Checkpoints are the same files either way, gathered whole on rank 0, so a run
saved on N GPUs resumes on M as long as the global batch (GPUs x --batch-size) stays: the data order, every draw
and the optimizer state continue where they stopped.

    torchrun --nproc_per_node 8 train.py --ckpt Tongyi-MAI/Z-Image-Turbo --parallel fsdp
    python train.py --ckpt Tongyi-MAI/Z-Image-Turbo --parallel fsdp --world-size 8 --dry-run   # memory per GPU
"""

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import weakref
from contextlib import ExitStack, nullcontext
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hub
import runtime
import transfer
from model import HEAD_LAYOUTS, HEAD_WIDTHS, TIMESTEP_RULES, TRAIN_TIMESTEPS, HeadConfig, PixelDiT, head_layout, shift_sigmas
from runtime import non_negative_float, non_negative_int, positive_float, positive_int, unit_interval
from tokenizer import ZIMAGE_MAX_TOKENS, PooledText, conditioning_from_parts, conditioning_parts

TRAIN_GRID = 500  # the released loss calls set_timesteps(500) and draws one index uniformly
TRAIN_SHIFT = 3.0
PAPER_LR, PAPER_WEIGHT_DECAY = 5e-5, 0.01  # paper Table 3, AdamW
# Arguments that define a run: a resume must repeat them (the rest, like --steps, may change). The global batch
# (GPUs x --batch-size) is one of them, the world size and the batch per GPU each are not: they may trade.
RUN_DEFINING = ("ckpt", "data", "global_batch", "lr", "weight_decay", "warmup", "cooldown", "clip", "ema",
                "freeze", "blocks", "head", "head_widths", "init", "output", "patch", "patch_init", "seed",
                "fresh_noise", "train_shift", "train_grid", "timesteps", "max_pixels", "image_size")
PAPER_DEFAULTS = {"steps": 10000, "batch_size": 1, "lr": PAPER_LR, "warmup": 0, "cooldown": 0, "freeze": "released",
                  "blocks": 5, "head": "1k", "head_widths": ",".join(map(str, HEAD_WIDTHS))}
HIGH_RES_GRID = 1000  # the high-resolution loss draws from set_timesteps(1000, training=True), shifted by 3
NOISE_SALT = "training noise"  # mixed into an image's seed: its training noise is not the noise that made it
CSV_METADATA = "metadata.csv"  # a CSV corpus folder's rows (the official dataset's layout)
CSV_COLUMNS = ("image", "prompt", "seed")
OFFICIAL_MAX_PIXELS = 1024 * 1024  # the official loader scales larger images down to about 1 MP
# What the 1K recipe trains with where no flag (and no --head recipe, high_res_recipe) says otherwise
BASE_DEFAULTS = {"patch": transfer.PIXEL_PATCH, "train_grid": TRAIN_GRID, "fresh_noise": False,
                 "max_pixels": OFFICIAL_MAX_PIXELS}
STEP_FOLDER = re.compile(r"^step-\d{6}$")  # the checkpoint folders train.py writes, and the only ones it deletes


def high_res_recipe(layout: str, native: int) -> dict:
    """The authors' recipe for a high-resolution layout (their train_run_ds.sh and train_L2P.py), as defaults for
    what no flag gives: its patch (64, 128, 160 px: the 64 x 64 token grid at 4, 8, 10 x the native side), the
    1000-point grid, fresh noise every step, and its image size. 4K and 10K resize every image to cover the square
    of that side and centre-crop it; 8K scales images down to at most that many pixels, sides floored to multiples
    of the patch, so it trains at many sizes (batch 1 per GPU). Their lr (5e-5), batch and freeze plan are the
    1K recipe's, this script's defaults."""
    patch = transfer.LAYOUT_PATCHES[layout]
    side = native * patch // transfer.PIXEL_PATCH
    size = {"max_pixels": side * side} if layout == "8k" else {"image_size": side}
    return {"patch": patch, "train_grid": HIGH_RES_GRID, "fresh_noise": True} | size


# ----------------------------------------------------------------------------------------------------
# Data


def inside(folder: Path, name, where: str) -> Path:
    """The file a corpus row names, refused unless it lies inside the corpus folder: no absolute path, no '..',
    no link that leads out (a row must never make training read, and the model memorise, any other file)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: no image file named")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{where}: image {name!r} is not a path inside the corpus folder {folder}")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: image {name!r} is a link that leads outside the corpus folder {folder}")
    if not path.is_file():
        raise ValueError(f"{where}: image {name} is missing")
    return path


def official_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """(height, width) the official loader trains an image at (DiffSynth's ImageCropAndResize): scaled down to
    at most max_pixels keeping the aspect ratio, each side floored to a multiple of the patch."""
    if width * height > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        height, width = int(height / scale), int(width / scale)
    return height // multiple * multiple, width // multiple * multiple


def cover_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bilinear) to cover height x width keeping the aspect ratio, then centre-crop: the official
    loader's crop_and_resize, whose torchvision calls on a PIL image are these PIL operations."""
    scale = max(width / image.width, height / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    top, left = round((image.height - height) / 2), round((image.width - width) / 2)
    return image.crop((left, top, left + width, top + height))


class Corpus:
    """Training images and their rows (file, prompt, seed, and the height and width the image trains at):

    - a folder made by synth.py: metadata.jsonl, each image at the size its row records;
    - a CSV with columns image, prompt, seed, as the official L2P dataset ships (a .csv file, or a folder
      holding metadata.csv): images of any size, brought to at most `max_pixels` with sides a multiple of the
      patch as the official loader does (official_size, cover_and_crop).

    With `size`, every image of either kind trains at size x size, resized to cover it and centre-cropped (the
    4K and 10K recipes). Every row is checked before any weight loads: its file lies inside the corpus folder,
    its header reads as an image of a usable size, its prompt is text and its seed an integer (when the noise
    needs one)."""

    def __init__(self, location: Path, patch: int = transfer.PIXEL_PATCH, max_pixels: int = OFFICIAL_MAX_PIXELS,
                 need_seeds: bool = True, size: int | None = None):
        self.patch, self.need_seeds, self.size = patch, need_seeds, size
        if location.is_file() and location.suffix == ".csv":
            self.folder, self.rows = location.parent, self.read_csv(location, max_pixels)
        elif (location / runtime.CORPUS_METADATA).is_file():
            self.folder = location
            self.rows = self.read_jsonl(location / runtime.CORPUS_METADATA)
        elif (location / CSV_METADATA).is_file():
            self.folder, self.rows = location, self.read_csv(location / CSV_METADATA, max_pixels)
        else:
            raise ValueError(f"--data {location}: neither a corpus folder (no {runtime.CORPUS_METADATA} from synth.py, "
                             f"no {CSV_METADATA}) nor a .csv file")
        if not self.rows:
            raise ValueError(f"--data {location}: holds no rows")
        counts = {}
        for row in self.rows:
            counts[row["file"]] = counts.get(row["file"], 0) + 1
        self.duplicates = sum(n - 1 for n in counts.values())  # rows naming an image another row names too
        self.sizes = sorted({(r["height"], r["width"]) for r in self.rows})
        self.sources = sorted({r["transformer_sha256"] for r in self.rows if r.get("transformer_sha256")})

    def checked_row(self, row: dict, where: str, header_size: tuple[int, int]) -> dict:
        """The row with its training size, after the checks every row gets."""
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{where}: the prompt must be text, got {row.get('prompt')!r}")
        seed = row.get("seed")
        if self.need_seeds and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: needs an integer seed (the image's training noise is drawn from it), got "
                             f"{seed!r}; or train with --fresh-noise")
        height, width = row["height"], row["width"]
        if min(height, width) < self.patch or height % self.patch or width % self.patch:
            raise ValueError(f"{where}: trains at {height}x{width}, not a multiple of {self.patch} (the patch size "
                             "and the head's cell)")
        if (height, width) != header_size and not row.get("resized"):
            raise ValueError(f"{where}: the row says {height}x{width} but the image is {header_size[0]}x{header_size[1]}")
        return row

    def read_jsonl(self, path: Path) -> list[dict]:
        rows = []
        for n, text in runtime.read_lines(path, "--data"):
            where = f"--data {path}:{n}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            header = image_size(inside(path.parent, row.get("file"), where), where)
            if self.size:
                row |= {"height": self.size, "width": self.size, "resized": True}
            row.setdefault("height", header[0])
            row.setdefault("width", header[1])
            rows.append(self.checked_row(row, where, header))
        return rows

    def read_csv(self, path: Path, max_pixels: int) -> list[dict]:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                required = CSV_COLUMNS if self.need_seeds else CSV_COLUMNS[:2]
                missing = [c for c in required if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"--data {path}: the header must name the columns {', '.join(CSV_COLUMNS)} "
                                     f"(missing: {', '.join(missing)})")
                rows = []
                for record in reader:
                    where = f"--data {path}:{reader.line_num}"
                    header = image_size(inside(path.parent, record.get("image"), where), where)
                    seed = (record.get("seed") or "").strip()
                    height, width = (self.size, self.size) if self.size else \
                        official_size(header[1], header[0], max_pixels, self.patch)
                    row = {"file": record["image"], "prompt": record.get("prompt"), "height": height, "width": width,
                           "seed": int(seed) if re.fullmatch(r"-?\d+", seed) else (seed or None), "resized": True}
                    rows.append(self.checked_row(row, where, header))
        except UnicodeDecodeError:
            raise ValueError(f"--data {path}: not UTF-8 text") from None
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1] at the row's training size."""
        row = self.rows[i]
        path = self.folder / row["file"]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--data {path}: the image cannot be decoded ({e})") from None
        if image.size != (row["width"], row["height"]):
            image = cover_and_crop(image, row["height"], row["width"])
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) from the image's header alone."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, UnidentifiedImageError):
        raise ValueError(f"{where}: {path} is not a readable image") from None


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (so any rank can recompute any sample's draws)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def global_batch(step: int, size: int, n_items: int, seed: int) -> list[tuple[int, int]]:
    """(position in the data stream, item index) of the global batch of `step`: epoch e reads a seeded
    permutation of the corpus, so the data position is step * size and nothing needs saving."""
    batch = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(sample_seed(seed, epoch)))
        batch.append((position, int(order[offset])))
    return batch


def training_sigmas(shift: float = TRAIN_SHIFT, rule: str = "exact", grid: int = TRAIN_GRID) -> torch.Tensor:
    """The released training grid: linspace(1, 0, grid + 1)[:-1] = {1, 0.998, ..., 0.002} at the 1K release's
    500 points (1000 for the high-resolution ones: {1, ..., 0.001}, shifted to 0.00299 as theirs), shifted.

    rule "official": the grid as the released loss really samples it. It casts the drawn timestep (sigma x 1000)
    to bfloat16, and the scheduler's add_noise snaps that back to the nearest grid timestep, so only 252 of the
    500 sigmas are ever drawn (some twice as often); the model then sees the rounded time (model.zimage_time)."""
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, grid + 1)[:-1], shift)
    if rule == "official":
        timesteps = sigmas * TRAIN_TIMESTEPS
        drawn = timesteps.to(torch.bfloat16).float()
        sigmas = sigmas[(timesteps[None] - drawn[:, None]).abs().argmin(dim=1)]
    return sigmas


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, captions,
                       patch: int | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """Paper Eq. 5: MSE between the predicted velocity at x_sigma and noise - x0, in float32. `guidance`: the
    embedded guidance scale a guidance-distilled source (FLUX.1-dev) made each image with."""
    s = sigma[:, None, None, None]
    extra = {} if guidance is None else {"guidance": guidance}
    velocity = model((1 - s) * x0 + s * noise, sigma, captions, patch, **extra)
    return F.mse_loss(velocity.float(), (noise - x0).float())


class TextFeatures:
    """Prompt features without gradients, from the source's text encoder, optionally cached on disk. The cache
    is keyed by the prompt and the hash of the text side's weights and tokenizer files, so a changed encoder
    (a new revision behind the same hub id, a replaced file) never reuses old features. With a complete cache
    the encoder is never loaded."""

    def __init__(self, ckpt: str, dtype, device, cache: Path | None):
        self.ckpt, self.dtype, self.device, self.cache = ckpt, dtype, device, cache
        self.text = None
        self.text_sha256 = hub.text_sha256(ckpt) if cache else None

    def path(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.text_sha256}\n{prompt}".encode()).hexdigest()[:32]
        return self.cache / f"{key}.safetensors"

    def encode(self, prompts: list[str]):
        if self.text is None:
            self.text = hub.load_pipeline(self.ckpt, self.dtype, self.device, parts=("text",)).text
        return self.text(prompts)

    def __call__(self, prompts: list[str]):
        """The conditioning the backbone takes (tokenizer.ZImageText / SD3Text / FluxText output)."""
        if not self.cache:
            return self.encode(prompts)
        misses = list(dict.fromkeys(p for p in prompts if not self.path(p).is_file()))
        for prompt, part in zip(misses, conditioning_parts(self.encode(misses)) if misses else []):
            transfer.atomic_save(part, self.path(prompt), {"format": "text-features"})
        return conditioning_from_parts([{k: t.to(self.dtype) for k, t in hub.read_tensors(self.path(p), self.device).items()}
                                        for p in prompts])


# ----------------------------------------------------------------------------------------------------
# Parallelism: DDP replicates the model on every rank, FSDP shards it

PARALLEL = ("ddp", "fsdp")


def transformer_blocks(model: PixelDiT) -> list[torch.nn.Module]:
    """The backbone's transformer blocks, every list of them: Z-Image's refiners and main layers, SD3's joint blocks,
    FLUX's double- and single-stream blocks. A freeze plan trains or freezes whole blocks, so each is all one or the
    other."""
    return [block for child in model.backbone.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def idle_parameters(model: PixelDiT, patch: int) -> set[str]:
    """Trained tensors no step reaches: the patch embedders (and linear outputs) of the model's other patch sizes,
    e.g. the 16-px embedder a 4K stage keeps while it trains at patch 64. They get no gradient, so AdamW leaves them
    as they are."""
    layers = tuple(f"backbone.{name}." for name in ("all_x_embedder", "all_final_layer"))
    return {name for name, _ in model.named_parameters()
            if name.startswith(layers) and not name.startswith(tuple(f"{layer}{patch}-1." for layer in layers))}


def parallelize(model: PixelDiT, parallel: str, world: int, device: torch.device, compute_dtype: torch.dtype,
                patch: int) -> torch.nn.Module:
    """The module the training step calls. ddp: the model itself on one rank, else wrapped in
    DistributedDataParallel (every rank holds everything; gradients are all-reduced). fsdp: the model sharded in
    place with FSDP2, one unit per transformer block and a root unit for the rest (embedders, pad tokens, the Detailer
    Head): every rank keeps 1/world of each tensor, and of each gradient and AdamW moment, in the tensor's own dtype
    (float32 masters for trained tensors, the compute dtype for frozen ones); a unit is all-gathered in the compute
    dtype just before it runs and freed after, and its gradients are reduce-scattered in float32. A block is wholly
    frozen or wholly trained, so frozen blocks cost no gradient or optimizer memory at all. (FSDP2 lets a unit mix
    frozen and trained tensors, as the root does, as long as its trained ones share one dtype: here float32.)"""
    if parallel == "ddp":
        # some trained tensors sit out every step (idle_parameters): DDP must not wait for their gradients
        return DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    mesh = init_device_mesh(device.type, (world,))
    # Inputs keep their dtype (cast_forward_inputs=False): sigma stays float32, so the timestep is exact, as under DDP
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for p in model.parameters():
        p.data = p.data.contiguous()  # FSDP shards contiguous tensors only (the head keeps channels-last weights)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    idle = idle_parameters(model, patch)
    fully_shard(model, mesh=mesh, mp_policy=policy,
                ignored_params={p for name, p in model.named_parameters() if name in idle})
    # a trained tensor one rank's step does not reach still joins the reduce-scatter, with a zero gradient (as DDP's
    # find_unused_parameters does), so the ranks' collectives always match
    model.set_reduce_scatter_unused_params(True)
    return model


def gathered(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors` on rank 0 (an empty dict on the others). An FSDP shard (a DTensor) is
    all-gathered, one tensor at a time, so every rank must call this; a rank never holds more than one whole tensor
    on its GPU, and rank 0 collects the copies in host memory."""
    whole = {}
    with torch.no_grad():
        for name, t in tensors.items():
            t = t.full_tensor() if isinstance(t, DTensor) else t
            if rank == 0:
                whole[name] = t.detach().cpu()
    return whole


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `like`: this rank's shard of it when `like` is an FSDP shard (each rank slices
    its own part, no communication), else the tensor itself on like's device. This is where a checkpoint written at
    one world size is resharded for another."""
    if isinstance(like, DTensor):
        whole = whole.to(like.device, like.dtype)
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(like.device)


def each_tensor(path: Path):
    """(name, tensor) of a safetensors file, read one at a time onto the CPU: every rank reads the checkpoint and
    keeps only its share of each tensor, so no rank ever holds the whole optimizer state."""
    for f, handle in hub.open_safetensors(path):
        for key in handle.keys():
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise hub.CheckpointError(f"{f}: could not read tensors, truncated or corrupt ({e})") from None
            yield key, tensor


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step: int, model, plan, source: dict, optimizer, ema: dict | None, args, keep=(),
                    rank: int = 0) -> Path:
    """step-NNNNNN/ with model, EMA and state files, written into a fresh temporary folder then renamed, so a
    published step folder is always complete; then `latest`, then old step folders pruned (--keep). Every rank
    calls it: FSDP shards are gathered whole (one file's tensors at a time), and rank 0 alone writes."""
    name = f"step-{step:06d}"
    final, tmp = out / name, out / f".{name}.{os.getpid()}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    # every rank gathers the same tensors in the same order: the model's (never a set's, whose order is per process)
    params = dict(model.named_parameters())
    kept = gathered({n: p for n, p in params.items() if n in keep and not p.requires_grad}, rank)
    trained = gathered({n: params[n] for n in transfer.trained_names(model)}, rank)
    if rank == 0:
        transfer.save_trained(tmp / "model.safetensors", model, plan, source, tensors=trained | kept, step=step)
    del trained
    if ema is not None:
        averages = gathered(ema, rank)
        if rank == 0:
            transfer.save_trained(tmp / "ema.safetensors", model, plan, source, tensors=averages | kept, step=step)
        del averages
    state = gathered({f"opt.{n}.{k}": v for n, p in params.items() if p in optimizer.state
                      for k, v in optimizer.state[p].items()}, rank)
    if rank != 0:
        return final
    state |= {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    transfer.atomic_save(state, tmp / "state.safetensors", {"format": transfer.CHECKPOINT_FORMAT, "kind": "state",
                                                            "step": step, "data_position": step * args.global_batch})
    if final.exists():  # a checkpoint of this step from an interrupted earlier save
        shutil.rmtree(final)
    tmp.rename(final)
    runtime.write_text_atomic(out / "latest", name)
    steps = sorted(p for p in out.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name))
    for old in steps[: -args.keep] if args.keep > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, model, optimizer, ema: dict | None, source: dict) -> int:
    """Restore trained tensors, EMA, optimizer state and RNG states; returns the step to continue from. Every rank
    reads the whole files and keeps its own share (shard_like), so any world size resumes any checkpoint."""
    files = ["model.safetensors", "state.safetensors"] + (["ema.safetensors"] if ema is not None else [])
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise hub.CheckpointError(f"{folder}: an incomplete checkpoint (no {', '.join(missing)}); point `latest` "
                                  "at a complete step folder, or start anew with another --out")
    meta = transfer.read_metadata(folder / "model.safetensors")
    if not meta:
        raise hub.CheckpointError(f"{folder}/model.safetensors: not a checkpoint written by train.py")
    if meta["source"]["transformer_sha256"] != source["transformer_sha256"]:
        raise hub.CheckpointError(f"{folder}: trained on source weights {meta['source']['transformer_sha256'][:12]}…, "
                                  f"but --ckpt {source['id']} has {source['transformer_sha256'][:12]}…")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in each_tensor(folder / "model.safetensors"):
            params[name].copy_(shard_like(t, params[name]))
        if ema is not None:
            for name, t in each_tensor(folder / "ema.safetensors"):
                ema[name].copy_(shard_like(t, ema[name]))
    per_param, rng = {}, {}
    for key, t in each_tensor(folder / "state.safetensors"):
        if key.startswith("opt."):
            name, field = key[4:].rsplit(".", 1)
            per_param.setdefault(name, {})[field] = t if field == "step" else shard_like(t, params[name])
        else:
            rng[key] = t
    torch.set_rng_state(rng["rng.cpu"])
    for i in range(torch.cuda.device_count()):  # the devices both machines have (a run on 8 GPUs may resume on 4)
        if f"rng.cuda.{i}" in rng:
            torch.cuda.set_rng_state(rng[f"rng.cuda.{i}"], i)
    index = {n: i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    saved = optimizer.state_dict()
    saved["state"] = {index[n]: s for n, s in per_param.items()}
    optimizer.load_state_dict(saved)
    return meta["step"]


def check_resume(out: Path, args) -> Path | None:
    """The checkpoint to resume from, after checking the run-defining arguments did not change."""
    if not (out / "latest").is_file():
        return None
    name = (out / "latest").read_text().strip()
    if not STEP_FOLDER.match(name) or not (out / name).is_dir():
        raise ValueError(f"--out {out}: `latest` names {name!r}, which is not one of its step folders; point it "
                         "at one (ls the folder), or use another --out to start anew")
    saved_args = out / "args.json"
    try:
        recorded = json.loads(saved_args.read_text())
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"--out {out}: has checkpoints but no readable args.json, so the run it resumes cannot be "
                         "checked; use another --out to start anew") from None
    now = {k: str(v) for k, v in vars(args).items()}
    if recorded.get("global_batch") != now["global_batch"]:
        raise ValueError(f"--out {out} trains with a global batch of {recorded.get('global_batch')} images per step "
                         f"({recorded.get('world_size')} GPU(s) x --batch-size {recorded.get('batch_size')}), and a "
                         f"resume must keep it: GPUs x --batch-size must equal {recorded.get('global_batch')}, not "
                         f"{args.world_size} x {args.batch_size}; or use another --out to start anew")
    differ = [k for k in RUN_DEFINING if recorded.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"--out {out} is a run with other {', '.join(differ)}: use another --out to start anew")
    return out / name


def forget_logged_steps_after(log: Path, step: int) -> None:
    """On resume, drop log rows of steps after the checkpoint: they are trained again and logged anew."""
    if log.is_file():
        rows = [line for line in log.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        if len(kept) < len(rows):
            runtime.write_text_atomic(log, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------
# Memory: what one GPU holds while training, planned from configs alone (--dry-run)

TRANSIENT = ("activations", "FSDP gathered blocks", "optimizer step scratch")  # the rest is held all through a step


class LiveTensors(TorchDispatchMode):
    """Records each tensor storage the ops run inside it allocate, and when it is freed, so `peak` is the most bytes
    alive at once. A view shares its input's storage and adds nothing; tensors made before (parameters, the batch)
    are not counted. Works on real and on fake tensors alike."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, tuple[int, int]] = {}  # storage address -> (allocation number, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation number, +bytes when allocated or -bytes when freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                address = storage._cdata
                if storage.nbytes() and address not in inputs and address not in self.alive:
                    self.alive[address] = (len(self.events), storage.nbytes())
                    self.events.append(self.alive[address])
                    weakref.finalize(storage, self.freed, address)
        return out

    def freed(self, address: int) -> None:
        number, size = self.alive.pop(address)
        self.events.append((number, -size))

    def allocation(self, t: torch.Tensor) -> int | None:
        """The allocation number of a live tensor's storage (None if it was not allocated in here)."""
        entry = self.alive.get(t.untyped_storage()._cdata)
        return entry[0] if entry else None

    def peak(self, excluding: set = frozenset()) -> int:
        """The most bytes alive at once, leaving out the given allocations (e.g. the parameters' gradients)."""
        live = peak = 0
        for number, size in self.events:
            if number not in excluding:
                live += size
                peak = max(peak, live)
        return peak


def activation_bytes(model: PixelDiT, dtypes: dict[str, torch.dtype], height: int, width: int, batch: int,
                     caption_tokens: int, compute_dtype: torch.dtype, patch: int) -> int:
    """Peak bytes of a training step besides the parameters and their gradients, measured on a simulated step: a
    copy of `model` (meta) made of fake tensors (FakeTensorMode: shapes and dtypes, no memory, no arithmetic) runs
    the step's forward and backward at the real sizes, under the run's autocast and gradient checkpointing, while
    LiveTensors records what is alive. That is: what autograd keeps for the backward pass (without checkpointing,
    every op's saved inputs; with it, each block's inputs and the one block being recomputed), the Detailer Head's
    full-resolution maps, the bf16 copies autocast makes of float32 master weights (kept for the backward pass), and
    the gradients flowing back through the activations. The eager CPU kernels are what is simulated; CUDA's save the
    same tensors up to small extras (an attention kernel's random state)."""
    backbone, fake = model.cfg.backbone, deepcopy(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for prefix, module in fake.named_modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    dtype = dtypes[f"{prefix}.{name}" if prefix else name]
                    module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), p.requires_grad)
            for name, b in list(module._buffers.items()):  # loaded in the compute dtype, as the source's weights
                if b is not None:
                    dtype = compute_dtype if b.is_floating_point() else b.dtype
                    module._buffers[name] = torch.empty(b.shape, dtype=dtype)
        x0, noise = (torch.empty(batch, 3, height, width) for _ in range(2))
        if model.cfg.family == "zimage":  # text features arrive in the compute dtype, as TextFeatures gives them
            captions = [torch.empty(caption_tokens, backbone.cap_feat_dim, dtype=compute_dtype)] * batch
        else:
            captions = PooledText(torch.empty(batch, caption_tokens, backbone.joint_attention_dim, dtype=compute_dtype),
                                  torch.empty(batch, backbone.pooled_projection_dim, dtype=compute_dtype))
        guidance = torch.ones(batch) if getattr(backbone, "guidance_embeds", False) else None
        autocast = torch.autocast("cpu", dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
        with LiveTensors() as live:
            with autocast:
                loss = flow_matching_loss(fake, x0, noise, torch.full((batch,), 0.5), captions, patch, guidance)
            loss.backward()
            gradients = {live.allocation(p.grad) for p in fake.parameters() if p.grad is not None}
    return live.peak(excluding=gradients)


def gathered_block_bytes(model: PixelDiT, idle: set[str], compute_dtype: torch.dtype) -> int:
    """FSDP's transient memory: the root unit stays gathered through forward and backward, a block is gathered
    while it runs and the next is prefetched, and gradients exist whole (in the compute dtype, then float32 for the
    reduction) from a unit's backward until they are reduce-scattered: the root's, and one trained block's."""
    size, blocks = compute_dtype.itemsize, transformer_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = [p for name, p in model.named_parameters() if id(p) not in in_blocks and name not in idle]
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    trained = [n for block, n in zip(blocks, sizes) if any(p.requires_grad for p in block.parameters())]
    root_gradients = sum(p.numel() for p in root if p.requires_grad) * (size + 4)
    block_gradients = max(trained, default=0) * (size + 4)
    return sum(p.numel() for p in root) * size + root_gradients + 2 * max(sizes) * size + block_gradients


def memory_plan(model: PixelDiT, full_precision: set[str], parallel: str, world: int, height: int, width: int,
                batch: int, caption_tokens: int, compute_dtype: torch.dtype, patch: int) -> dict[str, int]:
    """Bytes one GPU holds for each part of a training step (under FSDP rank 0's shares, the largest). `model`: the
    pixel model on the meta device with its freeze plan, head tile and gradient checkpointing set as build_model
    leaves them. Weights, gradients and optimizer state are counted exactly; activations by activation_bytes."""
    fsdp, params = parallel == "fsdp", dict(model.named_parameters())
    dtypes = parameter_dtypes(model, full_precision, compute_dtype)
    idle = idle_parameters(model, patch)

    def held(name: str, dtype: torch.dtype) -> int:
        """A tensor's bytes, or under FSDP rank 0's shard: dim 0 split as torch.chunk does, rank 0's the largest."""
        p = params[name]
        rows = p.shape[0] if p.dim() else 1
        share = -(-rows // world) if fsdp and name not in idle else rows
        return p.numel() // rows * share * dtype.itemsize

    trained = [name for name, p in params.items() if p.requires_grad]
    stepped = [name for name in trained if name not in idle]  # the tensors that get gradients and AdamW state
    gradients = sum(held(name, torch.float32) for name in stepped)
    # buffers (SD3's position table) are loaded in the compute dtype; FSDP does not shard them
    buffers = sum(b.numel() * (compute_dtype if b.is_floating_point() else b.dtype).itemsize for b in model.buffers())
    return {
        "frozen weights": sum(held(name, dtypes[name]) for name, p in params.items() if not p.requires_grad) + buffers,
        "trained weights": sum(held(name, torch.float32) for name in trained),  # float32 masters
        "gradients": gradients,  # float32, as the masters
        # DDP all-reduces through buckets that hold a second float32 copy of every gradient
        "DDP gradient buckets": sum(params[n].numel() * 4 for n in trained) if parallel == "ddp" and world > 1 else 0,
        # AdamW: exp_avg and exp_avg_sq in float32, and a float32 step count per tensor
        "optimizer state": sum(2 * held(name, torch.float32) + 4 for name in stepped),
        "FSDP gathered blocks": gathered_block_bytes(model, idle, compute_dtype) if fsdp else 0,
        # under FSDP the blocks compute with weights in the compute dtype: no float32 masters, no autocast copies
        "activations": activation_bytes(model, {n: compute_dtype for n in params} if fsdp else dtypes, height, width,
                                        batch, caption_tokens, compute_dtype, patch),
        # the foreach AdamW step computes sqrt(exp_avg_sq) for every tensor at once: a float32 copy of the gradients
        "optimizer step scratch": gradients,
    }


def peak_bytes(parts: dict[str, int]) -> int:
    """What is held all through a step, plus the larger transient: the forward and backward passes' (activations,
    FSDP's gathered blocks) or the optimizer step's. An upper bound: gradients are counted whole through the backward
    pass, in which they grow from nothing."""
    held = sum(v for name, v in parts.items() if name not in TRANSIENT)
    return held + max(parts["activations"] + parts["FSDP gathered blocks"], parts["optimizer step scratch"])


def in_units(size: int) -> str:
    return f"{size / 2**30:8.2f} GiB" if size >= 2**30 else f"{size / 2**20:8.2f} MiB"


def dry_run(args) -> dict:
    """--dry-run: the memory plan per GPU from configs (and safetensors headers, for --init) alone, printed with the
    verdict against the GPU's memory. Returns {"parts", "peak", "gpu_memory" (None when unknown), "fits",
    "caption_tokens"}."""
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    compute_dtype = torch.bfloat16 if args.dtype == "auto" else runtime.DTYPES[args.dtype]  # as on CUDA
    head = parse_head(args.head, args.head_widths)
    full_precision = set()
    if args.init in ("transfer", "scratch"):
        source = hub.transformer_config(hub.resolve(args.ckpt, ["transformer/config.json"]) / "transformer")
        patches = (args.patch,) if head.layout != "1k" else (transfer.PIXEL_PATCH,)  # as build_model makes them
        cfg = transfer.pixel_config(source, head, patches, output=args.output, timestep_rule=args.timesteps or "exact")
    else:
        cfg, init_file = transfer.peek_config(args.init), transfer.checkpoint_file(args.init, ema=False)
        if transfer.read_metadata(init_file).get("kind") == "trained":  # as build_model keeps them: float32
            full_precision = transfer.tensor_names(init_file)
    with torch.device("meta"):
        model = PixelDiT(replace(cfg, patches=tuple(sorted(set(cfg.patches) | {args.patch}))))
    trainable, total = transfer.apply_freeze_plan(model, transfer.make_plan(args.freeze, args.blocks))
    model.head_tile = args.head_tile
    model.set_gradient_checkpointing(args.grad_ckpt != "off")
    corpus = None
    if args.h is None and args.w is None and args.data.exists():
        corpus = Corpus(args.data, args.patch, args.max_pixels, need_seeds=not args.fresh_noise)
        height, width = max(corpus.sizes, key=lambda size: size[0] * size[1])
    else:
        height, width = args.h or args.w or hub.DEFAULT_SIZE, args.w or args.h or hub.DEFAULT_SIZE
    runtime.check_size(height, width, max(args.patch, head.cell), "the patch and the Detailer Head's cell")
    caption_tokens = hub.text_tokens(cfg.backbone)
    if caption_tokens is None:  # Z-Image: as long as the corpus's longest prompt, else the most it encodes
        caption_tokens = ZIMAGE_MAX_TOKENS
        if corpus is not None:
            tokenizer = hub.load_tokenizer(hub.resolve(args.ckpt, ["tokenizer/*"]) / "tokenizer")
            caption_tokens = int(tokenizer([row["prompt"] for row in corpus.rows])[1].sum(1).max())
    parts = memory_plan(model, full_precision, args.parallel, world, height, width, args.batch_size, caption_tokens,
                        compute_dtype, args.patch)
    peak = peak_bytes(parts)
    capacity = int(args.gpu_memory * 2**30) if args.gpu_memory else \
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    print(f"memory per GPU: {args.parallel} on {world} GPU(s), {height}x{width}, batch {args.batch_size} per GPU "
          f"(global {world * args.batch_size}), {caption_tokens} caption tokens, {str(compute_dtype)[6:]}, gradient "
          f"checkpointing {'on' if args.grad_ckpt != 'off' else 'off'}; {args.freeze} plan: {trainable:,} of "
          f"{total:,} parameters trained", file=sys.stderr)
    for name, value in parts.items():
        print(f"  {name:<24} {in_units(value)}{'  (transient)' if name in TRANSIENT else ''}", file=sys.stderr)
    print(f"  {'peak':<24} {in_units(peak)}", file=sys.stderr)
    if capacity is None:
        print("no GPU here: give --gpu-memory GiB to check the fit", file=sys.stderr)
    else:
        print(f"{'fits' if peak <= capacity else 'does not fit'}: about {peak / 2**30:.1f} of {capacity / 2**30:.1f} "
              "GiB per GPU" + ("" if peak <= capacity else "; try --parallel fsdp, more GPUs or --grad-ckpt on"),
              file=sys.stderr)
    return {"parts": parts, "peak": peak, "gpu_memory": capacity, "fits": capacity is None or peak <= capacity,
            "caption_tokens": caption_tokens}


# ----------------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(hub.BUNDLED_SOURCE),
                   help="source model (hub id or diffusers folder) the pixel model starts from (default: the bundled "
                        "toy source)")
    p.add_argument("--data", type=Path, default=Path("data"),
                   help="corpus: a folder written by synth.py (metadata.jsonl), or a CSV with columns image, prompt, "
                        "seed (a .csv file, or a folder holding metadata.csv) as the official L2P dataset ships")
    p.add_argument("--max-pixels", type=positive_int,
                   help="CSV corpora: images larger than this are scaled down to it, as the official loader does "
                        f"(default {OFFICIAL_MAX_PIXELS}; --head 8k: 8 x the native side, squared)")
    p.add_argument("--image-size", type=positive_int,
                   help="train every image at SIDE x SIDE, resized to cover it and centre-cropped (default: each "
                        "image's own size; --head 4k / 10k: 4 / 10 x the native side, as their recipes)")
    p.add_argument("--out", type=Path, default=transfer.DEFAULT_RUN,
                   help="run folder: checkpoints, logs; resumed if present")
    p.add_argument("--steps", type=positive_int, help="total optimizer steps (default: recipe card, else 10000)")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per rank per step (default: card, else 1 as the paper x 8 GPUs). GPUs x --batch-size "
                        "is the global batch, which a resume keeps: a run may resume on other GPUs with the batch per "
                        "GPU changed to match (8 x 1 -> 4 x 2)")
    p.add_argument("--lr", type=positive_float, help=f"AdamW learning rate (default: card, else the paper's {PAPER_LR})")
    p.add_argument("--weight-decay", type=non_negative_float, default=PAPER_WEIGHT_DECAY,
                   help="AdamW weight decay (paper: 0.01)")
    p.add_argument("--warmup", type=non_negative_int,
                   help="linear warm-up steps, then constant (default: card, else 0 as the paper)")
    p.add_argument("--cooldown", type=non_negative_int,
                   help="the last K steps before --steps decay the lr linearly to 0 (warm-up, stable, decay), so a "
                        "resume with other --steps moves the decay; default: card, else 0 (the paper's constant lr)")
    p.add_argument("--clip", type=non_negative_float, default=0.0,
                   help="gradient-norm clipping; 0 = off (paper: off)")
    p.add_argument("--ema", type=unit_interval, default=0.0, help="EMA decay of the trained tensors, e.g. 0.999; 0 = off")
    p.add_argument("--freeze", choices=tuple(transfer.FREEZE_PLANS),
                   help="freeze plan: released, paper or full (default: card, else released)")
    p.add_argument("--blocks", type=non_negative_int,
                   help="main blocks trained at each end (default: card, else the paper's n = 5)")
    p.add_argument("--head", choices=HEAD_LAYOUTS,
                   help="Detailer Head layout: 1k (default: card, else 1k), or a high-resolution model's (4k, 8k, "
                        "10k: deeper heads for 4, 8, 10 x the native side at the native token grid), which also sets "
                        "that model's recipe where no flag does: its --patch, --train-grid 1000, --fresh-noise and "
                        "--image-size (4k, 10k) or --max-pixels (8k)")
    p.add_argument("--head-widths", help="Detailer Head channels per stage of the 1K head, which the high-resolution "
                                         "layouts extend (default: card, else 64,128,256,512)")
    p.add_argument("--init", default="transfer",
                   help="transfer: copy the source's weights (L2P); scratch: the same architecture at random init; "
                        "or an L2P checkpoint / run folder to continue from (e.g. a 1K model for 4K training; with "
                        "another --head layout, every tensor whose name and shape it holds is copied)")
    p.add_argument("--patch", type=positive_int,
                   help="pixel patch to train at: 16 at the native size (default); 64 at 4x keeps the token grid "
                        "(paper 4K); default with --head: that model's (64, 128, 160)")
    p.add_argument("--patch-init", default="downsampled", choices=("downsampled", "random"),
                   help="a new large-patch embedder: a smaller trained one (16 px; 64 px for 8K) on area-downsampled "
                        "pixels, or default init (a new model from a latent source has its own at default init)")
    p.add_argument("--head-tile", type=positive_int, help="Detailer Head tile in pixels (bounds full-resolution memory)")
    p.add_argument("--output", default="detailer", choices=("detailer", "linear"),
                   help="detailer: the Detailer Head (L2P); linear: a per-patch linear output layer instead")
    p.add_argument("--train-shift", type=positive_float, default=TRAIN_SHIFT,
                   help="shift of the training sigma grid (the released 3; lower trains more at low noise)")
    p.add_argument("--train-grid", type=positive_int,
                   help=f"points of the training sigma grid (default {TRAIN_GRID} as the 1K release; --head 4k / 8k / "
                        f"10k: {HIGH_RES_GRID} as theirs)")
    p.add_argument("--timesteps", choices=TIMESTEP_RULES,
                   help="exact (default for a new model): the model sees exact times and sigma is uniform on the grid; "
                        "official: as the released code trains, times rounded to bfloat16 and sigma snapped to the "
                        "252 grid points that rounding reaches (Z-Image only). Recorded, and sampling uses the same. "
                        "Default with --init CKPT: that model's rule")
    p.add_argument("--fresh-noise", action=argparse.BooleanOptionalAction,
                   help="new noise every step instead of one per image (default: off; --head 4k / 8k / 10k: on)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, sigmas and new layers' init")
    p.add_argument("--grad-ckpt", default="auto", choices=("auto", "on", "off"),
                   help="gradient checkpointing: auto (on with CUDA), on, off")
    p.add_argument("--text-cache", type=Path, help="folder caching prompt features (the encoder then loads once)")
    p.add_argument("--save-every", type=positive_int, default=1000, help="checkpoint every K steps (and at the end)")
    p.add_argument("--keep", type=non_negative_int, default=3, help="checkpoints kept; 0 = all")
    p.add_argument("--log-every", type=positive_int, default=10, help="log every K steps")
    p.add_argument("--device", default="auto", help="auto (CUDA device LOCAL_RANK when present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                   help="compute dtype: auto (bf16 autocast on CUDA and on CPUs that compute bf16 natively, AMX or "
                        "AVX512-BF16; fp32 on other CPUs), bf16, fp16, fp32")
    p.add_argument("--parallel", default="ddp", choices=PARALLEL,
                   help="how ranks under torchrun share the model. ddp (default; one GPU runs the plain model): every "
                        "GPU holds all of it: frozen weights, trained fp32 master weights, their gradients and AdamW "
                        "moments. fsdp (FSDP2, PyTorch's ZeRO-3): each GPU holds 1/N of every tensor, gradient and "
                        "moment, and gathers one transformer block at a time in the compute dtype; checkpoints are the "
                        "same either way, so a resume may switch")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory one GPU needs (weights, gradients, optimizer state, activations, peak) for "
                        "these flags and whether it fits, from configs alone (no weights read), then exit. Planned for "
                        "CUDA: --dtype auto means bf16, --grad-ckpt auto means on")
    p.add_argument("--world-size", type=positive_int,
                   help="--dry-run: the number of GPUs to plan for (default: WORLD_SIZE as torchrun sets it, else 1)")
    p.add_argument("--h", type=positive_int, help="--dry-run: image height (default: the corpus's largest size if "
                                                  "--data exists, else 1024)")
    p.add_argument("--w", type=positive_int, help="--dry-run: image width (default: as --h)")
    p.add_argument("--gpu-memory", type=positive_float,
                   help="--dry-run: GiB per GPU to check the plan against (default: this machine's first GPU)")
    return p.parse_args(argv)


def parse_head(layout: str, text: str) -> HeadConfig:
    """--head and --head-widths -> the head (model.head_layout)."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != len(HEAD_WIDTHS) or min(widths) < 1:
        raise ValueError(f"--head-widths {text!r}: expected {len(HEAD_WIDTHS)} comma-separated positive integers")
    if layout != "1k" and widths[0] % 4:
        raise ValueError(f"--head-widths {text!r}: --head {layout} has outer levels a quarter and a half of the first "
                         "width, so it must be a multiple of 4")
    return head_layout(layout, widths)


def resolved_args(argv=None) -> argparse.Namespace:
    """The flags, with every unset one filled: the recipe card's, else the paper's; for a high-resolution head its
    own recipe (high_res_recipe); an --init run keeps its head layout unless --head says otherwise."""
    args = parse_args(argv)
    card = hub.recipe_card(args.ckpt)
    if args.head is None and args.init not in ("transfer", "scratch"):  # an earlier stage keeps its own layout
        args.head = transfer.peek_config(args.init).head.layout
    runtime.fill_unset(args, hub.recipe_defaults(card, "train", PAPER_DEFAULTS))
    if args.head != "1k":
        runtime.fill_unset(args, high_res_recipe(args.head, card.get("size", [hub.DEFAULT_SIZE])[0]))
    runtime.fill_unset(args, BASE_DEFAULTS)
    return args


def train(argv=None) -> dict:
    """Returns {"step", "losses": [per-step loss averaged over ranks], "out", "stopped": the signal that stopped
    the run early, or None}."""
    args = resolved_args(argv)
    if args.dry_run:
        return dry_run(args)
    planning = [flag for flag in ("world_size", "h", "w", "gpu_memory") if getattr(args, flag) is not None]
    if planning:
        raise ValueError(f"--{planning[0].replace('_', '-')} plans a --dry-run: a training run takes its GPUs from "
                         "torchrun and its image sizes from the corpus")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.world_size, args.global_batch = world, world * args.batch_size
    plan = transfer.make_plan(args.freeze, args.blocks)
    head = parse_head(args.head, args.head_widths)
    if args.head_tile and args.head_tile % head.cell:
        raise ValueError(f"--head-tile {args.head_tile}: must be a multiple of {head.cell}")
    # every side a multiple of the patch (the token grid) and of the head's cell (its bottleneck grid)
    multiple = math.lcm(args.patch, head.cell)
    if args.image_size and args.image_size % multiple:
        raise ValueError(f"--image-size {args.image_size}: must be a multiple of {multiple} (the {args.patch}-px patch "
                         f"and the {args.head} head's {head.cell}-px cell)")
    corpus = Corpus(args.data, multiple, args.max_pixels, need_seeds=not args.fresh_noise, size=args.image_size)
    if len(corpus.sizes) > 1 and args.batch_size > 1:
        raise ValueError(f"--data {args.data}: images train at {len(corpus.sizes)} sizes (e.g. {corpus.sizes[:3]}) "
                         "and a batch needs one: use --batch-size 1 (per GPU, as the paper)")
    if args.text_cache:
        runtime.writable_folder(args.text_cache, "--text-cache")
    out = runtime.writable_folder(args.out)
    device, compute_dtype = runtime.pick_device_dtype(args.device, args.dtype, bf16_on_cpu=True)
    with ExitStack() as stack:
        if rank == 0:
            stack.enter_context(runtime.folder_lock(out))
        resume_from = check_resume(out, args)
        if world > 1 or args.parallel == "fsdp":  # FSDP shards over a process group, even one of a single rank
            alone = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
            stack.enter_context(runtime.process_group("nccl" if device.type == "cuda" else "gloo", **alone))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if rank == 0 and resume_from is None:
            runtime.write_text_atomic(out / "args.json", json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
        return run(args, rank, world, device, compute_dtype, plan, head, corpus, out, resume_from)


def build_model(args, plan, head, source, device, compute_dtype, verbose: bool):
    """source -> transfer (or an earlier L2P stage), with the patch embedder to train. Trained tensors in float32
    (master weights), and those an earlier stage trained; other frozen ones in the compute dtype. Returns the
    model and the names of frozen tensors the checkpoints keep (what an earlier stage changed).

    A high-resolution head layout holds one embedder, its patch's, as the releases do. An earlier stage of
    another layout (1K -> 4K, 4K -> 8K or 10K) passes on every tensor whose name and shape fit (transfer.inherit);
    its embedder first grows the new patch (downsampled from a dividing one, or --patch-init random)."""
    keep, full_precision = (), set()
    high_res = head.layout not in (None, "1k")
    patches = (args.patch,) if high_res else (transfer.PIXEL_PATCH,)
    if args.init in ("transfer", "scratch"):
        model = transfer.transfer(source.transformer, plan, head, seed=args.seed, verbose=verbose,
                                  copy=args.init == "transfer", output=args.output,
                                  timestep_rule=args.timesteps or "exact", patches=patches)
    else:
        model, meta = transfer.load_pixel_model(args.init, torch.float32, device)
        recorded = meta["source"].get("transformer_sha256")
        if recorded and recorded != source.transformer_sha256:
            raise hub.CheckpointError(f"--init {args.init}: built on other source weights than --ckpt {args.ckpt}")
        if args.timesteps and args.timesteps != model.cfg.timestep_rule:
            raise ValueError(f"--timesteps {args.timesteps}: --init {args.init} was trained with "
                             f"{model.cfg.timestep_rule} timesteps, and keeps them")
        # What the earlier stage changed stays in our checkpoints even where this stage freezes it, exactly: its
        # trained tensors stay float32 (a standalone file's are cast like the source's; it is bf16 by default).
        if meta["kind"] == "trained":
            keep = full_precision = transfer.tensor_names(transfer.checkpoint_file(args.init, ema=False))
        else:
            keep = set(dict(model.named_parameters()))
        if head.layout != model.cfg.head.layout:
            grown = transfer.add_patch_sizes(model, (args.patch,), args.patch_init)
            cfg = replace(model.cfg, head=head, patches=patches if high_res else grown.cfg.patches)
            model = transfer.inherit(grown, cfg, seed=args.seed, verbose=verbose)
            names = set(dict(model.named_parameters()))
            keep, full_precision = keep & names, full_precision & names
        transfer.apply_freeze_plan(model, plan)
    model = transfer.add_patch_sizes(model, (args.patch,), args.patch_init)
    model.head_tile = args.head_tile
    dtypes = parameter_dtypes(model, full_precision, compute_dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(device, dtypes[name])
    model.set_gradient_checkpointing(args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and device.type == "cuda"))
    return model.train(), keep


def parameter_dtypes(model: PixelDiT, full_precision: set[str], compute_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Trained tensors, and frozen ones an earlier stage trained, stay float32 (master weights); other frozen tensors
    take the compute dtype."""
    return {name: torch.float32 if p.requires_grad or name in full_precision else compute_dtype
            for name, p in model.named_parameters()}


def run(args, rank, world, device, compute_dtype, plan, head, corpus, out, resume_from) -> dict:
    source = hub.load_pipeline(args.ckpt, compute_dtype, device, parts=("transformer",))
    if rank == 0:
        report_corpus(corpus, args.data, source)
    model, keep = build_model(args, plan, head, source, device, compute_dtype, verbose=rank == 0)
    del source.transformer
    net = parallelize(model, args.parallel, world, device, compute_dtype, args.patch)  # FSDP: `model` now holds shards
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if args.ema > 0 else None
    step = load_checkpoint(resume_from, model, optimizer, ema, source.source) if resume_from else 0
    if resume_from and rank == 0:
        forget_logged_steps_after(out / "log.jsonl", step)
        print(f"resuming {resume_from} at step {step}", file=sys.stderr)
    text = TextFeatures(args.ckpt, compute_dtype, device, args.text_cache)

    stop = {"signal": 0}
    previous_handlers = {sig: signal.signal(sig, lambda signum, _: stop.update(signal=signum))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        losses = run_steps(args, step, net, model, plan, source.source, optimizer, ema, corpus, text, device,
                           compute_dtype, out, rank, world, stop, keep)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return {"step": step + len(losses), "losses": losses, "out": out, "stopped": stop["signal"] or None}


def report_corpus(corpus: Corpus, location: Path, source: hub.LatentPipeline) -> None:
    """What a user should know about the corpus before hours of training: repeats, and another source."""
    print(f"corpus: {len(corpus)} images at {len(corpus.sizes)} size(s), e.g. {corpus.sizes[0][0]}x{corpus.sizes[0][1]}",
          file=sys.stderr)
    if corpus.duplicates:
        print(f"warning: --data {location}: {corpus.duplicates} rows name an image another row names too; they are "
              "trained on as often as they are listed", file=sys.stderr)
    foreign = [h for h in corpus.sources if h != source.transformer_sha256]
    if foreign:
        print(f"warning: --data {location}: made by a source whose transformer weights hash to {foreign[0][:12]}…, "
              f"not --ckpt {source.name} ({(source.transformer_sha256 or '')[:12]}…): L2P trains on the source's own "
              "images", file=sys.stderr)


def learning_rate(step: int, args) -> float:
    """Linear warm-up over --warmup steps, constant, then a linear cool-down to 0 over the last --cooldown
    steps (the warm-up-stable-decay schedule); the paper's is constant."""
    scale = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    if args.cooldown:
        scale = min(scale, (args.steps - step) / args.cooldown)
    return args.lr * scale


def load_batch(corpus: Corpus, batch, args, step: int, sigmas: torch.Tensor):
    """Images, sigmas and noise of this rank's share of a step, every draw from (seed, step, position)."""
    x0 = torch.stack([corpus.image(i) for _, i in batch])
    draws = [torch.Generator().manual_seed(sample_seed(args.seed, step, position)) for position, _ in batch]
    sigma = torch.stack([sigmas[torch.randint(len(sigmas), (), generator=g)] for g in draws])
    if args.fresh_noise:
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws])
    else:  # one noise per image, salted so it is not the noise its seed gave the source when synthesising it
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
            sample_seed(NOISE_SALT, corpus.rows[i]["seed"]))) for _, i in batch])
    return x0, sigma, noise


def run_steps(args, step, net, model, plan, source, optimizer, ema, corpus, text, device, compute_dtype, out,
              rank, world, stop, keep=()) -> list[float]:
    """The training loop from `step` to --steps; returns the per-step losses averaged over ranks."""
    trained = [p for p in model.parameters() if p.requires_grad]
    sigmas = training_sigmas(args.train_shift, model.cfg.timestep_rule, args.train_grid)
    # bf16/fp16 autocast (on CUDA by default; `--dtype bf16` runs the same path on CPU)
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    losses, tick, tick_step, saved_step = [], time.time(), step, step
    while step < args.steps:
        batch = global_batch(step, args.global_batch, len(corpus), args.seed)[rank * args.batch_size:(rank + 1) * args.batch_size]
        try:
            x0, sigma, noise = load_batch(corpus, batch, args, step, sigmas)
            failure = None
        except ValueError as e:  # an image that will not decode: stop cleanly, with the steps so far saved
            failure = e
        if any_rank(failure is not None, world, device):
            if step > saved_step:
                saved = save_checkpoint(out, step, model, plan, source, optimizer, ema, args, keep, rank)
                if rank == 0:
                    print(f"saved {saved}", file=sys.stderr)
            raise failure or ValueError("another rank met an image it cannot decode (see its error)")
        captions = text([corpus.rows[i]["prompt"] for _, i in batch])
        # a guidance-distilled source is trained with the guidance embedding each image was synthesised with
        guidance = torch.tensor([float(corpus.rows[i]["guidance"]) for _, i in batch], device=device) \
            if getattr(model.cfg.backbone, "guidance_embeds", False) else None
        with autocast:
            loss = flow_matching_loss(net, x0.to(device), noise.to(device), sigma.to(device), captions, args.patch,
                                      guidance)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, args.clip)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        ema[name].lerp_(p, 1 - args.ema)
        step += 1

        mean_loss, signum = reduce_over_ranks(loss.item(), stop["signal"], world, device)
        losses.append(mean_loss)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            elapsed = (time.time() - tick) / (step - tick_step)
            row = {"step": step, "loss": losses[-1], "lr": optimizer.param_groups[0]["lr"], "step_s": elapsed,
                   "images_per_s": args.global_batch / elapsed,
                   "peak_memory_gb": runtime.peak_memory(device) / 2**30}
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr)
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
            tick, tick_step = time.time(), step
        stopping = signum > 0
        if step % args.save_every == 0 or step == args.steps or stopping:
            saved = save_checkpoint(out, step, model, plan, source, optimizer, ema, args, keep, rank)
            if rank == 0:
                print(f"saved {saved}", file=sys.stderr)
            saved_step = step
            if world > 1:
                dist.barrier()  # no rank runs ahead of (or exits before) a checkpoint being written
        if stopping:
            stop["signal"] = stop["signal"] or signum
            print(f"stopped at step {step} (checkpoint saved); rerun the same command to resume", file=sys.stderr)
            break
    return losses


def any_rank(flag: bool, world: int, device) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)  # on the device: nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] > 0)


def reduce_over_ranks(loss: float, signum: int, world: int, device) -> tuple[float, int]:
    """The step's loss averaged over ranks, and a stop signal any rank received."""
    if world == 1:
        return loss, signum
    t, stop = torch.tensor([loss], device=device), torch.tensor([signum], device=device)
    dist.all_reduce(t)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return float(t[0]) / world, int(stop[0])


def main(argv=None) -> dict:
    result = train(argv)
    if result.get("stopped"):
        raise SystemExit(runtime.EXIT_SIGNAL_BASE + result["stopped"])
    return result


if __name__ == "__main__":
    runtime.run_cli(main)
