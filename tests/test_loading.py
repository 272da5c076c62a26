"""Loading from every layout a user may hold, and clear errors for every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
from conftest import FAKE_COMMIT

ROOT = Path(__file__).resolve().parents[1]


def dit_output(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 8, 8, generator=g)
    captions = [torch.randn(5, 32, generator=g), torch.randn(40, 32, generator=g)]
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype), torch.tensor([0.3, 0.7]), captions).float()


def run_sample_cli(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    """The user's path: a fresh process, so HF_HUB_OFFLINE is read as huggingface_hub starts."""
    env = os.environ | {"PYTHONPATH": str(ROOT)} | env_extra
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_hub_id_resolves_from_cache_offline(hf_cache, pipeline_dir, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)}
    common = ["--prompt", "a red circle", "--h", "32", "--w", "48", "--steps", "2", "--guidance", "2"]
    done = run_sample_cli(offline, "--ckpt", "acme/tiny-zimage", *common, "--out", str(tmp_path / "hub.png"))
    assert done.returncode == 0, done.stderr
    done = run_sample_cli({}, "--ckpt", str(pipeline_dir), *common, "--out", str(tmp_path / "folder.png"))
    assert done.returncode == 0, done.stderr
    hub_image, folder_image = (np.asarray(Image.open(tmp_path / f)) for f in ("hub.png", "folder.png"))
    assert hub_image.shape == (32, 48, 3) and np.array_equal(hub_image, folder_image)
    settings = json.loads(Image.open(tmp_path / "hub.png").text["l2p"])
    assert settings["ckpt"] == "acme/tiny-zimage" and settings["seed"] == 42
    done = run_sample_cli(offline, "--ckpt", "acme/not-cached", *common, "--out", str(tmp_path / "x.png"))
    assert done.returncode != 0 and "acme/not-cached: not a local folder" in done.stderr and "offline" in done.stderr
    assert "Traceback" not in done.stderr


def test_revision_is_read_from_a_cache_snapshot(hf_cache):
    snapshot = hf_cache / "models--acme--tiny-zimage" / "snapshots" / FAKE_COMMIT
    assert hub.revision_of(snapshot) == FAKE_COMMIT
    assert hub.revision_of(snapshot / "transformer") == FAKE_COMMIT


def test_sharded_and_original_layouts_equal_plain_folder(pipeline_dir, sharded_transformer, original_transformer_file):
    plain = hub.load_zimage_transformer(pipeline_dir / "transformer", torch.float32, "cpu")
    sharded = hub.load_zimage_transformer(sharded_transformer, torch.float32, "cpu")
    assert torch.equal(dit_output(sharded), dit_output(plain))
    # the original file is stored in bf16: equal to the plain folder's weights rounded to bf16
    original = hub.load_zimage_transformer(original_transformer_file, torch.float32, "cpu")
    assert original.cfg == plain.cfg
    rounded = {k: v.to(torch.bfloat16).float() for k, v in plain.state_dict().items()}
    plain.load_state_dict(rounded)
    assert torch.equal(dit_output(original), dit_output(plain))


def test_pipeline_accepts_an_original_single_file_transformer(pipeline_dir, original_transformer_file):
    pipe = hub.load_pipeline(str(pipeline_dir), parts=("transformer", "text"), transformer=str(original_transformer_file))
    assert "layers.0.attention.to_q.weight" in pipe.transformer.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_dtype_loads_into_requested_dtype(pipeline_dir, original_transformer_file, dtype):
    model = hub.load_zimage_transformer(original_transformer_file, dtype, "cpu")
    stored = load_file(original_transformer_file)
    assert all(p.dtype == dtype for p in model.parameters())
    assert torch.equal(model.layers[0].feed_forward.w1.weight, stored["layers.0.feed_forward.w1.weight"].to(dtype))
    assert not any(p.requires_grad for p in model.parameters()), "a loaded source is frozen until training says so"


def test_text_encoder_with_causal_lm_prefix_loads(pipeline_dir, tmp_path):
    """Checkpoints saved from Qwen3ForCausalLM carry `model.` and maybe `lm_head.weight`."""
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(pipeline_dir / "text_encoder" / "config.json", folder)
    tensors = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    tensors = {f"model.{k}": v for k, v in tensors.items()} | {"lm_head.weight": tensors["embed_tokens.weight"].clone()}
    save_file(tensors, folder / "model.safetensors")
    ours = hub.load_qwen3(folder, torch.float32, "cpu")
    plain = hub.load_qwen3(pipeline_dir / "text_encoder", torch.float32, "cpu")
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(ours(ids, mask), plain(ids, mask))


# ----------------------------------------------------------------------------------------------------
# Bad input: each error names the file or folder and says what was expected.


def test_missing_folder(tmp_path):
    with pytest.raises(hub.CheckpointError, match=f"{tmp_path}/nowhere: no such file or folder"):
        hub.load_pipeline(str(tmp_path / "nowhere"))


def test_folder_without_model_index(pipeline_copy):
    (pipeline_copy / "model_index.json").unlink()
    with pytest.raises(hub.CheckpointError, match="no model_index.json, so not a diffusers pipeline folder"):
        hub.load_pipeline(str(pipeline_copy))


def test_unsupported_pipeline_class(pipeline_copy):
    index = json.loads((pipeline_copy / "model_index.json").read_text())
    (pipeline_copy / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyPipeline"}))
    with pytest.raises(hub.CheckpointError, match="'KandinskyPipeline' is not supported.*ZImagePipeline"):
        hub.load_pipeline(str(pipeline_copy))


def test_missing_shard(sharded_transformer, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(sharded_transformer, folder)
    victim = sorted(folder.glob("*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(hub.CheckpointError, match=f"index.json: names shard.*missing: {victim.name}"):
        hub.load_zimage_transformer(folder, torch.float32, "cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(pipeline_copy, damage):
    path = pipeline_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(hub.CheckpointError, match=f"{path}: not a readable safetensors file"):
        hub.load_pipeline(str(pipeline_copy))


def test_keys_that_do_not_match(pipeline_copy):
    path = pipeline_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["layers.0.attention.to_qq.weight"] = tensors.pop("layers.0.attention.to_q.weight")
    del tensors["x_pad_token"]
    save_file(tensors, path)
    with pytest.raises(hub.CheckpointError, match=r"keys do not match ZImageDiT: 2 missing \(e.g. \['layers.0.attention"
                                                  r".to_q.weight', 'x_pad_token'\]\), 1 unexpected \(e.g. \['layers.0"
                                                  r".attention.to_qq.weight'\]\)"):
        hub.load_pipeline(str(pipeline_copy))


def test_shape_that_does_not_match_config(pipeline_copy):
    config_path = pipeline_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"cap_feat_dim": 48}))
    with pytest.raises(hub.CheckpointError, match="shape.*differ from the config.*cap_embedder"):
        hub.load_pipeline(str(pipeline_copy))


def test_missing_weights_and_tokenizer(pipeline_copy):
    (pipeline_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(hub.CheckpointError, match="vae: no weights found"):
        hub.load_pipeline(str(pipeline_copy))
    with pytest.raises(hub.CheckpointError, match="tokenizer: no tokenizer.json"):
        (pipeline_copy / "tokenizer" / "tokenizer.json").unlink()
        hub.load_pipeline(str(pipeline_copy), parts=("transformer", "text"))


def test_single_file_that_is_not_zimage(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(hub.CheckpointError, match="not a Z-Image transformer.*x_embedder.weight"):
        hub.load_zimage_transformer(path, torch.float32, "cpu")
