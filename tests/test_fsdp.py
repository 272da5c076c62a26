"""Training on many ranks (torchrun, gloo on CPU): DDP and FSDP against one rank, resume at other world sizes, the
corpus on three ranks, and the memory plan of `train.py --dry-run` against the live tensors of a real step."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hub
import train
import transfer
from model import HeadConfig
from train_step_memory import measure

from conftest import HEAD, ROOT, SIZE, run_script, train_args

GOLDEN_ZIMAGE = ROOT / "tests" / "golden" / "Z-Image-Turbo-SDNQ-derivative"  # configs only, no weights
# Float32 runs that differ only in how the ranks' gradients are summed (all-reduce, reduce-scatter, one process's
# batch mean) round differently, by about 1e-7 relative per step; AdamW's normalised updates carry that into the
# weights at about 1e-6 after a few steps. 1e-5 allows that and no more: every checked weight moves by over 1e-3.
TOLERANCE = 1e-5
MOVED = 1e-3


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)


def checkpoint(run, step: int, file: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / f"step-{step:06d}" / f"{file}.safetensors")


def ran(result):
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_fsdp_and_ddp_on_two_ranks_equal_one_rank_with_the_same_global_batch(pipeline_dir, corpus, tmp_path):
    """Three steps at the paper's learning rate in float32 (bf16 rounding depends on the batch shape, so bf16 runs
    agree only to bf16 precision): FSDP and DDP on two ranks of one image each, one rank with two."""
    paper = ["--lr", str(train.PAPER_LR), "--steps", "3", "--dtype", "fp32"]
    ran(run_script("train.py", *train_args(pipeline_dir, corpus, tmp_path / "fsdp", *paper, "--batch-size", "1",
                                           "--parallel", "fsdp"), nproc=2))
    ran(run_script("train.py", *train_args(pipeline_dir, corpus, tmp_path / "ddp", *paper, "--batch-size", "1"),
                   nproc=2))
    train.train(train_args(pipeline_dir, corpus, tmp_path / "one", *paper, "--batch-size", "2"))
    fsdp, ddp, one = (checkpoint(tmp_path / run, 3) for run in ("fsdp", "ddp", "one"))
    start = transfer.transfer(hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer,
                              transfer.make_plan("released", 1), HeadConfig.from_widths((8, 16, 32, 64)),
                              verbose=False).state_dict()
    assert relative_difference(one, {n: start[n] for n in one}) > MOVED, "the steps must move the weights"
    assert relative_difference(fsdp, one) < TOLERANCE and relative_difference(ddp, one) < TOLERANCE
    assert relative_difference(fsdp, ddp) < TOLERANCE


@pytest.mark.slow
def test_fsdp_resumes_bit_exact_and_on_other_world_sizes(pipeline_dir, corpus, tmp_path):
    """A global batch of 6 on 2 ranks x 3 images, checkpoints at steps 3 and 6. A copy whose `latest` is step 3 is
    what a kill after that checkpoint leaves: resumed on 2 ranks it ends bit for bit as the uninterrupted run; on
    1 rank x 6 and on 3 ranks x 2 the data and draws are the same and only the gradient sums' rounding differs."""
    common = ["--parallel", "fsdp", "--dtype", "fp32", "--ema", "0.9", "--warmup", "4", "--clip", "1.0",
              "--save-every", "3", "--steps", "6"]
    straight = tmp_path / "straight"
    ran(run_script("train.py", *train_args(pipeline_dir, corpus, straight, *common, "--batch-size", "3"), nproc=2))
    resumed = {}
    for world, batch in ((2, 3), (1, 6), (3, 2)):
        run = resumed[world] = tmp_path / f"on-{world}"
        shutil.copytree(straight, run)
        shutil.rmtree(run / "step-000006")
        (run / "latest").write_text("step-000003")
        args = train_args(pipeline_dir, corpus, run, *common, "--batch-size", str(batch))
        if world == 1:
            train.train(args)
        else:
            assert "resuming" in ran(run_script("train.py", *args, nproc=world)).stderr
    for file in ("model", "ema", "state"):
        a, b = checkpoint(straight, 6, file), checkpoint(resumed[2], 6, file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    moved = relative_difference(checkpoint(straight, 6), checkpoint(straight, 3))
    assert moved > MOVED
    for world in (1, 3):
        for file in ("model", "ema"):
            assert relative_difference(checkpoint(resumed[world], 6, file), checkpoint(straight, 6, file)) < TOLERANCE
    assert [json.loads(line)["step"] for line in (resumed[3] / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


@pytest.mark.slow
def test_fsdp_high_resolution_stage_keeps_what_it_does_not_train(pipeline_dir, corpus, tmp_path):
    """A 4x stage on 2 FSDP ranks from a native run: it trains a new 64-px embedder and keeps the 16-px one it never
    uses (FSDP ignores it: no gradient, no AdamW state, unchanged, as under DDP), and the refiners the native stage
    trained and this plan freezes stay float32, bit for bit, in its checkpoints."""
    native = tmp_path / "native"
    train.train(train_args(pipeline_dir, corpus, native, "--steps", "1"))
    big = tmp_path / "data4x"
    big.mkdir()
    rows = [json.loads(line) for line in (corpus / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        Image.open(corpus / row["file"]).resize((384, 256), Image.NEAREST).save(big / row["file"])
    (big / "metadata.jsonl").write_text("".join(json.dumps(r | {"height": 256, "width": 384}) + "\n" for r in rows))
    stage = tmp_path / "4x"
    ran(run_script("train.py", *train_args(pipeline_dir, big, stage, "--steps", "2", "--init", str(native), "--patch",
                                           "64", "--head-tile", "128", "--freeze", "paper", "--dtype", "bf16",
                                           "--parallel", "fsdp"), nproc=2))
    before, after, state = checkpoint(native, 1), checkpoint(stage, 2), checkpoint(stage, 2, "state")
    for name in ("backbone.all_x_embedder.16-1.weight", "backbone.noise_refiner.0.attention.to_q.weight"):
        assert after[name].dtype == torch.float32 and torch.equal(after[name], before[name]), name
    assert not any(".16-1." in key for key in state) and any(".64-1." in key for key in state)


# Run in a fresh interpreter: one FSDP step through train.train, then the names of the process's threads.
THREADS_AFTER_AN_FSDP_RUN = """
import os, sys
import train
train.train(sys.argv[1:])
print("threads:", *(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")))
"""


def test_an_fsdp_run_ends_its_process_group_before_the_process_exits(pipeline_dir, corpus, tmp_path):
    """A group FSDP used outlived destroy_process_group (DTensor's caches keep the mesh, the mesh the group); its
    gloo threads were torn down at interpreter exit, and a two-rank FSDP step aborted there (exit -6) in 5 runs of
    20. With the group ended, no gloo thread is left when train.train returns."""
    args = train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "1", "--parallel", "fsdp")
    done = ran(subprocess.run([sys.executable, "-c", THREADS_AFTER_AN_FSDP_RUN, *args], cwd=ROOT, text=True,
                              capture_output=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=600))
    threads = done.stdout.splitlines()[-1].split()
    assert threads[0] == "threads:" and len(threads) > 1 and not [name for name in threads if "gloo" in name], threads


def test_a_resume_keeps_the_global_batch(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1", "--batch-size", "2"))
    with pytest.raises(ValueError, match=r"a global batch of 2 images per step \(1 GPU\(s\) x --batch-size 2\), "
                                         r"and a resume must keep it: GPUs x --batch-size must equal 2, not 1 x 3"):
        train.train(train_args(pipeline_dir, corpus, out, "--steps", "2", "--batch-size", "3"))
    with pytest.raises(ValueError, match="--world-size plans a --dry-run"):
        train.train(train_args(pipeline_dir, corpus, out, "--steps", "2", "--world-size", "2"))


@pytest.mark.slow
def test_synth_on_three_ranks_makes_the_same_corpus(pipeline_dir, prompt_file, corpus, tmp_path):
    """Rank r makes images j with j % 3 == r; the last rank to finish writes the metadata. The images are those one
    process made in batches of 3 (within one 8-bit level: batched matmuls round differently)."""
    out = tmp_path / "data"
    ran(run_script("synth.py", "--ckpt", str(pipeline_dir), "--prompts", str(prompt_file), "--out", str(out), *SIZE,
                   "--steps", "2", nproc=3))
    ours, theirs = ((folder / "metadata.jsonl").read_text().splitlines() for folder in (out, corpus))
    assert ours == theirs
    for row in map(json.loads, ours):
        a, b = (np.asarray(Image.open(folder / row["file"])).astype(int) for folder in (out, corpus))
        assert np.abs(a - b).max() <= 1


# ----------------------------------------------------------------------------------------------------
# The memory plan (--dry-run) against a real step


def dry_run(*args: str) -> dict:
    return train.train([*args, "--dry-run"])


@pytest.mark.parametrize("grad_ckpt", ["on", "off"])
def test_dry_run_equals_the_live_tensors_of_a_step(pipeline_dir, corpus, tmp_path, grad_ckpt):
    """One rank, the whole corpus as its batch (so the batch holds the longest prompt the plan assumes): weights,
    gradients and optimizer state to the byte; activations, measured as the peak of live tensors through forward and
    backward besides the gradients, within 25% (the plan simulates the same step on fake tensors)."""
    args = train_args(pipeline_dir, corpus, tmp_path / "run", "--dtype", "fp32", "--batch-size", "8",
                      "--grad-ckpt", grad_ckpt)
    step, planned = measure(args), dry_run(*args)
    plan = planned["parts"]
    assert step["frozen_kept"] and step["caption_tokens"] == planned["caption_tokens"]
    for part in ("frozen weights", "trained weights", "gradients", "optimizer state"):
        assert plan[part] == step["parts"][part], part
    assert abs(plan["activations"] / step["parts"]["activations"] - 1) < 0.25
    assert plan["DDP gradient buckets"] == plan["FSDP gathered blocks"] == 0


@pytest.mark.slow
def test_dry_run_equals_the_live_shards_of_an_fsdp_step_on_two_ranks(pipeline_dir, corpus, tmp_path):
    """Rank 0's FSDP shards after a real step on 2 ranks, to the byte (dim 0 split as torch.chunk does, rank 0's part
    the largest); the paper plan also freezes the root unit's embedders beside its trained tensors. Frozen tensors
    keep their bits through the step."""
    args = train_args(pipeline_dir, corpus, tmp_path / "run", "--dtype", "fp32", "--batch-size", "4", "--parallel",
                      "fsdp", "--freeze", "paper")
    step = json.loads(ran(run_script("tests/train_step_memory.py", *args, nproc=2)).stdout.splitlines()[-1])
    plan = dry_run(*args, "--world-size", "2")["parts"]
    whole = dry_run(*args, "--world-size", "1")["parts"]
    assert step["frozen_kept"]
    for part in ("frozen weights", "trained weights", "gradients", "optimizer state"):
        assert plan[part] == step["parts"][part], part
        assert whole[part] / 2 <= plan[part] < whole[part], part


@pytest.mark.slow
def test_dry_run_plans_zimage_turbo_from_its_config_alone(capsys):
    """The real Z-Image-Turbo config, no weights anywhere: the released plan trains 2.55B of 6.17B parameters, which
    take 16 bytes each (float32 master, gradient, two AdamW moments) unsharded, and FSDP divides every held part by
    the GPUs."""
    common = ["--ckpt", str(GOLDEN_ZIMAGE), "--data", "no-corpus", "--gpu-memory", "80"]
    ddp = dry_run(*common, "--world-size", "8")
    assert "released plan: 2,548,257,795 of 6,166,464,515 parameters trained" in capsys.readouterr().err
    fsdp = dry_run(*common, "--world-size", "8", "--parallel", "fsdp")
    trained = 2_548_257_795
    assert ddp["parts"]["trained weights"] + ddp["parts"]["gradients"] + ddp["parts"]["optimizer state"] == \
        pytest.approx(16 * trained, rel=1e-4)
    assert ddp["parts"]["DDP gradient buckets"] == 4 * trained
    for part in ("frozen weights", "trained weights", "gradients", "optimizer state"):
        assert fsdp["parts"][part] == pytest.approx(ddp["parts"][part] / 8, rel=1e-3), part
    assert ddp["fits"] and fsdp["peak"] < ddp["peak"] / 4


@pytest.mark.slow
def test_bench_fsdp_runs_at_tiny_size_on_cpu():
    done = ran(run_script("bench.py", "fsdp", "--dim", "64", "--heads", "2", "--layers", "4", "--refiners", "1",
                          "--cap-dim", "32", "--caption-tokens", "20", "--size", "64", "--head-widths", HEAD,
                          "--blocks", "1"))
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()[2:]}
    for part in ("frozen weights", "trained weights", "gradients", "optimizer state"):
        plan, measured, ratio = (cell.strip() for cell in rows[part])
        assert ratio == "1", (part, plan, measured)
    assert "peak" in rows
