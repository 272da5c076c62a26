"""The whole recipe on SD3 and FLUX sources: synth, transfer, 20 training steps, pixel sampling (tiny models)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import hub
import sample
import synth
import train
import transfer
from fixtures import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares"]
SIZE = ["--h", "32", "--w", "48"]  # multiples of the 16-px pixel patch and of the tiny VAE x patch
STEPS = 20
HEAD = "8,16,32,64"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sd3", "flux-dev", "flux-schnell"])
def recipe_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, source folder, run folder) after synth and STEPS training steps of L2P on the tiny source (text
    features through the on-disk cache: SD3 / FLUX conditioning is stored per prompt and read back)."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    source = tiny_sd3_pipeline(root / "source") if family == "sd3" else \
        tiny_flux_pipeline(root / "source", guidance=family == "flux-dev")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = synth.synthesize(["--ckpt", str(source), "--prompts", str(prompts), "--out", str(root / "data"), *SIZE,
                             "--steps", "2", "--images-per-prompt", "2", "--device", "cpu", "--dtype", "fp32"])
    run = root / "run"
    result = train.train(["--ckpt", str(source), "--data", str(data), "--out", str(run), "--steps", str(STEPS),
                          "--batch-size", "2", "--blocks", "1", "--head-widths", HEAD, "--lr", "1e-3",
                          "--log-every", "5", "--save-every", str(STEPS), "--text-cache", str(root / "cache")])
    assert result["step"] == STEPS and all(torch.isfinite(torch.tensor(result["losses"])))
    return family, source, run


def test_training_changes_only_the_plan(recipe_run):
    """Trained tensors moved away from the transfer; frozen blocks keep the source's bits; the freeze plan names
    the family's blocks (FLUX: first double, last single block)."""
    family, source, run = recipe_run
    model, meta = transfer.load_pixel_model(str(run), ema=False)
    src = hub.load_pipeline(str(source), parts=("transformer",)).transformer.state_dict()
    ours = model.backbone.state_dict()
    trained = transfer.tensor_names(transfer.checkpoint_file(str(run), ema=False))
    frozen = [k for k in ours if k in src and f"backbone.{k}" not in trained]
    assert frozen and all(torch.equal(ours[k], src[k].to(ours[k].dtype)) for k in frozen)
    moved = [k for k in ours if k in src and f"backbone.{k}" in trained and not torch.equal(ours[k], src[k])]
    assert moved, "training changed none of the copied tensors it was meant to train"
    first, last = transfer.BLOCK_LISTS["sd3" if family == "sd3" else "flux"]
    n_last = len(getattr(model.backbone, last))
    assert any(k.startswith(f"backbone.{first}.0.") for k in trained)
    assert any(k.startswith(f"backbone.{last}.{n_last - 1}.") for k in trained)
    frozen_block = n_last - 2  # trained only when it is also among the first n (= 1) blocks of the same list
    if not (first == last and frozen_block < 1):
        assert not any(k.startswith(f"backbone.{last}.{frozen_block}.") for k in trained)
    assert any(k.startswith("detailer_head.") for k in trained)
    assert not any(".pos_embed.proj." in k or k.startswith(("backbone.x_embedder.", "backbone.proj_out."))
                   for k in model.state_dict()), "the latent embedder and final layer must be gone"


def test_pixel_sampling_writes_the_image_an_euler_loop_makes(recipe_run, tmp_path):
    """The PNG sample.py writes is the image a plain Euler loop written here makes from the same seed's noise:
    guidance (classifier-free, or FLUX-dev's embedded scale), the shifted schedule and the sign all count."""
    family, source, run = recipe_run
    steps, guidance, seed, (h, w) = 3, 2.0, 42, (32, 48)
    written = sample.main(["--ckpt", str(run), "--prompt", PROMPTS[0], "--h", str(h), "--w", str(w), "--steps",
                           str(steps), "--guidance", str(guidance), "--seed", str(seed), "--out", str(tmp_path / "x.png"),
                           "--device", "cpu", "--dtype", "fp32"])
    image = Image.open(written[0])
    assert image.size == (w, h) and json.loads(image.text["l2p"])["prompt"] == PROMPTS[0]
    model, _ = transfer.load_pixel_model(str(run))
    text = hub.load_pipeline(str(source), parts=("text",)).text
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    raw = torch.linspace(1, 0, steps + 1)
    sigmas = 3.0 * raw / (1 + 2.0 * raw)  # the release's shift 3
    with torch.no_grad():
        cond, uncond = text(PROMPTS[:1]), text([""])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sigma = torch.full((1,), float(s))
            if family == "flux-dev":  # guidance-distilled: the scale is an input, no unconditional pass
                v = model(x, sigma, cond, guidance=torch.full((1,), guidance))
            else:
                v_cond, v_uncond = model(x, sigma, cond), model(x, sigma, uncond)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (s_next - s) * v
    expected = ((x[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).round()
    got = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(h, w, 3)
    assert (got - expected).abs().max() <= 1 and got.std() > 0


def test_pixel_dry_run_estimates_memory(recipe_run, capsys, monkeypatch):
    """The dry run's parts equal a count by hand, byte for byte: fp32 weights of the pixel model and its text
    encoders, six full-size float32 images at the guidance step, 12 (tokens x width) activations per block input,
    the feature map at the head's bottleneck, and the head's skips, input and last decoder stage (widths 8-64)."""
    family, source, run = recipe_run
    printed = {}
    print_memory = sample.print_memory
    monkeypatch.setattr(sample, "print_memory", lambda parts, *a: printed.update(parts) or print_memory(parts, *a))
    sample.main(["--ckpt", str(run), "--prompt", PROMPTS[0], "--h", "64", "--w", "64", "--dry-run", "--guidance", "2",
                 "--device", "cpu", "--dtype", "fp32"])
    err = capsys.readouterr().err
    model, _ = transfer.load_pixel_model(str(run))
    text = hub.load_pipeline(str(source), parts=("text",)).text
    encoders = [m for m in vars(text).values() if isinstance(m, torch.nn.Module)]
    params = sum(p.numel() for m in [model, *encoders] for p in m.parameters())
    area, width = 64 * 64, model.cfg.backbone.dim
    cfg_batch = 1 if family == "flux-dev" else 2  # FLUX-dev takes guidance as an input: no CFG batch
    copies = 2 if family == "flux-dev" else 6  # x and the head's output; or x, the CFG pair, the output pair, the lerp
    tokens = (64 // 16) ** 2 + hub.text_tokens(model.cfg.backbone)
    by_hand = {"weights": 4 * params, "images": copies * 3 * area * 4,
               "transformer": cfg_batch * tokens * width * 4 * 12, "feature map": cfg_batch * width * 4 * 4 * 4,
               "head": cfg_batch * 4 * (3 * area + (8 + 16 / 4 + 32 / 16 + 64 / 64) * area + (2 * 8 + 8 + 8) * area)}
    assert {k: printed[k] for k in by_hand} == by_hand and printed["attention scores"] == 0  # fused SDPA: none
    assert "patch 16" in err and "fits: about" in err and re.search(r"  head\s+[\d.]+ GiB", err)


@pytest.mark.slow
def test_measured_peak_is_at_most_a_quarter_over_the_estimate(recipe_run, tmp_path):
    """The estimate's bound at a size where the full-size images and the head tiles dominate: sample.py, in its own
    process (the peak is the process's maximum RSS), prints the estimate and the measured peak."""
    _, _, run = recipe_run
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--prompt", PROMPTS[0], "--h", "2048",
                             "--w", "2048", "--steps", "2", "--guidance", "2", "--out", str(tmp_path / "x.png"),
                             "--device", "cpu", "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    share = int(re.search(r"measured peak .*\((\d+)% of the estimate\)", result.stderr).group(1))
    # The bound users rely on is the upper one: sizes are refused by the estimate. The estimate runs high (freed
    # pages are reused across phases): 84-88% measured alone, 74% for FLUX-dev (one image, no CFG batch) once in a
    # full suite run, so the lower bound only catches an estimate that has come loose.
    assert 65 <= share <= 125, result.stderr


def test_dry_run_caps_the_head_tile_on_cpu(recipe_run, capsys):
    """On CPU the head tile is at most CPU_HEAD_TILE (faster there), a tight budget still shrinks it, and a
    given --head-tile is kept."""
    _, _, run = recipe_run

    def tile(*flags):
        sample.main(["--ckpt", str(run), "--prompt", PROMPTS[0], "--h", "2048", "--w", "2048", "--dry-run",
                     "--device", "cpu", "--dtype", "fp32", *flags])
        return re.search(r"head tile (\w+)", capsys.readouterr().err).group(1)

    assert tile() == str(sample.CPU_HEAD_TILE)
    assert int(tile("--memory-budget", "0.2")) < sample.CPU_HEAD_TILE
    assert tile("--head-tile", "0") == "None"
    assert tile("--head-tile", "2048") == "2048"


def test_attention_chunk_only_for_the_math_backend(recipe_run, capsys):
    """The fused SDPA kernels hold no score matrix, so only the math backend is given a query chunk (and its
    scores are counted)."""
    _, _, run = recipe_run

    def plan(*flags):
        sample.main(["--ckpt", str(run), "--prompt", PROMPTS[0], "--h", "2048", "--w", "2048", "--dry-run",
                     "--memory-budget", "0.05", "--device", "cpu", "--dtype", "fp32", *flags])
        err = capsys.readouterr().err
        scores = float(re.search(r"attention scores\s+([\d.]+) GiB", err).group(1))
        return re.search(r"attention chunk (\w+)", err).group(1), scores

    assert plan() == ("None", 0.0)
    chunk, scores = plan("--sdpa-backend", "math")
    assert chunk != "None" and scores > 0
