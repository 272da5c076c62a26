"""The L2P recipe end to end on a tiny source: transfer, synth, train (DDP, resume), pixel sampling."""

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hub
import runtime
import sample
import synth
import train
import transfer
from model import HeadConfig

from conftest import ROOT, SIZE, run_script, train_args


# ----------------------------------------------------------------------------------------------------
# transfer


def test_transfer_copies_adds_drops_and_counts(pipeline_dir):
    source = hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer
    printed = io.StringIO()
    with redirect_stdout(printed):
        model = transfer.transfer(source, transfer.make_plan("released", 1), head=HeadConfig.from_widths((8, 16, 32, 64)))
    source_state, ours = source.state_dict(), model.backbone.state_dict()
    copied = [k for k in ours if k in source_state and source_state[k].shape == ours[k].shape]
    assert len(copied) == len([k for k in source_state if not k.startswith(("all_final_layer.", "all_x_embedder."))])
    assert all(torch.equal(ours[k], source_state[k]) for k in copied)
    assert "all_x_embedder.16-1.weight" in ours and ours["all_x_embedder.16-1.weight"].shape == (64, 16 * 16 * 3)
    assert not any(k.startswith("all_final_layer.") for k in ours)
    assert any(k.startswith("detailer_head.bottleneck.") for k in model.state_dict())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable parameters {trainable:,} of" in printed.getvalue()


def test_freeze_plans():
    released, paper, full = (transfer.make_plan(name, 1) for name in ("released", "paper", "full"))
    n, z = {"layers": 4}, "zimage"
    for plan in (released, paper, full):
        assert plan.trains("detailer_head.enc1.0.weight", n, z) and plan.trains("backbone.all_x_embedder.16-1.weight", n, z)
        assert plan.trains("backbone.layers.0.attention.to_q.weight", n, z)
        assert plan.trains("backbone.layers.3.feed_forward.w1.weight", n, z)
    assert not released.trains("backbone.layers.1.attention.to_q.weight", n, z)
    assert not paper.trains("backbone.layers.2.attention.to_q.weight", n, z)
    assert full.trains("backbone.layers.2.attention.to_q.weight", n, z)
    for name in ("backbone.noise_refiner.0.attention.to_q.weight", "backbone.t_embedder.mlp.0.weight",
                 "backbone.cap_embedder.1.weight", "backbone.x_pad_token"):
        assert released.trains(name, n, z) and not paper.trains(name, n, z)
    # FLUX: the first n double-stream blocks and the last n single-stream blocks; SD3: first and last joint blocks
    blocks = {"transformer_blocks": 3, "single_transformer_blocks": 4}
    assert released.trains("backbone.transformer_blocks.0.attn.to_q.weight", blocks, "flux")
    assert not released.trains("backbone.transformer_blocks.2.attn.to_q.weight", blocks, "flux")
    assert not released.trains("backbone.single_transformer_blocks.0.proj_mlp.weight", blocks, "flux")
    assert released.trains("backbone.single_transformer_blocks.3.proj_mlp.weight", blocks, "flux")
    sd3_blocks = {"transformer_blocks": 4}
    assert [released.trains(f"backbone.transformer_blocks.{i}.ff.net.2.weight", sd3_blocks, "sd3")
            for i in range(4)] == [True, False, False, True]
    assert released.trains("backbone.context_embedder.weight", sd3_blocks, "sd3")
    assert not paper.trains("backbone.time_text_embed.text_embedder.linear_1.weight", sd3_blocks, "sd3")
    with pytest.raises(ValueError, match="--freeze 'partial': expected one of released, paper, full"):
        transfer.make_plan("partial", 5)


def test_one_step_changes_trained_and_keeps_frozen(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    before = transfer.transfer(hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer,
                               transfer.make_plan("released", 1), HeadConfig.from_widths((8, 16, 32, 64)), verbose=False)
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1"))
    after = load_file(out / "step-000001" / "model.safetensors")
    assert set(after) == set(transfer.trained_names(before))
    changed = [n for n, t in after.items() if not torch.equal(t, before.state_dict()[n])]
    assert len(changed) > 0.9 * len(after), "an AdamW step moves every trained tensor that got a gradient"
    state = load_file(out / "step-000001" / "state.safetensors")
    frozen = [n for n, p in before.named_parameters() if not p.requires_grad]
    assert frozen and not any(k.startswith(f"opt.{n}.") for n in frozen for k in state), "no state for frozen"
    # the frozen tensors come back from the source bit for bit, with no gradient
    model, _ = transfer.load_pixel_model(str(out), ema=False)
    assert all(torch.equal(dict(model.named_parameters())[n], before.state_dict()[n]) for n in frozen)


@pytest.mark.parametrize("plan", ["released", "paper"])
def test_a_step_moves_trained_tensors_only(pipeline_dir, plan):
    """In memory, one objective + AdamW step (weight decay on): frozen tensors keep their bits and get no
    gradient; every trained tensor gets one and changes (24 image tokens are padded to 32, so even the
    image pad token is used)."""
    source = hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer
    model = transfer.transfer(source, transfer.make_plan(plan, 1), HeadConfig.from_widths((8, 16, 32, 64)), verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1, torch.randn(2, 3, 64, 96, generator=g)
    train.flow_matching_loss(model, x0, noise, torch.tensor([0.3, 0.8]), [torch.randn(7, 32), torch.randn(40, 32)]).backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert grads[name] and not torch.equal(p, before[name]), name
        else:
            assert not grads[name] and torch.equal(p, before[name]), name
    assert sum(not p.requires_grad for p in model.parameters()) > 0


# ----------------------------------------------------------------------------------------------------
# checkpoints: official release, standalone export, source hash


def test_official_release_file_loads_and_samples(official_release, pipeline_dir, tmp_path):
    path, model = official_release
    loaded, meta = transfer.load_pixel_model(str(path), source=str(pipeline_dir))
    assert meta["kind"] == "official" and loaded.cfg == model.cfg
    x, sigma, caps = torch.randn(2, 3, 48, 64), torch.tensor([0.3, 0.9]), [torch.randn(5, 32), torch.randn(40, 32)]
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, caps), model(x, sigma, caps))
    png = tmp_path / "official.png"
    sample.main(["--ckpt", str(path), "--source", str(pipeline_dir), "--prompt", "a red circle", "--h", "48",
                 "--w", "64", "--steps", "3", "--out", str(png)])
    assert Image.open(png).size == (64, 48)


def test_standalone_export_equals_trained_checkpoint(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "2"))
    standalone = tmp_path / "standalone.safetensors"
    subprocess.run([sys.executable, "transfer.py", "--export", str(out), "--out", str(standalone), "--dtype", "fp32"],
                   cwd=ROOT, check=True, capture_output=True)
    a, _ = transfer.load_pixel_model(str(out))
    b, meta = transfer.load_pixel_model(str(standalone))
    assert meta["kind"] == "standalone" and meta["source"]["id"] == str(pipeline_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------------------
# training: resume (on many ranks: test_fsdp.py)


def test_resume_is_bit_exact(pipeline_dir, corpus, tmp_path):
    common = ["--ema", "0.9", "--warmup", "4", "--clip", "1.0", "--save-every", "3"]
    straight = train.train(train_args(pipeline_dir, corpus, tmp_path / "straight", "--steps", "6", *common))
    first = train.train(train_args(pipeline_dir, corpus, tmp_path / "resumed", "--steps", "3", *common))
    second = train.train(train_args(pipeline_dir, corpus, tmp_path / "resumed", "--steps", "6", *common))
    assert first["step"] == 3 and second["step"] == 6
    assert straight["losses"] == first["losses"] + second["losses"]
    for file in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        a = load_file(tmp_path / "straight" / "step-000006" / file)
        b = load_file(tmp_path / "resumed" / "step-000006" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_learning_rate_warms_up_holds_and_cools_down():
    args = argparse.Namespace(lr=1.0, warmup=2, cooldown=4, steps=10)
    assert [train.learning_rate(step, args) for step in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    args.cooldown = 0  # the paper's constant lr after the warm-up
    assert [train.learning_rate(step, args) for step in range(4)] == [0.5, 1, 1, 1]


def test_mixed_precision_path_on_cpu(pipeline_dir, corpus, tmp_path):
    """The CUDA recipe's dtypes on CPU: bf16 autocast, float32 master weights for trained tensors, bf16 frozen."""
    result = train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "2", "--dtype", "bf16"))
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    saved = load_file(tmp_path / "run" / "step-000002" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    model, _ = transfer.load_pixel_model(str(tmp_path / "run"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_step_folder_loads_its_own_checkpoint(pipeline_dir, corpus, tmp_path):
    """`--ckpt runs/x/step-000001` means that checkpoint, not the run's latest."""
    train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "2", "--save-every", "1"))
    first = load_file(tmp_path / "run" / "step-000001" / "model.safetensors")
    from_step, _ = transfer.load_pixel_model(str(tmp_path / "run" / "step-000001"))
    from_run, _ = transfer.load_pixel_model(str(tmp_path / "run"))  # the latest: step 2
    step_params, run_params = dict(from_step.named_parameters()), dict(from_run.named_parameters())
    assert all(torch.equal(step_params[name], t) for name, t in first.items())
    assert not all(torch.equal(run_params[name], t) for name, t in first.items())
    with pytest.raises(hub.CheckpointError, match="neither a training run folder"):
        transfer.load_pixel_model(str(tmp_path))


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_finishes(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", *train_args(pipeline_dir, corpus, out, "--steps", "500", "--save-every", "1000"),
                      popen=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # saved, then a failing status so pipelines stop
    stopped = int((out / "latest").read_text().split("-")[1])
    assert 3 <= stopped < 500 and "checkpoint saved" in stderr
    done = train.train(train_args(pipeline_dir, corpus, out, "--steps", str(stopped + 2), "--save-every", "1000"))
    assert done["step"] == stopped + 2 and len(done["losses"]) == 2


# ----------------------------------------------------------------------------------------------------
# synth


@pytest.mark.slow
def test_synth_under_torchrun_resumes_after_a_kill(pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"object number {i}", "category": "nature/objects"}) + "\n"
                               for i in range(7)))
    out = tmp_path / "data"
    args = ["--ckpt", str(pipeline_dir), "--prompts", str(prompts), "--out", str(out), *SIZE, "--steps", "40"]
    proc = run_script("synth.py", *args, popen=True)
    deadline = time.time() + 120
    while len(list(out.glob("*.png"))) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    made = sorted(out.glob("*.png"))
    assert 3 <= len(made) < 14 and not (out / "metadata.jsonl").exists()
    (out / "000006-1.png.tmp").write_bytes(b"\x89PNG half written")  # a half-written file never counts
    mtimes = {p.name: p.stat().st_mtime_ns for p in made}
    done = run_script("synth.py", *args, nproc=2)
    assert done.returncode == 0, done.stderr
    assert all((out / name).stat().st_mtime_ns == t for name, t in mtimes.items()), "finished images are kept"
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [f"{p:06d}-{k}.png" for p in range(7) for k in range(2)]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == files and [r["seed"] for r in rows] == list(range(14))
    for r in rows:
        assert json.loads(Image.open(out / r["file"]).info["l2p"]) == r
        assert r["prompt"] == f"object number {int(r['file'][:6])}" and r["category"] == "nature/objects"
        assert r["transformer_sha256"] and r["steps"] == 40 and (r["height"], r["width"]) == (64, 96)


def test_synth_image_equals_the_latent_sampler(corpus, pipeline_dir):
    """A corpus image (made in a batch of 3) is what sample.py makes alone from the same source, prompt and
    seed: the noise depends on the seed only; batched matmuls may round one 8-bit level differently."""
    row = json.loads((corpus / "metadata.jsonl").read_text().splitlines()[3])
    pipe = hub.load_pipeline(str(pipeline_dir))
    image = sample.sample_latent(pipe, [row["prompt"]], [row["seed"]], 64, 96, steps=2)[0]
    ours = np.asarray(runtime.to_pil(image)).astype(int)
    stored = np.asarray(Image.open(corpus / row["file"])).astype(int)
    assert np.abs(ours - stored).max() <= 1 and (ours != stored).mean() < 0.01


# ----------------------------------------------------------------------------------------------------
# end to end


def test_end_to_end_synth_train_sample(pipeline_dir, corpus, tmp_path):
    result = train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "20", "--lr", "2e-3",
                                    "--save-every", "20"))
    losses = result["losses"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses
    png = tmp_path / "fox.png"
    sample.main(["--ckpt", str(tmp_path / "run"), "--prompt", "a red circle", "--h", "48", "--w", "80",
                 "--steps", "4", "--out", str(png)])
    image = Image.open(png)
    assert image.size == (80, 48) and json.loads(image.info["l2p"])["guidance"] == sample.PIXEL_GUIDANCE


# ----------------------------------------------------------------------------------------------------
# bad input: a clear error, and nothing overwritten


def test_empty_or_missing_prompt_file(pipeline_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path, message in ((empty, "holds no prompt"), (tmp_path / "nope.txt", "no such file")):
        with pytest.raises(ValueError, match=f"--prompts {path}: {message}"):
            synth.synthesize(["--ckpt", str(pipeline_dir), "--prompts", str(path), "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()


def test_size_not_a_multiple_of_the_patch(pipeline_dir, official_release, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match="--w 100 is not a positive multiple of 16"):
        sample.main(["--ckpt", str(official_release[0]), "--prompt", "x", "--h", "64", "--w", "100", "--out", str(out)])
    with pytest.raises(ValueError, match="--h 30 is not a positive multiple of 4"):
        synth.synthesize(["--ckpt", str(pipeline_dir), "--out", str(tmp_path / "d"), "--h", "30", "--w", "32"])
    assert out.read_bytes() == b"precious" and not (tmp_path / "d").exists()


def test_data_folder_without_metadata(pipeline_dir, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=f"--data {tmp_path / 'data'}: neither a corpus folder \\(no metadata.jsonl"):
        train.train(["--ckpt", str(pipeline_dir), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_trained_weights_on_another_source(pipeline_dir, corpus, tmp_path):
    from fixtures import tiny_zimage_pipeline

    other = tiny_zimage_pipeline(tmp_path / "other", seed=1)
    train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "1"))
    with pytest.raises(hub.CheckpointError, match=r"model.safetensors: trained on source .* whose transformer "
                                                  r"weights hash to \w+…, but .*other hashes to"):
        transfer.load_pixel_model(str(tmp_path / "run"), source=str(other))


def test_run_samples_after_its_source_moved(pipeline_dir, corpus, tmp_path):
    """--source stands in for the recorded source everywhere: the base weights and the text encoder."""
    moved = tmp_path / "source"
    shutil.copytree(pipeline_dir, moved)
    train.train(train_args(moved, corpus, tmp_path / "run", "--steps", "1"))
    shutil.rmtree(moved)
    png = tmp_path / "moved.png"
    sample.main(["--ckpt", str(tmp_path / "run"), "--source", str(pipeline_dir), "--prompt", "a red circle",
                 *SIZE, "--steps", "2", "--out", str(png)])
    assert Image.open(png).size == (int(SIZE[3]), int(SIZE[1]))


def test_output_folder_that_cannot_be_written(pipeline_dir, corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=f"--out {blocker / 'data'}: cannot write there"):
        synth.synthesize(["--ckpt", str(pipeline_dir), "--out", str(blocker / "data"), *SIZE])
    with pytest.raises(ValueError, match=f"--out {blocker / 'run'}: cannot write there"):
        train.train(train_args(pipeline_dir, corpus, blocker / "run"))
    with pytest.raises(ValueError, match=f"--out {blocker}: is a file, not a folder"):
        sample.main(["--ckpt", str(pipeline_dir), "--prompt", "x", "--h", "32", "--w", "32",
                     "--out", str(blocker / "x.png")])
    assert blocker.read_text() == "not a folder"


def test_run_with_a_small_patch_loads_and_samples(pipeline_dir, corpus, tmp_path):
    """An 8-px embedder (no downsampled init exists for it: 8 is not a multiple of 16) trains from random init,
    and its checkpoint loads with the trained tensor and samples a 2x finer token grid."""
    out = tmp_path / "p8"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1", "--patch", "8", "--patch-init", "random"))
    model, meta = transfer.load_pixel_model(str(out))
    assert meta["config"]["patches"] == [8, 16]
    saved = hub.read_tensors(transfer.checkpoint_file(str(out)), "cpu")["backbone.all_x_embedder.8-1.weight"]
    assert torch.equal(model.state_dict()["backbone.all_x_embedder.8-1.weight"], saved)
    png = tmp_path / "p8.png"
    sample.main(["--ckpt", str(out), "--prompt", "a red circle", *SIZE, "--patch", "8", "--steps", "2",
                 "--out", str(png)])
    assert Image.open(png).size == (int(SIZE[3]), int(SIZE[1]))
    with pytest.raises(ValueError, match=r"--patch 20: the model has no embedder for it \(trained: \[8, 16\]\), "
                                         r"and only multiples of a trained patch derive from one"):
        sample.main(["--ckpt", str(out), "--prompt", "a red circle", "--h", "80", "--w", "160", "--patch", "20",
                     "--out", str(png)])


def test_high_resolution_stage_continues_a_native_run(pipeline_dir, corpus, tmp_path):
    """4x the corpus size at 64-px patches: the token grid is unchanged; the stage starts from the 1x run, trains
    a freshly initialised 64-px embedder with a tiled head, and keeps what the 1x stage trained even where it
    now freezes it (the paper plan freezes the refiners that the released plan trained), bit for bit even when
    the stage computes in bf16."""
    first = tmp_path / "native"
    train.train(train_args(pipeline_dir, corpus, first, "--steps", "2"))
    big = tmp_path / "data4x"
    big.mkdir()
    rows = []
    for line in (corpus / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        Image.open(corpus / row["file"]).resize((384, 256), Image.NEAREST).save(big / row["file"])
        rows.append(json.dumps(row | {"height": 256, "width": 384}))
    (big / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    second = tmp_path / "4x"
    train.train(train_args(pipeline_dir, big, second, "--steps", "2", "--init", str(first), "--patch", "64",
                           "--head-tile", "128", "--freeze", "paper", "--dtype", "bf16"))
    stage1, _ = transfer.load_pixel_model(str(first))
    stage2, meta = transfer.load_pixel_model(str(second))
    assert meta["config"]["patches"] == [16, 64]
    refiner = "backbone.noise_refiner.0.attention.to_q.weight"
    assert torch.equal(stage2.state_dict()[refiner], stage1.state_dict()[refiner])
    assert not torch.equal(stage2.state_dict()["backbone.all_x_embedder.64-1.weight"],
                           transfer.downsampled_embedder(stage1.backbone.all_x_embedder["16-1"].weight,
                                                         stage1.backbone.all_x_embedder["16-1"].bias, 64)[0])
    png = tmp_path / "4x.png"
    sample.main(["--ckpt", str(second), "--prompt", "a red circle", "--h", "256", "--w", "384", "--patch", "64",
                 "--head-tile", "128", "--steps", "2", "--out", str(png)])
    assert Image.open(png).size == (384, 256)
