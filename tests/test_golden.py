"""Conformance with the real checkpoints: their tensor names and shapes, their configs, and quantized re-saves.

The facts come from tests/golden; tests/golden/SOURCES.md says where each file came from and how far to trust it.
Each real model is built at its real config on the meta device (no memory, no weights) through the loader's own
pure functions (renames, config from config.json or from shapes, unused-key filtering), fed meta tensors of the
golden shapes, and handed to hub.load_module: the check every real load ends with, which refuses any missing,
unexpected or differently shaped tensor.
"""

import gzip
import hashlib
import json
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hub
import sample
import transfer
from fixtures import tiny_qwen3, to_official
from model import HEAD_WIDTHS, FluxConfig, FluxDiT, PixelDiT, ZImageConfig, ZImageDiT, head_layout
from tokenizer import (CLIP_DEFAULT_SPECIALS, T5_DEFAULT_SPECIALS, CLIPTextConfig, Qwen3Config, Qwen3TextEncoder,
                       T5Config, VAEConfig, special_tokens)

GOLDEN = Path(__file__).parent / "golden"
ZIMAGE = "Z-Image-Turbo"
SDNQ = "Z-Image-Turbo-SDNQ-derivative"
FLUX_DEV = "FLUX.1-dev"
SCHNELL_BNB = "FLUX.1-schnell-bnb-nf4-derivative"
ZIMAGE_TRANSFORMER = f"{ZIMAGE}/transformer/DERIVED_tensor_shapes.json"
ZIMAGE_TEXT_ENCODER = f"{ZIMAGE}/text_encoder/DERIVED_tensor_shapes.json"
ZIMAGE_ORIGINAL = f"{ZIMAGE}/single_file_keys/invokeai_z_image_transformer_comfyui_keys.json"
L2P_RELEASE = "L2P/DERIVED_model-1k-merge.tensor_shapes.json"
HR_RELEASES = {layout: f"L2P-HR/L2P-{layout.upper()}.tensor_shapes.json" for layout in ("4k", "8k", "10k")}
FLUX_BFL = f"{FLUX_DEV}/single_file_keys/DERIVED_flux1-dev.safetensors.tensor_shapes.json"
FLUX_INDEX = f"{FLUX_DEV}/transformer/diffusion_pytorch_model.safetensors.index.json.gz"
FLUX_INT8 = f"{FLUX_DEV}/single_file_keys/invokeai_flux1_dev_int8_convrot_keys.json"
# The model_hash DiffSynth-Studio publishes for each real file (diffsynth/configs/model_configs.py, as copied in
# vinx6903/T2I-L2P @ fb5f989): a list whose hash matches has exactly the real file's names and shapes.
PUBLISHED_HASHES = {
    ZIMAGE_TRANSFORMER: "fc3a8a1247fe185ce116ccbe0e426c28",  # "z_image_dit", Tongyi-MAI/Z-Image-Turbo transformer
    ZIMAGE_TEXT_ENCODER: "0f050f62a88876fea6eae0a18dac5a2e",  # "z_image_text_encoder"
    L2P_RELEASE: "577b2d3e0acea1fb784ca600f966805e",  # "z_image_dit_L2P", zhen-nan/L2P model-1k-merge.safetensors
    # "z_image_L2P_series" of the high-resolution code's model_configs.py: HaojunChen/PixVerve-L2P l2p_*_sft.safetensors
    HR_RELEASES["4k"]: "69e8fd5b562ea858b9f864508c1263b3",
    HR_RELEASES["8k"]: "df0e4e865d39501e2fe96c7ea8aa40f6",
    HR_RELEASES["10k"]: "e6094ba663b7c10011eb47db072ead0b",
    FLUX_BFL: "a29710fea6dddb0314663ee823598e50",  # "flux_dit", black-forest-labs/FLUX.1-dev flux1-dev.safetensors
}
STACKS = ("layers", "noise_refiner", "context_refiner")  # Z-Image's numbered block lists


def golden(path: str) -> dict:
    """A golden JSON file; large ones are stored gzipped (tests/golden/SOURCES.md)."""
    raw = (GOLDEN / path).read_bytes()
    return json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)


def shapes(path: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in golden(path)["tensors"].items()}


def meta_tensors(named_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """What a safetensors header says, as tensors without storage."""
    return {k: torch.empty(shape, device="meta") for k, shape in named_shapes.items()}


def conforms(build, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Our module built on meta and loaded strictly from `tensors` by the loader's own check (hub.load_module)."""
    return hub.load_module(build, tensors, "golden", torch.float32, "meta")


def shape_diff(ours: dict[str, torch.Tensor], real: dict[str, tuple[int, ...]]) -> list[str]:
    """Names only we have, names only the real file has, and shared names whose shapes differ."""
    return ([f"only ours: {k}" for k in sorted(ours.keys() - real.keys())]
            + [f"only real: {k}" for k in sorted(real.keys() - ours.keys())]
            + [f"{k}: ours {tuple(ours[k].shape)}, real {real[k]}" for k in sorted(ours.keys() & real.keys())
               if tuple(ours[k].shape) != real[k]])


def without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def turbo_config() -> dict:
    """Z-Image-Turbo's transformer config.json. The copy we have is from an SDNQ re-save, which added
    quantization_config and _name_or_path; the official file has neither (tests/golden/SOURCES.md)."""
    return without(golden(f"{SDNQ}/transformer/config.json"), "quantization_config", "_name_or_path")


def qwen3_config() -> dict:
    """Z-Image-Turbo's text_encoder config.json, from the same re-save, without the quantization it added."""
    return without(golden(f"{SDNQ}/text_encoder/config.json"), "quantization_config")


def diffsynth_hash(named_shapes: dict) -> str:
    """DiffSynth's hash_model_file of a flat state dict: md5 over the sorted strings "key:d0_d1_..." and "key",
    joined by commas."""
    keys = [f"{k}:{'_'.join(map(str, shape))}" for k, shape in named_shapes.items()] + list(named_shapes)
    return hashlib.md5(",".join(sorted(keys)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# The golden lists are the real ones


@pytest.mark.parametrize("path", PUBLISHED_HASHES)
def test_derived_lists_hash_to_the_published_model_hash(path):
    # What makes a DERIVED list trustworthy (tests/golden/SOURCES.md); it also catches a damaged copy
    assert diffsynth_hash(golden(path)["tensors"]) == PUBLISHED_HASHES[path]
    if "_num_tensors" in golden(path):  # the high-resolution lists record their hash, not a count
        assert len(golden(path)["tensors"]) == golden(path)["_num_tensors"]


# ----------------------------------------------------------------------------------------------------
# Z-Image-Turbo


def test_zimage_turbo_transformer_diffusers_folder():
    """The 521 tensors of Tongyi-MAI/Z-Image-Turbo transformer/*.safetensors at its config.json."""
    cfg, tensors = hub.zimage_transformer_tensors(meta_tensors(shapes(ZIMAGE_TRANSFORMER)), turbo_config(), "golden")
    conforms(lambda: ZImageDiT(cfg), tensors)


def test_zimage_turbo_config_from_shapes():
    """A single file has no config.json: what we read from the real shapes is the real config. axes_lens is not
    stored in any tensor (Turbo says 1536, the inferred config keeps diffusers' 1024) and we never use it."""
    cfg, tensors = hub.zimage_transformer_tensors(meta_tensors(shapes(ZIMAGE_TRANSFORMER)), None, "golden")
    real = ZImageConfig.from_dict(turbo_config())
    assert replace(cfg, axes_lens=real.axes_lens) == real
    conforms(lambda: ZImageDiT(cfg), tensors)


def block_zero(named_shapes: dict) -> dict:
    """Block 0 of each stack and every non-block key: what the InvokeAI dump kept of the full file."""
    return {k: v for k, v in named_shapes.items() if k.split(".")[0] not in STACKS or k.split(".")[1] == "0"}


def original_dump() -> dict[str, tuple[int, ...]]:
    # The dump adds norm_final.weight to exercise a converter's skip branch; real files do not hold it
    # (tests/golden/SOURCES.md), so it is no evidence either way
    return without(shapes(ZIMAGE_ORIGINAL), "norm_final.weight")


def test_zimage_original_single_file_names_map_to_the_diffusers_names():
    """ComfyUI / original names (fused qkv, x_embedder, final_layer, q_norm, out) through our rename give exactly
    the diffusers names and shapes of the same blocks."""
    renamed = hub.zimage_from_original(meta_tensors(original_dump()))
    assert shape_diff(renamed, block_zero(shapes(ZIMAGE_TRANSFORMER))) == []


def test_zimage_original_single_file_loads_at_its_inferred_config():
    """The single-file path end to end on the dump: rename, config from shapes (one block per stack), strict load."""
    cfg, tensors = hub.zimage_transformer_tensors(meta_tensors(original_dump()), None, "golden")
    real = ZImageConfig.from_dict(turbo_config())
    assert (cfg.n_layers, cfg.n_refiner_layers) == (1, 1)
    full = replace(cfg, n_layers=real.n_layers, n_refiner_layers=real.n_refiner_layers, axes_lens=real.axes_lens)
    assert full == real
    conforms(lambda: ZImageDiT(cfg), tensors)


def test_qwen3_text_encoder_drops_exactly_what_hidden_states_minus_two_never_reaches():
    """The 398 tensors of Z-Image-Turbo's Qwen3-4B: what we drop is what transformers' Qwen3Model leaves without a
    gradient when only hidden_states[-2] is used (at the real depth, tiny widths), and the rest is our encoder."""
    real = shapes(ZIMAGE_TEXT_ENCODER)
    cfg = Qwen3Config.from_dict(qwen3_config())
    kept = hub.qwen3_tensors(meta_tensors(real), cfg)
    conforms(lambda: Qwen3TextEncoder(cfg), kept)

    oracle = tiny_qwen3(num_hidden_layers=cfg.num_hidden_layers)
    ids = torch.tensor([[1, 2, 3, 4]])
    oracle(input_ids=ids, output_hidden_states=True).hidden_states[-2].sum().backward()
    unreached = {f"model.{name}" for name, p in oracle.named_parameters() if p.grad is None}
    dropped = {k for k in real if k.removeprefix("model.") not in kept}
    assert dropped and dropped == unreached


# ----------------------------------------------------------------------------------------------------
# The official L2P release


def test_official_l2p_release():
    """zhen-nan/L2P's model-1k-merge.safetensors (545 tensors): recognised, its config read from its shapes, and
    mapped exactly onto our PixelDiT; its backbone is Z-Image-Turbo's with 16-px RGB patches and no final layer."""
    release = meta_tensors(shapes(L2P_RELEASE))
    assert transfer.is_official_release(release)
    cfg = transfer.official_config(release)
    model = conforms(lambda: PixelDiT(cfg), transfer.from_official(release))
    turbo = transfer.pixel_config(ZImageConfig.from_dict(turbo_config()), cfg.head, timestep_rule="official")
    assert cfg == replace(turbo, backbone=replace(turbo.backbone, axes_lens=cfg.backbone.axes_lens))
    # the fake release test_recipe.py samples from is written under these names
    assert shape_diff(to_official(model.state_dict()), shapes(L2P_RELEASE)) == []


def release_config(path: str) -> tuple[dict[str, torch.Tensor], "transfer.PixelConfig"]:
    release = meta_tensors(shapes(path))
    assert transfer.is_official_release(release)
    return release, transfer.official_config(release)


@pytest.mark.parametrize("layout", HR_RELEASES)
def test_high_resolution_releases(layout):
    """HaojunChen/PixVerve-L2P's l2p_{4k,8k,10k}_sft.safetensors (557, 563, 557 tensors): recognised, patch and
    head read from their shapes, mapped exactly onto our PixelDiT at that real config. The head is our
    head_layout at the releases' widths, stage by stage, the backbone the 1K release's, and
    the text side Z-Image (Base)'s."""
    release, cfg = release_config(HR_RELEASES[layout])
    assert cfg.patches == (transfer.LAYOUT_PATCHES[layout],) and cfg.timestep_rule == "official"
    assert cfg.head == head_layout(layout, HEAD_WIDTHS) and cfg.head.layout == layout
    assert cfg.backbone == release_config(L2P_RELEASE)[1].backbone
    assert transfer.official_source(cfg.patches[0]) == "Tongyi-MAI/Z-Image"
    model = conforms(lambda: PixelDiT(cfg), transfer.from_official(release))
    assert shape_diff(to_official(model.state_dict()), shapes(HR_RELEASES[layout])) == []


@pytest.mark.parametrize("layout, stage, shape", [
    ("4k", "local_decoder.dec1.0.weight", (64, 128, 3, 3)),  # 1K's dec1 (the 4K head narrows it to 32)
    ("8k", "local_decoder.dec_8k.0.weight", (16, 32, 3, 3)),  # without the 3-channel wrapper skip
    ("10k", "local_decoder.up3.1.weight", (256, 256, 3, 3)),  # the 4K head's up3 (10K's takes the 512 bottleneck)
    ("10k", "local_decoder.bottleneck.0.weight", (512, 4352, 1, 1)),  # pooled 512 + features: 4K's
])
def test_a_changed_stage_of_a_high_resolution_list_fails(layout, stage, shape):
    """A copy of a list with one stage's shape changed fails against our model at the real config (naming the
    stage), and through the loader's own path too, where the config is read from the changed shapes."""
    real = shapes(HR_RELEASES[layout])
    changed = meta_tensors(real | {stage: shape})
    _, cfg = release_config(HR_RELEASES[layout])
    named = stage.removeprefix("local_decoder.")
    with pytest.raises(hub.CheckpointError, match=rf"1 tensor shape\(s\) differ.*{named}"):
        conforms(lambda: PixelDiT(cfg), transfer.from_official(changed))
    with pytest.raises(hub.CheckpointError, match=r"tensor shape\(s\) differ"):
        conforms(lambda: PixelDiT(transfer.official_config(changed)), transfer.from_official(changed))
    assert shape_diff(changed, real) == [f"{stage}: ours {shape}, real {real[stage]}"]


# What a higher-resolution release takes from a lower one when started from it (transfer.inherit): the modules
# left at init (in the new file with no tensor of that name and shape in the old one) and those dropped
INHERITANCE = [
    ("1k", "4k", ["all_x_embedder.64-1", "dec0", "dec0b", "dec1", "enc0", "enc0b", "enc1", "out_conv", "up0", "up0b"],
     ["all_x_embedder.16-1"]),
    ("4k", "8k", ["all_x_embedder.128-1", "dec_8k", "enc_8k", "up_8k"], ["all_x_embedder.64-1"]),
    ("4k", "10k", ["all_x_embedder.160-1", "bottleneck", "dec_10k_a", "enc_10k_a", "up3", "up_10k_a"],
     ["all_x_embedder.64-1", "dec4", "enc4", "up4"]),
]


@pytest.mark.parametrize("low, high, at_init, dropped", INHERITANCE)
def test_what_a_release_inherits_from_a_lower_resolution_one(low, high, at_init, dropped):
    """On the real lists, in our names: every backbone tensor and the shared head stages carry over (4K -> 8K the
    whole 4K head; 4K -> 10K all but bottleneck and up3, whose shapes differ, and the missing level 4)."""
    lists = {"1k": L2P_RELEASE} | HR_RELEASES
    old, new = (transfer.from_official(meta_tensors(shapes(lists[layout]))) for layout in (low, high))
    kept = transfer.matching_tensors(old, new)
    assert transfer.module_names(new.keys() - set(kept)) == at_init
    assert transfer.module_names(old.keys() - new.keys()) == dropped
    assert all(k in kept for k in new if k.startswith("backbone.") and "all_x_embedder" not in k)


# ----------------------------------------------------------------------------------------------------
# FLUX.1-dev


def flux_from_bfl() -> tuple[FluxConfig, dict[str, torch.Tensor]]:
    return hub.mmdit_tensors("flux", meta_tensors(shapes(FLUX_BFL)), None, "golden")


def test_flux_dev_bfl_single_file():
    """flux1-dev.safetensors (780 tensors, BFL names): renamed and its config read from shapes, which is the
    config.json of the diffusers folder (which has no axes_dims_rope: FLUX.1's (16, 56, 56) is the default)."""
    cfg, tensors = flux_from_bfl()
    assert cfg == FluxConfig.from_dict(golden(f"{FLUX_DEV}/transformer/config.json"))
    conforms(lambda: FluxDiT(cfg), tensors)


def test_flux_dev_diffusers_folder():
    """The diffusers folder's index json names its 1160 tensors (no shapes): they are our FluxDiT's at the folder's
    config.json, and the BFL file's tensors renamed; shapes are the BFL file's through our rename."""
    names = set(golden(FLUX_INDEX)["weight_map"])
    _, renamed = flux_from_bfl()
    assert names == set(renamed)
    cfg, tensors = hub.mmdit_tensors("flux", renamed, golden(f"{FLUX_DEV}/transformer/config.json"), "golden")
    conforms(lambda: FluxDiT(cfg), tensors)


# ----------------------------------------------------------------------------------------------------
# Every real config parses, extra fields and all


CONFIGS = {  # config.json -> our config class; derivative copies keep their added fields on purpose
    f"{SDNQ}/transformer/config.json": ZImageConfig,
    f"{SDNQ}/text_encoder/config.json": Qwen3Config,
    f"{SDNQ}/vae/config.json": VAEConfig,
    f"{FLUX_DEV}/transformer/config.json": FluxConfig,
    f"{SCHNELL_BNB}/transformer/config.json": FluxConfig,
    f"{SCHNELL_BNB}/vae/config.json": VAEConfig,
    f"{SCHNELL_BNB}/text_encoder/config.json": CLIPTextConfig,
    f"{SCHNELL_BNB}/text_encoder_2/config.json": T5Config,
}


@pytest.mark.parametrize("path", CONFIGS)
def test_real_configs_parse(path):
    """Every field our class has takes the file's value; the rest (quantization_config, _name_or_path, dtype,
    layer_types, ...) is ignored."""
    raw = golden(path)
    cfg = CONFIGS[path].from_dict(raw)
    values = asdict(cfg)
    set_here = [f.name for f in fields(cfg) if raw.get(f.name) is not None]
    assert set_here
    for name in set_here:
        assert values[name] == (tuple(raw[name]) if isinstance(raw[name], list) else raw[name]), name


def test_real_qwen3_config_rope_theta():
    # rope_scaling is null in the real file, so the top-level rope_theta holds
    assert Qwen3Config.from_dict(qwen3_config()).rope_theta == qwen3_config()["rope_theta"]


@pytest.mark.parametrize("path", [f"{SDNQ}/scheduler/scheduler_config.json",
                                  f"{SCHNELL_BNB}/scheduler/scheduler_config.json"])
def test_real_scheduler_configs_give_a_schedule(path):
    sigmas = sample.source_sigmas(8, golden(path), image_seq_len=4096)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())


def test_real_model_indexes():
    """Z-Image-Turbo's model_index.json (transcribed) lists the components, with the classes, that our
    save_pipeline writes; FLUX's names every folder our FluxPipeline format reads."""
    zimage = golden(f"{ZIMAGE}/model_index.TRANSCRIBED.json")
    assert without(zimage, "_class_name", "_diffusers_version") == hub.PIPELINE_COMPONENTS
    assert zimage["_class_name"] in hub.SUPPORTED_PIPELINES
    flux = golden(f"{SCHNELL_BNB}/model_index.json")
    pipeline = hub.PIPELINE_FORMATS[flux["_class_name"]]
    assert flux["transformer"][1] == pipeline.transformer_class
    assert all(name in flux for pair in pipeline.text_components for name in pair)


@pytest.mark.parametrize("folder, defaults, pad", [("tokenizer", CLIP_DEFAULT_SPECIALS, "<|endoftext|>"),
                                                  ("tokenizer_2", T5_DEFAULT_SPECIALS, "<pad>")])
def test_real_tokenizer_configs(folder, defaults, pad):
    assert special_tokens(GOLDEN / SCHNELL_BNB / folder, defaults)["pad_token"] == pad


# ----------------------------------------------------------------------------------------------------
# The comparisons above can fail


def test_a_renamed_key_or_a_changed_shape_is_reported():
    real = shapes(ZIMAGE_TRANSFORMER)
    renamed = dict(real)
    renamed["layers.0.attention.to_qkv.weight"] = renamed.pop("layers.0.attention.to_q.weight")
    reshaped = real | {"cap_embedder.1.weight": (3840, 2048)}
    for broken, message in ((renamed, r"1 missing .*to_q.*1 unexpected .*to_qkv"),
                            (reshaped, r"1 tensor shape\(s\) differ.*cap_embedder.1.weight")):
        cfg, tensors = hub.zimage_transformer_tensors(meta_tensors(broken), turbo_config(), "golden")
        with pytest.raises(hub.CheckpointError, match=message):
            conforms(lambda: ZImageDiT(cfg), tensors)
    assert shape_diff(meta_tensors(renamed), real) == ["only ours: layers.0.attention.to_qkv.weight",
                                                       "only real: layers.0.attention.to_q.weight"]
    assert shape_diff(meta_tensors(reshaped), real) == ["cap_embedder.1.weight: ours (3840, 2048), real (3840, 2560)"]


# ----------------------------------------------------------------------------------------------------
# Quantized re-saves are refused by name, before any tensor is read


class HeaderOnly:
    """A safetensors handle whose tensors may not be read."""

    def __init__(self, handle):
        self.handle = handle

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        raise AssertionError(f"tensor {key} was read")


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """A load that reads a tensor fails the test: a refusal must come from configs and headers alone."""
    opener = hub.safe_open
    monkeypatch.setattr(hub, "safe_open", lambda *args, **kwargs: HeaderOnly(opener(*args, **kwargs)))


def quantized_copy(pipeline_dir: Path, tmp_path: Path, component: str, **extra: dict) -> Path:
    """The tiny pipeline with `component`'s config.json given extra top-level fields."""
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, folder)
    config = json.loads((folder / component / "config.json").read_text())
    (folder / component / "config.json").write_text(json.dumps(config | extra))
    return folder


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_sdnq_pipeline_is_refused(pipeline_dir, tmp_path, no_tensor_reads, component):
    """The real quantization_config block of the SDNQ re-save of Z-Image-Turbo, in the tiny pipeline's configs."""
    block = golden(f"{SDNQ}/{component}/config.json")["quantization_config"]
    folder = quantized_copy(pipeline_dir, tmp_path, component, quantization_config=block)
    with pytest.raises(hub.CheckpointError, match=rf"{component}: a quantized checkpoint \(SDNQ uint4\); this project "
                                                  r"loads full-precision weights \(fp32, bf16 or fp16\)"):
        hub.load_pipeline(str(folder))


def test_sdnq_quantization_config_json_beside_is_refused(pipeline_dir, tmp_path, no_tensor_reads):
    folder = quantized_copy(pipeline_dir, tmp_path, "transformer")
    shutil.copy(GOLDEN / SDNQ / "transformer" / "quantization_config.json", folder / "transformer")
    with pytest.raises(hub.CheckpointError, match=r"transformer: a quantized checkpoint \(SDNQ uint4\)"):
        hub.load_pipeline(str(folder), parts=("transformer",))


def test_bitsandbytes_config_is_named():
    config = golden(f"{SCHNELL_BNB}/transformer/config.json")["quantization_config"]
    assert hub.config_quantization(config) == "bitsandbytes nf4"


def tiny_file(path: Path, names) -> Path:
    """A safetensors file with the given tensor names (a zero each): its header is all a refusal may read."""
    save_file({name: torch.zeros(1) for name in names}, path)
    return path


def test_bitsandbytes_t5_file_is_refused(tmp_path, no_tensor_reads):
    """The real tensor names of the bitsandbytes-nf4 T5 of a FLUX.1-schnell re-save (.absmax, .quant_map,
    .quant_state.bitsandbytes__nf4 beside each weight)."""
    names = golden(f"{SCHNELL_BNB}/text_encoder_2/model.safetensors.index.json")["weight_map"]
    path = tiny_file(tmp_path / "t5xxl_nf4.safetensors", names)
    with pytest.raises(hub.CheckpointError, match=r"t5xxl_nf4.safetensors: a quantized checkpoint "
                                                  r"\(bitsandbytes nf4\)"):
        hub.load_t5(path, torch.float32, "cpu")


def test_scaled_int8_flux_file_is_refused(tmp_path, no_tensor_reads):
    """The real tensor names of a community int8 repack of flux1-dev (.weight_scale, .comfy_quant)."""
    path = tiny_file(tmp_path / "flux1-dev-int8.safetensors", golden(FLUX_INT8)["tensors"])
    with pytest.raises(hub.CheckpointError, match=r"a quantized checkpoint \(.*(weight_scale|comfy_quant)\)"):
        hub.load_flux_transformer(path, torch.float32, "cpu")


def test_derivative_extra_fields_do_not_stop_a_load(pipeline_dir, tmp_path):
    """The re-saves' other added fields (_name_or_path, dtype, layer_types, transformers_version, ...) on the tiny
    pipeline's configs: it still loads."""
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, folder)
    for component, real in (("transformer", golden(f"{SDNQ}/transformer/config.json")),
                            ("text_encoder", golden(f"{SDNQ}/text_encoder/config.json"))):
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        extra = {k: v for k, v in real.items() if k not in config and k != "quantization_config"}
        path.write_text(json.dumps(config | extra))
    assert "layer_types" in json.loads((folder / "text_encoder" / "config.json").read_text())
    pipe = hub.load_pipeline(str(folder), parts=("transformer", "text"))
    assert pipe.transformer is not None and pipe.text is not None
