"""Session fixtures: one tiny Z-Image pipeline folder, the other layouts a user may hold of it, and a tiny corpus
synthesised from it; and how tests run a script as a user does."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
import synth
import transfer
from fixtures import tiny_zimage_pipeline, to_official
from model import HeadConfig, PixelDiT

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    """A ZImagePipeline saved by diffusers' save_pretrained: the real folder layout and key names."""
    return tiny_zimage_pipeline(tmp_path_factory.mktemp("tiny-zimage") / "pipe")


@pytest.fixture
def pipeline_copy(pipeline_dir, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, copy)
    return copy


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
    """Invert the documented original -> diffusers mapping (docs/formats.md, "Z-Image")."""
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


# ----------------------------------------------------------------------------------------------------
# The recipe's inputs: a corpus from the tiny source, and training flags that keep CPU steps fast

ROOT = Path(__file__).resolve().parents[1]
HEAD = "8,16,32,64"  # a narrow Detailer Head keeps CPU steps fast; the layout is the paper's
SIZE = ["--h", "64", "--w", "96"]  # a 4 x 6 token grid: 24 image tokens, padded to 32 with the pad token
PROMPTS = ["a red circle", "a blue square on white", "three green triangles", "a yellow star above a cat"]


def run_script(script: str, *args: str, nproc: int = 1, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """A script as a user runs it; under torchrun (gloo on CPU) when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(ROOT / script), *args]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, pipeline_dir, prompt_file) -> Path:
    """8 images (4 prompts x 2 seeds) synthesised by the tiny source."""
    out = tmp_path_factory.mktemp("corpus") / "data"
    synth.synthesize(["--ckpt", str(pipeline_dir), "--prompts", str(prompt_file), "--out", str(out), *SIZE,
                      "--steps", "2", "--batch-size", "3"])
    return out


def train_args(pipeline_dir, corpus, out, *extra) -> list[str]:
    return ["--ckpt", str(pipeline_dir), "--data", str(corpus), "--out", str(out), "--head-widths", HEAD,
            "--blocks", "1", "--lr", "1e-3", "--log-every", "1", *extra]


@pytest.fixture(scope="session")
def official_release(tmp_path_factory, pipeline_dir) -> tuple[Path, PixelDiT]:
    """A fake of zhen-nan/L2P's model-1k-merge.safetensors from a tiny transfer: the release's names, bf16. That
    these names are the real file's is checked at full size in test_golden.py (test_official_l2p_release)."""
    source = hub.load_pipeline(str(pipeline_dir), parts=("transformer",)).transformer
    model = transfer.transfer(source, head=HeadConfig.from_widths((8, 16, 32, 64)), verbose=False, timestep_rule="official")
    path = tmp_path_factory.mktemp("release") / "model-1k-merge.safetensors"
    save_file(to_official(model.state_dict()), path)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return path, model
