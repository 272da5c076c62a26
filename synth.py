"""Build the training corpus with the source model itself (paper section 3.2: 10k prompts -> 20k images).

    python synth.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompts prompts/l2p_taxonomy.jsonl --out data
    torchrun --nproc_per_node 8 synth.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompts my_prompts.txt --out data

Image j (prompt j // images_per_prompt, its (j % images_per_prompt)-th seed) gets seed `--seed + j` and the
file `{prompt:06d}-{k}.png`. Under torchrun rank r makes the images with j % world_size == r. A PNG is
written under a temporary name and renamed when complete, and carries its own metadata row as PNG text,
so an existing file is a finished image: a killed run resumes by skipping them, with nothing lost or made
twice. When every image exists, `metadata.jsonl` (one row per image, in order) is written from the PNGs.
Defaults follow the source's recipe card, else its family's recommended inference (hub.SOURCE_DEFAULTS:
Z-Image-Turbo 8 steps, no guidance; SD3.5-Medium 40 steps, CFG 4.5; FLUX.1-schnell 4 steps; FLUX.1-dev 50 steps,
embedded guidance 3.5).
"""

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import hub
import runtime
import sample
from runtime import non_negative_float, positive_int

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "l2p_taxonomy.jsonl"
PAPER_IMAGES_PER_PROMPT = 2  # 10k prompts -> 20k images
SETTINGS_FILE = "synth.json"  # the corpus's settings; a rerun must match them


@dataclass(frozen=True)
class Job:
    index: int  # position in the corpus
    prompt: str
    category: str | None
    seed: int
    file: str


def plan_jobs(prompts: list[dict], images_per_prompt: int, seed: int) -> list[Job]:
    jobs = []
    for p, row in enumerate(prompts):
        for k in range(images_per_prompt):
            j = p * images_per_prompt + k
            jobs.append(Job(j, row["prompt"], row["category"], seed + j, f"{p:06d}-{k}.png"))
    return jobs


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_settings(out: Path, settings: dict) -> None:
    """A corpus folder holds one set of settings: resuming with others would mix two corpora."""
    path = out / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in settings if recorded.get(k) != settings[k])
        if differ:
            raise ValueError(f"--out {out} holds a corpus made with other settings ({', '.join(differ)} differ): "
                             "use another --out, or the same settings to resume")
    else:
        runtime.write_text_atomic(path, json.dumps(settings, indent=2))


def write_metadata(out: Path, jobs: list[Job]) -> int:
    """metadata.jsonl from the PNGs' own rows, in corpus order. Every rank that finds the corpus complete may
    write it; the content is the same, and each write is atomic."""
    rows = [Image.open(out / job.file).info["l2p"] for job in jobs]
    runtime.write_text_atomic(out / runtime.CORPUS_METADATA, "".join(row + "\n" for row in rows))
    return len(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(hub.BUNDLED_SOURCE),
                   help="source model: hub id (owner/name) or diffusers folder (default: the bundled toy source)")
    p.add_argument("--prompts", type=Path, help="plain text (one per line) or JSONL with 'prompt' and optional "
                                                "'category' (default: the source's recipe card, else the bundled "
                                                "100-prompt taxonomy sample)")
    p.add_argument("--out", type=Path, default=Path("data"), help="corpus folder (PNGs + metadata.jsonl)")
    p.add_argument("--images-per-prompt", type=positive_int,
                   help=f"seeds per prompt (default: card, else {PAPER_IMAGES_PER_PROMPT})")
    p.add_argument("--h", type=positive_int, help="image height (default: the recipe card's, else 1024)")
    p.add_argument("--w", type=positive_int, help="image width (default: the recipe card's, else 1024)")
    p.add_argument("--steps", type=positive_int, help=f"Euler steps of the source (default: card, else by family: "
                                                      f"{hub.defaults_help('steps')})")
    p.add_argument("--guidance", type=non_negative_float,
                   help=f"guidance, 1 = off; FLUX-dev: its embedded guidance (default: card, else by family: "
                        f"{hub.defaults_help('guidance')})")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image j uses seed + j")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward batch on each rank")
    p.add_argument("--device", default="auto", help="auto (CUDA device LOCAL_RANK when present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                   help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    return p.parse_args(argv)


def synthesize(argv=None) -> Path:
    args = parse_args(argv)
    rank, world = rank_and_world()
    configs = hub.resolve(args.ckpt, ["model_index.json", "transformer/config.json"])  # no weights yet
    pipeline_class = hub.read_pipeline_index(configs)["_class_name"]
    family = hub.source_family(hub.pipeline_transformer_config(configs / "transformer", pipeline_class))
    card = hub.recipe_card(args.ckpt)
    runtime.fill_unset(args, hub.recipe_defaults(card, "synth", hub.SIZE_DEFAULTS | hub.SOURCE_DEFAULTS[family]
                                                 | {"images_per_prompt": PAPER_IMAGES_PER_PROMPT}))
    if args.prompts is None:  # the card's prompt file lies in the source's folder
        prompts = card.get("synth", {}).get("prompts")
        args.prompts = hub.resolve(args.ckpt) / prompts if prompts else DEFAULT_PROMPTS
    jobs = plan_jobs(runtime.read_prompt_file(args.prompts), args.images_per_prompt, args.seed)
    root = hub.resolve(args.ckpt)
    hub.read_pipeline_index(root)
    runtime.check_size(args.h, args.w, hub.latent_pixel_multiple(root), "pixels per latent token")
    out = runtime.writable_folder(args.out)
    device, dtype = runtime.pick_device_dtype(args.device, args.dtype)
    with runtime.folder_lock(out) if rank == 0 else nullcontext():
        return make_images(args, jobs, out, device, dtype, rank, world)


def make_images(args, jobs: list[Job], out: Path, device, dtype, rank: int, world: int) -> Path:
    """This rank's share of the corpus, skipping finished images; metadata.jsonl once every image exists."""
    pipe = hub.load_pipeline(args.ckpt, dtype, device)
    shift = pipe.scheduler.get("shift", 1.0) if not pipe.scheduler.get("use_dynamic_shifting") else "dynamic"
    common = dict(source=pipe.name, revision=pipe.revision, transformer_sha256=pipe.transformer_sha256,
                  steps=args.steps, guidance=args.guidance, shift=shift, height=args.h, width=args.w)
    prompts_hash = hashlib.sha256(args.prompts.read_bytes()).hexdigest()
    check_settings(out, common | {"prompts_sha256": prompts_hash, "images_per_prompt": args.images_per_prompt,
                                  "seed": args.seed})

    mine = [job for job in jobs if job.index % world == rank]
    todo = [job for job in mine if not (out / job.file).exists()]
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{tag}{len(mine) - len(todo)} of my {len(mine)} images exist; making {len(todo)} "
          f"(corpus: {len(jobs)} images)", file=sys.stderr)
    start = time.time()
    for done in range(0, len(todo), args.batch_size):
        batch = todo[done : done + args.batch_size]
        images = sample.sample_latent(pipe, [j.prompt for j in batch], [j.seed for j in batch], args.h, args.w,
                                      args.steps, args.guidance)
        for job, image in zip(batch, images):
            row = {"file": job.file, "prompt": job.prompt, "category": job.category, "seed": job.seed} | common
            runtime.save_png(image, out / job.file, row)  # atomic: a whole image or none
        n = done + len(batch)
        rate = n / (time.time() - start)
        print(f"{tag}{n}/{len(todo)} images  {rate * 60:.1f} img/min  ETA {(len(todo) - n) / rate / 60:.1f} min",
              file=sys.stderr)
    if all((out / job.file).exists() for job in jobs):
        print(f"{tag}corpus complete: wrote {write_metadata(out, jobs)} rows to {out / runtime.CORPUS_METADATA}",
              file=sys.stderr)
    else:
        print(f"{tag}my share is done; metadata.jsonl is written once every rank's images exist", file=sys.stderr)
    return out


if __name__ == "__main__":
    runtime.run_cli(synthesize)
