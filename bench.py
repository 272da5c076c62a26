"""Benchmarks that print numbers (a markdown table, and JSON with --json), never timed unit tests.

    python bench.py dit      # our Z-Image DiT forward vs diffusers' on the same weights

Each comparison runs both sides in one process on the same weights and inputs, interleaved, and reports
medians and their ratio: these machines are noisy, ratios measured side by side are not. The reference
libraries (diffusers) come from requirements-dev.txt; they are imported here only, never by the project.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import hub


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_dit(args) -> dict:
    """Forward of a tiny-but-real-shaped Z-Image DiT: ours vs diffusers' ZImageTransformer2DModel."""
    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    from fixtures import tiny_zimage_transformer  # the test fixtures build the reference model

    head_dim = args.dim // args.heads
    ref = tiny_zimage_transformer(dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.blocks,
                                  cap_feat_dim=args.dim, axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8])
    folder = Path(args.workdir) / "bench-dit"
    ref.save_pretrained(folder)
    ours = hub.load_zimage_transformer(folder, torch.float32, "cpu")
    ref.eval()
    side = int(args.tokens**0.5) * 2  # latent pixels per side; patch 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 16, side, side, generator=g)
    captions = [torch.randn(args.caption_tokens, args.dim, generator=g) for _ in range(args.batch)]
    t = torch.full((args.batch,), 0.5)
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
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = {"dit": bench_dit}[args.what](args)
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
