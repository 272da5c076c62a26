"""SD3 / SD3.5 MMDiT(-X) and FLUX.1 against diffusers, in float32 on tiny random weights, from every layout a user may
hold: diffusers folders (plain and sharded) and the original single files (SAI's, BFL's), plus clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
import model
from fixtures import randomize
from tokenizer import PooledText

# docs/formats.md, "Tiny checkpoints", with sample_size 16 so the stored position table is spaced 8 / 16 (SD3's is 64 / 192)
SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
                pos_embed_max_size=16)
SD3_VARIANTS = {
    "sd3-medium": dict(num_layers=2),
    "sd35-medium": dict(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm"),
    # heads of 64 with no q/k norm: the shape a SAI file without q/k norms must have (SAI infers head_dim 64)
    "sd3-sai-heads": dict(num_layers=2, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128),
}
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=24)
FLUX_VARIANTS = {
    # head_dim 16 split (4, 6, 6): FLUX.1's (16, 56, 56) does not scale to it, so a single file needs a config
    "dev": dict(guidance_embeds=True, attention_head_dim=16, num_attention_heads=4, axes_dims_rope=(4, 6, 6)),
    # FLUX.1's (16, 56, 56) scaled to head_dim 32, so a single file's config can be inferred
    "schnell": dict(guidance_embeds=False, axes_dims_rope=(4, 14, 14)),
}
LATENT_SIZES = [(12, 20), (10, 14)]  # token grids 6 x 10 and 5 x 7 (odd crop offsets for SD3)
SIGMAS = torch.tensor([0.3, 0.875])  # a batch of 2 at different noise levels
TEXT_TOKENS = 7


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def bf16_exact(module: torch.nn.Module) -> torch.nn.Module:
    """Round every float parameter and buffer to bfloat16 values, so a bf16 copy of the weights is lossless."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.copy_(t.bfloat16().float())
    return module


def tiny_sd3(variant: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return bf16_exact(randomize(SD3Transformer2DModel(**(SD3_TINY | SD3_VARIANTS[variant])), seed)).eval()


def tiny_flux(variant: str, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return bf16_exact(randomize(FluxTransformer2DModel(**(FLUX_TINY | FLUX_VARIANTS[variant])), seed)).eval()


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    for variant in SD3_VARIANTS:
        tiny_sd3(variant).save_pretrained(root / variant)
    return {variant: root / variant for variant in SD3_VARIANTS}


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    for variant in FLUX_VARIANTS:
        tiny_flux(variant).save_pretrained(root / variant)
    return {variant: root / variant for variant in FLUX_VARIANTS}


def sd3_inputs(cfg: dict, latent_size: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_channels"], *latent_size, generator=g)
    context = torch.randn(2, TEXT_TOKENS, cfg["joint_attention_dim"], generator=g)
    return x, context, torch.randn(2, cfg["pooled_projection_dim"], generator=g)


def flux_guidance(cfg) -> torch.Tensor | None:
    return torch.tensor([3.5, 2.0]) if cfg["guidance_embeds"] else None


def reference_flux(ref, x, sigma, context, pooled, guidance):
    """diffusers' FLUX takes packed latents, RoPE ids and t = sigma; packing as FluxPipeline does it."""
    from diffusers import FluxPipeline

    B, C, H, W = x.shape
    ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    packed = ref(FluxPipeline._pack_latents(x, B, C, H, W), context, pooled, sigma, ids,
                 torch.zeros(context.shape[1], 3), guidance, return_dict=False)[0]
    vae_scale = 8  # _unpack_latents takes pixel sizes
    return FluxPipeline._unpack_latents(packed, H * vae_scale, W * vae_scale, vae_scale)


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("latent_size", LATENT_SIZES)
@pytest.mark.parametrize("variant", ["sd3-medium", "sd35-medium"])
def test_sd3_matches_diffusers(sd3_dirs, variant, latent_size):
    """SD3 takes timestep = sigma * 1000 and predicts noise - x0 natively; query chunking changes nothing."""
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(sd3_dirs[variant]).eval()
    ours = hub.load_sd3_transformer(sd3_dirs[variant], torch.float32, "cpu")
    x, context, pooled = sd3_inputs(ref.config, latent_size)
    with torch.no_grad():
        expected = ref(x, context, pooled, SIGMAS * 1000, return_dict=False)[0]
        got = ours(x, SIGMAS, PooledText(context, pooled))
        with model.attention_settings(query_chunk=16):
            chunked = ours(x, SIGMAS, PooledText(context, pooled))
    assert relative_error(got, expected) < 1e-5
    assert relative_error(chunked, expected) < 1e-5


@pytest.mark.parametrize("latent_size", LATENT_SIZES)
@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_flux_matches_diffusers(flux_dirs, variant, latent_size):
    """FLUX with (dev) and without (schnell) the guidance embedding, 2 x 2 packing done inside our model."""
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(flux_dirs[variant]).eval()
    ours = hub.load_flux_transformer(flux_dirs[variant], torch.float32, "cpu")
    x, context, pooled = sd3_inputs(dict(ref.config, in_channels=ref.config.in_channels // 4), latent_size)
    guidance = flux_guidance(ref.config)
    with torch.no_grad():
        expected = reference_flux(ref, x, SIGMAS, context, pooled, guidance)
        got = ours(x, SIGMAS, PooledText(context, pooled), guidance)
        with model.attention_settings(query_chunk=16):
            chunked = ours(x, SIGMAS, PooledText(context, pooled), guidance)
    assert relative_error(got, expected) < 1e-5
    assert relative_error(chunked, expected) < 1e-5


def test_sharded_folders_load(tmp_path, sd3_dirs, flux_dirs):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    for cls, folder, load in [(SD3Transformer2DModel, sd3_dirs["sd35-medium"], hub.load_sd3_transformer),
                              (FluxTransformer2DModel, flux_dirs["dev"], hub.load_flux_transformer)]:
        sharded = tmp_path / folder.name
        cls.from_pretrained(folder).save_pretrained(sharded, max_shard_size="100KB")
        assert len(list(sharded.glob("*.safetensors"))) > 1
        plain, split = load(folder, torch.float32, "cpu").state_dict(), load(sharded, torch.float32, "cpu").state_dict()
        assert plain.keys() == split.keys() and all(torch.equal(plain[k], split[k]) for k in plain)


def test_gradient_checkpointing_gives_the_same_gradients(sd3_dirs, flux_dirs):
    sd3 = hub.load_sd3_transformer(sd3_dirs["sd35-medium"], torch.float32, "cpu")
    flux = hub.load_flux_transformer(flux_dirs["dev"], torch.float32, "cpu")
    for net, inputs in [(sd3, sd3_inputs(SD3_TINY, (8, 8))),
                        (flux, sd3_inputs(dict(FLUX_TINY, in_channels=4), (8, 8)) + (torch.tensor([3.5, 2.0]),))]:
        net.requires_grad_(True)
        grads = []
        for ckpt in (False, True):
            net.gradient_checkpointing = ckpt
            net.zero_grad()
            x, context, pooled, *guidance = inputs
            net(x, SIGMAS, PooledText(context, pooled), *guidance).square().mean().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


# ----------------------------------------------------------------------------------------------------
# Original single files: fakes made by inverting the renames of docs/formats.md ("SD3", "FLUX"), written here independently of hub.py


class Inverter:
    """Builds an original-layout state dict from diffusers tensors, checking every diffusers tensor is used once."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.out, self.used = tensors, {}, set()

    def copy(self, original: str, diffusers: str, swap: bool = False) -> None:
        """One key to one key, or, for names ending in ".", their weight and bias (when present)."""
        pairs = [(original, diffusers)]
        if diffusers.endswith("."):
            pairs = [(original + s, diffusers + s) for s in ("weight", "bias")]
        for original_key, key in pairs:
            if key in self.tensors:
                t = self.tensors[key]
                if swap:  # diffusers (scale, shift) -> original (shift, scale)
                    scale, shift = t.chunk(2)
                    t = torch.cat([shift, scale])
                self.out[original_key] = t
                self.used.add(key)

    def fuse(self, original: str, parts: list[str]) -> None:
        for suffix in ("weight", "bias"):
            if parts[0] + suffix in self.tensors:
                self.out[original + suffix] = torch.cat([self.tensors[p + suffix] for p in parts])
                self.used.update(p + suffix for p in parts)

    def result(self) -> dict[str, torch.Tensor]:
        assert self.used == self.tensors.keys(), sorted(self.tensors.keys() - self.used)[:5]
        return self.out


def sd3_to_original(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    inv = Inverter(tensors)
    inv.copy("pos_embed", "pos_embed.pos_embed")
    inv.copy("x_embedder.proj.", "pos_embed.proj.")
    inv.copy("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1.")
    inv.copy("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2.")
    inv.copy("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1.")
    inv.copy("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2.")
    inv.copy("context_embedder.", "context_embedder.")
    inv.copy("final_layer.linear.", "proj_out.")
    inv.copy("final_layer.adaLN_modulation.1.", "norm_out.linear.", swap=True)
    for i in range(layers):
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        inv.fuse(o + "x_block.attn.qkv.", [d + "attn.to_q.", d + "attn.to_k.", d + "attn.to_v."])
        inv.fuse(o + "context_block.attn.qkv.", [d + "attn.add_q_proj.", d + "attn.add_k_proj.", d + "attn.add_v_proj."])
        inv.fuse(o + "x_block.attn2.qkv.", [d + "attn2.to_q.", d + "attn2.to_k.", d + "attn2.to_v."])
        for original, diffusers in [("x_block.attn.proj.", "attn.to_out.0."), ("x_block.attn2.proj.", "attn2.to_out.0."),
                                    ("context_block.attn.proj.", "attn.to_add_out."),
                                    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
                                    ("context_block.attn.ln_q.", "attn.norm_added_q."),
                                    ("context_block.attn.ln_k.", "attn.norm_added_k."),
                                    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
                                    ("x_block.adaLN_modulation.1.", "norm1.linear."),
                                    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
                                    ("context_block.mlp.fc1.", "ff_context.net.0.proj."),
                                    ("context_block.mlp.fc2.", "ff_context.net.2.")]:
            inv.copy(o + original, d + diffusers)
        inv.copy(o + "context_block.adaLN_modulation.1.", d + "norm1_context.linear.", swap=i == layers - 1)
    return inv.result()


def flux_to_original(tensors: dict[str, torch.Tensor], layers: int, single_layers: int) -> dict[str, torch.Tensor]:
    inv = Inverter(tensors)
    for original, diffusers in [("img_in.", "x_embedder."), ("txt_in.", "context_embedder."),
                                ("time_in.in_layer.", "time_text_embed.timestep_embedder.linear_1."),
                                ("time_in.out_layer.", "time_text_embed.timestep_embedder.linear_2."),
                                ("guidance_in.in_layer.", "time_text_embed.guidance_embedder.linear_1."),
                                ("guidance_in.out_layer.", "time_text_embed.guidance_embedder.linear_2."),
                                ("vector_in.in_layer.", "time_text_embed.text_embedder.linear_1."),
                                ("vector_in.out_layer.", "time_text_embed.text_embedder.linear_2."),
                                ("final_layer.linear.", "proj_out.")]:
        inv.copy(original, diffusers)
    inv.copy("final_layer.adaLN_modulation.1.", "norm_out.linear.", swap=True)
    for i in range(layers):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        inv.fuse(o + "img_attn.qkv.", [d + "attn.to_q.", d + "attn.to_k.", d + "attn.to_v."])
        inv.fuse(o + "txt_attn.qkv.", [d + "attn.add_q_proj.", d + "attn.add_k_proj.", d + "attn.add_v_proj."])
        for original, diffusers in [("img_mod.lin.", "norm1.linear."), ("txt_mod.lin.", "norm1_context.linear."),
                                    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                                    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                                    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                                    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
                                    ("img_attn.proj.", "attn.to_out.0."), ("txt_attn.proj.", "attn.to_add_out."),
                                    ("img_mlp.0.", "ff.net.0.proj."), ("img_mlp.2.", "ff.net.2."),
                                    ("txt_mlp.0.", "ff_context.net.0.proj."), ("txt_mlp.2.", "ff_context.net.2.")]:
            inv.copy(o + original, d + diffusers)
    for i in range(single_layers):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        inv.fuse(o + "linear1.", [d + "attn.to_q.", d + "attn.to_k.", d + "attn.to_v.", d + "proj_mlp."])
        for original, diffusers in [("linear2.", "proj_out."), ("norm.query_norm.scale", "attn.norm_q.weight"),
                                    ("norm.key_norm.scale", "attn.norm_k.weight"), ("modulation.lin.", "norm.linear.")]:
            inv.copy(o + original, d + diffusers)
    return inv.result()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def save_bf16(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.bfloat16().contiguous() for k, v in tensors.items()}, path)
    return path


def same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant", ["sd3-sai-heads", "sd35-medium"])
def test_sd3_original_single_file_equals_folder(tmp_path, sd3_dirs, variant):
    """sd3.5_medium.safetensors style: MMDiT under model.diffusion_model., the VAE beside it under first_stage_model.,
    bf16; the config comes from shapes alone (head_dim 64 without q/k norms, else from the norm)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    folder = sd3_dirs[variant]
    layers = json.loads((folder / "config.json").read_text())["num_layers"]
    original = sd3_to_original(folder_tensors(folder), layers)
    # our mapping and diffusers' own converter agree
    ours, theirs = hub.sd3_from_original(dict(original)), convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    vae = {"first_stage_model.encoder.conv_in.weight": torch.randn(32, 3, 3, 3)}
    path = save_bf16({hub.SAI_PREFIX + k: v for k, v in original.items()} | vae, tmp_path / "sd3.5_medium.safetensors")
    from_file = hub.load_sd3_transformer(path, torch.float32, "cpu")
    from_folder = hub.load_sd3_transformer(folder, torch.float32, "cpu")
    assert from_file.cfg.to_dict() | {"sample_size": 0} == from_folder.cfg.to_dict() | {"sample_size": 0}
    assert same_module(from_file, from_folder)
    x, context, pooled = sd3_inputs(SD3_TINY, LATENT_SIZES[0])
    with torch.no_grad():
        assert torch.equal(from_file(x, SIGMAS, PooledText(context, pooled)), from_folder(x, SIGMAS, PooledText(context, pooled)))


def test_flux_original_single_file_equals_folder(tmp_path, flux_dirs):
    """flux1-schnell.safetensors style: no prefix, bf16, config inferred (RoPE axes: FLUX.1's scaled to head_dim);
    a ComfyUI-style repack under model.diffusion_model. loads the same."""
    folder = flux_dirs["schnell"]
    cfg = json.loads((folder / "config.json").read_text())
    original = flux_to_original(folder_tensors(folder), cfg["num_layers"], cfg["num_single_layers"])
    plain = save_bf16(original, tmp_path / "flux1-schnell.safetensors")
    prefixed = save_bf16({hub.SAI_PREFIX + k: v for k, v in original.items()}, tmp_path / "comfy.safetensors")
    from_folder = hub.load_flux_transformer(folder, torch.float32, "cpu")
    x, context, pooled = sd3_inputs(dict(FLUX_TINY, in_channels=4), LATENT_SIZES[0])
    with torch.no_grad():
        expected = from_folder(x, SIGMAS, PooledText(context, pooled))
    for path in (plain, prefixed):
        from_file = hub.load_flux_transformer(path, torch.float32, "cpu")
        assert from_file.cfg == from_folder.cfg
        assert same_module(from_file, from_folder)
        with torch.no_grad():
            assert torch.equal(from_file(x, SIGMAS, PooledText(context, pooled)), expected)


def test_flux_single_file_with_unscalable_rope_axes_needs_a_config(tmp_path, flux_dirs):
    """FLUX-dev fake: guidance is found from guidance_in.*, but FLUX.1's RoPE split does not scale to head_dim 16
    in even sizes: without a config the loader refuses, with one it loads."""
    folder = flux_dirs["dev"]
    cfg = json.loads((folder / "config.json").read_text())
    original = flux_to_original(folder_tensors(folder), cfg["num_layers"], cfg["num_single_layers"])
    assert "guidance_in.in_layer.weight" in original
    path = save_bf16(original, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(hub.CheckpointError, match=r"flux1-dev.safetensors: head_dim 16 .*pass a config with axes_dims_rope"):
        hub.load_flux_transformer(path, torch.float32, "cpu")
    from_file = hub.load_flux_transformer(path, torch.float32, "cpu", config=cfg)
    assert from_file.cfg.guidance_embeds and same_module(from_file, hub.load_flux_transformer(folder, torch.float32, "cpu"))


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_files_name_the_markers_looked_for(tmp_path, flux_dirs):
    random_file = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, random_file)
    with pytest.raises(hub.CheckpointError, match=r"random.safetensors: not an SD3 / SD3.5 transformer .*"
                       r"joint_blocks\.0\.context_block\.adaLN_modulation\.1\.bias or pos_embed\.proj\.weight"
                       r".*model\.diffusion_model\."):
        hub.load_sd3_transformer(random_file, torch.float32, "cpu")
    with pytest.raises(hub.CheckpointError,
                       match=r"not a FLUX.1 transformer .*double_blocks\.0\.img_attn\.norm\.key_norm\.scale"):
        hub.load_flux_transformer(random_file, torch.float32, "cpu")
    flux_file = flux_dirs["schnell"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(hub.CheckpointError, match="not an SD3 / SD3.5 transformer"):
        hub.load_sd3_transformer(flux_file, torch.float32, "cpu")
    with pytest.raises(hub.CheckpointError, match="_class_name 'FluxTransformer2DModel', expected SD3Transformer2DModel"):
        hub.load_sd3_transformer(flux_dirs["schnell"], torch.float32, "cpu")


@pytest.mark.parametrize("change,message", [
    # block 1 is no longer the last, so it lacks its text output projection and MLP, and block 2 is missing
    ({"num_layers": 3}, r"keys do not match SD3MMDiT: 28 missing \(e\.g\. \['transformer_blocks\.1\.attn\.to_add_out\."),
    ({"pos_embed_max_size": 8},
     r"shape\(s\) differ from the config, e\.g\. \['pos_embed\.pos_embed \(1, 256, 32\) != \(1, 64, 32\)'"),
])
def test_sd3_folder_whose_config_disagrees_with_its_tensors(tmp_path, sd3_dirs, change, message):
    folder = tmp_path / "transformer"
    shutil.copytree(sd3_dirs["sd3-medium"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(hub.CheckpointError, match=message):
        hub.load_sd3_transformer(folder, torch.float32, "cpu")


def test_call_errors_say_what_was_expected(sd3_dirs, flux_dirs):
    sd3 = hub.load_sd3_transformer(sd3_dirs["sd3-medium"], torch.float32, "cpu")
    dev = hub.load_flux_transformer(flux_dirs["dev"], torch.float32, "cpu")
    schnell = hub.load_flux_transformer(flux_dirs["schnell"], torch.float32, "cpu")
    x, context, pooled = sd3_inputs(SD3_TINY, (8, 10))
    flux_context = torch.zeros(2, TEXT_TOKENS, FLUX_TINY["joint_attention_dim"])
    with pytest.raises(ValueError, match="SD3 latents 8x9: .*multiples of the patch size 2"):
        sd3(x[..., :9], SIGMAS, PooledText(context, pooled))
    with pytest.raises(ValueError, match="SD3 has no guidance embedding"):
        sd3(x, SIGMAS, PooledText(context, pooled), torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="FLUX latents 8x9: height and width must be even"):
        schnell(x[:, :4, :, :9], SIGMAS, PooledText(flux_context, pooled))
    with pytest.raises(ValueError, match="guidance-distilled .*pass guidance"):
        dev(x[:, :4], SIGMAS, PooledText(flux_context, pooled))
    with pytest.raises(ValueError, match="no guidance embedding .*guidance must be None"):
        schnell(x[:, :4], SIGMAS, PooledText(flux_context, pooled), 3.5)


# ----------------------------------------------------------------------------------------------------
# SD3 position table past its P x P grid


def test_sd3_position_table_within_and_beyond_its_grid(sd3_dirs):
    """Within P the table is diffusers' centre crop, bit for bit. Past P (diffusers raises) the same grid continues
    at the stored spacing: the stored positions keep their values, and the model runs."""
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(sd3_dirs["sd3-medium"]).eval()
    ours = hub.load_sd3_transformer(sd3_dirs["sd3-medium"], torch.float32, "cpu")
    P, patch = SD3_TINY["pos_embed_max_size"], SD3_TINY["patch_size"]
    for grid in [(P, P), (5, 7), (16, 3)]:
        assert torch.equal(ours.pos_embed.table(grid), ref.pos_embed.cropped_pos_embed(grid[0] * patch, grid[1] * patch))
    assert ours.pos_embed.spacing() == 0.5  # sample_size 16 / patch 2 = 8 positions over P = 16 rows

    grid = (P + 4, P + 3)  # starts at row (P - h) // 2 = -2 and column floor(-3 / 2) = -2 of the stored grid
    extended = ours.pos_embed.table(grid).reshape(*grid, -1)
    stored = ours.pos_embed.pos_embed.reshape(P, P, -1)
    assert (extended[2:2 + P, 2:2 + P] - stored).abs().max() < 2**-8  # the fixture's table went through bf16
    x, context, pooled = sd3_inputs(SD3_TINY, (grid[0] * patch, grid[1] * patch))
    with torch.no_grad():
        out = ours(x, SIGMAS, PooledText(context, pooled))
        with pytest.raises(ValueError, match="cannot be greater than `pos_embed_max_size`"):
            ref(x, context, pooled, SIGMAS * 1000)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sd3_position_table_that_is_not_sincos_is_not_extended(sd3_dirs):
    ours = hub.load_sd3_transformer(sd3_dirs["sd3-medium"], torch.float32, "cpu")
    P = SD3_TINY["pos_embed_max_size"]
    ours.pos_embed.pos_embed = torch.randn_like(ours.pos_embed.pos_embed)
    assert ours.pos_embed.table((P, P)).shape == (1, P * P, ours.cfg.dim)  # a crop needs no formula
    with pytest.raises(ValueError, match=f"not the sin-cos grid diffusers builds .*past its {P} x {P} tokens"):
        ours.pos_embed.table((P + 1, P))
