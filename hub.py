"""Reading checkpoints: a hub id, a diffusers folder or a single safetensors file -> our modules.

One path for every source: `resolve` turns a hub id or a path into a local folder (huggingface_hub
`snapshot_download` with `allow_patterns`, so only the needed files come, and HF_HUB_OFFLINE=1 works
from the cache), `read_tensors` reads plain, sharded (index json) or single-file safetensors, and
`load_module` builds a module on the meta device and loads it strictly with `assign=True`.
The format knowledge lives here too: which components a pipeline has, and the original (non-diffusers)
key names of a single-file checkpoint.

Every error names the file or folder and what was expected, and is raised before weights are read.
"""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from model import ZImageConfig, ZImageDiT
from tokenizer import QWEN3_CHAT_TEMPLATE, AutoencoderKL, PromptTokenizer, Qwen3Config, Qwen3TextEncoder, VAEConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what was expected."""


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[\w./-]+\.safetensors)$")  # owner/name/file.safetensors
# The weights of one component: the diffusers name, then the transformers name.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# What each part of a pipeline needs from a repository: configs, non-variant safetensors, the tokenizer.
PART_FOLDERS = {"transformer": ("transformer",), "text": ("text_encoder", "tokenizer"), "vae": ("vae",)}
ALL_PARTS = tuple(PART_FOLDERS)
VARIANT_PATTERNS = ("*.fp16.*", "*.fp16-*", "*.bf16.*", "*.bf16-*")
KEYS_SHOWN = 5
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HASH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2p" / "sha256.json"


# ----------------------------------------------------------------------------------------------------
# Files


def pipeline_patterns(parts=ALL_PARTS) -> list[str]:
    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    for part in parts:
        patterns += [f"{folder}/*" for folder in PART_FOLDERS[part]]
    return patterns


def resolve(ckpt: str, allow_patterns=None) -> Path:
    """A local file or folder as is; `owner/name/file.safetensors` as that one hub file; otherwise a hub id,
    downloaded (or read from the HF cache, e.g. with HF_HUB_OFFLINE=1) to a folder."""
    path = Path(ckpt).expanduser()
    if path.exists():
        return path
    hub_file = HUB_FILE.match(ckpt)
    if not HUB_ID.match(ckpt) and not hub_file:
        raise CheckpointError(f"{ckpt}: no such file or folder (and not a hub id of the form owner/name)")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        if hub_file:
            return Path(hf_hub_download(hub_file["repo"], hub_file["file"]))
        patterns = list(allow_patterns or pipeline_patterns())
        return Path(snapshot_download(ckpt, allow_patterns=patterns, ignore_patterns=list(VARIANT_PATTERNS)))
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


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes. A file in the HF cache links to a blob named by that hash, so nothing is
    read; other files are hashed once and remembered by (path, size, mtime) in ~/.cache/l2p/sha256.json."""
    blob = path.resolve()
    if path.is_symlink() and SHA256_HEX.match(blob.name):
        return blob.name
    stat = blob.stat()
    key = f"{blob}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(HASH_CACHE.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        known[key] = digest.hexdigest()
        try:
            HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = HASH_CACHE.with_name(f"{HASH_CACHE.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(HASH_CACHE)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return known[key]


def weights_sha256(location: Path) -> str:
    """One hash for a component's weights: sha256 over its safetensors files' names and hashes."""
    files = safetensors_files(location)
    lines = "\n".join(f"{f.name}:{file_sha256(f)}" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


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
    tensors = read_tensors(location, device)
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
    tensors = {k.removeprefix("model."): t for k, t in read_tensors(location, device).items()}
    tensors = {k: t for k, t in tensors.items() if not Qwen3TextEncoder.unused_keys(cfg, k)}
    return load_module(lambda: Qwen3TextEncoder(cfg), tensors, location, dtype, device)


def load_tokenizer(folder: Path) -> PromptTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (the fast-tokenizer file this project reads)")
    return PromptTokenizer.from_folder(folder)


def load_vae(location: Path, dtype: torch.dtype, device) -> AutoencoderKL:
    cfg = VAEConfig.from_dict(read_json(location / "config.json"))
    return load_module(lambda: AutoencoderKL(cfg), read_tensors(location, device), location, dtype, device)


# ----------------------------------------------------------------------------------------------------
# Pipelines

SUPPORTED_PIPELINES = ("ZImagePipeline",)


@dataclass
class LatentPipeline:
    """A loaded latent text-to-image source, or the parts of it that a caller asked for."""

    name: str  # the hub id or path the user gave
    revision: str | None  # the hub commit when read from a cache snapshot
    transformer_sha256: str | None  # hash of the transformer's weight files (when loaded): what L2P builds on
    transformer: ZImageDiT | None
    text_encoder: Qwen3TextEncoder | None
    tokenizer: PromptTokenizer | None
    vae: AutoencoderKL | None
    scheduler: dict  # scheduler_config.json

    @property
    def source(self) -> dict:
        """Provenance recorded in synthesised data and L2P checkpoints."""
        return {"id": self.name, "revision": self.revision, "transformer_sha256": self.transformer_sha256}


RECIPE_CARD = "l2p.json"  # optional: a source's recommended sizes and settings for synth, train and sample


def recipe_card(ckpt: str) -> dict:
    """The source's recipe card (l2p.json in its folder), or {} when it has none. Only that file is fetched."""
    try:
        root = resolve(ckpt, [RECIPE_CARD])
    except CheckpointError:
        return {}
    return read_json(root / RECIPE_CARD) if root.is_dir() and (root / RECIPE_CARD).is_file() else {}


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


def load_pipeline(ckpt: str, dtype: torch.dtype = torch.float32, device="cpu", *, parts=ALL_PARTS,
                  transformer: str | None = None) -> LatentPipeline:
    """The `parts` of a Z-Image pipeline ("transformer", "text", "vae") from a hub id or a diffusers folder;
    only their files are downloaded. `transformer` may replace the pipeline's transformer with another folder
    or single file (an original-layout checkpoint, say). Configs and safetensors headers of every part are
    checked before any weight is read; the transformer's weight hash is always computed (provenance)."""
    root = resolve(ckpt, pipeline_patterns(parts))
    read_pipeline_index(root)
    transformer_path = Path(transformer).expanduser() if transformer else root / "transformer"
    weights = {"transformer": transformer_path, "text": root / "text_encoder", "vae": root / "vae"}
    for part in parts:
        if weights[part].is_dir():
            read_json(weights[part] / "config.json")
        open_safetensors(weights[part])
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(root / "tokenizer") if "text" in parts else None
    return LatentPipeline(
        name=ckpt,
        revision=revision_of(root),
        transformer_sha256=weights_sha256(transformer_path) if "transformer" in parts else None,
        transformer=load_zimage_transformer(transformer_path, dtype, device) if "transformer" in parts else None,
        text_encoder=load_qwen3(root / "text_encoder", dtype, device) if "text" in parts else None,
        tokenizer=tokenizer,
        vae=load_vae(root / "vae", dtype, device) if "vae" in parts else None,
        scheduler=scheduler,
    )


# ----------------------------------------------------------------------------------------------------
# Writing a pipeline folder (the toy source model): the inverse of load_pipeline

PIPELINE_COMPONENTS = {  # model_index.json entries of a ZImagePipeline
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DIFFUSERS_VERSION = "0.42.1"  # the layout these files follow


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_weights(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Written beside the target, then renamed over it: an interrupted save never leaves a truncated file."""
    floats = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(floats, partial, metadata={"format": "pt"})
    os.replace(partial, path)


def save_pipeline(folder: Path, transformer: ZImageDiT, text_encoder: dict[str, torch.Tensor], text_config: Qwen3Config,
                  tokenizer: Tokenizer, vae: AutoencoderKL, scheduler: dict, transformer_dtype=torch.bfloat16,
                  dtype=torch.float32) -> Path:
    """A ZImagePipeline folder in the diffusers layout (model_index.json and one folder per component), with
    the configs and key names the reference libraries write. `text_encoder` is a full Qwen3Model state dict
    (the last layer and the final norm included, though Z-Image never reads them). The transformer is stored
    in bf16 by default, as Z-Image-Turbo's is."""
    write_json(folder / "model_index.json", {"_class_name": "ZImagePipeline", "_diffusers_version": DIFFUSERS_VERSION}
               | PIPELINE_COMPONENTS)
    cfg = {k: v for k, v in transformer.cfg.to_dict().items() if k != "final_layer"}
    write_json(folder / "transformer" / "config.json", {"_class_name": "ZImageTransformer2DModel",
                                                        "_diffusers_version": DIFFUSERS_VERSION} | cfg)
    save_weights(transformer.state_dict(), folder / "transformer" / "diffusion_pytorch_model.safetensors",
                 transformer_dtype)
    blocks = len(vae.cfg.block_out_channels)
    write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
                                                "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * blocks,
                                                "up_block_types": ["UpDecoderBlock2D"] * blocks, "force_upcast": True}
               | {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vae.cfg).items()})
    save_weights(vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    tc = asdict(text_config)
    write_json(folder / "text_encoder" / "config.json", {
        "architectures": ["Qwen3Model"], "model_type": "qwen3", "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
        "use_sliding_window": False, "dtype": str(dtype).removeprefix("torch."),
        "rope_parameters": {"rope_type": "default", "rope_theta": tc.pop("rope_theta")}} | tc)
    save_weights(text_encoder, folder / "text_encoder" / "model.safetensors", dtype)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    write_json(folder / "tokenizer" / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "bos_token": None, "unk_token": None, "padding_side": "right", "add_prefix_space": False,
        "model_max_length": 131072, "chat_template": QWEN3_CHAT_TEMPLATE})
    write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                "_diffusers_version": DIFFUSERS_VERSION} | scheduler)
    return folder
