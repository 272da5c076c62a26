"""The toy world: captioned coloured shapes, and ShapeEval, a GenEval-like judge of whether images follow prompts.

A scene is 1-4 flat, axis-aligned shapes (circle, square, upright triangle) in 5 colours on a plain
background. Prompts come from six GenEval categories: single object ("a square"), two objects ("a circle
and a triangle"), counting ("three squares"), colours ("a blue circle"), position ("a circle to the left
of a square") and colour attribution ("a red square and a green triangle"). ShapeEval checks the prompt: the
exact objects, counts, colours and relation, scored per category and overall (their mean), as GenEval does.
Its default judge finds objects as GenEval does with an instance segmenter and CLIP: connected segments of
everything that differs from the background (whose colour it reads off the image's frame), split only where
touching objects of different colours meet, each shaped by its silhouette (how much of its box it fills:
square 1, circle pi/4, triangle 1/2; convex, mirror-symmetric, a triangle's apex up) and coloured by the
palette colour of most of its pixels, or by none. A speckled, two-tone or colour-bled object is thus still
one object, and those defects are measured apart, as image quality: a Fréchet distance between pixel
statistics (speckle, blended pixels, two-tone objects, colour error) of the samples and of rendered ground
truth for the same prompts, lower is better, 0 like ground truth. `--judge colour` keeps the earlier
judge, which segments by palette colour first and so breaks such an object into fragments: it measured
both at once.

The bundled source model (assets/toy-zimage) is the real Z-Image, Qwen3 and VAE architecture at tiny
widths, built by `python shapes.py build-source`: a byte-level BPE trained on the world's prompts, a frozen
random Qwen3 text encoder, a VAE trained on rendered images, then the latent DiT trained with flow matching.

    python shapes.py eval --ckpt runs/l2p     # sample the evaluation prompts, write a grid, print ShapeEval
                                              # and image quality (--judge colour: the earlier judge)
    python shapes.py build-source             # rebuild assets/toy-zimage (about 2.5 hours on 2 CPU cores)
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import hub
import runtime
import sample
import transfer
from model import ZImageConfig, ZImageDiT, shift_sigmas
from tokenizer import (AutoencoderKL, PromptTokenizer, Qwen3Config, Qwen3TextEncoder, VAEConfig, ZImageText,
                       encode_prompts)
from tokenizer import train_qwen_style_bpe

NATIVE = 128  # the world's native image side in pixels
BACKGROUND = (242, 240, 235)
PALETTE = {"red": (215, 45, 45), "green": (40, 160, 70), "blue": (45, 85, 215), "yellow": (232, 190, 25),
           "purple": (140, 65, 180)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
# Objects sit in distinct cells of a 2 x 2 grid (64-px cells: 4 x 4 tokens of 16 px), with a little size and
# position jitter. Free placement at any size and position, and even a 4 x 4 grid, made composition (counts,
# relations, which colour goes with which shape) too slow to learn for a source trained on 2 CPU cores
# (ShapeEval about 0.25 after 6000 DiT steps, then 0.57 after 3000 more on a 4 x 4 grid); four cells still hold
# every category, up to "four".
GRID = 2
OBJECT_SIZE = (36, 46)  # side of an object's bounding box at native size
JITTER = 3.0  # pixels an object's centre may move from its cell's centre: >= 12 px stay free between objects

# ShapeEval thresholds, at native size
FOREGROUND_DISTANCE = 60  # L1 distance from the background colour that makes a pixel foreground
COLOR_DISTANCE = 150  # L1 distance within which a pixel takes a palette colour
MIN_AREA = OBJECT_SIZE[0] ** 2 // 8  # a quarter of the smallest triangle: smaller components are specks
FILL_SQUARE, FILL_CIRCLE, FILL_TRIANGLE = 0.88, 0.64, 0.35  # lower bounds of bbox fill per shape
MAX_ASPECT = 1.6  # our shapes have square bounding boxes
POSITION_MARGIN = 4  # centroids must differ by more than this along the relation's axis
# ... and those of the GenEval-like judge alone
BORDER = 3  # width of the image's frame, whose median colour is the background
CLEANUP_RADIUS = 2  # the foreground is a majority vote over 5 x 5 windows: specks go, pinholes fill ...
OPENING_RADIUS = 1  # ... then an opening with a 3 x 3 square cuts off the speckle that clings to edges
SPLIT_RADIUS, SPLIT_PURITY = 4, 0.75  # a colour's core: pixels whose 9 x 9 window is at least 75% that colour
COLOR_MAJORITY = 0.6  # an object's colour holds more than this share of its pixels of a palette colour ...
PALETTE_SHARE = 1 / 3  # ... which are at least this share of its pixels (blur leaves half); else it has none
MAX_SIDE = 3 * OBJECT_SIZE[1] // 2  # larger silhouettes are no object of this world (a noise field, say)
MIN_SOLIDITY = 0.85  # area / convex hull area: all three shapes are convex
MIN_SYMMETRY = 0.8  # IoU of a silhouette and its mirror image: all three are symmetric about the vertical
APEX_SHARE = 0.4  # share of the area in the top half of the box: upright triangle 1/4, circle and square 1/2
# Image quality
OFF_WORLD_DISTANCE = 45  # L1 distance from the local median or from every world colour that marks a pixel
MIX_RADIUS = 2  # a palette pixel with another palette colour within 2 px is two-tone


# ----------------------------------------------------------------------------------------------------
# What a prompt asks for


@dataclass(frozen=True)
class Spec:
    """A prompt's content. objects: (shape, colour or None, count); relation: of objects[0] to objects[1]."""

    category: str
    objects: tuple[tuple[str, str | None, int], ...]
    relation: str | None = None

    @property
    def prompt(self) -> str:
        def phrase(shape, color, count):
            if count > 1:
                return f"{NUMBERS[count]} {f'{color} ' if color else ''}{shape}s"
            return f"a {f'{color} ' if color else ''}{shape}"

        words = [phrase(*o) for o in self.objects]
        if self.relation:
            return f"{words[0]} {RELATIONS[self.relation]} {words[1]}"
        return " and ".join(words)


def random_spec(rng: random.Random, category: str) -> Spec:
    colors, shapes = list(PALETTE), list(SHAPES)
    if category == "single_object":
        return Spec(category, ((rng.choice(shapes), None, 1),))
    if category == "colors":
        return Spec(category, ((rng.choice(shapes), rng.choice(colors), 1),))
    if category == "counting":
        return Spec(category, ((rng.choice(shapes), None, rng.choice(list(NUMBERS))),))
    s1, s2 = rng.sample(shapes, 2)
    if category == "two_objects":
        return Spec(category, ((s1, None, 1), (s2, None, 1)))
    if category == "position":
        return Spec(category, ((s1, None, 1), (s2, None, 1)), rng.choice(list(RELATIONS)))
    if category == "color_attr":
        c1, c2 = rng.sample(colors, 2)
        return Spec(category, ((s1, c1, 1), (s2, c2, 1)))
    raise ValueError(f"unknown category {category!r}")


def evaluation_specs(per_category: int = 10, seed: int = 1234) -> list[Spec]:
    """The fixed evaluation set: `per_category` prompts of each category, the same every time."""
    rng = random.Random(seed)
    return [random_spec(rng, c) for c in CATEGORIES for _ in range(per_category)]


def training_specs(n: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    return [random_spec(rng, rng.choice(CATEGORIES)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Placed:
    shape: str
    color: str
    cx: float
    cy: float
    size: int


def layout(spec: Spec, rng: random.Random, size: int = NATIVE) -> list[Placed]:
    """Colours for unnamed objects, then distinct cells of the GRID x GRID layout grid, each object centred in
    its cell with a little jitter; for a relation, cells that show it (another column or row)."""
    items = []
    for shape, color, count in spec.objects:
        scene_color = color or rng.choice(list(PALETTE))
        for _ in range(count):
            items.append((shape, scene_color if count > 1 else (color or rng.choice(list(PALETTE)))))
    cells = [(row, col) for row in range(GRID) for col in range(GRID)]
    while True:
        chosen = rng.sample(cells, len(items))
        if spec.relation is None or relation_holds(spec.relation, *(CellCentre(*c) for c in chosen[:2]), margin=0.5):
            break
    scale, cell = size / NATIVE, size / GRID
    placed = []
    for (shape, color), (row, col) in zip(items, chosen):
        s = round(rng.randint(*OBJECT_SIZE) * scale)
        jitter = lambda: rng.uniform(-JITTER, JITTER) * scale  # noqa: E731
        placed.append(Placed(shape, color, (col + 0.5) * cell + jitter(), (row + 0.5) * cell + jitter(), s))
    return placed


@dataclass(frozen=True)
class CellCentre:
    """A layout cell as a point (column, row) for relation_holds."""

    cy: float
    cx: float


def render(placed: list[Placed], size: int = NATIVE, background=BACKGROUND) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for p in placed:
        x0, y0, x1, y1 = p.cx - p.size / 2, p.cy - p.size / 2, p.cx + p.size / 2, p.cy + p.size / 2
        fill = PALETTE[p.color]
        if p.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif p.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(p.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def render_spec(spec: Spec, seed: int, size: int = NATIVE) -> Image.Image:
    return render(layout(spec, random.Random(seed), size), size)


# ----------------------------------------------------------------------------------------------------
# ShapeEval
#
# Two judges share the rules of `follows` and differ in how they find objects. "geneval" (the default) does
# what GenEval does with its instance segmenter and CLIP: objects are the connected parts of everything that
# is not background, each judged by its silhouette, and coloured by the palette colour most of its pixels
# vote for, so a speckled, two-tone or blurred object is still one object of its shape and colour.
# "colour" segments by palette colour first, so every such object falls apart into fragments: it measures
# prompt following and image quality at once, and is kept for comparison with earlier measurements.


@dataclass(frozen=True)
class Detection:
    shape: str  # or "unknown"
    color: str  # or "unknown"
    cx: float
    cy: float
    area: int


def native_pixels(image: Image.Image) -> np.ndarray:
    """(NATIVE, NATIVE, 3) int32: every image is judged at the world's native size."""
    if image.size != (NATIVE, NATIVE):
        image = image.resize((NATIVE, NATIVE), Image.BOX)
    return np.asarray(image.convert("RGB")).astype(np.int32)


def palette_index(pixels: np.ndarray) -> np.ndarray:
    """(H, W): index of each pixel's nearest palette colour, or -1 farther than COLOR_DISTANCE from all of them."""
    distance = np.abs(pixels[:, :, None, :] - np.array(list(PALETTE.values()))).sum(-1)  # (H, W, colours)
    return np.where(distance.min(-1) <= COLOR_DISTANCE, distance.argmin(-1), -1)


def window_share(mask: np.ndarray, radius: int) -> np.ndarray:
    """Share of each pixel's (2 radius + 1)^2 window that lies in `mask` (outside the image counts as not),
    from an integral image."""
    k = 2 * radius + 1
    h, w = mask.shape
    s = np.pad(np.pad(mask.astype(np.int32), radius).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (s[k:k + h, k:k + w] - s[:h, k:k + w] - s[k:k + h, :w] + s[:h, :w]) / (k * k)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal nonzero labels -> component ids (0 = background), numpy only. Every pixel
    starts with its own index (from 1); then, until nothing changes, each run of equal labels along a row, and
    then along a column, takes the smallest id in it, and every id is replaced by the id of the pixel it names
    (pointer jumping). A component's id ends as its first pixel's index, in a few rounds for compact shapes."""
    h, w = labels.shape
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), 0)
    runs = []  # for rows, then columns: where each run of equal labels starts in the flattened image, and its length
    for lines in (labels, labels.T):
        flat = lines.ravel()
        starts = np.flatnonzero(np.r_[True, (flat[1:] != flat[:-1]) | (np.arange(1, flat.size) % lines.shape[1] == 0)])
        runs.append((starts, np.diff(np.r_[starts, flat.size])))
    while True:
        previous = ids
        for transposed, (starts, lengths) in zip((False, True), runs):
            lines = ids.T if transposed else ids
            lines = np.repeat(np.minimum.reduceat(lines.ravel(), starts), lengths).reshape(lines.shape)
            ids = lines.T if transposed else lines
        pointers = np.concatenate([[0], ids.ravel()])  # pointers[i]: the id of pixel i (from 1), 0: none
        while not np.array_equal(pointers[pointers], pointers):
            pointers = pointers[pointers]
        ids = pointers[1:].reshape(h, w)
        if np.array_equal(ids, previous):
            return ids


# The colour judge: segments of one palette colour, shaped by their bounding-box fill


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(w, h) > MAX_ASPECT * min(w, h):
        return "unknown"
    fill = len(xs) / (w * h)
    if fill >= FILL_SQUARE:
        return "square"
    if fill >= FILL_CIRCLE:
        return "circle"
    return "triangle" if fill >= FILL_TRIANGLE else "unknown"


def detect_by_colour(image: Image.Image) -> list[Detection]:
    """The colour judge: connected components of equal palette colour (or of none) on the foreground."""
    pixels = native_pixels(image)
    foreground = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > FOREGROUND_DISTANCE
    colours = palette_index(pixels)
    labels = np.where(foreground, np.where(colours >= 0, colours + 1, len(PALETTE) + 1), 0)
    components = connected_components(labels)
    names = list(PALETTE) + ["unknown"]
    found = []
    for cid in np.nonzero(np.bincount(components.ravel())[1:] >= MIN_AREA)[0] + 1:  # smaller ones are specks
        mask = components == cid
        ys, xs = np.nonzero(mask)
        color = names[int(labels[ys[0], xs[0]]) - 1]
        found.append(Detection(classify_shape(mask), color, float(xs.mean()), float(ys.mean()), len(xs)))
    return found


# The GenEval-like judge: instance segments of the foreground, shaped by their silhouette, coloured by a vote


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """The median colour of the image's frame: objects sit in the middle of their layout cells, and a model's
    background need not be BACKGROUND exactly."""
    frame = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                            pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    return np.median(frame, 0)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region it encloses added: what is not connected to the outside of its box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    outside = connected_components(np.pad(~mask[y0:y1, x0:x1], 1, constant_values=True).astype(np.int32))
    filled = mask.copy()
    filled[y0:y1, x0:x1] = outside[1:-1, 1:-1] != outside[0, 0]
    return filled


def split_by_colour(segment: np.ndarray, colours: np.ndarray) -> list[np.ndarray]:
    """One segment -> the objects in it. Touching objects of different colours make one foreground segment; each
    has a core, a large solid region where nearly every window is its colour. Speckle and small patches of
    another colour make no core, so a speckled or two-tone object stays whole. With two or more cores, each
    object is its core's colour connected to the core, and the rest (speckle, blended edges) goes to the
    nearest object by growing them all a pixel at a time."""
    cores = []
    for c in range(len(PALETTE)):
        own = segment & (colours == c)
        if own.sum() < MIN_AREA:
            continue
        core = connected_components((segment & (window_share(own, SPLIT_RADIUS) >= SPLIT_PURITY)).astype(np.int32))
        sizes = np.bincount(core.ravel())[1:]
        if sizes.size and sizes.max() >= MIN_AREA:
            cores.append((c, core == sizes.argmax() + 1))
    if len(cores) < 2:
        return [segment]
    owner = np.zeros(segment.shape, np.int32)  # 0: not yet assigned, k: the k-th object
    for k, (c, core) in enumerate(cores, 1):
        regions = connected_components((segment & (colours == c)).astype(np.int32))
        owner[np.isin(regions, regions[core & (regions > 0)]) & (owner == 0)] = k
    none = len(cores) + 1
    while (segment & (owner == 0)).any():  # each unassigned pixel next to objects goes to the first of them
        p = np.pad(np.where(owner > 0, owner, none), 1, constant_values=none)
        rows = np.minimum(np.minimum(p[:, :-2], p[:, 1:-1]), p[:, 2:])  # the smallest owner in each 3 x 3 window
        nearby = np.minimum(np.minimum(rows[:-2], rows[1:-1]), rows[2:])
        owner = np.where(segment & (owner == 0) & (nearby < none), nearby, owner)
    return [owner == k for k in range(1, none)]


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of `mask`: the corners of each row's first and last pixel,
    by Andrew's monotone chain and the shoelace formula."""
    rows = np.nonzero(mask.any(1))[0]
    left = mask[rows].argmax(1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(1)
    points = sorted({(int(x), int(y + dy)) for y, a, b in zip(rows, left, right) for x in (a, b) for dy in (0, 1)})

    def chain(ordered):
        hull = []
        for p in ordered:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull[:-1]

    hull = chain(points) + chain(points[::-1])
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1]))) / 2


def classify_silhouette(mask: np.ndarray) -> str:
    """The shape of a silhouette: it must look like one of the world's shapes (not too large, square box, convex,
    symmetric about its vertical axis), then the fill of its box tells them apart (square 1, circle pi/4,
    triangle 1/2; a square whose corners are rounded with a radius of 0.3 of its side still fills 0.9), and a
    triangle must stand on its base (a quarter of its area in the top half of its box)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    area = len(xs)
    if max(w, h) > MAX_SIDE or max(w, h) > MAX_ASPECT * min(w, h) or area < MIN_SOLIDITY * convex_hull_area(box):
        return "unknown"
    if (box & box[:, ::-1]).sum() < MIN_SYMMETRY * (box | box[:, ::-1]).sum():
        return "unknown"
    fill, top = area / (w * h), box[:h // 2].sum() / area
    if fill >= FILL_SQUARE:
        return "square"
    if fill >= FILL_CIRCLE and top > APEX_SHARE:
        return "circle"
    return "triangle" if fill >= FILL_TRIANGLE and top <= APEX_SHARE else "unknown"


def dominant_colour(votes: np.ndarray) -> str:
    """An object's colour, as CLIP names the colour of a masked crop: a clear majority (COLOR_MAJORITY) of its
    pixels that have a palette colour must have the same one (votes: palette indices, -1 for none). Blends,
    black and white specks abstain; an object of mostly no palette colour, or of several in like shares, has
    none ("unknown")."""
    voters = votes[votes >= 0]
    counts = np.bincount(voters, minlength=len(PALETTE))
    if len(voters) < PALETTE_SHARE * len(votes) or counts.max() <= COLOR_MAJORITY * len(voters):
        return "unknown"
    return list(PALETTE)[counts.argmax()]


def detect_instances(image: Image.Image) -> list[Detection]:
    """The GenEval-like judge: the foreground (smoothed by a majority vote and an opening), its connected segments
    with their holes filled, each split into the objects it holds."""
    pixels = native_pixels(image)
    foreground = np.abs(pixels - background_colour(pixels)).sum(-1) > FOREGROUND_DISTANCE
    foreground = window_share(foreground, CLEANUP_RADIUS) > 0.5
    foreground = window_share(window_share(foreground, OPENING_RADIUS) == 1, OPENING_RADIUS) > 0  # erode, dilate
    colours = palette_index(pixels)
    segments = connected_components(foreground.astype(np.int32))
    found = []
    for sid in np.nonzero(np.bincount(segments.ravel())[1:] >= MIN_AREA)[0] + 1:  # smaller ones are specks
        ys, xs = np.nonzero(segments == sid)
        y0, x0 = ys.min(), xs.min()
        box = np.s_[y0:ys.max() + 1, x0:xs.max() + 1]  # work in the segment's box: the same, and faster
        for piece in split_by_colour(fill_holes(segments[box] == sid), colours[box]):
            ys, xs = np.nonzero(piece)
            found.append(Detection(classify_silhouette(piece), dominant_colour(colours[box][piece]),
                                   float(x0 + xs.mean()), float(y0 + ys.mean()), len(xs)))
    return found


JUDGES = {"geneval": detect_instances, "colour": detect_by_colour}


def detect(image: Image.Image, judge: str = "geneval") -> list[Detection]:
    """Objects in an image of any size (judged at native size), found the `judge`'s way."""
    return JUDGES[judge](image)


def relation_holds(relation: str, a, b, margin: float = POSITION_MARGIN) -> bool:
    """Is a `relation` of b, judged by centroids (GenEval: only the relation's own axis counts)?"""
    return {"left": a.cx + margin < b.cx, "right": a.cx > b.cx + margin,
            "above": a.cy + margin < b.cy, "below": a.cy > b.cy + margin}[relation]


def follows(spec: Spec, found: list[Detection]) -> bool:
    """Exactly the objects the prompt asks for: shapes, counts, named colours, and the relation."""
    wanted = [(shape, color) for shape, color, count in spec.objects for _ in range(count)]
    if len(found) != len(wanted) or any(d.shape == "unknown" for d in found):
        return False
    remaining = list(found)
    for shape, color in sorted(wanted, key=lambda w: w[1] is None):  # named colours claim their object first
        match = next((d for d in remaining if d.shape == shape and (color is None or d.color == color)), None)
        if match is None:
            return False
        remaining.remove(match)
    if spec.relation:
        first = next(d for d in found if d.shape == spec.objects[0][0])
        second = next(d for d in found if d.shape == spec.objects[1][0])
        return relation_holds(spec.relation, first, second)
    return True


def shape_eval(specs: list[Spec], images: list[Image.Image], judge: str = "geneval") -> dict[str, float]:
    """Fraction of images that follow their prompt, per category and overall (the mean of the categories)."""
    hits = {c: [] for c in CATEGORIES}
    for spec, image in zip(specs, images, strict=True):
        hits[spec.category].append(follows(spec, detect(image, judge)))
    scores = {c: float(np.mean(h)) for c, h in hits.items() if h}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


# ----------------------------------------------------------------------------------------------------
# Image quality, apart from prompt following
#
# A Fréchet distance, as FID, between Gaussians fitted to per-image features of a set of samples and of
# rendered ground truth for the same prompts. The features are fixed and measure how pixels look, not what
# is drawn: ground truth is flat world colours (palette and background) with one-pixel steps between them.
#   speckle       % of pixels farther than OFF_WORLD_DISTANCE from the median of their 3 x 3 neighbourhood:
#                 isolated specks, of any colour (flat regions, straight edges and smooth ramps have none)
#   blend         % of the other pixels farther than that from every world colour: blur, colour bleeding and
#                 soft edges, where ground truth steps from one colour to the next
#   two-tone      % of pixels of a palette colour with another palette colour within MIX_RADIUS: objects in
#                 patches of several colours (the layout keeps ground truth's objects apart)
#   colour error  mean L1 distance to the nearest world colour, in % of the largest (765): tints too faint
#                 to count as blends
# Each is about the share of pixels that are wrong, so the distance is in percent squared: 0 for identical
# statistics and between ground-truth sets, about 100 with a tenth of the pixels speckled or blended,
# thousands for noise. An image of plain background scores as well as ground truth: whether the objects are
# there is ShapeEval's question. A background of another colour counts as blended all over.

WORLD_COLOURS = np.array([BACKGROUND, *PALETTE.values()])


def quality_features(image: Image.Image) -> np.ndarray:
    """(4,): speckle, blend, two-tone, colour error, in percent (see above)."""
    pixels = native_pixels(image)
    h, w, _ = pixels.shape
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge"),
                                                       (3, 3), axis=(0, 1)).reshape(h, w, 3, 9)
    median = np.partition(windows, 4, -1)[..., 4]  # the 5th of 9
    speckle = np.abs(pixels - median).sum(-1) > OFF_WORLD_DISTANCE
    distance = np.abs(pixels[:, :, None, :] - WORLD_COLOURS).sum(-1)  # (H, W, world colours)
    world = np.where(distance.min(-1) <= OFF_WORLD_DISTANCE, distance.argmin(-1), -1)  # 0: background, -1: none
    blend = (world < 0) & ~speckle
    nearby = sum(window_share(world == c, MIX_RADIUS) > 0 for c in range(1, len(WORLD_COLOURS)))  # palette colours
    two_tone = (world > 0) & (nearby > 1)
    return 100 * np.array([speckle.mean(), blend.mean(), two_tone.mean(), distance.min(-1).mean() / 765])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between Gaussians fitted to the rows of a and
    b (population covariance, so a set of one image works); symmetric square roots by eigendecomposition."""
    def moments(x):
        return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False, bias=True))

    (mu_a, cov_a), (mu_b, cov_b) = moments(a), moments(b)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(0)).sum()
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross))


def image_quality(images: list[Image.Image], reference_images: list[Image.Image]) -> float:
    """Fréchet distance of the images' quality features to the reference's (rendered ground truth for the same
    prompts): lower is better, 0 for identical statistics."""
    return frechet_distance(np.stack([quality_features(i) for i in images]),
                            np.stack([quality_features(i) for i in reference_images]))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# The bundled source model: real architectures at tiny widths

TOY_SOURCE = Path(__file__).parent / "assets" / "toy-zimage"
TOY_VOCAB = 320
TOY_TEXT = Qwen3Config(vocab_size=TOY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TOY_VAE = VAEConfig(block_out_channels=(16, 32, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
TOY_DIT = ZImageConfig(in_channels=4, dim=128, n_layers=6, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                       cap_feat_dim=64, axes_dims=(16, 24, 24))
TOY_SHIFT = 3.0  # the scheduler's flow shift, as Z-Image-Turbo's
CAPTION_DROPOUT = 0.1  # prompts replaced by "" in training, so the source supports classifier-free guidance
KL_WEIGHT = 1e-6


def toy_tokenizer(seed: int = 0):
    corpus = [s.prompt for s in training_specs(5000, seed)] + [s.prompt for s in evaluation_specs()]
    return train_qwen_style_bpe(corpus, TOY_VOCAB)


def toy_text_encoder(seed: int = 0) -> tuple[Qwen3TextEncoder, dict[str, torch.Tensor]]:
    """A frozen random Qwen3: unit-variance embeddings keep prompts apart; its layers only mix them. Returns
    the encoder as Z-Image uses it and the full state dict a Qwen3Model checkpoint holds."""
    torch.manual_seed(seed)
    full = Qwen3TextEncoder(replace(TOY_TEXT, num_hidden_layers=TOY_TEXT.num_hidden_layers + 1))
    torch.nn.init.normal_(full.embed_tokens.weight)
    state = full.state_dict() | {"norm.weight": torch.ones(TOY_TEXT.hidden_size)}
    encoder = Qwen3TextEncoder(TOY_TEXT)
    encoder.load_state_dict({k: v for k, v in state.items() if not Qwen3TextEncoder.unused_keys(TOY_TEXT, k)})
    return encoder.eval().requires_grad_(False), state


def scene_batch(specs: list[Spec], seeds: list[int]) -> torch.Tensor:
    return torch.stack([image_tensor(render_spec(spec, seed)) for spec, seed in zip(specs, seeds)])


def train_vae(steps: int, batch: int, seed: int, log) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) with a small KL term; then shift and scale make the latents zero-mean, unit-std."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(replace(TOY_VAE, scaling_factor=1.0, shift_factor=0.0))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        specs = [random_spec(rng, rng.choice(CATEGORIES)) for _ in range(batch)]
        x = scene_batch(specs, [rng.randrange(2**31) for _ in specs])
        mean, logvar = vae.encode_moments(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        recon = vae.decoder(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.1f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        specs = training_specs(256, seed + 1)
        latents = torch.cat([vae.encode_moments(scene_batch(specs[i:i + 64], list(range(i, i + 64))))[0]
                             for i in range(0, 256, 64)])
    vae.cfg = replace(vae.cfg, shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return vae


def evaluate_source(dit, vae, text, tokenizer, specs, steps: int, guidance: float, seed: int = 0) -> dict:
    pipe = hub.LatentPipeline("toy", None, None, dit, ZImageText(text, tokenizer), vae, {"shift": TOY_SHIFT})
    images = []
    for i in range(0, len(specs), 30):
        chunk = specs[i:i + 30]
        x = sample.sample_latent(pipe, [s.prompt for s in chunk], [seed + i + j for j in range(len(chunk))],
                                 NATIVE, NATIVE, steps, guidance)
        images += [runtime.to_pil(im) for im in x]
    return shape_eval(specs, images), images


def train_dit(vae, text, tokenizer, steps: int, batch: int, dataset: int, seed: int, log, eval_every: int,
              save, start: ZImageDiT | None = None):
    """Flow matching in the VAE's latent space on a fixed set of rendered scenes, with caption dropout and an
    EMA of the weights. Every `eval_every` steps the EMA is judged and handed to `save`, so an interrupted
    build loses at most that many steps (`--resume` goes on from it). `start`: continue from these weights."""
    rng = random.Random(seed)
    specs = training_specs(dataset, seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(scene_batch(specs[i:i + 128], list(range(i, i + 128))))
                             for i in range(0, dataset, 128)])
    log(f"encoded {dataset} scenes to latents {tuple(latents.shape[1:])}, std {latents.std():.3f}")
    torch.manual_seed(seed)
    dit = ZImageDiT(TOY_DIT)
    if start is not None:
        dit.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    dit.requires_grad_(True).train()
    ema = ZImageDiT(TOY_DIT)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=5e-4, weight_decay=0.0)
    warmup, start = 200, time.time()
    for step in range(1, steps + 1):
        idx = [rng.randrange(dataset) for _ in range(batch)]
        prompts = ["" if rng.random() < CAPTION_DROPOUT else specs[i].prompt for i in idx]
        with torch.no_grad():
            captions = encode_prompts(text, tokenizer, prompts)
        x0 = latents[idx]
        sigma = shift_sigmas(torch.rand(batch), TOY_SHIFT)
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None]
        loss = F.mse_loss(dit((1 - s) * x0 + s * noise, sigma, captions), noise - x0)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * min(1.0, step / warmup) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), dit.parameters()):
                e.lerp_(p, 1 - min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0:
            log(f"dit step {step}/{steps} loss {loss.item():.4f} {(time.time() - start) / step:.2f} s/step")
        if eval_every and (step % eval_every == 0 or step == steps):
            ema.eval()
            scores, _ = evaluate_source(ema, vae, text, tokenizer, evaluation_specs(5), 20, 3.0)
            log(f"dit step {step}: ShapeEval (EMA, 20 steps, guidance 3) {fmt(scores)}")
            save(ema)
    return ema.eval()


def fmt(scores: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in scores.items())


TOY_RECIPE = {  # assets/toy-zimage/l2p.json: the defaults synth.py, train.py and sample.py take for this source
    "size": [NATIVE, NATIVE],
    "synth": {"prompts": "prompts.txt", "steps": 20, "guidance": 3.0, "images_per_prompt": 2},
    "train": {"steps": 2000, "batch_size": 8, "lr": 6e-4, "warmup": 50, "freeze": "paper", "blocks": 1,
              "head_widths": "16,32,64,128"},
    "sample": {"steps": 20, "guidance": 3.0, "shift": TOY_SHIFT,
               "prompts": ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
                           "a purple square and a red triangle"]},
}
TOY_SYNTH_PROMPTS = 200  # x 2 seeds: the toy corpus (the paper: 10k x 2)
# The bundled source's own scores (600 images: the 60 evaluation prompts x 10 rounds, the card's sampling), so that
# `eval` can say how much of it a pixel model keeps without sampling the source again.
SOURCE_SCORES = {"geneval": 0.83, "colour": 0.74, "images": 600}


def write_recipe(folder: Path) -> None:
    hub.write_json(folder / hub.RECIPE_CARD, TOY_RECIPE)
    write_prompts(folder / TOY_RECIPE["synth"]["prompts"], TOY_SYNTH_PROMPTS, seed=7)


def build_source(args) -> Path:
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.recipe_only:
        write_recipe(args.out)
        return args.out
    if args.resume:  # train the saved DiT further; the VAE, text encoder and tokenizer stay as they are
        pipe = hub.load_pipeline(str(args.out))
        from safetensors.torch import load_file

        state = load_file(args.out / "text_encoder" / "model.safetensors")
        save = lambda dit: hub.save_pipeline(args.out, dit, state, TOY_TEXT, pipe.text.tokenizer.tokenizer,  # noqa: E731
                                             pipe.vae, pipe.scheduler)
        save(train_dit(pipe.vae, pipe.text.encoder, pipe.text.tokenizer, args.dit_steps, args.dit_batch, args.dataset,
                       args.seed + 1, log, args.eval_every, save, start=pipe.transformer))
        write_recipe(args.out)
        log(f"wrote {args.out}")
        return args.out
    tok = toy_tokenizer(args.seed)
    encoder, encoder_state = toy_text_encoder(args.seed)
    folder = args.out
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    tokenizer = PromptTokenizer(tok_dir / "tokenizer.json", "<|endoftext|>")
    vae = train_vae(args.vae_steps, args.vae_batch, args.seed, log)
    log(f"vae shift {vae.cfg.shift_factor:.4f} scale {vae.cfg.scaling_factor:.4f}")
    scheduler = {"num_train_timesteps": 1000, "shift": TOY_SHIFT, "use_dynamic_shifting": False}
    save = lambda dit: hub.save_pipeline(folder, dit, encoder_state, TOY_TEXT, tok, vae, scheduler)  # noqa: E731
    save(train_dit(vae, encoder, tokenizer, args.dit_steps, args.dit_batch, args.dataset, args.seed, log,
                   args.eval_every, save))
    write_recipe(folder)
    log(f"wrote {folder}")
    return folder


# ----------------------------------------------------------------------------------------------------
# Evaluation, corpora and the paper's claims at toy scale


QUALITY = "quality FD"  # the image quality column beside ShapeEval's scores


def evaluate(model: "sample.ImageModel", specs: list[Spec], seeds: int, steps: int, guidance: float,
             shift: float | None, size: int = NATIVE, batch: int = 32,
             judge: str = "geneval") -> tuple[dict, list[Image.Image], list[Spec]]:
    """Sample every spec with `seeds` seeds, judge them with ShapeEval (the `judge`'s way), and measure their
    image quality against rendered ground truth for the same prompts (laid out with the same seeds). Every
    image gets its own seed (round k, item i: k * len(specs) + i): the world has few distinct prompts per
    category (single object: 3 of 10), and with one seed per round for all of them, repeats of a prompt were
    one image counted several times."""
    jobs = [(spec, k * len(specs) + i) for k in range(seeds) for i, spec in enumerate(specs)]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        x = model([s.prompt for s, _ in chunk], [k for _, k in chunk], size, size, steps, guidance, shift)
        images += [runtime.to_pil(im) for im in x]
    judged = [s for s, _ in jobs]
    reference = [render_spec(s, k, size) for s, k in jobs]
    return shape_eval(judged, images, judge) | {QUALITY: image_quality(images, reference)}, images, judged


def judge(ckpt: str, specs: list[Spec], seeds: int = 1, size: int | None = None, steps: int | None = None,
          guidance: float | None = None, batch: int = 32,
          judge: str = "geneval") -> tuple[dict, list[Image.Image], list[Spec]]:
    """Load a model and `evaluate` it with its recipe card's sampling settings unless given (size: its native)."""
    model = sample.load_model(ckpt)
    d = model.defaults
    return evaluate(model, specs, seeds, steps or d["steps"], d["guidance"] if guidance is None else guidance, None,
                    size or d["h"], batch, judge)


def grid(images: list[Image.Image], specs: list[Spec], columns: int = 10, cell: int = NATIVE,
         judge: str = "geneval") -> Image.Image:
    """Samples with their prompts underneath, and a green / red bar for ShapeEval's verdict (the `judge`'s way)."""
    caption = 22
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, spec) in enumerate(zip(images, specs)):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption)
        sheet.paste(image.resize((cell, cell)), (x, y))
        ok = follows(spec, detect(image, judge))
        draw.rectangle((x, y + cell, x + cell - 1, y + cell + 2), fill=(40, 170, 60) if ok else (210, 40, 40))
        words = spec.prompt
        draw.text((x + 2, y + cell + 4), words[:26], fill="black")
        if len(words) > 26:
            draw.text((x + 2, y + cell + 12), words[26:52], fill="black")
    return sheet


HIGH_NOISE = (0.8, 0.9, 0.97)  # where a sample's layout, colours and counts are decided


def caption_gap(ckpt: str, data: Path, sigmas=HIGH_NOISE, seed: int = 0) -> tuple[float, float]:
    """(loss, gap) of a pixel model on held-out source images at fixed high-noise sigmas and a fixed noise draw:
    the flow-matching loss with each image's own prompt, and how much it rises when the prompts are shuffled
    (each image gets the next image's). The gap measures how much the model reads the caption; it is informative
    after a hundred steps, long before samples are judged well: a transferred model reads the caption through
    the source's frozen blocks from the start, a model from scratch has to learn to."""
    import train

    model, meta = transfer.load_pixel_model(ckpt)
    text = hub.load_pipeline(meta["source"]["id"], parts=("text",)).text
    corpus = train.Corpus(data)
    x0 = torch.stack([corpus.image(i) for i in range(len(corpus))])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    prompts = [row["prompt"] for row in corpus.rows]
    right, shuffled = text(prompts), text(prompts[1:] + prompts[:1])
    with torch.no_grad():
        def loss(captions) -> float:
            return sum(float(train.flow_matching_loss(model, x0, noise, torch.full((len(x0),), s), captions))
                       for s in sigmas) / len(sigmas)
        own = loss(right)
        return own, loss(shuffled) - own


def write_prompts(path: Path, n: int, seed: int) -> Path:
    """Training prompts for synthesis, one per line (their specs are training_specs(n, seed))."""
    path.write_text("".join(s.prompt + "\n" for s in training_specs(n, seed)))
    return path


def render_corpus(out: Path, prompts: list[str], images_per_prompt: int, size: int = NATIVE) -> Path:
    """Ground-truth ("real") images for the same prompts, in synth.py's layout and metadata format."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)
        for k in range(images_per_prompt):
            j = p * images_per_prompt + k
            name = f"{p:06d}-{k}.png"
            render_spec(spec, j, size).save(out / name)
            rows.append({"file": name, "prompt": prompt, "category": spec.category, "seed": j, "source": "renderer",
                         "height": size, "width": size})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def all_specs() -> list[Spec]:
    """Every prompt of the world (177 of them): the categories' grammar, enumerated."""
    colors, pairs = list(PALETTE), [(a, b) for a in SHAPES for b in SHAPES if a != b]
    specs = [Spec("single_object", ((s, None, 1),)) for s in SHAPES]
    specs += [Spec("colors", ((s, c, 1),)) for s in SHAPES for c in colors]
    specs += [Spec("counting", ((s, None, n),)) for s in SHAPES for n in NUMBERS]
    specs += [Spec("two_objects", ((a, None, 1), (b, None, 1))) for a, b in pairs]
    specs += [Spec("position", ((a, None, 1), (b, None, 1)), r) for a, b in pairs for r in RELATIONS]
    specs += [Spec("color_attr", ((a, c, 1), (b, d, 1))) for a, b in pairs for c in colors for d in colors if c != d]
    return specs


def parse_prompt(prompt: str) -> Spec:
    """The spec of a prompt of this world (the inverse of Spec.prompt)."""
    spec = {s.prompt: s for s in all_specs()}.get(prompt)
    if spec is None:
        raise ValueError(f"not a prompt of the shapes world: {prompt!r}")
    return spec


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def eval_command(args) -> list[dict]:
    rows = []
    for ckpt in args.ckpt:
        scores, images, judged = judge(ckpt, evaluation_specs(args.per_category), args.seeds, steps=args.steps,
                                       guidance=args.guidance, judge=args.judge)
        out = Path(ckpt) / "shapeeval.png" if Path(ckpt).is_dir() else Path(ckpt).with_suffix(".shapeeval.png")
        grid(images, judged, judge=args.judge).save(out)
        print(f"wrote {out}", file=sys.stderr)
        toy = sample.sampling_defaults(ckpt)[0] == "pixel" and \
            Path(transfer.source_of(ckpt)).resolve() == TOY_SOURCE.resolve()
        rows.append({"model": ckpt} | scores | {"of source": scores["overall"] / SOURCE_SCORES[args.judge] if toy else "-"})
    print(table(rows))
    if any(r["of source"] != "-" for r in rows):
        print(f"of source: the share of the bundled source's {SOURCE_SCORES[args.judge]:.2f} under this judge (its "
              f"{SOURCE_SCORES['images']} images); the paper's pixel model keeps 93% of its source's GenEval score")
    return rows


# The claims' budgets. "card": the recipe card's (2000 steps of batch 8 on 400 images, about 4 min a row here).
# "full": where the recipe levels off on a 2-core CPU (docs/toy-experiments.md, "A larger batch"): 4000 images,
# batch 32, fresh noise, 6000 steps of which the last 2000 cool the lr down to 0 (about 35 min a row here).
CLAIMS_BUDGETS = {
    "card": {"prompts": TOY_SYNTH_PROMPTS, "train": []},
    "full": {"prompts": 2000, "train": ["--steps", "6000", "--batch-size", "32", "--cooldown", "2000", "--fresh-noise"]},
}
CLAIMS = [  # (row, train.py flags, data): every row trains for the same steps with the same settings
    ("L2P (shallow layers + embedder + head, source's samples)", [], "synthetic"),
    ("full fine-tuning", ["--freeze", "full"], "synthetic"),
    ("L2P on ground-truth (real) images", [], "real"),
    ("pixel model from scratch", ["--init", "scratch", "--freeze", "full"], "synthetic"),
    # At the toy's width (128 channels) a linear layer cannot write a 768-value patch: this row fails here for
    # that reason alone (docs/toy-experiments.md), while the real model's 3840 channels have no such limit.
    ("L2P with a linear output layer", ["--output", "linear"], "synthetic"),
]


def claims_command(args) -> list[dict]:
    """The paper's claims at toy scale: one table, every row trained in this run on the same budget and judged on
    the same images by both judges, with image quality. Resumable: a rerun skips finished rows (their scores are
    kept beside their runs) and resumes a row's training where it stopped."""
    import synth
    import train

    budget = CLAIMS_BUDGETS["full" if args.full else "card"]
    work, source = args.work, str(args.source)
    card = hub.recipe_card(source)
    per_prompt = card["synth"]["images_per_prompt"]
    synthetic = work / "data"
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = write_prompts(work / "prompts.txt", args.prompts or budget["prompts"], seed=7)
    synth.synthesize(["--ckpt", source, "--out", str(synthetic), "--prompts", str(prompts_file)])
    prompts = [json.loads(line)["prompt"] for line in (synthetic / "metadata.jsonl").read_text().splitlines()]
    real = render_corpus(work / "real", prompts[::per_prompt], per_prompt)
    specs = evaluation_specs(args.per_category)
    flags = budget["train"] + (["--steps", str(args.steps)] if args.steps else [])

    def judged(ckpt: str, folder: Path) -> dict:
        """Both judges on the same samples, and image quality; kept in folder/scores.json."""
        path = folder / "scores.json"
        if path.is_file():
            return json.loads(path.read_text())
        scores, images, shown = judge(ckpt, specs, args.seeds)
        colour = shape_eval(shown, images, "colour")
        row = {"overall": scores["overall"], "colour-first": colour["overall"], QUALITY: scores[QUALITY]} | \
              {k: v for k, v in scores.items() if k in CATEGORIES}
        folder.mkdir(parents=True, exist_ok=True)
        runtime.write_text_atomic(path, json.dumps(row, indent=2))
        return row

    start = time.time()
    rows = [{"row": "source model (latent)", "trained params": "-", "train s": "-"} | judged(source, work / "source")]
    print(table(rows), file=sys.stderr)
    for k, (name, row_flags, data) in enumerate(CLAIMS, 1):
        out = work / name.split(" (")[0].replace(" ", "-").lower()
        done = time.time() - start
        eta = done / (k - 1) * (len(CLAIMS) - k + 1) if k > 1 else None
        print(f"[claims] row {k}/{len(CLAIMS)}: {name}; {done / 60:.0f} min so far"
              + (f", about {eta / 60:.0f} min to go" if eta else ""), file=sys.stderr)
        began = time.time()
        if not (out / "scores.json").is_file():  # train.main: a signal saves the row's run and exits, unjudged
            train.main(["--ckpt", source, "--data", str(synthetic if data == "synthetic" else real), "--out",
                        str(out), "--save-every", "500", "--log-every", "100", *flags, *row_flags])
        model, _ = transfer.load_pixel_model(str(out))
        saved = transfer.tensor_names(transfer.checkpoint_file(str(out), ema=False))
        trained = sum(p.numel() for n, p in model.named_parameters() if n in saved)
        rows.append({"row": name, "trained params": f"{trained / 1e6:.2f}M", "train s": f"{time.time() - began:.0f}"}
                    | judged(str(out), out))
        print(table(rows), file=sys.stderr)
    for r in rows:
        r["of source"] = r["overall"] / rows[0]["overall"] if rows[0]["overall"] else float("nan")
    print(table(rows))
    runtime.write_text_atomic(work / "claims.json", json.dumps(rows, indent=2))
    return rows


HIGHRES_SCALE = 4  # the paper's 1K -> 4K step: 16-px patches at the native size, 64-px patches at 4x
# What `highres --compare` trains from the native run, each row with the same steps, batch and seeds: the 64-px
# embedder's init (the 1K head kept), or the head (today's extrapolation, the 1K head fed the 8 x 8 token features
# upsampled 4x, against the 4K release's six-level layout at toy widths, with the 4K recipe's grid and noise both).
HIGHRES_COMPARISONS = {
    "embedder": [("64-px embedder init downsampled", ["--patch-init", "downsampled"]),
                 ("64-px embedder init random", ["--patch-init", "random"])],
    "head": [("1K head, features upsampled 4x", ["--train-grid", "1000", "--fresh-noise"]),
             ("4K head (six levels)", ["--head", "4k", "--train-grid", "1000", "--fresh-noise"])],
}


def highres_command(args) -> list[dict]:
    """4x training at toy scale (the paper's 1K -> 4K stage): continue an L2P run on rendered 4x images with
    64-px patches, so the transformer's token grid is unchanged, once per row of the --compare table (the 64-px
    embedder's init, or the Detailer Head's layout), and judge every row at 4x with the same budget."""
    import train

    size = hub.recipe_card(str(args.source))["size"][0] * HIGHRES_SCALE
    patch = transfer.PIXEL_PATCH * HIGHRES_SCALE
    data = render_corpus(args.work / "real", [s.prompt for s in training_specs(args.prompts, seed=11)], 1, size)
    specs = evaluation_specs(args.per_category)

    def judged(ckpt: str) -> dict:
        scores, images, shown = judge(ckpt, specs, size=size, batch=8, judge=args.judge)
        grid(images, shown, judge=args.judge).save(args.work / f"{Path(ckpt).name}.shapeeval.png")
        return scores

    rows = [{"row": f"{args.init} at {size} px, no 4x training (derived {patch}-px embedder)", "wall s": "-",
             "s/step": "-", "first loss": "-", "last loss": "-"} | judged(str(args.init))]
    for name, flags in HIGHRES_COMPARISONS[args.compare]:
        out = args.work / name.split(" (")[0].replace(" ", "-").replace(",", "").lower()
        start = time.time()
        losses = train.main(["--init", str(args.init), "--ckpt", str(args.source), "--data", str(data),
                             "--out", str(out), "--patch", str(patch), "--steps", str(args.steps), "--batch-size",
                             str(args.batch_size), "--save-every", str(args.steps), "--log-every", "25",
                             *flags])["losses"]
        logged = [json.loads(line)["step_s"] for line in (out / "log.jsonl").read_text().splitlines()]
        tenth = max(1, len(losses) // 10)  # mean losses of the first and the last tenth of the steps
        rows.append({"row": f"{args.steps} steps at {size} px, {name}", "wall s": f"{time.time() - start:.0f}",
                     "s/step": f"{sum(logged[1:] or logged) / len(logged[1:] or logged):.2f}",
                     "first loss": sum(losses[:tenth]) / tenth, "last loss": sum(losses[-tenth:]) / tenth}
                    | judged(str(out)))
        print(table(rows), file=sys.stderr)
    print(table(rows))
    return rows


# ----------------------------------------------------------------------------------------------------
# CLI


def judge_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", choices=list(JUDGES), default="geneval",
                        help="how ShapeEval finds objects: 'geneval' (default) as GenEval does, by foreground instance "
                             "segments shaped by their silhouette and coloured by the majority of their pixels, so a "
                             "speckled, two-tone or blurred object is still one object; 'colour' by palette colour "
                             "first, the earlier judge, under which such an object falls apart. Either way the table "
                             f"also reports '{QUALITY}': image quality as a Fréchet distance of pixel statistics "
                             "(speckle, blended pixels, two-tone objects, colour error) to rendered ground truth for "
                             "the same prompts, lower is better, 0 = like ground truth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-source", help="train the bundled toy source model and save it (diffusers layout)")
    b.add_argument("--out", type=Path, default=TOY_SOURCE)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae-steps", type=int, default=2500)
    b.add_argument("--vae-batch", type=int, default=8)
    b.add_argument("--dit-steps", type=int, default=14000)
    b.add_argument("--dit-batch", type=int, default=64)
    b.add_argument("--dataset", type=int, default=20000, help="rendered scenes the DiT trains on")
    b.add_argument("--eval-every", type=int, default=1000, help="ShapeEval of the EMA model every K steps; 0 = off")
    b.add_argument("--resume", action="store_true", help="train the DiT saved in --out for --dit-steps more steps")
    b.add_argument("--recipe-only", action="store_true", help="only (re)write the recipe card and prompt file")
    e = sub.add_parser("eval", help="sample the evaluation prompts, write a grid beside each model, print ShapeEval "
                                    "and image quality")
    e.add_argument("--ckpt", nargs="+", default=[str(transfer.DEFAULT_RUN)],
                   help="models: L2P run folders or files, or latent sources (default: runs/l2p)")
    e.add_argument("--per-category", type=int, default=10, help="evaluation prompts per category")
    e.add_argument("--seeds", type=int, default=1, help="samples per prompt")
    e.add_argument("--steps", type=int, help="sampling steps (default: the source's recipe card)")
    e.add_argument("--guidance", type=float, help="guidance (default: the source's recipe card)")
    judge_flag(e)
    c = sub.add_parser("claims", help="the paper's claims at toy scale: a table of rows trained on the same budget")
    c.add_argument("--work", type=Path, default=Path("runs/claims"), help="folder for the corpora and the runs")
    c.add_argument("--source", type=Path, default=TOY_SOURCE, help="the toy source model")
    c.add_argument("--full", action="store_true",
                   help="the budget where the recipe levels off on a 2-core CPU (4000 images, batch 32, fresh noise, "
                        "6000 steps with a 2000-step cool-down: about 3.5 hours for the table) instead of the recipe "
                        "card's (400 images, 2000 steps of batch 8: about 30 minutes)")
    c.add_argument("--prompts", type=int, help="synthesis prompts, 2 images each (default: the budget's)")
    c.add_argument("--steps", type=int, help="training steps of every row (default: the budget's)")
    c.add_argument("--per-category", type=int, default=10)
    c.add_argument("--seeds", type=int, default=4, help="rounds of the evaluation prompts, a seed per image")
    h = sub.add_parser("highres", help="4x training with 64-px patches: downsampled vs random embedder init, or the "
                                       "1K head on upsampled features vs the 4K release's head")
    h.add_argument("--init", type=Path, default=transfer.DEFAULT_RUN, help="the native-size L2P run to continue")
    h.add_argument("--source", type=Path, default=TOY_SOURCE, help="the toy source model")
    h.add_argument("--work", type=Path, default=Path("runs/highres"), help="folder for the 4x corpus and the runs")
    h.add_argument("--prompts", type=int, default=200, help="rendered 4x training images")
    h.add_argument("--steps", type=int, default=100, help="training steps of each run")
    h.add_argument("--batch-size", type=int, default=4)
    h.add_argument("--per-category", type=int, default=2, help="evaluation prompts per category (sampled at 4x)")
    h.add_argument("--compare", choices=list(HIGHRES_COMPARISONS), default="embedder",
                   help="what the trained rows differ in: the 64-px embedder's init (default), or the head (the 1K "
                        "head fed upsampled features against the 4K release's six-level layout at toy widths)")
    judge_flag(h)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    commands = {"build-source": build_source, "eval": eval_command, "claims": claims_command, "highres": highres_command}
    commands[args.command](args)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
