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
@pytest.mark.xfail(strict=True, reason="issue 4 open: runs this short (up to 1000 steps at 128 px, 1200 at 64 px "
                                       "tried) score about 0 on ShapeEval, transferred or not: objects stay speckled "
                                       "with several colours (README, 'Short training'); remove once the recipe is fixed")
def test_reduced_recipe_transfer_beats_scratch(tmp_path):
    """Synthesise a small corpus with the bundled source, train the transferred and the from-scratch pixel
    models for the same steps, and judge both with ShapeEval on the same prompts and seeds."""
    prompts = shapes.write_prompts(tmp_path / "prompts.txt", 48, seed=3)
    data = tmp_path / "data"
    synth.synthesize(["--prompts", str(prompts), "--out", str(data), "--steps", "10", "--batch-size", "16"])
    specs, scores = shapes.evaluation_specs(4), {}
    for init, freeze in (("transfer", "paper"), ("scratch", "full")):
        out = tmp_path / init
        train.train(["--data", str(data), "--out", str(out), "--init", init, "--freeze", freeze, "--steps", "120",
                     "--log-every", "40"])
        model = sample.load_model(str(out))
        scores[init], _, _ = shapes.evaluate(model, specs, 1, 10, model.defaults["guidance"], None)
    print({k: shapes.fmt(v) for k, v in scores.items()})
    assert scores["transfer"]["overall"] > scores["scratch"]["overall"] + 0.1, scores
