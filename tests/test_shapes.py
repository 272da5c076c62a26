"""The toy world: prompts, rendering and ShapeEval, which must pass ground truth and fail noise."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import shapes


def test_prompts_round_trip_and_cover_the_categories():
    specs = shapes.evaluation_specs(10)
    assert [s.category for s in specs[::10]] == list(shapes.CATEGORIES)
    assert all(shapes.parse_prompt(s.prompt) == s for s in specs)
    assert shapes.Spec("position", (("circle", None, 1), ("square", None, 1)), "left").prompt == \
        "a circle to the left of a square"
    assert shapes.Spec("counting", (("triangle", None, 3),)).prompt == "three triangles"
    with pytest.raises(ValueError, match="not a prompt of the shapes world"):
        shapes.parse_prompt("a dog")


def test_shapeeval_passes_ground_truth():
    specs = shapes.evaluation_specs(10) * 5
    images = [shapes.render_spec(spec, seed) for seed, spec in enumerate(specs)]
    scores = shapes.shape_eval(specs, images)
    assert scores["overall"] >= 0.99 and min(scores.values()) >= 0.95, scores


def test_shapeeval_passes_ground_truth_at_four_times_the_size():
    specs = shapes.evaluation_specs(5)
    images = [shapes.render_spec(spec, seed, size=4 * shapes.NATIVE) for seed, spec in enumerate(specs)]
    assert shapes.shape_eval(specs, images)["overall"] >= 0.95


@pytest.mark.parametrize("kind", ["uniform", "smooth"])
def test_shapeeval_fails_noise(kind):
    specs = shapes.evaluation_specs(10)
    rng = np.random.default_rng(0)
    images = []
    for _ in specs:
        if kind == "uniform":
            images.append(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
        else:  # colour blobs: coarse noise upsampled smoothly
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            images.append(coarse.resize((128, 128), Image.BILINEAR))
    assert shapes.shape_eval(specs, images)["overall"] <= 0.2


def test_the_judge_rejects_wrong_images():
    rng = random.Random(0)
    red_circle = shapes.Spec("colors", (("circle", "red", 1),))
    placed = shapes.layout(red_circle, rng)
    assert shapes.follows(red_circle, shapes.detect(shapes.render(placed)))
    blue = [shapes.Placed(p.shape, "blue", p.cx, p.cy, p.size) for p in placed]
    assert not shapes.follows(red_circle, shapes.detect(shapes.render(blue)))
    square = [shapes.Placed("square", p.color, p.cx, p.cy, p.size) for p in placed]
    assert not shapes.follows(red_circle, shapes.detect(shapes.render(square)))
    extra = placed + [shapes.Placed("triangle", "green", 20, 20, 24)] if placed[0].cx > 50 or placed[0].cy > 50 else \
        placed + [shapes.Placed("triangle", "green", 100, 100, 24)]
    assert not shapes.follows(red_circle, shapes.detect(shapes.render(extra)))
    left = shapes.Spec("position", (("circle", None, 1), ("square", None, 1)), "left")
    scene = shapes.layout(left, rng)
    assert shapes.follows(left, shapes.detect(shapes.render(scene)))
    swapped = [shapes.Placed(p.shape, p.color, shapes.NATIVE - p.cx, p.cy, p.size) for p in scene]
    assert not shapes.follows(left, shapes.detect(shapes.render(swapped)))
    three = shapes.Spec("counting", (("square", None, 3),))
    scene = shapes.layout(three, rng)
    assert shapes.follows(three, shapes.detect(shapes.render(scene)))
    assert not shapes.follows(three, shapes.detect(shapes.render(scene[:2])))


def test_real_corpus_has_synths_layout(tmp_path):
    prompts = ["a red circle", "two squares", "a circle above a triangle"]
    out = shapes.render_corpus(tmp_path / "real", prompts, 2)
    import train

    corpus = train.Corpus(out)
    assert len(corpus) == 6 and corpus.sizes == [(128, 128)]
    specs = [shapes.parse_prompt(r["prompt"]) for r in corpus.rows]
    images = [Image.open(out / r["file"]) for r in corpus.rows]
    assert shapes.shape_eval(specs, images)["overall"] == 1.0


def test_build_source_saves_a_loadable_source_and_resumes_from_it(tmp_path):
    """The builder's whole path at a few steps: the folder loads like a hub model, and --resume trains the
    saved DiT further while the VAE, text encoder and tokenizer stay as they were."""
    import hub

    out = tmp_path / "toy"
    common = ["build-source", "--out", str(out), "--dit-steps", "2", "--dit-batch", "4", "--dataset", "128",
              "--eval-every", "0"]
    shapes.main(common + ["--vae-steps", "2"])
    before = hub.load_pipeline(str(out))
    assert hub.recipe_card(str(out))["size"] == [shapes.NATIVE, shapes.NATIVE]
    shapes.main(common + ["--resume"])
    after = hub.load_pipeline(str(out))
    dit_before, dit_after = before.transformer.state_dict(), after.transformer.state_dict()
    assert any(not torch.equal(dit_before[k], dit_after[k]) for k in dit_before)
    assert all(torch.equal(v, after.vae.state_dict()[k]) for k, v in before.vae.state_dict().items())
    ids_before, ids_after = before.text.tokenizer(["a red circle"])[0], after.text.tokenizer(["a red circle"])[0]
    assert torch.equal(ids_before, ids_after)
