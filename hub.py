"""Reading checkpoints: a hub id, a diffusers folder or a single safetensors file -> our modules.

One path for every source: `resolve` turns a hub id or a path into a local folder (huggingface_hub
`snapshot_download` with `allow_patterns`, so only the needed files come, and HF_HUB_OFFLINE=1 works
from the cache), `read_tensors` reads plain, sharded (index json) or single-file safetensors, and
`load_module` builds a module on the meta device and loads it strictly with `assign=True`.
The format knowledge lives here too: which components a pipeline has, and the original (non-diffusers)
key names of a single-file checkpoint.

Every error names the file or folder and what was expected, and is raised before weights are read.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from model import ZImageConfig, ZImageDiT
from tokenizer import AutoencoderKL, PromptTokenizer, Qwen3Config, Qwen3TextEncoder, VAEConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what was expected."""


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The weights of one component: the diffusers name, then the transformers name.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# What a pipeline needs from a repository: configs, the non-variant safetensors, the tokenizer.
PIPELINE_PATTERNS = ("model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                     "scheduler/scheduler_config.json", "tokenizer/*")
VARIANT_PATTERNS = ("*.fp16.*", "*.fp16-*", "*.bf16.*", "*.bf16-*")
KEYS_SHOWN = 5


# ----------------------------------------------------------------------------------------------------
# Files


def resolve(ckpt: str, allow_patterns=PIPELINE_PATTERNS) -> Path:
    """A local file or folder as is; otherwise a hub id, downloaded (or read from the HF cache) to a folder."""
    path = Path(ckpt).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(ckpt):
        raise CheckpointError(f"{ckpt}: no such file or folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ckpt, allow_patterns=list(allow_patterns), ignore_patterns=list(VARIANT_PATTERNS)))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{ckpt}: not a local folder, and not in the Hugging Face cache while offline (HF_HUB_OFFLINE=1?): {e}"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{ckpt}: could not download from the Hugging Face hub: {e}") from None


def revision_of(path: Path) -> str | None:
    """The commit hash when `path` lies in a Hugging Face cache snapshot (…/snapshots/<hash>/…)."""
    parts = path.resolve().parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(location: Path) -> list[Path]:
    """The safetensors files of a component: a single file, a folder's index json shards, or its one file."""
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise CheckpointError(f"{location}: no such file or folder")
    for stem in WEIGHT_STEMS:
        index = location / f"{stem}.safetensors.index.json"
        if index.exists():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index}: has no weight_map")
            missing = [s for s in shards if not (location / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
            return [location / s for s in shards]
        if (location / f"{stem}.safetensors").is_file():
            return [location / f"{stem}.safetensors"]
    names = " or ".join(f"{s}.safetensors" for s in WEIGHT_STEMS)
    raise CheckpointError(f"{location}: no weights found (expected {names}, or a sharded index json)")


def open_safetensors(location: Path, device: torch.device | str = "cpu") -> list[tuple[Path, object]]:
    """Open every file of a component, which reads and checks its header but no tensor data."""
    opened = []
    for f in safetensors_files(location):
        try:
            opened.append((f, safe_open(str(f), framework="pt", device=str(device))))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
    return opened


def read_tensors(location: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a component. Every file's header is checked before any tensor is read."""
    tensors = {}
    for f, handle in open_safetensors(location, device):
        try:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: could not read tensors, truncated or corrupt ({e})") from None
    return tensors


def load_module(build: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], where: Path | str,
                dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Build on the meta device and load strictly with `assign=True`; floats are cast to `dtype`."""
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: keys do not match {type(module).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:KEYS_SHOWN]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:KEYS_SHOWN]})"
        )
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{where}: {len(wrong)} tensor shape(s) differ from the config, e.g. {wrong[:KEYS_SHOWN]}")
    state = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Z-Image components


ZIMAGE_ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI-style repacks
ZIMAGE_LATENT_PATCH = 2  # the only patch size of the released Z-Image transformers
ZIMAGE_ORIGINAL_RENAMES = {  # original name part -> diffusers name part
    ".attention.out.": ".attention.to_out.0.",
    ".attention.q_norm.": ".attention.norm_q.",
    ".attention.k_norm.": ".attention.norm_k.",
}


def zimage_from_original(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Z-Image's original single-file names -> diffusers names, as diffusers' convert_z_image_transformer_checkpoint:
    the fused qkv is split in three, x_embedder / final_layer are keyed by patch "2-1", norms and out renamed."""
    out = {}
    for key, t in tensors.items():
        key = key.removeprefix(ZIMAGE_ORIGINAL_PREFIX)
        if key == "norm_final.weight":  # stored by the original code, used by nothing
            continue
        for top in ("x_embedder.", "final_layer."):
            if key.startswith(top):
                key = f"all_{top}{ZIMAGE_LATENT_PATCH}-1.{key.removeprefix(top)}"
        for old, new in ZIMAGE_ORIGINAL_RENAMES.items():
            key = key.replace(old, new)
        if key.endswith(".attention.qkv.weight"):
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[key.replace(".qkv.", f".to_{name}.")] = part
        else:
            out[key] = t
    return out


def zimage_config_from_tensors(tensors: dict[str, torch.Tensor]) -> ZImageConfig:
    """A single file has no config.json: read sizes from tensor shapes, keep Z-Image's values for the rest.

    The RoPE split of the head dimension is not stored anywhere; we use Z-Image's proportions
    (1/4, 3/8, 3/8 of head_dim: (32, 48, 48) at 128).
    """
    embed = tensors["all_x_embedder.2-1.weight"]
    dim, patch_features = embed.shape
    norm_q = tensors.get("layers.0.attention.norm_q.weight")
    head_dim = norm_q.shape[0] if norm_q is not None else ZImageConfig().head_dim
    count = lambda prefix: len({k.split(".")[1] for k in tensors if k.startswith(prefix)})  # noqa: E731
    return ZImageConfig(
        in_channels=patch_features // ZIMAGE_LATENT_PATCH**2, dim=dim, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
        n_layers=count("layers."), n_refiner_layers=count("noise_refiner."), qk_norm=norm_q is not None,
        cap_feat_dim=tensors["cap_embedder.1.weight"].shape[1],
        axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    )


def is_original_zimage(tensors: dict) -> bool:
    return any(k.removeprefix(ZIMAGE_ORIGINAL_PREFIX).startswith("x_embedder.") for k in tensors)


def load_zimage_transformer(location: Path, dtype: torch.dtype, device) -> ZImageDiT:
    """A diffusers transformer folder (config.json + safetensors, sharded or not) or an original single file."""
    tensors = read_tensors(location)
    if is_original_zimage(tensors):
        tensors = zimage_from_original(tensors)
    if location.is_dir():
        config_dict = read_json(location / "config.json")
        if config_dict.get("_class_name", "ZImageTransformer2DModel") != "ZImageTransformer2DModel":
            raise CheckpointError(f"{location}/config.json: _class_name {config_dict['_class_name']!r}, "
                                  "expected ZImageTransformer2DModel")
        cfg = ZImageConfig.from_dict(config_dict)
    else:
        if "all_x_embedder.2-1.weight" not in tensors:
            raise CheckpointError(f"{location}: not a Z-Image transformer (looked for x_embedder.weight or "
                                  "all_x_embedder.2-1.weight, and layers.0.adaLN_modulation.0.weight)")
        cfg = zimage_config_from_tensors(tensors)
    return load_module(lambda: ZImageDiT(cfg), tensors, location, dtype, device)


def load_qwen3(location: Path, dtype: torch.dtype, device) -> Qwen3TextEncoder:
    """A transformers Qwen3 folder; an optional `model.` prefix (causal-LM checkpoints) is stripped."""
    cfg = Qwen3Config.from_dict(read_json(location / "config.json"))
    tensors = {k.removeprefix("model."): t for k, t in read_tensors(location).items()}
    tensors = {k: t for k, t in tensors.items() if not Qwen3TextEncoder.unused_keys(cfg, k)}
    return load_module(lambda: Qwen3TextEncoder(cfg), tensors, location, dtype, device)


def load_tokenizer(folder: Path) -> PromptTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (the fast-tokenizer file this project reads)")
    return PromptTokenizer.from_folder(folder)


def load_vae(location: Path, dtype: torch.dtype, device) -> AutoencoderKL:
    cfg = VAEConfig.from_dict(read_json(location / "config.json"))
    return load_module(lambda: AutoencoderKL(cfg), read_tensors(location), location, dtype, device)


# ----------------------------------------------------------------------------------------------------
# Pipelines

SUPPORTED_PIPELINES = ("ZImagePipeline",)


@dataclass
class LatentPipeline:
    """A loaded latent text-to-image source: what synth.py and the latent sampler need."""

    name: str  # the hub id or path the user gave
    revision: str | None  # the hub commit when read from a cache snapshot
    transformer: ZImageDiT
    text_encoder: Qwen3TextEncoder
    tokenizer: PromptTokenizer
    vae: AutoencoderKL | None
    scheduler: dict  # scheduler_config.json


def read_pipeline_index(root: Path) -> dict:
    if not root.is_dir():
        raise CheckpointError(f"{root}: a pipeline must be a folder holding model_index.json")
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root}: no model_index.json, so not a diffusers pipeline folder")
    index = read_json(root / "model_index.json")
    if index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{root}/model_index.json: pipeline class {index.get('_class_name')!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_PIPELINES)})")
    return index


def latent_pixel_multiple(root: Path, transformer: str | None = None) -> int:
    """Pixels per latent token (VAE downsampling x transformer patch), read from configs only."""
    vae = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
    folder = Path(transformer).expanduser() if transformer else root / "transformer"
    patch = ZImageConfig.from_dict(read_json(folder / "config.json")).all_patch_size[0] if folder.is_dir() else ZIMAGE_LATENT_PATCH
    return vae.downsample * patch


def load_pipeline(ckpt: str, dtype: torch.dtype = torch.float32, device="cpu", *, with_vae: bool = True,
                  transformer: str | None = None) -> LatentPipeline:
    """A Z-Image pipeline from a hub id or a diffusers folder; `transformer` may replace its transformer with
    another folder or single file (an original-layout checkpoint, say). All configs and safetensors headers
    are checked before any weight is read."""
    root = resolve(ckpt)
    read_pipeline_index(root)
    transformer_path = Path(transformer).expanduser() if transformer else root / "transformer"
    weights = [transformer_path, root / "text_encoder"] + ([root / "vae"] if with_vae else [])
    for location in weights:
        if location.is_dir():
            read_json(location / "config.json")
        open_safetensors(location)
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(root / "tokenizer")
    return LatentPipeline(
        name=ckpt,
        revision=revision_of(root),
        transformer=load_zimage_transformer(transformer_path, dtype, device),
        text_encoder=load_qwen3(root / "text_encoder", dtype, device),
        tokenizer=tokenizer,
        vae=load_vae(root / "vae", dtype, device) if with_vae else None,
        scheduler=scheduler,
    )
