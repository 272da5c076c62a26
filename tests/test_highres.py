"""High resolution: exact chunked attention and tiled head at every head layout, large-patch embedders, a bounded
shift, and the 4K, 8K and 10K models: inherited from a lower resolution, trained and sampled with their recipes."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import hub
import sample
import train
import transfer
from conftest import train_args
from fixtures import to_official
from test_golden import INHERITANCE
from model import (HEAD_LAYOUTS, DetailerHead, HeadConfig, attention, attention_settings, head_layout, key_padding_mask,
                   nearest_indices, patchify, shift_sigmas, tiled_head)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_attention_equals_full_attention(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))
    mask = key_padding_mask(torch.tensor([300, 217]), 300) if masked else None
    full = attention(q, k, v, mask)
    with attention_settings(query_chunk=64):
        chunked = attention(q, k, v, mask)
    assert (chunked - full).abs().max() < 1e-5
    causal = torch.ones(300, 300, dtype=torch.bool).tril()[None, None]  # a mask with a query dimension too
    with attention_settings(query_chunk=97):
        chunked = attention(q, k, v, causal)
    assert (chunked - F.scaled_dot_product_attention(q, k, v, attn_mask=causal)).abs().max() < 1e-5


@pytest.mark.parametrize("size,features", [((320, 448), (20, 28)), ((320, 448), (5, 7)), ((256, 256), (4, 4))])
def test_tiled_head_equals_untiled_head(size, features):
    """16-px-grid features, and a 64-px-patch grid the head upsamples 4x; tiles of 96 and 128 px."""
    torch.manual_seed(0)
    head = DetailerHead(HeadConfig.from_widths((8, 16, 32, 64)), 32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
        x, f = torch.randn(2, 3, *size), torch.randn(2, 32, *features)
        full = head(x, f)
        for tile in (96, 128):
            assert (tiled_head(head, x, f, tile) - full).abs().max() / full.abs().max() < 1e-5
    with pytest.raises(ValueError, match="head tile 100 must be a multiple of 16"):
        tiled_head(head, x, f, 100)


# Each released layout at tiny widths (w1..w4 = 8..64, so the outer levels are 2 and 4 channels wide) on an image
# whose inner tiles see less than the whole image through their halo, with the features its model's patch gives
# (1K 16, 4K 64, 8K 128, 10K 160 px: there the head resizes them 2.5x, as 64 -> 160 at 10240 px).
TINY_WIDTHS, TINY_DIM = (8, 16, 32, 64), 8
LAYOUT_CASES = {"1k": ((192, 256), 16), "4k": ((704, 192), 64), "8k": ((1280, 256), 128), "10k": ((640, 320), 160)}


def tiny_head_case(layout: str):
    """The head at PyTorch's default init doubled (outputs of order 1, where far context still shows), an image
    and its features."""
    torch.manual_seed(0)
    (height, width), patch = LAYOUT_CASES[layout]
    head = DetailerHead(head_layout(layout, TINY_WIDTHS), TINY_DIM)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(2)
    x, features = torch.randn(1, 3, height, width), torch.randn(1, TINY_DIM, height // patch, width // patch)
    return head, x, features


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_every_layouts_tiled_head_equals_the_untiled_head(layout, monkeypatch):
    """Float32, tiles of one cell: the halo rule (HeadConfig.halo, 4 cells) is exact at every depth (4 to 7 levels)
    and through the 10K feature resize, and it is not slack that hides an error: 2 cells are not enough."""
    head, x, features = tiny_head_case(layout)
    cell = head.cfg.cell
    assert max(x.shape[-2:]) > cell + 2 * head.cfg.halo  # some tiles see only part of the image
    with torch.no_grad():
        full = head(x, features)
        assert (tiled_head(head, x, features, cell) - full).abs().max() < 1e-5
        monkeypatch.setattr(HeadConfig, "halo", property(lambda cfg: 2 * cfg.cell))
        assert (tiled_head(head, x, features, cell) - full).abs().max() > 1e-5


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_every_layouts_checkpointed_and_tiled_gradients_equal_plain_ones(layout):
    """Gradients of every head weight and of the features: checkpointing each stage changes no bit; checkpointed
    tiles (how train.py bounds memory) sum each weight's gradient over tiles, equal up to that summation order."""
    head, x, features = tiny_head_case(layout)
    features.requires_grad_(True)
    weights = torch.randn(x.shape)

    def gradients(run):
        head.zero_grad(set_to_none=True)
        features.grad = None
        (run() * weights).sum().backward()
        return [p.grad.clone() for p in head.parameters()] + [features.grad.clone()]

    plain = gradients(lambda: head(x, features))
    head.gradient_checkpointing = True
    assert all(torch.equal(a, b) for a, b in zip(gradients(lambda: head(x, features)), plain))
    tiled = gradients(lambda: tiled_head(head, x, features, 4 * head.cfg.cell))
    assert all((a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(tiled, plain))


def test_the_10k_feature_resize_is_legacy_nearest_index_for_index():
    """F.interpolate's default mode "nearest" takes source index floor(dst * in / out): 64 -> 160 repeats the rows
    3, 2, 3, 2, ... times. The head's bottleneck sees exactly those rows and columns of the features."""
    rows = nearest_indices(64, 160)
    assert torch.equal(rows, torch.arange(160) * 64 // 160)
    assert torch.bincount(rows).tolist() == [3, 2] * 32
    head, x, features = tiny_head_case("10k")
    seen = []
    head.bottleneck.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, -TINY_DIM:]))
    with torch.no_grad():
        head(x, features)
    (h, w), (fh, fw) = seen[0].shape[-2:], features.shape[-2:]
    assert (h, w) == (10, 5) and (fh, fw) == (4, 2)
    assert torch.equal(seen[0], features[:, :, torch.arange(h) * fh // h][:, :, :, torch.arange(w) * fw // w])


def test_pixel_model_with_tiles_and_chunks_equals_plain(pipeline_dir):
    source = hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer
    head = HeadConfig.from_widths((8, 16, 32, 64))
    pixel = transfer.add_patch_sizes(transfer.transfer(source, head=head, verbose=False), (32, 64))
    x, sigma, caps = torch.randn(2, 3, 256, 192), torch.tensor([0.3, 0.8]), [torch.randn(5, 32), torch.randn(40, 32)]
    with torch.no_grad():
        for patch in (16, 64):
            plain = pixel(x, sigma, caps, patch)
            pixel.head_tile = 96
            with attention_settings(query_chunk=50):
                tiled = pixel(x, sigma, caps, patch)
            pixel.head_tile = None
            assert (tiled - plain).abs().max() / plain.abs().max() < 1e-5


def test_large_patch_embedder_starts_as_the_16px_embedding_of_the_downsampled_image():
    torch.manual_seed(0)
    embedder = torch.nn.Linear(16 * 16 * 3, 48)
    x = torch.randn(2, 3, 256, 192)
    for patch in (32, 64):
        w, b = transfer.downsampled_embedder(embedder.weight.data, embedder.bias.data, patch)
        big = patchify(x, patch) @ w.T + b
        small = embedder(patchify(F.avg_pool2d(x, patch // 16), 16)).detach()
        assert (big - small).abs().max() / small.abs().max() < 1e-5


def test_high_resolution_shift_is_bounded_and_the_schedule_stays_spread():
    assert sample.high_resolution_shift(1024, 1024) == pytest.approx(3.0)
    assert sample.high_resolution_shift(4096, 4096) == pytest.approx(4.0)  # the paper's best at 4K
    assert sample.high_resolution_shift(10 ** 6, 10 ** 6) == sample.MAX_PIXEL_SHIFT
    tokens = (4096 // 16) ** 2  # 65,536: 4K with 16-px patches
    for height in (4096, 10240, 10 ** 5):
        sigmas = sample.source_sigmas(30, {"shift": sample.high_resolution_shift(height, height)}, tokens)
        assert (sigmas[:-1] <= 0.5).float().mean() >= 1 / 8 and sigmas[-2] < 0.2
    # what a token-count-linear rule (FLUX's dynamic mu, diffusers defaults) would do at that size: pure noise
    mu = tokens * (sample.MAX_SHIFT - sample.BASE_SHIFT) / (sample.MAX_SEQ_LEN - sample.BASE_SEQ_LEN)
    mu += sample.BASE_SHIFT - sample.BASE_SEQ_LEN * (sample.MAX_SHIFT - sample.BASE_SHIFT) / (
        sample.MAX_SEQ_LEN - sample.BASE_SEQ_LEN)
    linear = shift_sigmas(torch.linspace(1.0, 1 / 30, 30), math.exp(mu))
    assert mu > 11 and (linear > 0.99).float().mean() > 0.9
    # ours follows that line up to max_image_seq_len (diffusers parity) and is bounded beyond it
    assert sample.resolution_mu(4096, {}) == pytest.approx(sample.MAX_SHIFT)
    assert sample.resolution_mu(1024, {}) == pytest.approx(0.5 + 768 * 0.65 / 3840)
    for n in (16384, tokens, 10 ** 7):
        flux = sample.source_sigmas(30, {"use_dynamic_shifting": True}, n)
        assert (flux[:-1] <= 0.5).float().mean() >= 1 / 8 and flux[-2] < 0.2
    assert sample.resolution_mu(10 ** 7, {}) == pytest.approx(math.log(sample.MAX_PIXEL_SHIFT))


def test_patch_choice_keeps_the_native_grid():
    assert sample.choose_patch((16, 32, 64), 1024, 1024) == 16
    assert sample.choose_patch((16, 32, 64), 2048, 1536) == 32
    assert sample.choose_patch((16, 32, 64), 4096, 4096) == 64
    assert sample.choose_patch((16,), 4096, 4096) == 64  # derived from the 16-px embedder when sampling
    assert sample.choose_patch((16, 32, 64), 512, 512, native=128) == 64
    assert sample.choose_patch((16, 32, 64), 4096, 4080) == 16  # only 16 divides 4080


# ----------------------------------------------------------------------------------------------------
# The 4K, 8K and 10K models


@pytest.mark.parametrize("low, high, at_init, dropped", INHERITANCE)
def test_a_higher_resolution_model_inherits_exactly_the_matching_tensors(pipeline_dir, low, high, at_init, dropped):
    """Tiny models of two layouts: every tensor of the same name and shape is copied bit for bit (the whole
    backbone among them), the others are the new layout's fresh init, and the modules left at init and dropped are
    those of the real releases (test_golden.INHERITANCE)."""
    source = hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer
    lower = transfer.transfer(source, head=head_layout(low, TINY_WIDTHS), patches=(transfer.LAYOUT_PATCHES[low],),
                              verbose=False)
    cfg = replace(lower.cfg, head=head_layout(high, TINY_WIDTHS), patches=(transfer.LAYOUT_PATCHES[high],))
    higher = transfer.inherit(lower, cfg, seed=1, verbose=False)
    old, new = lower.state_dict(), higher.state_dict()
    kept = set(transfer.matching_tensors(old, new))
    assert all(torch.equal(new[k], old[k]) for k in kept)
    assert {k for k in new if k.startswith("backbone.") and "all_x_embedder" not in k} <= kept
    assert transfer.module_names(new.keys() - kept) == at_init
    assert transfer.module_names(old.keys() - new.keys()) == dropped
    fresh = transfer.inherit(lower, cfg, seed=1, verbose=False).state_dict()  # the init is the seed's
    assert all(torch.equal(fresh[k], new[k]) for k in new.keys() - kept)


def card_copy(pipeline_dir: Path, tmp_path: Path) -> Path:
    """The tiny pipeline with a recipe card naming a native size of 32 px: the 4K, 8K and 10K layouts' sizes are
    then 128, 256 and 320 px, at the native 2 x 2 token grid."""
    folder = tmp_path / "source"
    shutil.copytree(pipeline_dir, folder)
    hub.write_json(folder / hub.RECIPE_CARD, {"size": [32, 32]})
    return folder


def large_csv_corpus(folder: Path) -> Path:
    """Two 400 x 300 images: the 8K recipe scales them to at most 256^2 pixels, sides floored to 128: 128 x 256."""
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (400, 300), (60 * i, 120, 200)).save(folder / f"img{i}.png")
    (folder / "metadata.csv").write_text("image,prompt\nimg0.png,a red circle\nimg1.png,a blue square on white\n")
    return folder


@pytest.mark.parametrize("layout", ["4k", "8k", "10k"])
def test_a_tiny_high_resolution_model_trains_and_samples_with_its_defaults(pipeline_dir, corpus, tmp_path, layout,
                                                                           capsys):
    """train.py --head: the layout's recipe (its patch, the 1000-point grid, fresh noise, its image size) unless
    flags say otherwise; the model holds its one embedder. Then the run, and the same weights under the release's
    names, sample through sample.py with the high-resolution defaults: their size, patch, shift 3, 50 steps,
    guidance 4, and for the release the official bf16 timesteps."""
    source = card_copy(pipeline_dir, tmp_path)
    data = large_csv_corpus(tmp_path / "large") if layout == "8k" else corpus
    run = tmp_path / "run"
    done = train.train(train_args(source, data, run, "--steps", "2", "--head", layout))
    assert done["step"] == 2 and all(math.isfinite(loss) for loss in done["losses"])
    recorded = json.loads((run / "args.json").read_text())
    patch, side = transfer.LAYOUT_PATCHES[layout], {"4k": 128, "8k": 256, "10k": 320}[layout]
    assert (recorded["patch"], recorded["train_grid"], recorded["fresh_noise"]) == (str(patch), "1000", "True")
    assert recorded["image_size" if layout != "8k" else "max_pixels"] == str(side if layout != "8k" else side**2)
    model, _ = transfer.load_pixel_model(str(run))
    assert model.cfg.patches == (patch,) and model.cfg.head == head_layout(layout, TINY_WIDTHS)
    release = tmp_path / f"l2p_{layout}_sft.safetensors"
    save_file(to_official(model.state_dict()), release)
    for ckpt, extra, times in ((str(run), [], "exact"), (str(release), ["--source", str(source)], "official")):
        png = tmp_path / "out.png"
        sample.main(["--ckpt", ckpt, "--prompt", "a red circle", "--out", str(png), *extra])
        assert f"{times} timesteps" in capsys.readouterr().err
        settings = json.loads(Image.open(png).text["l2p"])
        assert (settings["height"], settings["width"], settings["patch"], settings["shift"]) == (side, side, patch, 3.0)
        assert (settings["steps"], settings["guidance"]) == (50, 4.0)


def test_train_py_grows_1k_into_4k_into_8k(pipeline_dir, corpus, tmp_path):
    """--init with another --head: 1K -> 4K -> 8K, each run starting from the one before (its embedder derived
    from the previous patch), loading as source + trained tensors; 4K -> 10K cannot derive 160 px from 64 px."""
    source = card_copy(pipeline_dir, tmp_path)
    runs = {layout: tmp_path / layout for layout in ("1k", "4k", "8k", "10k")}
    train.train(train_args(source, corpus, runs["1k"], "--steps", "1"))
    for low, high in (("1k", "4k"), ("4k", "8k")):
        extra = ["--image-size", "256"] if high == "8k" else []
        train.train(train_args(source, corpus, runs[high], "--steps", "1", "--init", str(runs[low]), "--head", high,
                               *extra))
        lower, _ = transfer.load_pixel_model(str(runs[low]))
        higher, _ = transfer.load_pixel_model(str(runs[high]))
        assert higher.cfg.head.layout == high and higher.cfg.patches == (transfer.LAYOUT_PATCHES[high],)
        # a frozen backbone block the 1K run trained keeps its trained values
        name = "backbone.layers.0.attention.to_q.weight"
        assert not torch.equal(lower.state_dict()[name], hub.load_pipeline(str(source), parts=("transformer",))
                               .transformer.state_dict()[name.removeprefix("backbone.")])
    with pytest.raises(ValueError, match=r"patch 160: no embedder of this model \(64 px\) divides it .* --patch-init "
                                         r"random"):
        train.train(train_args(source, corpus, runs["10k"], "--steps", "1", "--init", str(runs["4k"]), "--head", "10k"))


def test_sizes_a_high_resolution_model_cannot_sample_are_refused(pipeline_dir, tmp_path, capsys):
    source = card_copy(pipeline_dir, tmp_path)
    model = transfer.transfer(hub.load_pipeline(str(source), parts=("transformer",)).transformer,
                              head=head_layout("10k", TINY_WIDTHS), patches=(160,), verbose=False)
    release = tmp_path / "l2p_10k_sft.safetensors"
    save_file(to_official(model.state_dict()), release)
    common = ["--ckpt", str(release), "--source", str(source), "--prompt", "a red circle", "--dry-run"]
    with pytest.raises(ValueError, match=r"--h 640 --w 640: a 10K model samples exactly 320x320: its head resizes the "
                                         r"2 x 2-token features to the fixed 5 x 5 grid of that size"):
        sample.main(common + ["--h", "640", "--w", "640"])
    sample.main(common)
    assert "320x320, patch 160, shift 3.000" in capsys.readouterr().err
    model = transfer.transfer(hub.load_pipeline(str(source), parts=("transformer",)).transformer,
                              head=head_layout("4k", TINY_WIDTHS), patches=(64,), verbose=False)
    save_file(to_official(model.state_dict()), release)
    with pytest.raises(ValueError, match=r"--h 96 is not a positive multiple of 64 \(this 4k model's 64-px patch"):
        sample.main(common + ["--h", "96", "--w", "128"])
    sample.main(common + ["--h", "192", "--w", "128"])  # any multiple of 64, not square too
    assert "192x128, patch 64, shift 3.000" in capsys.readouterr().err
