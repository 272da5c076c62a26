"""The bundled toy source: a faithful diffusers folder that follows its prompts, and the recipe on it."""

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
