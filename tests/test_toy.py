"""The bundled toy source: a faithful diffusers folder that follows its prompts, and the recipe on it."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import hub
import sample
import shapes
import synth
import train

SOURCE = str(hub.BUNDLED_SOURCE)
pytestmark = pytest.mark.skipif(not hub.BUNDLED_SOURCE.is_dir(), reason="the bundled toy source is not built")


def test_bundled_source_is_a_faithful_zimage_folder():
    """It loads in diffusers' ZImagePipeline too, and both sample the same image from the same latents."""
    from diffusers import ZImagePipeline

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = ZImagePipeline.from_pretrained(SOURCE)("a red circle above a blue square", height=128, width=128,
                                                      num_inference_steps=4, guidance_scale=2.0,
                                                      latents=latents.clone(), output_type="np").images[0]
    got = sample.sample_latent(hub.load_pipeline(SOURCE), ["a red circle above a blue square"], [0], 128, 128,
                               steps=4, guidance=3.0, latents=latents.clone())[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.slow
def test_bundled_source_follows_its_prompts():
    model = sample.load_model(SOURCE)
    d = model.defaults
    scores, _, _ = shapes.evaluate(model, shapes.evaluation_specs(10), 1, d["steps"], d["guidance"], None)
    print("bundled source ShapeEval:", shapes.fmt(scores))
    assert scores["overall"] >= 0.7, scores


@pytest.mark.slow
def test_reduced_recipe_transfer_reads_the_caption_and_scratch_does_not(tmp_path):
    """100 steps of the card's recipe on 96 source images: the transferred model already reads the caption at high
    noise (its held-out loss rises when the prompts are shuffled), while the same architecture from scratch does
    not, whether it trains everything or, as a broken transfer would, the card's layers only with nothing copied."""
    data, held = tmp_path / "data", tmp_path / "held"
    synth.synthesize(["--prompts", str(shapes.write_prompts(tmp_path / "p.txt", 48, seed=3)), "--out", str(data),
                      "--steps", "10", "--batch-size", "16"])
    synth.synthesize(["--prompts", str(shapes.write_prompts(tmp_path / "h.txt", 32, seed=98)), "--out", str(held),
                      "--steps", "10", "--batch-size", "16", "--seed", "200000", "--images-per-prompt", "1"])
    gaps = {}
    for init, freeze in (("transfer", "paper"), ("scratch", "full"), ("scratch", "paper")):
        out = tmp_path / f"{init}-{freeze}"
        train.train(["--data", str(data), "--out", str(out), "--init", init, "--freeze", freeze, "--steps", "100",
                     "--log-every", "100"])
        gaps[init, freeze] = shapes.caption_gap(str(out), held)[1]
    print(gaps)
    assert gaps["transfer", "paper"] > 1e-3
    assert gaps["transfer", "paper"] > 10 * max(abs(gaps["scratch", "full"]), abs(gaps["scratch", "paper"]))


def test_a_signal_ends_the_claims_run_without_judging_the_unfinished_row(tmp_path, monkeypatch):
    """A signal during a row's training: train.py saves the row's run, and the claims run must then exit with 128 + the
    signal rather than judge the half-trained model and record its scores as the row's, which a rerun would keep."""
    def synthesize(argv):  # the corpus's metadata as synth.py writes it: the claims read only the prompts
        out, prompts = (Path(argv[argv.index(flag) + 1]) for flag in ("--out", "--prompts"))
        out.mkdir(parents=True)
        rows = [json.dumps({"prompt": p}) + "\n" for p in prompts.read_text().splitlines() for _ in range(2)]
        (out / "metadata.jsonl").write_text("".join(rows))

    monkeypatch.setattr(synth, "synthesize", synthesize)
    monkeypatch.setattr(train, "train", lambda argv: {"step": 7, "losses": [0.5] * 7, "out": None,
                                                      "stopped": signal.SIGTERM})
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "scores.json").write_text(json.dumps({"overall": 0.8}))  # the source row, judged before
    with pytest.raises(SystemExit) as stop:
        shapes.main(["claims", "--work", str(tmp_path), "--prompts", "4"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert [p.parent.name for p in tmp_path.glob("*/scores.json")] == ["source"]
