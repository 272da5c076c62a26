"""Benchmarks that print numbers (a markdown table, and JSON with --json), never timed unit tests.

    python bench.py dit      # our Z-Image DiT forward vs diffusers' on the same weights
    python bench.py train    # a training step under each freeze plan: time, gradients, optimizer state, peak memory
    python bench.py fsdp     # one FSDP training step at Z-Image size on one GPU: measured memory vs train.py's plan
    python bench.py highres  # the paper's Figure 4: pixel model vs the latent pipeline of the same backbone
    python bench.py highres --scale 1 --sizes 4096 --patches 64 --layouts 1k 4k --dim 3840 --layers 30 --heads 30 \
        --refiners 2 --cap-dim 2560   # Figure 4 at full size on one GPU: the 4K model, the 1K head at 4K, latent

Each comparison runs both sides in one process on the same weights and inputs, interleaved, and reports
medians and their ratio: these machines are noisy, ratios measured side by side are not. The reference
libraries (diffusers) come from requirements-dev.txt; they are imported here only, never by the project.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import hub
import runtime
import train
import transfer
from model import HEAD_LAYOUTS, HeadConfig, PixelDiT, ZImageConfig, ZImageDiT, head_layout


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn(); on CUDA after the queued kernels finish."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_dit(args) -> dict:
    """Forward of a tiny-but-real-shaped Z-Image DiT: ours vs diffusers' ZImageTransformer2DModel."""
    from diffusers import ZImageTransformer2DModel

    head_dim = args.dim // args.heads
    torch.manual_seed(0)  # the values do not change the cost; both sides use these same weights
    ref = ZImageTransformer2DModel(dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.blocks,
                                   cap_feat_dim=args.dim, axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8])
    folder = Path(args.workdir) / "bench-dit"
    ref.save_pretrained(folder)
    # on a GPU both run in bf16 (as Z-Image is served); on a CPU in float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = hub.load_zimage_transformer(folder, dtype, device)
    ref.to(device, dtype).eval()
    side = int(args.tokens**0.5) * 2  # latent pixels per side; patch 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 16, side, side, generator=g).to(device, dtype)
    captions = [torch.randn(args.caption_tokens, args.dim, generator=g).to(device, dtype) for _ in range(args.batch)]
    t = torch.full((args.batch,), 0.5, device=device, dtype=dtype)
    ref_input = list(x.unsqueeze(2).unbind(0))
    run_ours = lambda: ours(x, 1 - t, captions)  # noqa: E731
    run_ref = lambda: ref(ref_input, t, captions, return_dict=False)  # noqa: E731
    with torch.inference_mode():
        run_ours(), run_ref()  # warm-up
        rounds = [(median_seconds(run_ours, 1), median_seconds(run_ref, 1)) for _ in range(args.repeats)]
    ours_s = statistics.median(r[0] for r in rounds)
    ref_s = statistics.median(r[1] for r in rounds)
    return {"bench": "dit", "dim": args.dim, "blocks": args.blocks, "image_tokens": (side // 2) ** 2,
            "caption_tokens": args.caption_tokens, "batch": args.batch, "threads": torch.get_num_threads(),
            "ours_s": ours_s, "diffusers_s": ref_s, "ratio": ours_s / ref_s}


def train_step_child(args) -> dict:
    """One plan, in its own process so its peak memory is its own: a Z-Image-shaped source (30 main blocks,
    2 + 2 refiners, a narrow width), transferred and trained for a few steps on random images."""
    torch.manual_seed(0)
    head_dim = args.dim // args.heads
    source = ZImageDiT(ZImageConfig(dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, cap_feat_dim=args.dim,
                                    axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = transfer.transfer(source.to(device), transfer.make_plan(args.plan, 5), HeadConfig.from_widths((8, 16, 32, 64)),
                              verbose=False)
    model.set_gradient_checkpointing(args.grad_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.PAPER_LR, weight_decay=train.PAPER_WEIGHT_DECAY)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    captions = [torch.randn(args.caption_tokens, args.dim, generator=g).to(device) for _ in range(args.batch)]
    sigma = torch.full((args.batch,), 0.5, device=device)
    times = []
    for i in range(args.steps + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        train.flow_matching_loss(model, x0, noise, sigma, captions).backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    trainable, total = transfer.count_parameters(model)
    peak = runtime.peak_memory(device)
    return {"plan": args.plan, "trainable": trainable, "total": total, "grad_mb": grad_bytes / 2**20,
            "optimizer_mb": state_bytes / 2**20, "peak_mb": peak / 2**20,
            "step_s": statistics.median(times[1:]), "device": device.type}


def bench_train(args) -> list[dict]:
    rows = []
    for plan in ("released", "paper", "full"):
        cmd = [sys.executable, __file__, "train", "--child", "--plan", plan, "--dim", str(args.dim), "--heads",
               str(args.heads), "--size", str(args.size), "--steps", str(args.steps), "--batch", str(args.batch)]
        done = subprocess.run(cmd + (["--grad-ckpt"] if args.grad_ckpt else []), capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = rows[-1]
    for row in rows:
        row["trainable_share"] = row["trainable"] / row["total"]
        row["optimizer_vs_full"] = row["optimizer_mb"] / full["optimizer_mb"]
    return rows


def held_bytes(tensors) -> int:
    """Bytes this rank holds of the tensors (an FSDP shard's local part)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def bench_fsdp(args) -> list[dict]:
    """One training step of a Z-Image-shaped pixel model (random weights, the freeze plan, 16-px patches, gradient
    checkpointing) under train.py's FSDP on one rank, as `--parallel fsdp` runs it: the bytes held per part and the
    peak, measured against `train.py --dry-run`'s plan for the same model. The first step allocates the optimizer
    state; the second is measured. On a GPU in bf16 with the CUDA allocator's peak (defaults: Z-Image-Turbo at
    1024^2); on a CPU in float32, where the peak is the process's resident memory, interpreter included, so only the
    held parts compare."""
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    head_dim = args.dim // args.heads
    cfg = transfer.pixel_config(ZImageConfig(dim=args.dim, n_layers=args.layers, n_refiner_layers=args.refiners,
                                             n_heads=args.heads, n_kv_heads=args.heads, cap_feat_dim=args.cap_dim,
                                             axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)),
                                HeadConfig.from_widths(tuple(int(w) for w in args.head_widths.split(","))))
    freeze = transfer.make_plan(args.plan, args.blocks)
    with torch.device("meta"):
        planned = PixelDiT(cfg)
    transfer.apply_freeze_plan(planned, freeze)
    planned.set_gradient_checkpointing(True)
    plan = train.memory_plan(planned, set(), "fsdp", 1, args.size, args.size, 1, args.caption_tokens, dtype,
                             transfer.PIXEL_PATCH)

    with runtime.process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1):
        measured = fsdp_step(args, cfg, freeze, device, dtype)
    plan["peak"] = train.peak_bytes(plan)
    rows = [{"part": name, "plan GiB": plan[name] / 2**30,
             "measured GiB": measured[name] / 2**30 if name in measured else "",
             "measured / plan": measured[name] / plan[name] if name in measured and plan[name] else ""}
            for name in plan]
    rows.append({"part": f"step seconds ({device.type}, {str(dtype)[6:]})", "plan GiB": "",
                 "measured GiB": measured["seconds"], "measured / plan": ""})
    return rows


def fsdp_step(args, cfg, freeze, device: torch.device, dtype: torch.dtype) -> dict:
    """Two training steps of a random-weight pixel model under train.py's FSDP: the bytes held per part and the
    peak after the second, and its seconds."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)  # random weights: the values do not change the memory
    with torch.device(device):
        model = PixelDiT(cfg)
    transfer.apply_freeze_plan(model, freeze)
    dtypes = train.parameter_dtypes(model, set(), dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(dtypes[name])
    model.set_gradient_checkpointing(True)
    train.parallelize(model, "fsdp", 1, device, dtype, transfer.PIXEL_PATCH)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=train.PAPER_LR, weight_decay=train.PAPER_WEIGHT_DECAY)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    captions = [torch.randn(args.caption_tokens, args.cap_dim, generator=g).to(device, dtype)]
    sigma = torch.full((1,), 0.5, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for step in range(2):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast:
            loss = train.flow_matching_loss(model, x0, noise, sigma, captions)
        loss.backward()
        gradients = held_bytes(p.grad for p in trained if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"frozen weights": held_bytes(p for p in model.parameters() if not p.requires_grad),
            "trained weights": held_bytes(trained), "gradients": gradients,
            "optimizer state": held_bytes(t for s in optimizer.state.values() for t in s.values()),
            "peak": runtime.peak_memory(device), "seconds": seconds}


FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)  # Z-Image's VAE


def timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def highres_child(args) -> dict:
    """One measurement in a fresh process: (seconds, peak bytes of the whole process or of CUDA's allocator,
    weights included) of the latent transformer step, the VAE decode, or the pixel model step (its head: the
    --layout of a release, at the release's widths)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    from model import PixelDiT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    head_dim = args.dim // args.heads
    axes = [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]
    torch.manual_seed(0)
    caption = [torch.randn(args.caption_tokens, args.cap_dim, device=device, dtype=dtype)]
    t = torch.full((1,), 0.5, device=device)
    latent = torch.randn(1, 16, args.side // 8, args.side // 8, device=device, dtype=dtype)
    with torch.device(device), torch.inference_mode():
        if args.child == "latent":
            ref = ZImageTransformer2DModel(dim=args.dim, n_layers=args.layers, n_refiner_layers=args.refiners,
                                           n_heads=args.heads, n_kv_heads=args.heads, cap_feat_dim=args.cap_dim,
                                           axes_dims=axes).to(dtype).eval()
            step = lambda: ref([latent[0, :, None]], t, caption, return_dict=False)  # noqa: E731
        elif args.child == "decode":
            vae = AutoencoderKL(**FLUX_VAE).to(dtype).eval()
            step = lambda: vae.decode(latent)  # noqa: E731
        else:
            cfg = ZImageConfig(dim=args.dim, n_layers=args.layers, n_refiner_layers=args.refiners, n_heads=args.heads,
                               n_kv_heads=args.heads, cap_feat_dim=args.cap_dim, axes_dims=tuple(axes))
            head = head_layout(args.layout)
            ours = PixelDiT(transfer.pixel_config(cfg, head, patches=(args.patch,))).to(dtype).eval()
            ours.head_tile = args.head_tile
            image = torch.randn(1, 3, args.side, args.side, dtype=dtype)
            step = lambda: ours(image, t, caption, args.patch)  # noqa: E731
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, device, 1 if args.child == "decode" else args.repeats)
    return {"seconds": seconds, "peak": runtime.peak_memory(device)}


def bench_highres(args) -> list[dict]:
    """Per-step latency and peak memory of the pixel model at each size and patch against the reference latent
    pipeline (diffusers' Z-Image transformer + the 16-channel VAE, random weights, the same backbone config),
    whose whole sample also pays a VAE decode at the output size. One forward per step, batch 1, no guidance;
    each measurement in its own process, peaks with the weights included. On CPU the sides are divided by
    --scale and the backbone is narrow; on a GPU: --scale 1 --dim 3840 --layers 30 --heads 30 --refiners 2.

    Pixel columns: "p{P}" the 1K head with P-px patches (at 4096 px, p64 is today's extrapolation: the 1K head
    fed the 64 x 64 token features upsampled 4x); "4k", "8k", "10k" a release's own model (its head layout and
    patch, --layouts). A whole sample is --steps steps (and the latent one's decode); with no decode, a pixel
    sample's peak is its step's."""
    common = ["--dim", str(args.dim), "--layers", str(args.layers), "--heads", str(args.heads), "--refiners",
              str(args.refiners), "--cap-dim", str(args.cap_dim), "--caption-tokens", str(args.caption_tokens),
              "--repeats", str(args.repeats)] + (["--head-tile", str(args.head_tile)] if args.head_tile else [])

    def child(kind: str, side: int, patch: int = 16, layout: str = "1k") -> dict:
        cmd = [sys.executable, __file__, "highres", "--child", kind, "--side", str(side), "--patch", str(patch),
               "--layout", layout]
        done = subprocess.run(cmd + common, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    pixel_models = [(f"p{patch}", patch, "1k") for patch in args.patches if "1k" in args.layouts]
    pixel_models += [(layout, transfer.LAYOUT_PATCHES[layout], layout) for layout in args.layouts if layout != "1k"]
    rows = []
    for size in args.sizes:
        side = size // args.scale
        latent, decode = child("latent", side), child("decode", side)
        latent_peak = max(latent["peak"], decode["peak"])
        row = {"size": size, "px": side, "latent step s": latent["seconds"], "decode s": decode["seconds"],
               "latent sample s": args.steps * latent["seconds"] + decode["seconds"],
               "latent sample GiB": latent_peak / 2**30}
        for name, patch, layout in pixel_models:
            if side % patch or side % head_layout(layout).cell:
                continue
            ours = child("pixel", side, patch, layout)
            row |= {f"{name} step s": ours["seconds"], f"{name} GiB": ours["peak"] / 2**30,
                    f"{name} latency": ours["seconds"] / latent["seconds"],
                    f"{name} sample": args.steps * ours["seconds"] / row["latent sample s"],
                    f"{name} memory": ours["peak"] / latent_peak}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    dit = sub.add_parser("dit", help="Z-Image DiT forward, ours vs diffusers, CPU float32")
    dit.add_argument("--dim", type=int, default=256)
    dit.add_argument("--heads", type=int, default=4)
    dit.add_argument("--blocks", type=int, default=4, help="main blocks (plus 2 + 2 refiner blocks)")
    dit.add_argument("--tokens", type=int, default=1024, help="image tokens (a square grid)")
    dit.add_argument("--caption-tokens", type=int, default=100)
    dit.add_argument("--batch", type=int, default=2)
    dit.add_argument("--repeats", type=int, default=7)
    dit.add_argument("--workdir", default="/tmp/l2p-bench")
    tr = sub.add_parser("train", help="training step per freeze plan (released, paper, full): memory and time")
    tr.add_argument("--dim", type=int, default=384, help="backbone width (30 main blocks as Z-Image)")
    tr.add_argument("--heads", type=int, default=6)
    tr.add_argument("--size", type=int, default=256, help="image side in pixels (16-px patches)")
    tr.add_argument("--caption-tokens", type=int, default=64)
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--steps", type=int, default=3, help="timed steps after one untimed step")
    tr.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    tr.add_argument("--plan", default="released", help=argparse.SUPPRESS)
    tr.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    fs = sub.add_parser("fsdp", help="one FSDP training step at Z-Image size on one GPU: measured memory vs the plan")
    fs.add_argument("--dim", type=int, default=3840, help="backbone width (Z-Image-Turbo: 3840)")
    fs.add_argument("--heads", type=int, default=30)
    fs.add_argument("--layers", type=int, default=30, help="main blocks")
    fs.add_argument("--refiners", type=int, default=2, help="noise and context refiner blocks, each")
    fs.add_argument("--cap-dim", type=int, default=2560, help="caption feature width (Qwen3-4B: 2560)")
    fs.add_argument("--caption-tokens", type=int, default=128)
    fs.add_argument("--size", type=int, default=1024, help="image side in pixels")
    fs.add_argument("--head-widths", default="64,128,256,512")
    fs.add_argument("--plan", default="released", help="freeze plan: released, paper or full")
    fs.add_argument("--blocks", type=int, default=5, help="main blocks trained at each end")
    hr = sub.add_parser("highres", help="Figure 4: pixel model per-step latency / peak memory vs the latent pipeline")
    hr.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="nominal output sides")
    hr.add_argument("--scale", type=int, default=8, help="divide the sides by this (1 on a GPU: full size)")
    hr.add_argument("--patches", type=int, nargs="+", default=[16, 32, 64], help="patches of the 1K-head model")
    hr.add_argument("--layouts", nargs="+", choices=HEAD_LAYOUTS, default=["1k"],
                    help="head layouts: 1k (with each of --patches), and the 4k / 8k / 10k releases' models (their "
                         "own patch), measured at the sizes their patch and head divide")
    hr.add_argument("--steps", type=int, default=50, help="steps of a whole sample (the high-resolution releases' 50)")
    hr.add_argument("--dim", type=int, default=256)
    hr.add_argument("--layers", type=int, default=6)
    hr.add_argument("--heads", type=int, default=4)
    hr.add_argument("--refiners", type=int, default=1)
    hr.add_argument("--cap-dim", type=int, default=256)
    hr.add_argument("--caption-tokens", type=int, default=128)
    hr.add_argument("--head-tile", type=int, help="tile the Detailer Head (pixels)")
    hr.add_argument("--repeats", type=int, default=3)
    hr.add_argument("--child", help=argparse.SUPPRESS)
    hr.add_argument("--side", type=int, help=argparse.SUPPRESS)
    hr.add_argument("--patch", type=int, default=16, help=argparse.SUPPRESS)
    hr.add_argument("--layout", default="1k", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.what in ("train", "highres") and args.child:
        print(json.dumps(train_step_child(args) if args.what == "train" else highres_child(args)))
        return None
    result = {"dit": bench_dit, "train": bench_train, "fsdp": bench_fsdp, "highres": bench_highres}[args.what](args)
    rows = result if isinstance(result, list) else [result]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
