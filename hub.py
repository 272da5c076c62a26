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
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import runtime
from model import FLUX_PACK, FLUX_RELEASED_AXES, FluxConfig, FluxDiT, SD3Config, SD3MMDiT, ZImageConfig, ZImageDiT
from tokenizer import (CLIP_MAX_TOKENS, FLUX_DEV_T5_TOKENS, FLUX_SCHNELL_T5_TOKENS, QWEN3_CHAT_TEMPLATE,
                       SD3_T5_TOKENS, AutoencoderKL,
                       CLIPPromptTokenizer, CLIPTextConfig, CLIPTextEncoder, FluxText, PromptTokenizer, Qwen3CausalLM,
                       Qwen3Config, Qwen3TextEncoder, SD3Text, T5Config, T5Encoder, T5PromptTokenizer, VAEConfig,
                       ZImageText)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what was expected."""


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[\w./-]+\.safetensors)$")  # owner/name/file.safetensors
# The weights of one component: the diffusers name, then the transformers name.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# What each part of a pipeline needs from a repository: configs, non-variant safetensors, the tokenizers. The text
# part matches every numbered text component: Z-Image's one, FLUX's two (CLIP-L, T5), SD3's three (CLIP-L, bigG, T5).
PART_FOLDERS = {"transformer": ("transformer",), "text": ("text_encoder*", "tokenizer*"), "vae": ("vae",)}
ALL_PARTS = tuple(PART_FOLDERS)
VARIANT_PATTERNS = ("*.fp16.*", "*.fp16-*", "*.bf16.*", "*.bf16-*")
KEYS_SHOWN = 5
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HASH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2p" / "sha256.json"
BUNDLED_SOURCE = Path(__file__).parent / "assets" / "toy-zimage"  # the toy source: the recipe on a CPU in minutes


# ----------------------------------------------------------------------------------------------------
# Files


def pipeline_patterns(parts=ALL_PARTS) -> list[str]:
    # transformer/config.json always: SD3's and FLUX's text sides depend on it (see load_text)
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json"]
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
    read; other files are hashed once and remembered in ~/.cache/l2p/sha256.json by path, size, mtime, inode
    and ctime. A file replaced or rewritten in place gets a new inode or ctime even when a copy or `touch -d`
    restores its size and mtime (ctime cannot be set by a user), so it is hashed anew."""
    blob = path.resolve()
    if path.is_symlink() and SHA256_HEX.match(blob.name):
        return blob.name
    stat = blob.stat()
    key = f"{blob}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"
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
    return files_sha256(safetensors_files(location))


def files_sha256(files: list[Path]) -> str:
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


# Quantized re-saves (SDNQ, bitsandbytes, ComfyUI's scaled int8 / fp8) store other tensors than the weights our
# modules hold, so loading one would only end in a key-mismatch list; they are named and refused instead.
# Tensor-name suffixes that only a quantized file has -> the method they belong to (bitsandbytes stores
# `<weight>.absmax`, `.quant_map` and `.quant_state.bitsandbytes__<type>` beside each packed weight; ComfyUI's
# int8 / fp8 repacks a `.weight_scale` and a `.comfy_quant` marker).
QUANTIZED_KEY_SUFFIXES = {".absmax": "bitsandbytes", ".quant_map": "bitsandbytes", ".weight_scale": "scaled int8 / fp8",
                          ".comfy_quant": "ComfyUI int8 / fp8"}
BNB_QUANT_STATE = re.compile(r"\.quant_state\.bitsandbytes__(\w+)$")  # its suffix names the 4-bit type: nf4, fp4


def config_quantization(config: dict) -> str | None:
    """The method of a `quantization_config` block (what diffusers / transformers / SDNQ add to config.json, or
    SDNQ's quantization_config.json), e.g. "SDNQ uint4", "bitsandbytes nf4"; None when there is none."""
    if not config:
        return None
    method = str(config.get("quant_method", "unknown method"))
    if method == "sdnq":
        return f"SDNQ {config.get('weights_dtype', '')}".strip()
    if method == "bitsandbytes":
        four_bit = config.get("load_in_4bit") or config.get("_load_in_4bit")
        return f"bitsandbytes {config.get('bnb_4bit_quant_type', 'fp4') if four_bit else 'int8'}"
    return method


def keys_quantization(keys: list[str]) -> str | None:
    """The method whose bookkeeping tensors appear among `keys` (see QUANTIZED_KEY_SUFFIXES), else None; a
    bitsandbytes quant state names its type."""
    types = [state[1] for key in keys if (state := BNB_QUANT_STATE.search(key))]
    if types:
        return f"bitsandbytes {types[0]}"
    for key in keys:
        for suffix, method in QUANTIZED_KEY_SUFFIXES.items():
            if key.endswith(suffix):
                return f"{method}, tensors such as {key}"
    return None


def refuse_quantized(where: Path, method: str | None) -> None:
    if method:
        raise CheckpointError(f"{where}: a quantized checkpoint ({method}); this project loads full-precision weights "
                              "(fp32, bf16 or fp16) only: use the original, unquantized checkpoint")


def open_safetensors(location: Path, device: torch.device | str = "cpu") -> list[tuple[Path, object]]:
    """Open every file of a component, which reads and checks its header but no tensor data. A quantized component
    (by its folder's config.json or quantization_config.json, or by its tensor names) is refused here, before any
    tensor is read."""
    if location.is_dir():
        config, sdnq = location / "config.json", location / "quantization_config.json"  # SDNQ writes both
        for block in (read_json(config).get("quantization_config") if config.is_file() else None,
                      read_json(sdnq) if sdnq.is_file() else None):
            refuse_quantized(location, config_quantization(block))
    opened = []
    for f in safetensors_files(location):
        try:
            opened.append((f, safe_open(str(f), framework="pt", device=str(device))))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
        refuse_quantized(f, keys_quantization(list(opened[-1][1].keys())))
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


def zimage_transformer_tensors(tensors: dict[str, torch.Tensor], config: dict | None,
                               where: Path | str) -> tuple[ZImageConfig, dict[str, torch.Tensor]]:
    """The config and our names of a Z-Image transformer's tensors: original names renamed, the config from its
    config.json fields or, for a single file (config None), from the shapes. Pure, so meta tensors of a
    header's shapes work too."""
    if is_original_zimage(tensors):
        tensors = zimage_from_original(tensors)
    if config is not None:
        if config.get("_class_name", "ZImageTransformer2DModel") != "ZImageTransformer2DModel":
            raise CheckpointError(f"{where}/config.json: _class_name {config['_class_name']!r}, "
                                  "expected ZImageTransformer2DModel")
        return ZImageConfig.from_dict(config), tensors
    if "all_x_embedder.2-1.weight" not in tensors:
        raise CheckpointError(f"{where}: not a Z-Image transformer (looked for x_embedder.weight or "
                              "all_x_embedder.2-1.weight, and layers.0.adaLN_modulation.0.weight)")
    return zimage_config_from_tensors(tensors), tensors


def load_zimage_transformer(location: Path, dtype: torch.dtype, device) -> ZImageDiT:
    """A diffusers transformer folder (config.json + safetensors, sharded or not) or an original single file."""
    tensors = read_tensors(location, device)
    config = read_json(location / "config.json") if location.is_dir() else None
    cfg, tensors = zimage_transformer_tensors(tensors, config, location)
    return load_module(lambda: ZImageDiT(cfg), tensors, location, dtype, device)


def qwen3_tensors(tensors: dict[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """The tensors our encoder holds: an optional `model.` prefix (causal-LM checkpoints) stripped, and what
    hidden_states[-2] never reads dropped (Qwen3TextEncoder.unused_keys). Pure, so meta tensors work too."""
    tensors = {k.removeprefix("model."): t for k, t in tensors.items()}
    return {k: t for k, t in tensors.items() if not Qwen3TextEncoder.unused_keys(cfg, k)}


def load_qwen3(location: Path, dtype: torch.dtype, device) -> Qwen3TextEncoder:
    """A transformers Qwen3 folder (a Qwen3Model's, or a causal LM's: see qwen3_tensors)."""
    cfg = Qwen3Config.from_dict(read_json(location / "config.json"))
    tensors = qwen3_tensors(read_tensors(location, device), cfg)
    return load_module(lambda: Qwen3TextEncoder(cfg), tensors, location, dtype, device)


def load_qwen3_lm(location: Path, dtype: torch.dtype, device) -> Qwen3CausalLM:
    """The whole Qwen3 causal LM from a transformers Qwen3 folder: Z-Image's text_encoder (a Qwen3Model's keys,
    tied, no lm_head.weight) or a Qwen3ForCausalLM's (`model.` prefix; lm_head.weight when untied)."""
    config = read_json(location / "config.json")
    cfg = Qwen3Config.from_dict(config)
    tied = config.get("tie_word_embeddings", False)  # transformers' Qwen3Config default
    tensors = {k.removeprefix("model."): t for k, t in read_tensors(location, device).items()}
    head, embed = tensors.get("lm_head.weight"), tensors.get("embed_tokens.weight")
    if tied and head is not None:
        if embed is None or not torch.equal(head, embed):
            raise CheckpointError(f"{location}: config.json sets tie_word_embeddings true, but the stored "
                                  "lm_head.weight differs from embed_tokens.weight (set it false to use the head)")
        del tensors["lm_head.weight"]  # a tied copy, as older transformers versions saved it
    if not tied and head is None:
        raise CheckpointError(f"{location}: config.json sets tie_word_embeddings false (or leaves it unset), but "
                              "there is no lm_head.weight (set it true if the head is the word embedding matrix)")
    return load_module(lambda: Qwen3CausalLM(cfg, tied), tensors, location, dtype, device)


def load_tokenizer(folder: Path) -> PromptTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (the fast-tokenizer file this project reads)")
    return PromptTokenizer.from_folder(folder)


def load_vae(location: Path, dtype: torch.dtype, device) -> AutoencoderKL:
    cfg = VAEConfig.from_dict(read_json(location / "config.json"))
    return load_module(lambda: AutoencoderKL(cfg), read_tensors(location, device), location, dtype, device)


# ----------------------------------------------------------------------------------------------------
# SD3 / FLUX text encoders (CLIP-L, OpenCLIP bigG, T5): folders and single files

COMBINED_TEXT_PREFIX = "text_encoders.{}.transformer."  # SD3 *_incl_clips*.safetensors (docs/formats.md, "Layouts")
CLIP_MARKERS = ("text_model.embeddings.token_embedding.weight",  # transformers 4 (every hub file)
                "embeddings.token_embedding.weight")  # CLIPTextModel saved by transformers >= 5
T5_MARKERS = ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
# What a single file does not store, and the released files all share:
CLIP_HEAD_DIM = 64  # CLIP-L is 12 heads of 64, OpenCLIP bigG 20 heads of 64
CLIP_L_HIDDEN = 768  # OpenAI CLIP-L (hidden 768) uses quick_gelu; OpenCLIP bigG (1280) uses exact gelu
T5_MAX_DISTANCE = 128  # relative_attention_max_distance of every T5 v1.1



def read_component(location: Path, prefixes: tuple[str, ...], markers: tuple[str, ...], what: str,
                   device) -> dict[str, torch.Tensor]:
    """One component of a folder or of a file that may bundle several: the tensors under the first of `prefixes`
    ("" is the whole file) that holds one of the marker keys, prefix removed. Keys are checked before any tensor
    is read, and nothing outside the prefix is read (a bundled SD3 file is 16 GB)."""
    handles = open_safetensors(location, device)
    keys = {key for _, handle in handles for key in handle.keys()}
    prefix = next((p for p in prefixes for m in markers if p + m in keys), None)
    if prefix is None:
        under = [p for p in prefixes if p]
        raise CheckpointError(f"{location}: not {what} (expected the key {' or '.join(markers)}"
                              + (f", optionally under {' or '.join(under)})" if under else ")"))
    tensors = {}
    for f, handle in handles:
        try:
            for key in handle.keys():
                if key.startswith(prefix):
                    tensors[key.removeprefix(prefix)] = handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: could not read tensors, truncated or corrupt ({e})") from None
    return tensors


def count_indexed(tensors: dict, prefix: str) -> int:
    """How many numbered children `prefix` has: 3 for layers.0.*, layers.1.*, layers.2.*."""
    return len({k.removeprefix(prefix).split(".")[0] for k in tensors if k.startswith(prefix)})


def clip_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names with the `text_model.` prefix, which transformers >= 5 leaves out of CLIPTextModel;
    the position_ids buffer some old files carry is dropped (positions are always 0..L-1)."""
    out = {}
    for key, t in tensors.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}"] = t
    return out


def clip_config_from_tensors(tensors: dict[str, torch.Tensor], where: Path) -> CLIPTextConfig:
    """A single file's config from its shapes; the head count assumes heads of 64 and the activation follows the
    released files (quick_gelu at hidden 768: CLIP-L; gelu otherwise: bigG)."""
    vocab, hidden = tensors["text_model.embeddings.token_embedding.weight"].shape
    if hidden % CLIP_HEAD_DIM:
        raise CheckpointError(f"{where}: CLIP hidden size {hidden} is not a multiple of the head size {CLIP_HEAD_DIM} "
                              "that single files are assumed to use; load a folder with its config.json instead")
    projection = tensors.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // CLIP_HEAD_DIM,
        intermediate_size=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_indexed(tensors, "text_model.encoder.layers."),
        max_position_embeddings=tensors["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if hidden == CLIP_L_HIDDEN else "gelu",
        projection_dim=hidden if projection is None else projection.shape[0], has_projection=projection is not None,
    )


def load_clip(location: Path, dtype: torch.dtype, device, which: str = "clip_l") -> CLIPTextEncoder:
    """A transformers CLIPTextModel(WithProjection) folder, or a single file: SAI's text_encoders/clip_l.safetensors
    (without text_projection) or clip_g.safetensors, or the `which` ("clip_l" / "clip_g") of a bundled SD3 file."""
    config = read_json(location / "config.json") if location.is_dir() else None
    prefixes = ("",) if location.is_dir() else (COMBINED_TEXT_PREFIX.format(which), "")
    tensors = clip_keys(read_component(location, prefixes, CLIP_MARKERS, "a CLIP text encoder", device))
    cfg = CLIPTextConfig.from_dict(config) if config is not None else clip_config_from_tensors(tensors, location)
    return load_module(lambda: CLIPTextEncoder(cfg), tensors, location, dtype, device)


def t5_config_from_tensors(tensors: dict[str, torch.Tensor], where: Path) -> T5Config:
    """A single file's config from its shapes: heads from the relative position table, d_kv from q."""
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in tensors:
        raise CheckpointError(f"{where}: not a T5 v1.1 encoder (no gated feed-forward "
                              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight)")
    buckets, heads = tensors[T5_MARKERS[0]].shape
    vocab, d_model = tensors["shared.weight"].shape
    return T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=T5_MAX_DISTANCE,
        d_kv=tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=count_indexed(tensors, "encoder.block."),
    )


def load_t5(location: Path, dtype: torch.dtype, device) -> T5Encoder:
    """A transformers T5EncoderModel folder, SAI's text_encoders/t5xxl_*.safetensors or the T5 of a bundled SD3
    file. The embedding is `shared.weight`; the tied copy `encoder.embed_tokens.weight` that SAI / Comfy files
    also store is dropped, or renamed when it is the only one."""
    config = read_json(location / "config.json") if location.is_dir() else None
    prefixes = ("",) if location.is_dir() else (COMBINED_TEXT_PREFIX.format("t5xxl"), "")
    tensors = read_component(location, prefixes, T5_MARKERS, "a T5 encoder", device)
    embed = tensors.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in tensors:
        if embed is None:
            raise CheckpointError(f"{location}: T5 encoder without an embedding "
                                  "(shared.weight or encoder.embed_tokens.weight)")
        tensors["shared.weight"] = embed
    cfg = T5Config.from_dict(config) if config is not None else t5_config_from_tensors(tensors, location)
    return load_module(lambda: T5Encoder(cfg), tensors, location, dtype, device)


def load_clip_tokenizer(folder: Path) -> CLIPPromptTokenizer:
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: no {' or '.join(missing)} "
                              "(a CLIP tokenizer folder holds vocab.json and merges.txt)")
    return CLIPPromptTokenizer(folder)


def load_t5_tokenizer(folder: Path) -> T5PromptTokenizer:
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (the fast-tokenizer file this project reads; "
                              "spiece.model alone is not enough)")
    return T5PromptTokenizer(folder)


# ----------------------------------------------------------------------------------------------------
# SD3 / SD3.5 and FLUX.1 transformers: diffusers folders, or original (SAI / BFL) single files

SAI_PREFIX = "model.diffusion_model."  # SAI and ComfyUI single files; the VAE beside it (first_stage_model.) is not read
SD3_MARKERS = ("joint_blocks.0.context_block.adaLN_modulation.1.bias",  # SAI layout (docs/formats.md, "Layouts")
               "pos_embed.proj.weight")  # diffusers layout saved as one file
FLUX_MARKERS = ("double_blocks.0.img_attn.norm.key_norm.scale",  # BFL layout
                "single_transformer_blocks.0.proj_mlp.weight")  # diffusers layout saved as one file
SD3_SAI_HEAD_DIM = 64  # SAI's MMDiT fixes heads of 64 (hidden = 64 x depth); used only when no q/k norm says otherwise
# Original name prefix -> diffusers name prefix; "{i}" is a block index. A tuple is a fused tensor split along its
# rows: the first names take `hidden` rows each, the last the rest (q, k, v; FLUX single blocks: q, k, v, mlp-in).
SD3_ORIGINAL_NAMES = {  # docs/formats.md, "SD3"
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
    "joint_blocks.{i}.x_block.attn.qkv.": ("transformer_blocks.{i}.attn.to_q.", "transformer_blocks.{i}.attn.to_k.",
                                           "transformer_blocks.{i}.attn.to_v."),
    "joint_blocks.{i}.x_block.attn.proj.": "transformer_blocks.{i}.attn.to_out.0.",
    "joint_blocks.{i}.x_block.attn.ln_q.": "transformer_blocks.{i}.attn.norm_q.",
    "joint_blocks.{i}.x_block.attn.ln_k.": "transformer_blocks.{i}.attn.norm_k.",
    "joint_blocks.{i}.x_block.attn2.qkv.": ("transformer_blocks.{i}.attn2.to_q.", "transformer_blocks.{i}.attn2.to_k.",
                                            "transformer_blocks.{i}.attn2.to_v."),
    "joint_blocks.{i}.x_block.attn2.proj.": "transformer_blocks.{i}.attn2.to_out.0.",
    "joint_blocks.{i}.x_block.attn2.ln_q.": "transformer_blocks.{i}.attn2.norm_q.",
    "joint_blocks.{i}.x_block.attn2.ln_k.": "transformer_blocks.{i}.attn2.norm_k.",
    "joint_blocks.{i}.x_block.adaLN_modulation.1.": "transformer_blocks.{i}.norm1.linear.",
    "joint_blocks.{i}.x_block.mlp.fc1.": "transformer_blocks.{i}.ff.net.0.proj.",
    "joint_blocks.{i}.x_block.mlp.fc2.": "transformer_blocks.{i}.ff.net.2.",
    "joint_blocks.{i}.context_block.attn.qkv.": ("transformer_blocks.{i}.attn.add_q_proj.",
                                                 "transformer_blocks.{i}.attn.add_k_proj.",
                                                 "transformer_blocks.{i}.attn.add_v_proj."),
    "joint_blocks.{i}.context_block.attn.proj.": "transformer_blocks.{i}.attn.to_add_out.",
    "joint_blocks.{i}.context_block.attn.ln_q.": "transformer_blocks.{i}.attn.norm_added_q.",
    "joint_blocks.{i}.context_block.attn.ln_k.": "transformer_blocks.{i}.attn.norm_added_k.",
    "joint_blocks.{i}.context_block.adaLN_modulation.1.": "transformer_blocks.{i}.norm1_context.linear.",
    "joint_blocks.{i}.context_block.mlp.fc1.": "transformer_blocks.{i}.ff_context.net.0.proj.",
    "joint_blocks.{i}.context_block.mlp.fc2.": "transformer_blocks.{i}.ff_context.net.2.",
}
FLUX_ORIGINAL_NAMES = {  # docs/formats.md, "FLUX"
    "img_in.": "x_embedder.",
    "txt_in.": "context_embedder.",
    "time_in.in_layer.": "time_text_embed.timestep_embedder.linear_1.",
    "time_in.out_layer.": "time_text_embed.timestep_embedder.linear_2.",
    "guidance_in.in_layer.": "time_text_embed.guidance_embedder.linear_1.",
    "guidance_in.out_layer.": "time_text_embed.guidance_embedder.linear_2.",
    "vector_in.in_layer.": "time_text_embed.text_embedder.linear_1.",
    "vector_in.out_layer.": "time_text_embed.text_embedder.linear_2.",
    "final_layer.linear.": "proj_out.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
    "double_blocks.{i}.img_mod.lin.": "transformer_blocks.{i}.norm1.linear.",
    "double_blocks.{i}.img_attn.qkv.": ("transformer_blocks.{i}.attn.to_q.", "transformer_blocks.{i}.attn.to_k.",
                                        "transformer_blocks.{i}.attn.to_v."),
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.img_attn.proj.": "transformer_blocks.{i}.attn.to_out.0.",
    "double_blocks.{i}.img_mlp.0.": "transformer_blocks.{i}.ff.net.0.proj.",
    "double_blocks.{i}.img_mlp.2.": "transformer_blocks.{i}.ff.net.2.",
    "double_blocks.{i}.txt_mod.lin.": "transformer_blocks.{i}.norm1_context.linear.",
    "double_blocks.{i}.txt_attn.qkv.": ("transformer_blocks.{i}.attn.add_q_proj.",
                                        "transformer_blocks.{i}.attn.add_k_proj.",
                                        "transformer_blocks.{i}.attn.add_v_proj."),
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "double_blocks.{i}.txt_attn.proj.": "transformer_blocks.{i}.attn.to_add_out.",
    "double_blocks.{i}.txt_mlp.0.": "transformer_blocks.{i}.ff_context.net.0.proj.",
    "double_blocks.{i}.txt_mlp.2.": "transformer_blocks.{i}.ff_context.net.2.",
    "single_blocks.{i}.linear1.": ("single_transformer_blocks.{i}.attn.to_q.", "single_transformer_blocks.{i}.attn.to_k.",
                                   "single_transformer_blocks.{i}.attn.to_v.", "single_transformer_blocks.{i}.proj_mlp."),
    "single_blocks.{i}.linear2.": "single_transformer_blocks.{i}.proj_out.",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
    "single_blocks.{i}.modulation.lin.": "single_transformer_blocks.{i}.norm.linear.",
}
# An adaLN of two vectors is (shift, scale) in SAI's and BFL's code and (scale, shift) in diffusers'
# AdaLayerNormContinuous: SD3's final layer and last context block, FLUX's final layer.
ORIGINAL_TWO_VECTOR_ADALN = "adaLN_modulation.1."


def shape_of(tensors: dict[str, torch.Tensor], key: str, where: Path) -> torch.Size:
    if key not in tensors:
        raise CheckpointError(f"{where}: missing tensor {key}")
    return tensors[key].shape


def rename_original(tensors: dict[str, torch.Tensor], names: dict, hidden: int) -> dict[str, torch.Tensor]:
    """Original names -> diffusers names by the first prefix of `names` that starts a key (see SD3_ORIGINAL_NAMES);
    two-vector adaLNs get their halves swapped. Keys the table does not know are kept, so the strict load names them."""
    patterns = [(re.compile(r"(\d+)".join(map(re.escape, old.split("{i}")))), new) for old, new in names.items()]
    out = {}
    for key, t in tensors.items():
        match, new = next(((m, new) for pattern, new in patterns if (m := pattern.match(key))), (None, None))
        if match is None:
            out[key] = t
            continue
        rest = key[match.end():]
        fill = lambda name: name.replace("{i}", match.group(1)) if match.groups() else name  # noqa: E731
        if isinstance(new, tuple):
            sizes = [hidden] * (len(new) - 1) + [t.shape[0] - hidden * (len(new) - 1)]
            out.update((fill(name) + rest, part) for name, part in zip(new, t.split(sizes)))
        else:
            if ORIGINAL_TWO_VECTOR_ADALN in key and t.shape[0] == 2 * hidden:
                shift, scale = t.chunk(2)
                t = torch.cat([scale, shift])
            out[fill(new) + rest] = t
    return out


def sd3_from_original(tensors: dict[str, torch.Tensor], where: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """SAI's MMDiT names (prefix already removed) -> diffusers', as diffusers' convert_sd3_transformer_checkpoint."""
    return rename_original(tensors, SD3_ORIGINAL_NAMES, shape_of(tensors, "x_embedder.proj.weight", where)[0])


def flux_from_original(tensors: dict[str, torch.Tensor], where: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """BFL's FLUX names -> diffusers', as diffusers' convert_flux_transformer_checkpoint (which hard-codes the
    width 3072; here the width is the image embedding's)."""
    return rename_original(tensors, FLUX_ORIGINAL_NAMES, shape_of(tensors, "img_in.weight", where)[0])


def sd3_config_from_tensors(tensors: dict[str, torch.Tensor], where: Path) -> SD3Config:
    """A single file's config from its (diffusers-named) shapes, as SAI's loader infers it (docs/formats.md, "SD3"):
    head_dim from the q norm when there is one, else SAI's fixed 64; P = sqrt(table rows); dual-attention layers
    are those with attn2 weights. sample_size is not stored and not needed: the position table is."""
    dim, in_channels, patch, _ = shape_of(tensors, "pos_embed.proj.weight", where)
    norm_q = tensors.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = SD3_SAI_HEAD_DIM if norm_q is None else norm_q.shape[0]
    if dim % head_dim:
        raise CheckpointError(f"{where}: width {dim} is not a multiple of the head size {head_dim} that a file without "
                              "q/k norms implies; pass a config (the diffusers config.json fields)")
    rows = shape_of(tensors, "pos_embed.pos_embed", where)[1]
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"{where}: pos_embed has {rows} rows, not a square P x P grid")
    layers = count_indexed(tensors, "transformer_blocks.")
    caption, joint = shape_of(tensors, "context_embedder.weight", where)
    out_channels = shape_of(tensors, "proj_out.weight", where)[0] // patch**2
    return SD3Config(
        patch_size=patch, in_channels=in_channels, out_channels=out_channels,
        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=dim // head_dim, joint_attention_dim=joint,
        caption_projection_dim=caption,
        pooled_projection_dim=shape_of(tensors, "time_text_embed.text_embedder.linear_1.weight", where)[1],
        pos_embed_max_size=side, qk_norm=None if norm_q is None else "rms_norm",
        dual_attention_layers=tuple(i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in tensors),
    )


def flux_config_from_tensors(tensors: dict[str, torch.Tensor], where: Path) -> FluxConfig:
    """A single file's config from its (diffusers-named) shapes; guidance_embeds iff the guidance embedder is there.

    The RoPE split of the head dimension is stored nowhere. FLUX.1's (16, 56, 56) of 128 is taken, scaled to the
    file's head_dim when that gives even integers summing to it (64: (8, 28, 28)); otherwise we refuse rather than
    guess, and ask for a config."""
    dim, in_channels = shape_of(tensors, "x_embedder.weight", where)
    head_dim = shape_of(tensors, "transformer_blocks.0.attn.norm_q.weight", where)[0]
    scaled = [a * head_dim / sum(FLUX_RELEASED_AXES) for a in FLUX_RELEASED_AXES]
    if any(a % 2 for a in scaled):  # not an even integer
        raise CheckpointError(f"{where}: head_dim {head_dim} does not scale FLUX.1's RoPE axes {FLUX_RELEASED_AXES} "
                              "to even sizes; pass a config with axes_dims_rope (the diffusers config.json fields)")
    joint_dim = shape_of(tensors, "context_embedder.weight", where)[1]
    out_channels = shape_of(tensors, "proj_out.weight", where)[0]
    return FluxConfig(
        in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,  # as FLUX.1's
        num_layers=count_indexed(tensors, "transformer_blocks."),
        num_single_layers=count_indexed(tensors, "single_transformer_blocks."),
        attention_head_dim=head_dim, num_attention_heads=dim // head_dim, joint_attention_dim=joint_dim,
        pooled_projection_dim=shape_of(tensors, "time_text_embed.text_embedder.linear_1.weight", where)[1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in tensors,
        axes_dims_rope=tuple(int(a) for a in scaled),
    )


def hub_config(folder: Path, class_name: str) -> dict:
    """A diffusers component's config.json, checked to be of `class_name`."""
    config = read_json(folder / "config.json")
    if config.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{folder}/config.json: _class_name {config['_class_name']!r}, expected {class_name}")
    return config


TRANSFORMER_CONFIGS = {"ZImageTransformer2DModel": ZImageConfig, "SD3Transformer2DModel": SD3Config,
                       "FluxTransformer2DModel": FluxConfig}


def transformer_config(folder: Path) -> ZImageConfig | SD3Config | FluxConfig:
    """A diffusers transformer folder's config, by its _class_name; no weights are read."""
    config = read_json(folder / "config.json")
    name = config.get("_class_name")
    if name not in TRANSFORMER_CONFIGS:
        raise CheckpointError(f"{folder}/config.json: _class_name {name!r} is not a supported transformer "
                              f"(supported: {', '.join(TRANSFORMER_CONFIGS)})")
    return TRANSFORMER_CONFIGS[name].from_dict(config)


def load_mmdit_transformer(location: Path, dtype: torch.dtype, device, family: str,
                           config: dict | None = None) -> SD3MMDiT | FluxDiT:
    """A diffusers folder (config.json + safetensors, sharded or not) of an SD3 / FLUX transformer, or a single
    file: SAI's sd3*.safetensors (`model.diffusion_model.` keys; the VAE and text encoders beside them are not
    read), BFL's flux1-{schnell,dev}.safetensors (no prefix; ComfyUI repacks under `model.diffusion_model.`), or a
    diffusers-named file. A single file's config is inferred from its shapes unless `config` (config.json fields)
    is given."""
    _, model_class, class_name, markers, what, _, _ = MMDIT_FORMATS[family]
    if location.is_dir():
        config = hub_config(location, class_name)
        tensors = read_tensors(location, device)
    else:
        tensors = read_component(location, (SAI_PREFIX, ""), markers, what, device)
    cfg, tensors = mmdit_tensors(family, tensors, config, location)
    return load_module(lambda: model_class(cfg), tensors, location, dtype, device)


def mmdit_tensors(family: str, tensors: dict[str, torch.Tensor], config: dict | None,
                  where: Path | str) -> tuple[SD3Config | FluxConfig, dict[str, torch.Tensor]]:
    """The config and our (diffusers) names of an SD3 / FLUX transformer's tensors (prefix already removed):
    original (SAI / BFL) names renamed, the config from config.json fields or else from the shapes. Pure, so meta
    tensors of a header's shapes work too."""
    config_class, _, _, markers, _, from_original, config_from_tensors = MMDIT_FORMATS[family]
    if markers[0] in tensors:  # the original names
        tensors = from_original(tensors, where)
    return (config_class.from_dict(config) if config else config_from_tensors(tensors, where)), tensors


MMDIT_FORMATS = {  # config, model, diffusers class, marker keys (original first), what it is, name and config mapping
    "sd3": (SD3Config, SD3MMDiT, "SD3Transformer2DModel", SD3_MARKERS, "an SD3 / SD3.5 transformer",
            sd3_from_original, sd3_config_from_tensors),
    "flux": (FluxConfig, FluxDiT, "FluxTransformer2DModel", FLUX_MARKERS, "a FLUX.1 transformer",
             flux_from_original, flux_config_from_tensors),
}


def load_sd3_transformer(location: Path, dtype: torch.dtype, device, config: dict | None = None) -> SD3MMDiT:
    return load_mmdit_transformer(location, dtype, device, "sd3", config)


def load_flux_transformer(location: Path, dtype: torch.dtype, device, config: dict | None = None) -> FluxDiT:
    return load_mmdit_transformer(location, dtype, device, "flux", config)


# ----------------------------------------------------------------------------------------------------
# Pipelines

class PipelineFormat(NamedTuple):
    """What a pipeline class (model_index.json `_class_name`) holds, as this project reads it."""

    transformer_class: str  # transformer/config.json _class_name
    load_transformer: Callable  # (location, dtype, device) -> the backbone
    text_components: tuple[tuple[str, str], ...]  # (encoder folder, tokenizer folder) pairs the text side reads


PIPELINE_FORMATS = {  # docs/formats.md: "Z-Image", "SD3", "FLUX"
    "ZImagePipeline": PipelineFormat("ZImageTransformer2DModel", load_zimage_transformer,
                                     (("text_encoder", "tokenizer"),)),
    "StableDiffusion3Pipeline": PipelineFormat("SD3Transformer2DModel", load_sd3_transformer, (
        ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))),
    "FluxPipeline": PipelineFormat("FluxTransformer2DModel", load_flux_transformer,
                                   (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))),
}
SUPPORTED_PIPELINES = tuple(PIPELINE_FORMATS)
# SD3 runs without T5 (StableDiffusion3Pipeline puts zeros in its place); model_index.json then says [null, null]
OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3")
# Latent pixels per image token side of every released transformer (Z-Image and SD3 patch 2, FLUX packs 2 x 2):
# what a single-file transformer, which stores no config, is taken to have
RELEASED_LATENT_PATCH = 2


def latent_layout(cfg: ZImageConfig | SD3Config | FluxConfig) -> tuple[int, int]:
    """(latent channels, latent pixels per image token side) of a backbone config. Z-Image and SD3 patchify the
    (B, 16, H, W) latents inside the model (all_patch_size / patch_size 2); FLUX takes them packed 2 x 2 into
    in_channels = 16 x 4 and embeds each packed pixel as one token (patch_size 1)."""
    if isinstance(cfg, FluxConfig):
        return cfg.in_channels // FLUX_PACK**2, FLUX_PACK * cfg.patch_size
    if isinstance(cfg, SD3Config):
        return cfg.in_channels, cfg.patch_size
    return cfg.in_channels, cfg.all_patch_size[0]


def pipeline_transformer_config(folder: Path, pipeline_class: str) -> ZImageConfig | SD3Config | FluxConfig:
    """A transformer folder's config, checked to be of the class `pipeline_class` holds; no weights are read."""
    name = PIPELINE_FORMATS[pipeline_class].transformer_class
    return TRANSFORMER_CONFIGS[name].from_dict(hub_config(folder, name))


@dataclass
class LatentPipeline:
    """A loaded latent text-to-image source, or the parts of it that a caller asked for."""

    name: str  # the hub id or path the user gave
    revision: str | None  # the hub commit when read from a cache snapshot
    transformer_sha256: str | None  # hash of the transformer's weight files (when loaded): what L2P builds on
    transformer: ZImageDiT | SD3MMDiT | FluxDiT | None
    text: ZImageText | SD3Text | FluxText | None  # text(prompts) -> the conditioning the transformer takes
    vae: AutoencoderKL | None
    scheduler: dict  # scheduler_config.json

    @property
    def source(self) -> dict:
        """Provenance recorded in synthesised data and L2P checkpoints."""
        return {"id": self.name, "revision": self.revision, "transformer_sha256": self.transformer_sha256}


# ----------------------------------------------------------------------------------------------------
# Defaults: the source's recipe card, else its family's recommended inference, else the paper's

RECIPE_CARD = "l2p.json"  # optional: a source's recommended sizes and settings for synth, train and sample
DEFAULT_SIZE = 1024  # Z-Image's and L2P's native resolution; a source's recipe card may name its own
# A latent source's sampling defaults when it has no recipe card, by family (`source_family`). guidance is ours:
# classifier-free with 1 = off, except FLUX-dev's, which is the scale its guidance embedding takes (no CFG batch).
SOURCE_DEFAULTS = {
    # Z-Image-Turbo's model card: 8 steps, no guidance. Z-Image (Base), Tongyi-MAI/Z-Image, the high-resolution L2P
    # releases' source, is sampled with many steps and CFG, but its configs do not tell it from Turbo (copies of its
    # transformer config.json and model_index.json hold Turbo's values; only the diffusers version that wrote them
    # differs): give it a recipe card (l2p.json) or --steps / --guidance
    "zimage": {"steps": 8, "guidance": 1.0},
    # SD3.5-Medium's model card (40 steps, guidance_scale 4.5; SAI's sd3_infer.py: 40-50 steps, CFG 4.5-5). Other
    # cards: SD3-Medium 28 / 7.0 (= StableDiffusion3Pipeline's defaults), SD3.5-Large 28 / 3.5, Large-Turbo 4 / off
    # (give those a recipe card, or --steps / --guidance)
    "sd3": {"steps": 40, "guidance": 4.5},
    # FLUX.1-schnell's model card and diffusers' FluxPipeline example: 4 steps, guidance_scale 0 (ignored: no
    # guidance embedding, no CFG)
    "flux-schnell": {"steps": 4, "guidance": 1.0},
    # FLUX.1-dev's model card: 50 steps, guidance_scale 3.5 (FluxPipeline's defaults: 28 steps, 3.5)
    "flux-dev": {"steps": 50, "guidance": 3.5},
}


def recipe_card(ckpt: str) -> dict:
    """The source's recipe card (l2p.json in its folder), or {} when it has none. Only that file is fetched."""
    try:
        root = resolve(ckpt, [RECIPE_CARD])
    except CheckpointError:
        return {}
    return read_json(root / RECIPE_CARD) if root.is_dir() and (root / RECIPE_CARD).is_file() else {}


SIZE_DEFAULTS = {"h": DEFAULT_SIZE, "w": DEFAULT_SIZE}


def recipe_defaults(card: dict, stage: str, built_in: dict) -> dict:
    """What a stage ("synth", "train" or "sample") runs with where no flag is given: each key of `built_in` from
    the recipe card's section for the stage if it names it (h and w from the card's size), else built_in's. The
    one place defaults are resolved: the card, else the family's or the paper's (what `built_in` holds)."""
    section = card.get(stage, {}) | ({"h": card["size"][0], "w": card["size"][1]} if "size" in card else {})
    return {k: section.get(k, v) for k, v in built_in.items()}


def source_family(cfg) -> str:
    """The SOURCE_DEFAULTS key of a latent backbone config: "zimage", "sd3", "flux-schnell" or "flux-dev"."""
    if isinstance(cfg, FluxConfig):
        return "flux-dev" if cfg.guidance_embeds else "flux-schnell"
    return "sd3" if isinstance(cfg, SD3Config) else "zimage"


def defaults_help(key: str) -> str:
    """"zimage 8, sd3 40, ...": a SOURCE_DEFAULTS setting per family, for --help."""
    return ", ".join(f"{family} {values[key]:g}" for family, values in SOURCE_DEFAULTS.items())


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
    """Pixels per image token side (VAE downsampling x latent pixels per token), read from configs only."""
    pipeline_class = read_pipeline_index(root)["_class_name"]
    vae = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
    folder = Path(transformer).expanduser() if transformer else root / "transformer"
    patch = latent_layout(pipeline_transformer_config(folder, pipeline_class))[1] if folder.is_dir() \
        else RELEASED_LATENT_PATCH
    return vae.downsample * patch


def text_folders(root: Path, index: dict) -> list[tuple[Path, Path] | None]:
    """(encoder, tokenizer) folders of the pipeline's text components; None for an optional one left out."""
    folders = []
    for encoder, tokenizer in PIPELINE_FORMATS[index["_class_name"]].text_components:
        absent = [name for name in (encoder, tokenizer) if name in OPTIONAL_COMPONENTS
                  and index.get(name, [None])[0] is None]
        if len(absent) == 1:
            raise CheckpointError(f"{root}/model_index.json: {absent[0]} is null but its partner is not "
                                  f"(expected both {encoder} and {tokenizer}, or neither)")
        folders.append(None if absent else (root / encoder, root / tokenizer))
    return folders


def load_text(pipeline_class: str, folders: list[tuple[Path, Path] | None], cfg, dtype: torch.dtype,
              device) -> ZImageText | SD3Text | FluxText:
    """The text side of a pipeline from its text_folders. `cfg` is the pipeline's own transformer config: SD3 takes
    the width of the zeros that replace a missing T5 from it, FLUX the T5 length. Tokenizers are read first, so
    a missing tokenizer file fails before any encoder weight is read."""
    if pipeline_class == "ZImagePipeline":
        (encoder, tokenizer), = folders
        tokenizer = load_tokenizer(tokenizer)
        return ZImageText(load_qwen3(encoder, dtype, device), tokenizer)
    if pipeline_class == "StableDiffusion3Pipeline":
        (clip_l, clip_l_tokenizer), (clip_g, clip_g_tokenizer), t5 = folders
        clip_l_tokenizer = load_clip_tokenizer(clip_l_tokenizer)
        clip_g_tokenizer = load_clip_tokenizer(clip_g_tokenizer)
        t5_tokenizer = None if t5 is None else load_t5_tokenizer(t5[1])
        return SD3Text(load_clip(clip_l, dtype, device), clip_l_tokenizer, load_clip(clip_g, dtype, device),
                       clip_g_tokenizer, None if t5 is None else load_t5(t5[0], dtype, device), t5_tokenizer,
                       cfg.joint_attention_dim)
    (clip_l, clip_tokenizer), (t5, t5_tokenizer) = folders
    clip_tokenizer, t5_tokenizer = load_clip_tokenizer(clip_tokenizer), load_t5_tokenizer(t5_tokenizer)
    return FluxText(load_clip(clip_l, dtype, device), clip_tokenizer, load_t5(t5, dtype, device), t5_tokenizer,
                    flux_t5_tokens(cfg))


def flux_t5_tokens(cfg: FluxConfig) -> int:
    """BFL encodes T5 to 512 tokens for the guidance-distilled dev and to 256 for schnell (flux/cli.py); diffusers'
    FluxPipeline defaults to 512 for both, and its docs say schnell takes at most 256."""
    return FLUX_DEV_T5_TOKENS if cfg.guidance_embeds else FLUX_SCHNELL_T5_TOKENS


def text_tokens(cfg) -> int | None:
    """Conditioning tokens per prompt of an SD3 / FLUX text side (padded to a fixed length: CLIP's 77 + T5's for
    SD3, T5's for FLUX, whose CLIP only gives the pooled vector); None for Z-Image, whose length follows the prompt."""
    if isinstance(cfg, SD3Config):
        return CLIP_MAX_TOKENS + SD3_T5_TOKENS
    return flux_t5_tokens(cfg) if isinstance(cfg, FluxConfig) else None


def load_pipeline(ckpt: str, dtype: torch.dtype = torch.float32, device="cpu", *, parts=ALL_PARTS,
                  transformer: str | None = None) -> LatentPipeline:
    """The `parts` ("transformer", "text", "vae") of a Z-Image, SD3 / SD3.5 or FLUX.1 pipeline from a hub id or a
    diffusers folder, by model_index.json's _class_name; only their files are downloaded. `transformer` may
    replace the pipeline's transformer with another folder or single file (an original-layout checkpoint, say).
    Configs and safetensors headers of every part are checked before any weight is read; the transformer's
    weight hash is always computed (provenance)."""
    root = resolve(ckpt, pipeline_patterns(parts))
    index = read_pipeline_index(root)
    pipeline_class = index["_class_name"]
    transformer_path = Path(transformer).expanduser() if transformer else root / "transformer"
    texts = text_folders(root, index)
    weights = {"transformer": [transformer_path], "text": [f[0] for f in texts if f is not None], "vae": [root / "vae"]}
    for part in parts:
        for location in weights[part]:
            if location.is_dir():
                read_json(location / "config.json")
            open_safetensors(location)
    if "transformer" in parts and transformer_path.is_dir():
        pipeline_transformer_config(transformer_path, pipeline_class)
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    text = None
    if "text" in parts:
        own = None if pipeline_class == "ZImagePipeline" else pipeline_transformer_config(root / "transformer",
                                                                                           pipeline_class)
        text = load_text(pipeline_class, texts, own, dtype, device)
    load_transformer = PIPELINE_FORMATS[pipeline_class].load_transformer
    return LatentPipeline(
        name=ckpt,
        revision=revision_of(root),
        transformer_sha256=weights_sha256(transformer_path) if "transformer" in parts else None,
        transformer=load_transformer(transformer_path, dtype, device) if "transformer" in parts else None,
        text=text,
        vae=load_vae(root / "vae", dtype, device) if "vae" in parts else None,
        scheduler=scheduler,
    )


def text_sha256(ckpt: str) -> str:
    """One hash for a pipeline's text side: its encoders' weight files and its tokenizer files. What caches of
    text features are keyed by, so that they follow the weights rather than the name they were loaded by."""
    root = resolve(ckpt, pipeline_patterns(("text",)))
    files = []
    for folders in text_folders(root, read_pipeline_index(root)):
        if folders is not None:
            files += safetensors_files(folders[0]) + sorted(f for f in folders[1].iterdir() if f.is_file())
    return files_sha256(files)


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
    """Floats cast to `dtype`, written atomically (an interrupted save never leaves a truncated file)."""
    floats = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in tensors.items()}
    with runtime.atomic_path(path) as tmp:
        save_file(floats, tmp, metadata={"format": "pt"})


def save_pipeline(folder: Path, transformer: ZImageDiT, text_encoder: dict[str, torch.Tensor], text_config: Qwen3Config,
                  tokenizer: Tokenizer, vae: AutoencoderKL, scheduler: dict, transformer_dtype=torch.bfloat16,
                  dtype=torch.float32) -> Path:
    """A ZImagePipeline folder in the diffusers layout (model_index.json and one folder per component), with
    the configs and key names the reference libraries write. `text_encoder` is a full Qwen3Model state dict
    (the last layer and the final norm included, though Z-Image never reads them). The transformer is stored
    in bf16 by default, as Z-Image-Turbo's is."""
    write_json(folder / "model_index.json", {"_class_name": "ZImagePipeline", "_diffusers_version": DIFFUSERS_VERSION}
               | PIPELINE_COMPONENTS)
    cfg = {k: v for k, v in transformer.cfg.to_dict().items() if k not in ("final_layer", "timestep_rule")}  # ours
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
