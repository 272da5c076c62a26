"""Session fixtures: one tiny Z-Image pipeline folder, and the other layouts a user may hold of it."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import tiny_zimage_pipeline

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    """A ZImagePipeline saved by diffusers' save_pretrained: the real folder layout and key names."""
    return tiny_zimage_pipeline(tmp_path_factory.mktemp("tiny-zimage") / "pipe")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, pipeline_dir) -> Path:
    """A Hugging Face cache holding the pipeline as hub repo `acme/tiny-zimage` at FAKE_COMMIT."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--acme--tiny-zimage"
    shutil.copytree(pipeline_dir, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return cache


@pytest.fixture(scope="session")
def sharded_transformer(tmp_path_factory, pipeline_dir) -> Path:
    """The transformer re-saved by diffusers in several shards with an index json."""
    from diffusers import ZImageTransformer2DModel

    folder = tmp_path_factory.mktemp("sharded") / "transformer"
    ZImageTransformer2DModel.from_pretrained(pipeline_dir / "transformer").save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def to_original_zimage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert the documented original -> diffusers mapping (hub_formats.md section 9)."""
    out = {"norm_final.weight": torch.ones(1)}
    for key, t in tensors.items():
        if key.endswith(".attention.to_k.weight") or key.endswith(".attention.to_v.weight"):
            continue
        if key.endswith(".attention.to_q.weight"):
            parts = [tensors[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            out[key.replace("to_q", "qkv")] = torch.cat(parts)
            continue
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace(".to_out.0.", ".out.").replace(".norm_q.", ".q_norm.").replace(".norm_k.", ".k_norm.")
        out[key] = t
    return out


@pytest.fixture(scope="session")
def original_transformer_file(tmp_path_factory, pipeline_dir) -> Path:
    """The transformer as one original-layout file (fused qkv, x_embedder / final_layer), stored in bf16."""
    tensors = load_file(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    path = tmp_path_factory.mktemp("original") / "z_image_turbo_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in to_original_zimage(tensors).items()}, path)
    return path
