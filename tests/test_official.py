"""The official release sampled exactly as its own code samples it, and the official dataset trained on as is.

The reference arithmetic below is written out from the released inference and training code (DiffSynth's Z-Image
scheduler, `model_fn_z_image`, the loss and `ImageCropAndResize`), not taken from our functions, so a drift in
ours fails here."""

import csv
import json

import pytest
import torch
from PIL import Image

import sample
import train
from conftest import train_args

STEPS, SHIFT = 30, 3.0


def official_schedule(steps: int = STEPS, shift: float = SHIFT) -> torch.Tensor:
    """DiffSynth's set_timesteps_z_image: linspace(1, 0, steps + 1)[:-1] in float32, shifted."""
    sigmas = torch.linspace(1, 0, steps + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def official_model_times(sigmas: torch.Tensor) -> torch.Tensor:
    """What the released DiT's timestep embedder receives: the pipeline casts the scheduler's timestep
    (sigma * 1000, float32) to bfloat16, model_fn computes (1000 - t) / 1000 and the DiT t * t_scale, in bf16."""
    timestep = (sigmas * 1000).to(torch.bfloat16)
    t = (1000 - timestep) / 1000
    return (t * 1000.0).float()


def times_fed(model, run) -> list[float]:
    """The time inputs the backbone's timestep embedder sees while `run()` samples (one per model call)."""
    seen = []
    hook = model.backbone.t_embedder.register_forward_pre_hook(lambda _, args: seen.append(float(args[0][0])))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_the_release_sees_the_official_bf16_times(official_release):
    path, model = official_release
    expected = official_model_times(official_schedule())
    assert expected[:6].tolist() == [0.0, 12.0, 24.0, 36.0, 48.0, 64.0]  # the rounding the issue describes
    fed = times_fed(model, lambda: sample.sample_pixels(model, lambda p: [torch.randn(3, 32)] * len(p), ["x"], [0],
                                                        32, 32, steps=STEPS, guidance=1.0, shift=SHIFT))
    assert torch.equal(torch.tensor(fed), expected)


def test_a_model_trained_with_exact_times_samples_with_exact_times(pipeline_dir, corpus, tmp_path):
    train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "1"))
    model = sample.load_model(str(tmp_path / "run"))
    assert model.pixel_model.cfg.timestep_rule == "exact"
    fed = times_fed(model.pixel_model, lambda: model(["a red circle"], [0], 32, 32, STEPS, 1.0))
    assert torch.equal(torch.tensor(fed), (1 - official_schedule()) * 1000)


def test_official_training_grid_is_the_snapped_one():
    """The released loss draws an index of the 500-point grid, casts that timestep to bf16, and add_noise snaps
    it back to the nearest grid timestep: 252 of the 500 sigmas, 222 distinct bf16 model times."""
    grid = official_schedule(500)
    timesteps = grid * 1000
    drawn = timesteps.to(torch.bfloat16)
    snapped = grid[torch.stack([torch.argmin((timesteps - t.float()).abs()) for t in drawn])]
    ours = train.training_sigmas(SHIFT, "official")
    assert torch.equal(ours, snapped)
    assert len(set(ours.tolist())) == 252 and len(set(official_model_times(ours).tolist())) == 222
    assert torch.equal(train.training_sigmas(SHIFT, "exact"), grid)


def test_official_rule_trains_and_is_recorded(pipeline_dir, corpus, tmp_path):
    train.train(train_args(pipeline_dir, corpus, tmp_path / "run", "--steps", "1", "--timesteps", "official"))
    assert sample.load_model(str(tmp_path / "run")).pixel_model.cfg.timestep_rule == "official"
    with pytest.raises(ValueError, match="--timesteps exact: --init .* was trained with official timesteps"):
        train.train(train_args(pipeline_dir, corpus, tmp_path / "next", "--steps", "1", "--init",
                               str(tmp_path / "run"), "--timesteps", "exact"))


def test_a_16px_model_samples_1280x768_with_patch_16_and_shift_3(official_release, pipeline_dir, tmp_path, capsys):
    path, _ = official_release
    png = tmp_path / "wide.png"
    sample.main(["--ckpt", str(path), "--source", str(pipeline_dir), "--prompt", "a red circle", "--h", "768",
                 "--w", "1280", "--steps", "1", "--out", str(png)])
    settings = json.loads(Image.open(png).text["l2p"])
    assert (settings["patch"], settings["shift"]) == (16, 3.0)
    assert "patch 16, shift 3, official timesteps" in capsys.readouterr().err


def test_a_larger_patch_is_derived_only_well_above_the_native_size(official_release, pipeline_dir, capsys):
    path, _ = official_release
    common = ["--ckpt", str(path), "--source", str(pipeline_dir), "--prompt", "a red circle", "--dry-run"]
    sample.main(common + ["--h", "2048", "--w", "2048"])  # 2x the native side: still the trained 16-px patch
    assert "2048x2048, patch 16, shift 3.000" in capsys.readouterr().err
    sample.main(common + ["--h", "4096", "--w", "4096"])  # beyond: the paper's 4K patch, derived, shift raised
    assert "4096x4096, patch 64, shift 4.000" in capsys.readouterr().err


def test_noise_on_cuda_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="--noise-device cuda: this machine has no CUDA device"):
        sample.initial_noise([0], (3, 16, 16), "cuda")


# ----------------------------------------------------------------------------------------------------
# Training noise and the official dataset


def test_training_noise_is_not_the_synthesis_noise(corpus):
    """Each image keeps one training noise across epochs, drawn from its seed through a salt: the first values
    no longer coincide with the latent noise synth.py drew from the same seed."""
    data = train.Corpus(corpus)
    args = type("Args", (), {"seed": 0, "fresh_noise": False})
    batch = [(0, 0)]
    _, _, noise = train.load_batch(data, batch, args, 0, train.training_sigmas())
    _, _, again = train.load_batch(data, batch, args, 7, train.training_sigmas())
    assert torch.equal(noise, again)  # the same image, another step: the same noise
    # a CPU generator's first values do not depend on the shape drawn: these began the latent noise of the image
    synthesis = sample.initial_noise([data.rows[0]["seed"]], (64,))
    assert not torch.allclose(noise.flatten()[:64], synthesis.flatten())


def write_csv_corpus(folder, rows: list[dict], sizes: list[tuple[int, int]]):
    """Images of the given (width, height) and a metadata.csv with the official dataset's columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 120, 200)).save(folder / f"img{i}.png")
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def official_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """DiffSynth's ImageCropAndResize.get_height_width, written out."""
    if width * height > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        height, width = int(height / scale), int(width / scale)
    return height // multiple * multiple, width // multiple * multiple


def test_a_csv_corpus_of_three_sizes_trains(pipeline_dir, tmp_path):
    sizes = [(56, 40), (64, 64), (100, 70)]  # (width, height), the last above --max-pixels
    rows = [{"image": f"img{i}.png", "prompt": f"a shape number {i}", "seed": i} for i in range(3)]
    data = write_csv_corpus(tmp_path / "data", rows, sizes)
    corpus = train.Corpus(data, max_pixels=4096)
    assert [(r["height"], r["width"]) for r in corpus.rows] == [official_size(w, h, 4096, 16) for w, h in sizes]
    assert [tuple(corpus.image(i).shape) for i in range(3)] == [(3, r["height"], r["width"]) for r in corpus.rows]
    done = train.train(train_args(pipeline_dir, data, tmp_path / "run", "--steps", "3", "--max-pixels", "4096"))
    assert done["step"] == 3
    with pytest.raises(ValueError, match="images train at 3 sizes .* use --batch-size 1"):
        train.train(train_args(pipeline_dir, data, tmp_path / "run2", "--batch-size", "2", "--max-pixels", "4096"))


@pytest.mark.parametrize("broken, message", [
    ({"image": "missing.png"}, r"metadata.csv:3: image missing.png is missing"),
    ({"seed": ""}, r"metadata.csv:3: needs an integer seed"),
])
def test_a_bad_csv_row_is_refused_before_training(pipeline_dir, tmp_path, broken, message):
    rows = [{"image": f"img{i}.png", "prompt": f"a shape number {i}", "seed": i} for i in range(2)]
    rows[1] |= broken
    data = write_csv_corpus(tmp_path / "data", rows, [(32, 32), (32, 32)])
    with pytest.raises(ValueError, match=message):
        train.train(train_args(pipeline_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run" / "latest").exists()
