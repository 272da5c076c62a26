"""Train the pixel model with the source's own objective (paper section 3.3, Eq. 5), on many GPUs.

    torchrun --nproc_per_node 8 train.py --ckpt Tongyi-MAI/Z-Image-Turbo --data data --out runs/l2p

Objective: x_sigma = (1 - sigma) x0 + sigma noise, target noise - x0, plain MSE in float32. sigma is uniform
over the released 500-point grid linspace(1, 0, 501)[:-1], shifted by 3. The noise of an image is fixed by
its metadata seed (as the released code does; `--fresh-noise` draws new noise each step).

Every random choice is a pure function of (--seed, step, position in the global batch): the data order
(one permutation per epoch), each sample's sigma and fresh noise. So 2 ranks at batch 1 see exactly what
1 rank at batch 2 sees, and a resumed run continues exactly where it stopped. A checkpoint folder
`step-NNNNNN/` holds the trained tensors (model.safetensors, the EMA in ema.safetensors) and the optimizer
state, step and RNG states (state.safetensors); `latest` names the newest. Rerunning the same command
resumes; SIGINT / SIGTERM saves a checkpoint at the end of the current step before exiting.
"""

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

import hub
import sample
import synth
import transfer
from model import HEAD_WIDTHS
from tokenizer import conditioning_from_parts, conditioning_parts

TRAIN_GRID = 500  # the released loss calls set_timesteps(500) and draws one index uniformly
TRAIN_SHIFT = 3.0
PAPER_LR, PAPER_WEIGHT_DECAY = 5e-5, 0.01  # paper Table 3, AdamW
# Arguments that define a run: a resume must repeat them (the rest, like --steps, may change).
RUN_DEFINING = ("ckpt", "data", "batch_size", "world_size", "lr", "weight_decay", "warmup", "cooldown", "clip", "ema",
                "freeze", "blocks", "head_widths", "init", "output", "patch", "patch_init", "seed", "fresh_noise",
                "train_shift")
PAPER_DEFAULTS = {"steps": 10000, "batch_size": 1, "lr": PAPER_LR, "warmup": 0, "cooldown": 0, "freeze": "released",
                  "blocks": 5, "head_widths": ",".join(map(str, HEAD_WIDTHS))}


# ----------------------------------------------------------------------------------------------------
# Data


class Corpus:
    """The synthesised images and their metadata rows (synth.py's metadata.jsonl)."""

    def __init__(self, folder: Path):
        path = folder / "metadata.jsonl"
        if not path.is_file():
            raise ValueError(f"--data {folder}: no metadata.jsonl (make the corpus with synth.py first)")
        self.folder = folder
        self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.rows:
            raise ValueError(f"--data {path}: holds no rows")
        missing = [r["file"] for r in self.rows if not (folder / r["file"]).is_file()]
        if missing:
            raise ValueError(f"--data {folder}: {len(missing)} images named in metadata.jsonl are missing, "
                             f"e.g. {missing[:3]}")
        sizes = {(r["height"], r["width"]) for r in self.rows}
        if len(sizes) != 1:
            raise ValueError(f"--data {folder}: images of several sizes {sorted(sizes)}; batches need one size")
        self.height, self.width = sizes.pop()

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1]."""
        array = np.asarray(Image.open(self.folder / self.rows[i]["file"]).convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1


def sample_seed(*parts: int) -> int:
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


def training_sigmas(shift: float = TRAIN_SHIFT) -> torch.Tensor:
    """The released training grid: linspace(1, 0, 501)[:-1] = {1, 0.998, ..., 0.002}, shifted."""
    return sample.shift_sigmas(torch.linspace(1.0, 0.0, TRAIN_GRID + 1)[:-1], shift)


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, captions,
                       patch: int | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """Paper Eq. 5: MSE between the predicted velocity at x_sigma and noise - x0, in float32. `guidance`: the
    embedded guidance scale a guidance-distilled source (FLUX.1-dev) made each image with."""
    s = sigma[:, None, None, None]
    extra = {} if guidance is None else {"guidance": guidance}
    velocity = model((1 - s) * x0 + s * noise, sigma, captions, patch, **extra)
    return F.mse_loss(velocity.float(), (noise - x0).float())


class TextFeatures:
    """Prompt features without gradients, from the source's text encoder, optionally cached on disk. With a
    complete cache the encoder is never loaded."""

    def __init__(self, ckpt: str, dtype, device, cache: Path | None):
        self.ckpt, self.dtype, self.device, self.cache = ckpt, dtype, device, cache
        self.text = None
        if cache:
            cache.mkdir(parents=True, exist_ok=True)

    def path(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.ckpt}\n{prompt}".encode()).hexdigest()[:32]
        return self.cache / f"{key}.safetensors"

    def encode(self, prompts: list[str]):
        if self.text is None:
            self.text = hub.load_pipeline(self.ckpt, self.dtype, self.device, parts=("text",)).text
        return self.text(prompts)

    def __call__(self, prompts: list[str]):
        """The conditioning the backbone takes (tokenizer.ZImageText / SD3Text / FluxText output)."""
        if not self.cache:
            return self.encode(prompts)
        misses = [p for p in prompts if not self.path(p).is_file()]
        for prompt, part in zip(misses, conditioning_parts(self.encode(misses)) if misses else []):
            transfer.atomic_save(part, self.path(prompt), {"format": "text-features"})
        return conditioning_from_parts([{k: t.to(self.dtype) for k, t in hub.read_tensors(self.path(p), self.device).items()}
                                        for p in prompts])


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step: int, model, plan, source: dict, optimizer, ema: dict | None, args, keep=()) -> Path:
    """step-NNNNNN/ with model, EMA and state files, written to a temporary folder then renamed; then `latest`."""
    name = f"step-{step:06d}"
    tmp = out / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
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
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)
    sample.write_text_atomic(out / "latest", name)
    for old in sorted(out.glob("step-*"))[: -args.keep] if args.keep > 0 else []:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return final


def load_checkpoint(folder: Path, model, optimizer, ema: dict | None, source: dict, device) -> int:
    """Restore trained tensors, EMA, optimizer state and RNG states; returns the step to continue from."""
    meta = transfer.read_metadata(folder / "model.safetensors")
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


# ----------------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(synth.BUNDLED_SOURCE),
                   help="source model (hub id or diffusers folder) the pixel model starts from (default: the bundled "
                        "toy source)")
    p.add_argument("--data", type=Path, default=Path("data"), help="corpus folder written by synth.py")
    p.add_argument("--out", type=Path, default=sample.DEFAULT_RUN, help="run folder: checkpoints, logs; resumed if present")
    p.add_argument("--steps", type=int, help="total optimizer steps (default: recipe card, else 10000)")
    p.add_argument("--batch-size", type=int, help="images per rank per step (default: card, else 1 as the paper x 8 GPUs)")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default: card, else the paper's {PAPER_LR})")
    p.add_argument("--weight-decay", type=float, default=PAPER_WEIGHT_DECAY, help="AdamW weight decay (paper: 0.01)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant (default: card, else 0 as the paper)")
    p.add_argument("--cooldown", type=int,
                   help="the last K steps before --steps decay the lr linearly to 0 (warm-up, stable, decay), so a "
                        "resume with other --steps moves the decay; default: card, else 0 (the paper's constant lr)")
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping; 0 = off (paper: off)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained tensors, e.g. 0.999; 0 = off")
    p.add_argument("--freeze", help="freeze plan: released, paper or full (default: card, else released)")
    p.add_argument("--blocks", type=int, help="main blocks trained at each end (default: card, else the paper's n = 5)")
    p.add_argument("--head-widths", help="Detailer Head channels per stage (default: card, else 64,128,256,512)")
    p.add_argument("--init", default="transfer",
                   help="transfer: copy the source's weights (L2P); scratch: the same architecture at random init; "
                        "or an L2P checkpoint / run folder to continue from (e.g. a 1K model for 4K training)")
    p.add_argument("--patch", type=int, default=transfer.PIXEL_PATCH,
                   help="pixel patch to train at: 16 at the native size; 64 at 4x keeps the token grid (paper 4K)")
    p.add_argument("--patch-init", default="downsampled", choices=("downsampled", "random"),
                   help="a new large-patch embedder: the 16-px one on area-downsampled pixels, or default init")
    p.add_argument("--head-tile", type=int, help="Detailer Head tile in pixels (bounds full-resolution memory)")
    p.add_argument("--output", default="detailer", choices=("detailer", "linear"),
                   help="detailer: the Detailer Head (L2P); linear: a per-patch linear output layer instead")
    p.add_argument("--train-shift", type=float, default=TRAIN_SHIFT,
                   help="shift of the training sigma grid (the released 3; lower trains more at low noise)")
    p.add_argument("--fresh-noise", action="store_true", help="new noise every step instead of the image's seed")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, sigmas and new layers' init")
    p.add_argument("--grad-ckpt", default="auto", help="gradient checkpointing: auto (on with CUDA), on, off")
    p.add_argument("--text-cache", type=Path, help="folder caching prompt features (the encoder then loads once)")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every K steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept; 0 = all")
    p.add_argument("--log-every", type=int, default=10, help="log every K steps")
    p.add_argument("--device", default="auto", help="auto (CUDA device LOCAL_RANK when present), cpu")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 autocast on CUDA and on CPUs that compute "
                                                   "bf16 natively, AMX or AVX512-BF16; fp32 on other CPUs), bf16, fp16, fp32")
    return p.parse_args(argv)


def check_resume(out: Path, args) -> Path | None:
    """The checkpoint to resume from, after checking the run-defining arguments did not change."""
    saved_args = out / "args.json"
    if not (out / "latest").is_file():
        return None
    recorded = json.loads(saved_args.read_text())
    now = {k: str(v) for k, v in vars(args).items()}
    differ = [k for k in RUN_DEFINING if recorded.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"--out {out} is a run with other {', '.join(differ)}: use another --out to start anew")
    return out / (out / "latest").read_text().strip()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def train(argv=None) -> dict:
    """Returns {"step", "losses": [per-step loss averaged over ranks], "out"}."""
    args = parse_args(argv)
    card = hub.recipe_card(args.ckpt).get("train", {})
    for key, value in PAPER_DEFAULTS.items():  # unset flags: the source's recipe card, else the paper
        if getattr(args, key) is None:
            setattr(args, key, card.get(key, value))
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    args.world_size, args.global_batch = world, world * args.batch_size
    if min(args.steps, args.batch_size, args.save_every, args.log_every) < 1:
        raise ValueError("--steps, --batch-size, --save-every and --log-every must be at least 1")
    if min(args.warmup, args.cooldown) < 0:
        raise ValueError("--warmup and --cooldown must be at least 0")
    plan = transfer.make_plan(args.freeze, args.blocks)
    try:
        head_widths = tuple(int(w) for w in args.head_widths.split(","))
    except ValueError:
        raise ValueError(f"--head-widths {args.head_widths!r}: expected 4 comma-separated integers") from None
    corpus = Corpus(args.data)
    sample.check_size(corpus.height, corpus.width, args.patch, f"corpus images in {args.data}")
    out = sample.writable_folder(args.out)
    resume_from = check_resume(out, args)
    device = torch.device(f"cuda:{local_rank}" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    _, compute_dtype = sample.pick_device_dtype(str(device), args.dtype, bf16_on_cpu=True)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank == 0 and resume_from is None:
        sample.write_text_atomic(out / "args.json", json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))

    # The model: source -> transfer (or an earlier L2P stage). Trained tensors in float32 (master weights), and
    # those an earlier stage trained; other frozen ones in the compute dtype.
    source = hub.load_pipeline(args.ckpt, compute_dtype, device, parts=("transformer",))
    keep, full_precision = (), set()
    if args.init in ("transfer", "scratch"):
        model = transfer.transfer(source.transformer, plan, head_widths, seed=args.seed, verbose=rank == 0,
                                  copy=args.init == "transfer", output=args.output)
    else:
        model, meta = transfer.load_pixel_model(args.init, torch.float32, device)
        recorded = meta["source"].get("transformer_sha256")
        if recorded and recorded != source.transformer_sha256:
            raise hub.CheckpointError(f"--init {args.init}: built on other source weights than --ckpt {args.ckpt}")
        # What the earlier stage changed stays in our checkpoints even where this stage freezes it, exactly: its
        # trained tensors stay float32 (a standalone file's are cast like the source's; it is bf16 by default).
        if meta["kind"] == "trained":
            keep = full_precision = transfer.tensor_names(transfer.checkpoint_file(args.init, ema=False))
        else:
            keep = set(dict(model.named_parameters()))
        transfer.apply_freeze_plan(model, plan)
    del source.transformer
    model = transfer.add_patch_sizes(model, (args.patch,), args.patch_init)
    model.head_tile = args.head_tile
    for name, p in model.named_parameters():
        p.data = p.data.to(device, torch.float32 if p.requires_grad or name in full_precision else compute_dtype)
    model.set_gradient_checkpointing(args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and device.type == "cuda"))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if args.ema > 0 else None
    step = load_checkpoint(resume_from, model, optimizer, ema, source.source, device) if resume_from else 0
    if resume_from and rank == 0:
        print(f"resuming {resume_from} at step {step}", file=sys.stderr)
    # Some trained tensors can sit out a step (the image pad token when h*w is a multiple of 32).
    net = DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    text = TextFeatures(args.ckpt, compute_dtype, device, args.text_cache)

    stop = {"requested": False}
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop.update(requested=True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        losses = run_steps(args, step, net, model, plan, source.source, optimizer, ema, corpus, text, device,
                           compute_dtype, out, rank, world, stop, keep)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if world > 1:
            dist.destroy_process_group()
    return {"step": step + len(losses), "losses": losses, "out": out}


def learning_rate(step: int, args) -> float:
    """Linear warm-up over --warmup steps, constant, then a linear cool-down to 0 over the last --cooldown
    steps (the warm-up-stable-decay schedule); the paper's is constant."""
    scale = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    if args.cooldown:
        scale = min(scale, (args.steps - step) / args.cooldown)
    return args.lr * scale


def run_steps(args, step, net, model, plan, source, optimizer, ema, corpus, text, device, compute_dtype, out,
              rank, world, stop, keep=()) -> list[float]:
    """The training loop from `step` to --steps; returns the per-step losses averaged over ranks."""
    trained = [p for p in model.parameters() if p.requires_grad]
    sigmas = training_sigmas(args.train_shift)
    # bf16/fp16 autocast (on CUDA by default; `--dtype bf16` runs the same path on CPU)
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    losses, tick, tick_step = [], time.time(), step
    while step < args.steps:
        batch = global_batch(step, args.global_batch, len(corpus), args.seed)[rank * args.batch_size:(rank + 1) * args.batch_size]
        x0 = torch.stack([corpus.image(i) for _, i in batch])
        draws = [torch.Generator().manual_seed(sample_seed(args.seed, step, position)) for position, _ in batch]
        sigma = torch.stack([sigmas[torch.randint(TRAIN_GRID, (), generator=g)] for g in draws])
        if args.fresh_noise:
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws])
        else:  # the image's own seed, exactly the noise synth/sample draw for that seed
            noise = sample.initial_noise([corpus.rows[i]["seed"] for _, i in batch], tuple(x0.shape[1:]))
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

        report = torch.tensor([loss.item(), float(stop["requested"])])
        if world > 1:
            dist.all_reduce(report)
            report[0] /= world
        losses.append(float(report[0]))
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            elapsed = (time.time() - tick) / (step - tick_step)
            row = {"step": step, "loss": losses[-1], "lr": optimizer.param_groups[0]["lr"], "step_s": elapsed,
                   "images_per_s": args.global_batch / elapsed, "peak_memory_gb": peak_memory_gb(device)}
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr)
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
            tick, tick_step = time.time(), step
        stopping = bool(report[1] > 0)
        if step % args.save_every == 0 or step == args.steps or stopping:
            if rank == 0:
                saved = save_checkpoint(out, step, model, plan, source, optimizer, ema, args, keep)
                print(f"saved {saved}", file=sys.stderr)
            if world > 1:
                dist.barrier()  # no rank runs ahead of (or exits before) a checkpoint being written
        if stopping:
            print(f"stopped at step {step} (checkpoint saved)", file=sys.stderr)
            break
    return losses


if __name__ == "__main__":
    try:
        train()
    except (ValueError, hub.CheckpointError) as e:
        raise SystemExit(f"error: {e}")
