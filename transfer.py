"""Latent -> pixel: the L2P transfer (paper section 3.3), the freeze plan, and L2P checkpoints.

    transfer:   copy every source tensor whose name and shape match (bit-exact), add the RGB patch embedder
                (Linear 16*16*3 -> dim) and the Detailer Head with PyTorch's default init, drop the source's
                final layer (the released L2P_convert_weight.py does exactly this).
    freeze:     a declarative plan of what trains; defaults equal the released code (main blocks 0-4 and
                25-29, both refiners, t/caption embedders, pad tokens), `paper` is the paper's literal list
                (first and last n blocks only), `full` is full fine-tuning. The new layers always train.
                Per family, "first and last n blocks" are: Z-Image the first and last n of `layers`; SD3 the
                first and last n `transformer_blocks` (joint blocks); FLUX the first n double-stream
                `transformer_blocks` (where text and image first meet) and the last n `single_transformer_blocks`
                (those nearest the output). SD3's and FLUX's embedders are time_text_embed and context_embedder.
    checkpoints: safetensors holding the trained tensors only, with the pixel config, the freeze plan and the
                source's id, revision and weight hash in the metadata; loaded as source + trained tensors with
                no merge step. `export` writes one standalone file; the official release files load too
                (zhen-nan/L2P, model-1k-merge.safetensors; HaojunChen/PixVerve-L2P, l2p_{4k,8k,10k}_sft).
    inherit:    a model of a higher-resolution layout started from a lower one (1K -> 4K -> 8K or 10K), every
                tensor whose name and shape fit copied, as the authors start their 8K and 10K models.

    python transfer.py --ckpt Tongyi-MAI/Z-Image-Turbo                   # parameter counts of the plan
    python transfer.py --export out/run --out l2p-standalone.safetensors  # one file, no source needed
"""

import argparse
import json
import re
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import hub
import runtime
from model import (RGB_CHANNELS, DetailerHead, FluxDiT, HeadConfig, HeadLevel, PixelConfig, PixelDiT, SD3MMDiT,
                   ZImageConfig, ZImageDiT, backbone_family)

PIXEL_PATCH = 16  # 16x16 RGB patches: the same token grid as the latent model (VAE 8x, DiT patch 2)
CHECKPOINT_FORMAT = "l2p/2"  # l2p/1 stored the pixel config in an older layout
DEFAULT_RUN = Path("runs/l2p")  # where train.py writes and sample.py reads by default
# The releases hold the DiT only; the text side is their source's: Z-Image-Turbo for the 1K release, Z-Image (Base)
# for the 4K, 8K and 10K ones (their README and training scripts; both have the same text encoder and tokenizer
# layout).
OFFICIAL_TEXT_SOURCE = "Tongyi-MAI/Z-Image-Turbo"
HIGH_RES_TEXT_SOURCE = "Tongyi-MAI/Z-Image"
# The RGB patch of each released model (model.HEAD_LAYOUTS): the one that keeps its DiT at the 1K model's 64 x 64
# token grid at its size (1024, 4096, 8192, 10240 px; the all_patch_size of each in the high-resolution code's
# model_configs.py).
LAYOUT_PATCHES = {"1k": 16, "4k": 64, "8k": 128, "10k": 160}


# ----------------------------------------------------------------------------------------------------
# Freeze plan


@dataclass(frozen=True)
class FreezePlan:
    """Which parts of the pixel model train. The patch embedders and the Detailer Head always do."""

    first_blocks: int = 5
    last_blocks: int = 5
    refiners: bool = True  # noise_refiner and context_refiner
    embedders: bool = True  # t_embedder and cap_embedder
    pad_tokens: bool = True  # x_pad_token and cap_pad_token
    all_blocks: bool = False  # full fine-tuning: everything trains

    def trains(self, name: str, blocks: dict[str, int], family: str) -> bool:
        """Whether the parameter `name` of a PixelDiT trains under this plan; `blocks` counts each block list."""
        part = name.split(".")
        if part[0] == "detailer_head" or part[1] in ("all_x_embedder", "all_final_layer") or self.all_blocks:
            return True
        first, last = BLOCK_LISTS[family]
        if part[1] in (first, last):
            block = int(part[2])
            return (part[1] == first and block < self.first_blocks) or \
                (part[1] == last and block >= blocks[last] - self.last_blocks)
        rules = {"noise_refiner": self.refiners, "context_refiner": self.refiners, "t_embedder": self.embedders,
                 "cap_embedder": self.embedders, "x_pad_token": self.pad_tokens, "cap_pad_token": self.pad_tokens,
                 "time_text_embed": self.embedders, "context_embedder": self.embedders}
        if part[1] not in rules:
            raise ValueError(f"freeze plan: no rule for parameter {name}")
        return rules[part[1]]


# Per family, the block list whose first n blocks train and the one whose last n blocks train
BLOCK_LISTS = {"zimage": ("layers", "layers"), "sd3": ("transformer_blocks", "transformer_blocks"),
               "flux": ("transformer_blocks", "single_transformer_blocks")}

FREEZE_PLANS = {
    "released": FreezePlan(),
    "paper": FreezePlan(refiners=False, embedders=False, pad_tokens=False),
    "full": FreezePlan(all_blocks=True),
}


def make_plan(name: str, blocks: int) -> FreezePlan:
    if name not in FREEZE_PLANS:
        raise ValueError(f"--freeze {name!r}: expected one of {', '.join(FREEZE_PLANS)}")
    if blocks < 0:
        raise ValueError(f"--blocks {blocks}: expected a number of blocks >= 0")
    return replace(FREEZE_PLANS[name], first_blocks=blocks, last_blocks=blocks)


def apply_freeze_plan(model: PixelDiT, plan: FreezePlan) -> tuple[int, int]:
    """Set requires_grad per the plan; returns (trainable, total) parameter counts."""
    family = model.cfg.family
    blocks = {name: len(getattr(model.backbone, name)) for name in BLOCK_LISTS[family]}
    for name, p in model.named_parameters():
        p.requires_grad_(plan.trains(name, blocks, family))
    return count_parameters(model)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trained_names(model: PixelDiT) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------
# Transfer


def pixel_config(source, head: HeadConfig = HeadConfig(), patches=(PIXEL_PATCH,), output: str = "detailer",
                 timestep_rule: str = "exact") -> PixelConfig:
    """The pixel model of a source backbone config: RGB patch embedders, and the Detailer Head in place of its
    final layer (or, for the Z-Image ablation, a per-patch linear final layer). timestep_rule: how the model
    turns sigma into its time input, "exact" or as the official L2P code rounds it (model.zimage_time)."""
    if backbone_family(source) == "zimage":
        source = replace(source, timestep_rule=timestep_rule)
    elif timestep_rule != "exact":
        raise ValueError(f"timestep rule {timestep_rule!r}: the official L2P rounding exists for Z-Image sources "
                         f"only, not {backbone_family(source)}")
    return PixelConfig(source, tuple(patches), head, output)


def transfer(source: ZImageDiT | SD3MMDiT | FluxDiT, plan: FreezePlan = FreezePlan(), head: HeadConfig = HeadConfig(),
             seed: int = 0, verbose: bool = True, copy: bool = True, output: str = "detailer",
             timestep_rule: str = "exact", patches: tuple[int, ...] = (PIXEL_PATCH,)) -> PixelDiT:
    """L2P's transfer (paper 3.3; the released L2P_convert_weight.py does the same): a copy of the source
    transformer loses its latent patch embedder and final layer, gains an RGB patch embedder (16 px; a
    high-resolution model's own, e.g. 64 px at 4K) and the Detailer Head at PyTorch's default init (seeded), and
    keeps every other tensor bit for bit, in the source's dtype and on its device (new tensors are float32). Then
    the freeze plan. The source module is not changed. copy=False builds the same architecture at random init
    instead: the from-scratch baseline."""
    cfg = pixel_config(source.cfg, head, patches, output=output, timestep_rule=timestep_rule)
    torch.manual_seed(seed)
    model = PixelDiT(cfg, backbone=deepcopy(source) if copy else None)
    model.to(next(source.parameters()).device)
    trainable, total = apply_freeze_plan(model, plan)
    if verbose:
        ours, theirs = model.backbone.state_dict(), source.state_dict()
        copied = [k for k in ours if k in theirs and copy]
        dropped = sorted({k.split(".")[0] for k in theirs if k not in ours})
        print(f"transfer: copied {len(copied)} source tensors, dropped the latent {' and '.join(dropped)}; new: the "
              f"{'/'.join(map(str, patches))}-px RGB embedder and "
              f"{'the Detailer Head' if output == 'detailer' else 'a linear output'}")
        print(f"transfer: trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")
    return model


def downsampled_embedder(weight: torch.Tensor, bias: torch.Tensor, patch: int,
                         base: int = PIXEL_PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """A P-px patch embedder that starts as a trained B-px one (16 px, or 64 px for 4K -> 8K) embedding the patch
    area-averaged down to B x B.

    Averaging k x k pixels (k = P / B) is linear, so W_P[:, (i, j, c)] = W_B[:, (i // k, j // k, c)] / k^2
    in the (ph, pw, c) patch order, and the bias stays. The transformer then sees a large-patch image as it
    saw its B-px tokens, and training starts from there (compared with random init in the toy world).
    """
    k = patch // base
    if patch % base or k < 1:
        raise ValueError(f"patch {patch} is not a multiple of {base} (train it with --patch-init random)")
    w = weight.reshape(weight.shape[0], base, base, -1)  # (dim, ph, pw, c)
    w = w.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2) / k**2
    return w.reshape(weight.shape[0], -1), bias.clone()


def add_patch_sizes(model: PixelDiT, patches: tuple[int, ...], init: str = "downsampled") -> PixelDiT:
    """A pixel model with embedders for more patch sizes; new ones start from the largest embedder whose patch
    divides theirs (see downsampled_embedder), or with init="random" at PyTorch's default init. Existing ones are
    kept."""
    have = model.cfg.patches
    patches = tuple(sorted(set(have) | set(patches)))
    if patches == have:
        return model
    state, trains = model.state_dict(), {n: p.requires_grad for n, p in model.named_parameters()}
    for patch in sorted(set(patches) - set(have)):
        bases = [p for p in have if patch % p == 0]
        if init == "downsampled":
            if not bases:
                raise ValueError(f"patch {patch}: no embedder of this model ({', '.join(map(str, have))} px) divides "
                                 "it to derive it from (train it with --patch-init random)")
            base = model.backbone.all_x_embedder[f"{max(bases)}-1"]
            w, b = downsampled_embedder(base.weight.data, base.bias.data, patch, max(bases))
        else:
            any_embedder = next(iter(model.backbone.all_x_embedder.values()))
            fresh = torch.nn.Linear(patch * patch * RGB_CHANNELS, any_embedder.out_features,
                                    device=any_embedder.weight.device)
            w, b = fresh.weight.data, fresh.bias.data
        state |= {f"backbone.all_x_embedder.{patch}-1.weight": w, f"backbone.all_x_embedder.{patch}-1.bias": b}
    with torch.device("meta"):
        bigger = PixelDiT(replace(model.cfg, patches=patches))
    bigger.load_state_dict(state, assign=True)
    bigger.head_tile = model.head_tile
    for name, p in bigger.named_parameters():  # the model's trained / frozen split; new embedders train
        p.requires_grad_(trains.get(name, True))
    return bigger


def matching_tensors(old: dict, new: dict) -> list[str]:
    """The names of `new` that `old` holds with the same shape (both map names to tensors or shapes)."""
    return [k for k, v in new.items() if k in old and tuple(old[k].shape) == tuple(v.shape)]


def module_names(names) -> list[str]:
    """"enc4", "all_x_embedder.64-1", ...: the modules of a pixel model's tensor names, for messages."""
    return sorted({re.sub(r"(\.[01])?\.(weight|bias)$", "", n.split(".", 1)[1]) for n in names})


def inherit(model: PixelDiT, cfg: PixelConfig, seed: int = 0, verbose: bool = True) -> PixelDiT:
    """A pixel model of another head layout or patch that starts from `model`, as the authors start a
    higher-resolution model from a lower one's merged weights (their L2P_convert_weight.py and README): every
    tensor whose name and shape `model` holds is copied bit for bit, the others start at PyTorch's default init
    (seeded) as a new head and embedder do in `transfer`, and what the new layout lacks is dropped. 4K -> 8K keeps
    the whole 4K head; 4K -> 10K leaves bottleneck and up3 (other shapes) at init and drops enc4, up4 and dec4.
    Only the head and the embedders may differ: the backbone is the same."""
    if cfg.backbone != model.cfg.backbone or cfg.output != "detailer":
        raise ValueError("inherit: the new pixel config must keep the model's backbone and its Detailer Head output")
    old = model.state_dict()
    device, dim = next(model.parameters()).device, cfg.backbone.dim
    torch.manual_seed(seed)
    fresh = {f"detailer_head.{k}": v for k, v in DetailerHead(cfg.head, dim).state_dict().items()}
    for p in cfg.patches:
        embedder = torch.nn.Linear(p * p * RGB_CHANNELS, dim)
        fresh |= {f"backbone.all_x_embedder.{p}-1.{k}": v for k, v in embedder.state_dict().items()}
    with torch.device("meta"):
        new = PixelDiT(cfg)
    shapes = new.state_dict()
    kept = set(matching_tensors(old, shapes))
    new.load_state_dict({k: old[k] if k in kept else fresh[k].to(device) for k in shapes}, assign=True)
    new.head_tile = model.head_tile
    if verbose:
        print(f"inherit: copied {len(kept)} of {len(shapes)} tensors; at init: "
              f"{', '.join(module_names(shapes.keys() - kept)) or 'none'}; dropped: "
              f"{', '.join(module_names(old.keys() - shapes.keys())) or 'none'}")
    return new


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors with JSON metadata values, written atomically (runtime.atomic_path)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with runtime.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})


def read_metadata(path: Path) -> dict:
    """The JSON metadata of one of our safetensors files ({} for any other safetensors file, a diffusers or
    transformers one whose metadata is {"format": "pt"} included)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise hub.CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    if raw.get("format") == json.dumps("l2p/1"):
        raise hub.CheckpointError(f"{path}: an l2p/1 checkpoint, whose config layout this version no longer reads")
    if raw.get("format") != json.dumps(CHECKPOINT_FORMAT):
        return {}
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise hub.CheckpointError(f"{path}: its l2p metadata is not valid JSON (a damaged header)") from None


def save_trained(path: Path, model: PixelDiT, plan: FreezePlan, source: dict, tensors=None, keep=(), **extra) -> None:
    """The trained tensors only (or `tensors`, e.g. their EMA, under the same names) plus what rebuilds the
    rest; `keep` names frozen tensors that differ from the source's transfer too (an earlier stage trained them)."""
    params = dict(model.named_parameters())
    tensors = (tensors if tensors is not None else {n: params[n] for n in trained_names(model)}) | \
        {n: params[n] for n in keep if not params[n].requires_grad}
    metadata = {"format": CHECKPOINT_FORMAT, "kind": "trained", "config": model.cfg.to_dict(),
                "freeze_plan": asdict(plan), "source": source} | extra
    atomic_save({n: t.float() for n, t in tensors.items()}, path, metadata)


def export_standalone(model: PixelDiT, path: Path, source: dict, dtype: torch.dtype = torch.bfloat16) -> None:
    """Every tensor of the pixel model in one file: samples with only the source's text encoder."""
    metadata = {"format": CHECKPOINT_FORMAT, "kind": "standalone", "config": model.cfg.to_dict(), "source": source}
    atomic_save({n: t.to(dtype) for n, t in model.state_dict().items()}, path, metadata)


def from_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's names (Z-Image keys, all_x_embedder.16-1.*, local_decoder.*) -> ours."""
    return {k.replace("local_decoder.", "detailer_head.", 1) if k.startswith("local_decoder.") else f"backbone.{k}": v
            for k, v in tensors.items()}


# The release's head levels from full resolution down, by module name (1K: "1".."4"; the high-resolution heads
# add "0" and "0b" above them, and the 8K / 10K ones an outer "_8k" / "_10k_a"; the 10K head has no "4").
RELEASE_HEAD_LEVELS = ("_10k_a", "_8k", "0", "0b", "1", "2", "3", "4")


def head_config_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "local_decoder.") -> HeadConfig:
    """A released Detailer Head's levels and widths, read from its convs' output channels."""
    out = lambda module: tensors[f"{prefix}{module}.weight"].shape[0]  # noqa: E731
    levels = [HeadLevel(name, out(f"enc{name}.0"), out(f"up{name}.1"), out(f"dec{name}.0"))
              for name in RELEASE_HEAD_LEVELS if f"{prefix}enc{name}.0.weight" in tensors]
    return HeadConfig(tuple(levels), out("bottleneck.0"))


def official_patch(tensors: dict) -> int:
    """The release's RGB patch, from its one embedder's key (all_x_embedder.16-1 at 1K, 64-1 at 4K, ...)."""
    keys = [k for k in tensors if k.startswith("all_x_embedder.") and k.endswith(".weight")]
    return int(keys[0].removeprefix("all_x_embedder.").split("-")[0])


def official_config(tensors: dict[str, torch.Tensor]) -> PixelConfig:
    """Sizes from tensor shapes (the release ships no config), Z-Image's values for the rest. The release keeps no
    latent embedder, so its source's latent layout is Z-Image's (16 channels, patch 2)."""
    patch = official_patch(tensors)
    latent_like = {k.replace(f"all_x_embedder.{patch}-1.", "all_x_embedder.2-1."): v for k, v in tensors.items()}
    source = replace(hub.zimage_config_from_tensors(latent_like), in_channels=ZImageConfig().in_channels)
    # the release is sampled as it was trained: with the official rounded timesteps
    return pixel_config(source, head_config_from_tensors(tensors), (patch,), timestep_rule="official")


def official_source(patch: int) -> str:
    """The text side's source of a release, by its patch: the 1K release's (16 px) or the high-resolution ones'."""
    return OFFICIAL_TEXT_SOURCE if patch == PIXEL_PATCH else HIGH_RES_TEXT_SOURCE


def is_official_release(tensors: dict) -> bool:
    embedders = [k for k in tensors if k.startswith("all_x_embedder.") and k.endswith(".weight")]
    return any(k.startswith("local_decoder.") for k in tensors) and len(embedders) == 1


def checkpoint_file(ckpt: str, ema: bool = True) -> Path:
    """A checkpoint argument -> one safetensors file: a training run folder gives its latest checkpoint, one of
    its step-NNNNNN folders that checkpoint."""
    path = hub.resolve(ckpt)
    if not path.is_dir():
        return path
    if (path / "model.safetensors").is_file():
        return step_checkpoint(path, ema)
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():
        raise hub.CheckpointError(f"{path}: a diffusers folder, not an L2P checkpoint: give a latent source as the "
                                  "whole pipeline folder (the one holding model_index.json)")
    return latest_checkpoint(path, ema)


def tensor_names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def latest_checkpoint(folder: Path, ema: bool = True) -> Path:
    """A training run folder -> its latest checkpoint file (the EMA weights when present and wanted)."""
    pointer = folder / "latest"
    if not pointer.is_file():
        raise hub.CheckpointError(f"{folder}: no `latest` file and no model.safetensors, so neither a training run "
                                  "folder of train.py nor one of its step-NNNNNN checkpoints")
    step = folder / pointer.read_text().strip()
    if not (step / "model.safetensors").is_file():
        raise hub.CheckpointError(f"{folder}: `latest` names {step.name!r}, which holds no model.safetensors")
    return step_checkpoint(step, ema)


def step_checkpoint(step_dir: Path, ema: bool = True) -> Path:
    """A step-NNNNNN checkpoint folder -> its EMA weights when present and wanted, else its raw weights."""
    path = step_dir / "ema.safetensors"
    return path if ema and path.is_file() else step_dir / "model.safetensors"


def source_of(ckpt: str) -> str:
    """The source id an L2P checkpoint records (a release: official_source), from metadata or shapes only."""
    meta = read_metadata(checkpoint_file(ckpt))
    return meta["source"]["id"] if meta else official_source(peek_config(ckpt).patches[0])


def peek_config(ckpt: str) -> PixelConfig:
    """An L2P checkpoint's pixel config from its metadata or, for the release, its header's shapes: no weights."""
    path = checkpoint_file(ckpt)
    meta = read_metadata(path)
    if meta:
        return PixelConfig.from_dict(meta["config"])
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    if not is_official_release(shapes):
        raise hub.CheckpointError(f"{path}: not an L2P checkpoint")
    return official_config(shapes)


def load_pixel_model(ckpt: str, dtype: torch.dtype = torch.float32, device="cpu", *, source: str | None = None,
                     ema: bool = True) -> tuple[PixelDiT, dict]:
    """An L2P model from: our trained-tensors file (+ its source), a training run folder, a standalone export,
    or the official release (a local file, or owner/name/file.safetensors on the hub).

    Returns the model (frozen, eval) and its metadata; metadata["source"]["id"] names where the text encoder
    comes from. `source` overrides that id; for trained-tensor files it must hold the same transformer weights.
    """
    path = checkpoint_file(ckpt, ema)
    meta = read_metadata(path)
    if meta.get("kind") == "trained":
        return load_trained(path, meta, dtype, device, source), meta
    tensors = hub.read_tensors(path, device)
    if meta.get("kind") == "standalone":
        cfg = PixelConfig.from_dict(meta["config"])
    elif is_official_release(tensors):
        cfg, tensors = official_config(tensors), from_official(tensors)
        meta = {"kind": "official", "source": {"id": official_source(cfg.patches[0]), "revision": None}}
    else:
        raise hub.CheckpointError(f"{path}: not an L2P checkpoint (no l2p metadata, and no local_decoder.* and "
                                  "all_x_embedder.{P}-1.weight keys of the official releases)")
    if source:
        meta["source"] = {"id": source, "revision": None}
    model = hub.load_module(lambda: PixelDiT(cfg), tensors, path, dtype, device)
    return model, meta


def load_trained(path: Path, meta: dict, dtype, device, source: str | None) -> PixelDiT:
    """Source transformer -> transfer -> the trained tensors on top. No merge step, nothing written."""
    recorded = meta["source"]
    pipe = hub.load_pipeline(source or recorded["id"], dtype, device, parts=("transformer",))
    if pipe.transformer_sha256 != recorded["transformer_sha256"]:
        raise hub.CheckpointError(
            f"{path}: trained on source {recorded['id']} whose transformer weights hash to "
            f"{recorded['transformer_sha256'][:12]}…, but {pipe.name} hashes to {pipe.transformer_sha256[:12]}…: "
            "these trained tensors belong to other base weights")
    cfg = PixelConfig.from_dict(meta["config"])
    plan = FreezePlan(**meta["freeze_plan"])
    if cfg != pixel_config(pipe.transformer.cfg, cfg.head, cfg.patches, cfg.output, cfg.timestep_rule):
        raise hub.CheckpointError(f"{path}: its pixel config does not follow from source {pipe.name}")
    # The loaded source becomes the backbone (the transfer, without copying it). The new layers are only shapes
    # here: the file holds them, as it holds every tensor the plan trains, so loading draws no random numbers.
    with torch.device("meta"):
        model = PixelDiT(cfg, backbone=pipe.transformer)
    apply_freeze_plan(model, plan)
    trained = hub.read_tensors(path, device)
    # the plan's trained tensors, and those an earlier stage trained (a 4K run started from a 1K one)
    missing = sorted(set(trained_names(model)) - set(trained))
    extra = sorted(set(trained) - set(dict(model.named_parameters())))
    if missing or extra:
        raise hub.CheckpointError(f"{path}: trained tensors do not match its freeze plan: {len(missing)} missing "
                                  f"(e.g. {missing[:5]}), {len(extra)} unknown (e.g. {extra[:5]})")
    model.load_state_dict({n: t.to(dtype) for n, t in trained.items()}, strict=False, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="source model (hub id or diffusers folder): print the plan's parameter counts")
    p.add_argument("--freeze", default="released", choices=tuple(FREEZE_PLANS),
                   help="freeze plan: released (default), paper or full")
    p.add_argument("--blocks", type=runtime.non_negative_int, default=5,
                   help="main blocks trained at each end (n in the paper)")
    p.add_argument("--export", help="an L2P checkpoint or training run folder to export as one standalone file")
    p.add_argument("--out", type=Path, help="output file of --export (.safetensors)")
    p.add_argument("--dtype", default="bf16", choices=tuple(runtime.DTYPES),
                   help="dtype of the exported tensors: bf16, fp16 or fp32")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        if not args.out:
            raise ValueError("--export needs --out FILE")
        if args.out.is_dir():
            raise ValueError(f"--out {args.out}: is a folder; give the file to write, e.g. {args.out / 'l2p.safetensors'}")
        runtime.writable_folder(args.out.parent)
        model, meta = load_pixel_model(args.export)
        export_standalone(model, args.out, meta["source"], runtime.DTYPES[args.dtype])
        print(f"wrote {args.out}")
    elif args.ckpt:
        with torch.device("meta"):  # counts only: no weights are read
            cfg = hub.transformer_config(hub.resolve(args.ckpt, ["transformer/config.json"]) / "transformer")
            model = PixelDiT(pixel_config(cfg))
        trainable, total = apply_freeze_plan(model, make_plan(args.freeze, args.blocks))
        print(f"{args.freeze} plan, n = {args.blocks}: trainable parameters {trainable:,} of {total:,} "
              f"({100 * trainable / total:.1f}%)")
    else:
        raise ValueError("give --ckpt (counts) or --export with --out")


if __name__ == "__main__":
    runtime.run_cli(main)
