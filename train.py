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
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel

import hub
import runtime
import transfer
from model import HEAD_LAYOUTS, HEAD_WIDTHS, TIMESTEP_RULES, TRAIN_TIMESTEPS, HeadConfig, head_layout, shift_sigmas
from runtime import non_negative_float, non_negative_int, positive_float, positive_int, unit_interval
from tokenizer import conditioning_from_parts, conditioning_parts

TRAIN_GRID = 500  # the released loss calls set_timesteps(500) and draws one index uniformly
TRAIN_SHIFT = 3.0
PAPER_LR, PAPER_WEIGHT_DECAY = 5e-5, 0.01  # paper Table 3, AdamW
# Arguments that define a run: a resume must repeat them (the rest, like --steps, may change).
RUN_DEFINING = ("ckpt", "data", "batch_size", "world_size", "lr", "weight_decay", "warmup", "cooldown", "clip", "ema",
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
# Checkpoints


def save_checkpoint(out: Path, step: int, model, plan, source: dict, optimizer, ema: dict | None, args, keep=()) -> Path:
    """step-NNNNNN/ with model, EMA and state files, written into a fresh temporary folder then renamed, so a
    published step folder is always complete; then `latest`, then old step folders pruned (--keep)."""
    name = f"step-{step:06d}"
    tmp = out / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    transfer.save_trained(tmp / "model.safetensors", model, plan, source, keep=keep, step=step)
    if ema is not None:
        transfer.save_trained(tmp / "ema.safetensors", model, plan, source, tensors=ema, keep=keep, step=step)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    for p, s in optimizer.state.items():
        state |= {f"opt.{names[id(p)]}.{k}": v for k, v in s.items()}
    transfer.atomic_save(state, tmp / "state.safetensors", {"format": transfer.CHECKPOINT_FORMAT, "kind": "state",
                                                            "step": step, "data_position": step * args.global_batch})
    final = out / name
    if final.exists():  # a checkpoint of this step from an interrupted earlier save
        shutil.rmtree(final)
    tmp.rename(final)
    runtime.write_text_atomic(out / "latest", name)
    steps = sorted(p for p in out.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name))
    for old in steps[: -args.keep] if args.keep > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, model, optimizer, ema: dict | None, source: dict, device) -> int:
    """Restore trained tensors, EMA, optimizer state and RNG states; returns the step to continue from."""
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
        for name, t in hub.read_tensors(folder / "model.safetensors", device).items():
            params[name].copy_(t)
        if ema is not None:
            for name, t in hub.read_tensors(folder / "ema.safetensors", device).items():
                ema[name].copy_(t)
    state = hub.read_tensors(folder / "state.safetensors")
    torch.set_rng_state(state["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda.0" in state:
        torch.cuda.set_rng_state_all([state[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    per_param = {}
    for key, t in state.items():
        if key.startswith("opt."):
            name, field = key[4:].rsplit(".", 1)
            per_param.setdefault(name, {})[field] = t
    index = {n: i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    saved = optimizer.state_dict()
    saved["state"] = {index[n]: {k: v.to(device) if k != "step" else v for k, v in s.items()}
                      for n, s in per_param.items()}
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
                   help="images per rank per step (default: card, else 1 as the paper x 8 GPUs)")
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


def train(argv=None) -> dict:
    """Returns {"step", "losses": [per-step loss averaged over ranks], "out", "stopped": the signal that stopped
    the run early, or None}."""
    args = parse_args(argv)
    card = hub.recipe_card(args.ckpt)
    if args.head is None and args.init not in ("transfer", "scratch"):  # an earlier stage keeps its own layout
        args.head = transfer.peek_config(args.init).head.layout
    runtime.fill_unset(args, hub.recipe_defaults(card, "train", PAPER_DEFAULTS))
    if args.head != "1k":
        runtime.fill_unset(args, high_res_recipe(args.head, card.get("size", [hub.DEFAULT_SIZE])[0]))
    runtime.fill_unset(args, BASE_DEFAULTS)
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
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            stack.callback(dist.destroy_process_group)
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
    for name, p in model.named_parameters():
        p.data = p.data.to(device, torch.float32 if p.requires_grad or name in full_precision else compute_dtype)
    model.set_gradient_checkpointing(args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and device.type == "cuda"))
    return model.train(), keep


def run(args, rank, world, device, compute_dtype, plan, head, corpus, out, resume_from) -> dict:
    source = hub.load_pipeline(args.ckpt, compute_dtype, device, parts=("transformer",))
    if rank == 0:
        report_corpus(corpus, args.data, source)
    model, keep = build_model(args, plan, head, source, device, compute_dtype, verbose=rank == 0)
    del source.transformer
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if args.ema > 0 else None
    step = load_checkpoint(resume_from, model, optimizer, ema, source.source, device) if resume_from else 0
    if resume_from and rank == 0:
        forget_logged_steps_after(out / "log.jsonl", step)
        print(f"resuming {resume_from} at step {step}", file=sys.stderr)
    # Some trained tensors can sit out a step (the image pad token when h*w is a multiple of 32).
    net = DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
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
            if rank == 0 and step > saved_step:
                print(f"saved {save_checkpoint(out, step, model, plan, source, optimizer, ema, args, keep)}",
                      file=sys.stderr)
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
            if rank == 0:
                saved = save_checkpoint(out, step, model, plan, source, optimizer, ema, args, keep)
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
    if result["stopped"]:
        raise SystemExit(runtime.EXIT_SIGNAL_BASE + result["stopped"])
    return result


if __name__ == "__main__":
    runtime.run_cli(main)
