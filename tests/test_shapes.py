"""The toy world: prompts, rendering, ShapeEval (which must pass ground truth and fail noise, and under its
GenEval-like judge pass ground truth with image defects too) and the image quality number (which must rank
ground truth first and grow with every defect)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import shapes

JUDGES = list(shapes.JUDGES)


def test_prompts_round_trip_and_cover_the_categories():
    specs = shapes.evaluation_specs(10)
    assert [s.category for s in specs[::10]] == list(shapes.CATEGORIES)
    assert all(shapes.parse_prompt(s.prompt) == s for s in specs)
    assert shapes.Spec("position", (("circle", None, 1), ("square", None, 1)), "left").prompt == \
        "a circle to the left of a square"
    assert shapes.Spec("counting", (("triangle", None, 3),)).prompt == "three triangles"
    with pytest.raises(ValueError, match="not a prompt of the shapes world"):
        shapes.parse_prompt("a dog")


@pytest.mark.parametrize("judge", JUDGES)
def test_shapeeval_passes_ground_truth(judge):
    specs = shapes.evaluation_specs(10) * 5
    images = [shapes.render_spec(spec, seed) for seed, spec in enumerate(specs)]
    scores = shapes.shape_eval(specs, images, judge)
    assert scores["overall"] >= 0.99 and min(scores.values()) >= 0.95, scores


@pytest.mark.parametrize("judge", JUDGES)
def test_shapeeval_passes_ground_truth_at_four_times_the_size(judge):
    specs = shapes.evaluation_specs(5)
    images = [shapes.render_spec(spec, seed, size=4 * shapes.NATIVE) for seed, spec in enumerate(specs)]
    assert shapes.shape_eval(specs, images, judge)["overall"] >= 0.95


@pytest.mark.parametrize("judge", JUDGES)
@pytest.mark.parametrize("kind", ["uniform", "smooth"])
def test_shapeeval_fails_noise(kind, judge):
    specs = shapes.evaluation_specs(10)
    rng = np.random.default_rng(0)
    images = []
    for _ in specs:
        if kind == "uniform":
            images.append(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
        else:  # colour blobs: coarse noise upsampled smoothly
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            images.append(coarse.resize((128, 128), Image.BILINEAR))
    assert shapes.shape_eval(specs, images, judge)["overall"] <= 0.2
    if kind == "uniform":  # not even a square as large as the image (a noise field differs from the background)
        assert all(d.shape == "unknown" for image in images for d in shapes.detect(image, judge))


@pytest.mark.parametrize("judge", JUDGES)
def test_the_judge_rejects_wrong_images(judge):
    def follows(spec, placed):
        return shapes.follows(spec, shapes.detect(shapes.render(placed), judge))

    rng = random.Random(0)
    red_circle = shapes.Spec("colors", (("circle", "red", 1),))
    placed = shapes.layout(red_circle, rng)
    assert follows(red_circle, placed)
    blue = [shapes.Placed(p.shape, "blue", p.cx, p.cy, p.size) for p in placed]
    assert not follows(red_circle, blue)
    square = [shapes.Placed("square", p.color, p.cx, p.cy, p.size) for p in placed]
    assert not follows(red_circle, square)
    extra = placed + [shapes.Placed("triangle", "green", 20, 20, 24)] if placed[0].cx > 50 or placed[0].cy > 50 else \
        placed + [shapes.Placed("triangle", "green", 100, 100, 24)]
    assert not follows(red_circle, extra)
    left = shapes.Spec("position", (("circle", None, 1), ("square", None, 1)), "left")
    scene = shapes.layout(left, rng)
    assert follows(left, scene)
    swapped = [shapes.Placed(p.shape, p.color, shapes.NATIVE - p.cx, p.cy, p.size) for p in scene]
    assert not follows(left, swapped)
    three = shapes.Spec("counting", (("square", None, 3),))
    scene = shapes.layout(three, rng)
    assert follows(three, scene)
    assert not follows(three, scene[:2])


# Ground truth with image defects. Each defect is a function (placed, strength, seed) -> image of the objects
# `placed`, as render draws them, with the defect at that strength (seed: for its random choices).


def masks(placed):
    """(objects, H, W) bool: the pixels of each object (the layout keeps them apart)."""
    return np.stack([(np.asarray(shapes.render([p])) != shapes.BACKGROUND).any(-1) for p in placed])


def pixels(placed):
    return np.asarray(shapes.render(placed)).astype(np.float64)


def to_image(x):
    return Image.fromarray(x.clip(0, 255).round().astype(np.uint8))


def salt_and_pepper(placed, rate, seed):
    """`rate` of each object's pixels black or white, and a tenth of that of the background's."""
    x, rng = pixels(placed), np.random.default_rng(seed)
    hit = rng.random(x.shape[:2]) < np.where(masks(placed).any(0), rate, rate / 10)
    x[hit] = np.where(rng.random((hit.sum(), 1)) < 0.5, 0, 255)
    return to_image(x)


def speckle(placed, rate, seed, background_rate=None):
    """`rate` of each object's pixels in random colours, and `background_rate` (default: the same) of the
    background's."""
    x, rng = pixels(placed), np.random.default_rng(seed)
    outside = rate if background_rate is None else background_rate
    hit = rng.random(x.shape[:2]) < np.where(masks(placed).any(0), rate, outside)
    x[hit] = rng.integers(0, 256, (hit.sum(), 3))
    return to_image(x)


def patchwork(placed, shares, seed):
    """Each object in 4 x 4-px patches at random places: shares[0] of them in its own colour, shares[1] in the
    next colour of the palette, and so on."""
    x, rng = pixels(placed), np.random.default_rng(seed)
    names = list(shapes.PALETTE)
    for p, mask in zip(placed, masks(placed)):
        ys, xs = np.nonzero(mask)
        patches = [np.s_[y:y + 4, x0:x0 + 4] for y in range(ys.min() // 4 * 4, ys.max() + 1, 4)
                   for x0 in range(xs.min() // 4 * 4, xs.max() + 1, 4) if mask[y:y + 4, x0:x0 + 4].any()]
        ends = np.round(np.cumsum(shares) * len(patches))
        for rank, i in enumerate(rng.permutation(len(patches))):
            colour = names[(names.index(p.color) + int(np.searchsorted(ends, rank, side="right"))) % len(names)]
            x[patches[i]][mask[patches[i]]] = shapes.PALETTE[colour]
    return to_image(x)


def two_tone(placed, minority, seed):
    return patchwork(placed, (1 - minority, minority), seed)


def rounded_corners(placed, radius, seed):
    """Squares with corners rounded with a radius of `radius` times their side."""
    image = shapes.render(placed)
    draw = ImageDraw.Draw(image)
    for p in placed:
        if p.shape == "square":
            box = (p.cx - p.size / 2, p.cy - p.size / 2, p.cx + p.size / 2, p.cy + p.size / 2)
            draw.rectangle(box, fill=shapes.BACKGROUND)
            draw.rounded_rectangle(box, radius=radius * p.size, fill=shapes.PALETTE[p.color])
    return image


def colour_bleeding(placed, width, seed):
    """Each object's colour bleeds `width` px into the background and fades out there: the object drawn 2k px
    larger, in a blend of its colour and the background's that grows fainter with k, for k = width .. 1."""
    x = pixels(placed)
    background = (x == shapes.BACKGROUND).all(-1)
    for p in placed:
        for k in range(width, 0, -1):
            halo = masks([shapes.Placed(p.shape, p.color, p.cx, p.cy, p.size + 2 * k)])[0] & background
            alpha = 1 - k / (width + 1)
            x[halo] = alpha * np.array(shapes.PALETTE[p.color]) + (1 - alpha) * np.array(shapes.BACKGROUND)
    return to_image(x)


def blur(placed, sigma, seed):
    return shapes.render(placed).filter(ImageFilter.GaussianBlur(sigma))


def holes(placed, width, seed):
    """A disc of background colour `width` times an object's side wide at the centre of its inscribed circle."""
    image = shapes.render(placed)
    draw = ImageDraw.Draw(image)
    for p in placed:
        cy = p.cy + p.size / 2 - 0.309 * p.size if p.shape == "triangle" else p.cy  # its inradius: 0.309 of the side
        r = width * p.size / 2
        draw.ellipse((p.cx - r, cy - r, p.cx + r, cy + r), fill=shapes.BACKGROUND)
    return image


def tint(placed, levels, seed):
    """Every pixel `levels` darker in each channel: too faint to leave the world's colours."""
    return to_image(pixels(placed) - levels)


def another_background(placed, colour, seed):
    return shapes.render(placed, background=colour)


def defective(defect, strength, specs, first_seed=0):
    """Ground truth for `specs` (seeds first_seed, first_seed + 1, ...) with a defect."""
    return [defect(shapes.layout(spec, random.Random(seed)), strength, seed)
            for seed, spec in enumerate(specs, first_seed)]


DEFECTS = {  # name: (defect, strength, what a person sees: the prompt's objects, with a defect of image quality)
    "salt and pepper": (salt_and_pepper, 0.2, "a fifth of each object's pixels black or white, some specks around"),
    "speckle": (speckle, 0.2, "a fifth of each object's pixels (and of the background's) in random colours"),
    "two-tone": (two_tone, 0.3, "each object in its colour, with 30% of its 4-px patches in another palette colour"),
    "rounded corners": (rounded_corners, 0.25, "squares with corners rounded a quarter of their side: squares"),
    "colour bleeding": (colour_bleeding, 4, "each object's colour fading out over 4 px into the background"),
    "blur": (blur, 2.0, "the whole image blurred (Gaussian, sigma 2 px): soft but plain objects"),
    "another background": (another_background, (215, 215, 200), "the objects on a darker, greyer background"),
    "holes": (holes, 0.4, "a hole of background colour, 0.4 of its side wide, in the middle of each object"),
}
BREAK_THE_COLOUR_JUDGE = ["salt and pepper", "speckle", "two-tone", "colour bleeding", "blur", "another background"]


@pytest.mark.parametrize("name", list(DEFECTS))
def test_the_geneval_judge_passes_ground_truth_with_image_defects(name):
    """Verdict: every image shows the prompt's objects, so ShapeEval is 1.0. The colour judge breaks most of these
    objects into fragments (or, on another background, takes the background for one) and scores at most 0.7."""
    defect, strength, _ = DEFECTS[name]
    specs = shapes.evaluation_specs(5)
    images = defective(defect, strength, specs)
    assert shapes.shape_eval(specs, images)["overall"] == 1.0
    if name in BREAK_THE_COLOUR_JUDGE:
        assert shapes.shape_eval(specs, images, "colour")["overall"] <= 0.7


def test_fully_rounded_squares_are_circles():
    """Verdict: a square with its corners rounded by half its side is a circle, so "a square" fails."""
    square = shapes.Spec("single_object", (("square", None, 1),))
    images = defective(rounded_corners, 0.5, [square] * 5)
    assert [[d.shape for d in shapes.detect(image)] for image in images] == [["circle"]] * 5


TOUCHING = [  # two objects of different colours that touch, and prompts they follow
    ([shapes.Placed("square", "red", 40, 64, 40), shapes.Placed("circle", "blue", 80, 64, 40)],
     [shapes.Spec("position", (("square", None, 1), ("circle", None, 1)), "left"),
      shapes.Spec("color_attr", (("square", "red", 1), ("circle", "blue", 1)))]),
    ([shapes.Placed("triangle", "green", 64, 40, 40), shapes.Placed("square", "yellow", 64, 80, 40)],
     [shapes.Spec("position", (("triangle", None, 1), ("square", None, 1)), "above"),
      shapes.Spec("color_attr", (("triangle", "green", 1), ("square", "yellow", 1)))]),
    ([shapes.Placed("circle", "purple", 44, 44, 44), shapes.Placed("circle", "red", 84, 44, 40)],
     [shapes.Spec("counting", (("circle", None, 2),))]),
]


@pytest.mark.parametrize("placed, specs", TOUCHING)
def test_touching_objects_of_different_colours_are_two_objects(placed, specs):
    """Verdict: two objects, with their shapes, colours and places, also when both are speckled."""
    for image in (shapes.render(placed), speckle(placed, 0.2, seed=0, background_rate=0.02)):
        found = shapes.detect(image)
        assert sorted((d.shape, d.color) for d in found) == sorted((p.shape, p.color) for p in placed)
        assert all(shapes.follows(spec, found) for spec in specs)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_an_object_of_no_clear_colour_has_none(shape):
    """An object in patches of palette colours, the prompted one first. Verdicts: 70% red, 30% green is a red
    object; red and green half and half, or three or four colours in like shares, have no dominant colour: the
    object is there, in its shape, so "a <shape>" passes, but "a red <shape>" fails."""
    named, plain = shapes.Spec("colors", ((shape, "red", 1),)), shapes.Spec("single_object", ((shape, None, 1),))
    for shares, red in (((0.7, 0.3), True), ((0.5, 0.5), False), ((1 / 3,) * 3, False), ((0.25,) * 4, False)):
        for seed in range(3):
            placed = shapes.layout(named, random.Random(seed))
            found = shapes.detect(patchwork(placed, shares, seed))
            assert [(d.shape, d.color) for d in found] == [(shape, "red" if red else "unknown")], (shares, seed)
            assert shapes.follows(named, found) == red and shapes.follows(plain, found)


def test_an_object_of_mostly_no_palette_colour_has_none():
    """Verdict: a pink circle (no palette colour) with a fifth of its pixels speckled red, or blue, is a pink circle:
    "a circle" passes, "a red circle" and "a blue circle" fail (its palette pixels vote, but are not most of it)."""
    placed = [shapes.Placed("circle", "red", 64, 64, 44)]
    mask = masks(placed)[0]
    rng = np.random.default_rng(0)
    for colour in ("red", "blue"):
        x = pixels(placed)
        x[mask] = (240, 150, 200)
        x[mask & (rng.random(mask.shape) < 0.2)] = shapes.PALETTE[colour]
        assert [(d.shape, d.color) for d in shapes.detect(to_image(x))] == [("circle", "unknown")]


def silhouette(points):
    """A red polygon (points in a 40 x 40 box) in the middle of a scene."""
    image = Image.new("RGB", (shapes.NATIVE, shapes.NATIVE), shapes.BACKGROUND)
    ImageDraw.Draw(image).polygon([(44 + x, 44 + y) for x, y in points], fill=shapes.PALETTE["red"])
    return image


NO_SHAPES = {  # silhouettes that are none of the world's shapes, though they fill a square box as one does
    "T upside down": [(14, 0), (26, 0), (26, 28), (40, 28), (40, 40), (0, 40), (0, 28), (14, 28)],  # symmetric,
    # on its base, fills about half its box as a triangle does, but is not convex
    "right triangle": [(0, 0), (40, 40), (0, 40)],  # fills 1/2, convex, but not symmetric
    "triangle upside down": [(0, 0), (40, 0), (20, 40)],  # symmetric and convex, but stands on its apex
    "L": [(0, 0), (16, 0), (16, 24), (40, 24), (40, 40), (0, 40)],  # fills 0.64, as a circle does
}


@pytest.mark.parametrize("name", list(NO_SHAPES))
def test_a_silhouette_of_no_shape_of_the_world_is_unknown(name):
    """Verdict: none of these is a circle, a square or a triangle, so "a red <shape>" fails for every shape. (The
    colour judge, which looks only at the fill of the box, takes each for one of them.)"""
    found = shapes.detect(silhouette(NO_SHAPES[name]))
    assert [(d.shape, d.color) for d in found] == [("unknown", "red")]
    assert [d.shape for d in shapes.detect(silhouette(NO_SHAPES[name]), "colour")] != ["unknown"]


# Image quality


def test_image_quality_ranks_ground_truth_first_and_grows_with_each_defect():
    """Ground truth against other ground truth for the same prompts (other layouts) is about 0; speckle (1-10% of
    pixels), blur (sigma 0.5-2 px), colour bleeding (1-4 px), two-tone objects (5-30% of their patches) and a
    faint tint (4-14 levels) each score strictly worse as they grow; noise scores far worse than any of them."""
    specs = shapes.evaluation_specs(2)
    reference = [shapes.render_spec(spec, seed) for seed, spec in enumerate(specs)]
    assert shapes.image_quality(reference, reference) == pytest.approx(0, abs=1e-9)
    ground_truth = shapes.image_quality([shapes.render_spec(spec, 100 + i) for i, spec in enumerate(specs)], reference)
    assert ground_truth < 0.01
    worst = 0.0
    for defect, strengths in ((speckle, (0.01, 0.03, 0.1)), (blur, (0.5, 1.0, 2.0)), (colour_bleeding, (1, 2, 4)),
                              (two_tone, (0.05, 0.15, 0.3)), (tint, (4, 8, 14))):
        scores = [shapes.image_quality(defective(defect, s, specs, 100), reference) for s in strengths]
        assert ground_truth + 0.5 < scores[0] < scores[1] < scores[2], (defect.__name__, scores)
        worst = max(worst, scores[-1])
    rng = np.random.default_rng(0)
    uniform = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in specs]
    smooth = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((128, 128), Image.BILINEAR)
              for _ in specs]
    for noise in (uniform, smooth):
        assert shapes.image_quality(noise, reference) > 10 * worst


def test_frechet_distance_of_gaussians():
    """|mu_a - mu_b|^2 + (sigma_a - sigma_b)^2 per independent feature: means 1 and 8, standard deviations 1 and 3
    -> 49 + 4; a second feature equal in both adds nothing, and the distance is symmetric."""
    a, b = np.array([[0.0, 5.0], [2.0, 7.0]]), np.array([[5.0, 5.0], [11.0, 7.0]])
    assert shapes.frechet_distance(a, b) == pytest.approx(53)
    assert shapes.frechet_distance(b, a) == pytest.approx(53)
    assert shapes.frechet_distance(a[:, :1], b[:, :1]) == pytest.approx(53)


def test_evaluate_reports_shapeeval_and_image_quality():
    """A model that draws ground truth (laid out with the sampling seed) scores 1.0 and quality 0 with either
    judge; speckling its objects keeps the new judge's 1.0 and costs quality."""
    def model(rate):
        def draw(prompts, seeds, height, width, steps, guidance, shift):
            images = [speckle(shapes.layout(shapes.parse_prompt(p), random.Random(s), height), rate, s, 0.0)
                      for p, s in zip(prompts, seeds)]
            return torch.stack([(shapes.image_tensor(i) + 1) / 2 for i in images])
        return draw

    specs = shapes.evaluation_specs(2)
    for judge in JUDGES:
        scores, images, judged = shapes.evaluate(model(0.0), specs, 1, 1, 1.0, None, judge=judge)
        assert scores["overall"] == 1.0 and scores[shapes.QUALITY] == pytest.approx(0, abs=1e-9) and judged == specs
    scores, _, _ = shapes.evaluate(model(0.2), specs, 1, 1, 1.0, None)
    assert scores["overall"] == 1.0 and scores[shapes.QUALITY] > 1.0
    assert shapes.parse_args(["eval"]).judge == "geneval"
    assert shapes.parse_args(["eval", "--judge", "colour"]).judge == "colour"


def test_real_corpus_has_synths_layout(tmp_path):
    prompts = ["a red circle", "two squares", "a circle above a triangle"]
    out = shapes.render_corpus(tmp_path / "real", prompts, 2)
    import train

    corpus = train.Corpus(out)
    assert len(corpus) == 6 and corpus.sizes == [(128, 128)]
    specs = [shapes.parse_prompt(r["prompt"]) for r in corpus.rows]
    images = [Image.open(out / r["file"]) for r in corpus.rows]
    assert shapes.shape_eval(specs, images)["overall"] == 1.0


@pytest.mark.slow
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
