"""Tiny checkpoints in the exact on-disk layout of the real hub repositories, built with the reference
libraries (diffusers, transformers, tokenizers) so our loaders read what a user would download.

Used by the tests and by bench.py. Nothing here is downloaded.
"""

import json
import tempfile
from pathlib import Path

import torch

TOKENIZER_CORPUS = [
    "a red circle above a blue square on a white background",
    "two green triangles to the left of a yellow circle",
    "A photo of a cat sitting on a wooden table, golden hour light.",
    "A poster with the text \"HELLO WORLD\" in bold letters, minimalist design.",
    "Portrait of an old fisherman, cinematic lighting, 35mm film.",
]
TINY_VOCAB = 400


def build_qwen_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer.json shaped like Qwen3's (NFC, regex split + byte level, chat tokens)."""
    from tokenizer import QWEN3_CHAT_TEMPLATE, train_qwen_style_bpe

    folder.mkdir(parents=True, exist_ok=True)
    train_qwen_style_bpe(TOKENIZER_CORPUS * 4, TINY_VOCAB).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN3_CHAT_TEMPLATE, "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "bos_token": None, "unk_token": None,
        "padding_side": "right", "add_prefix_space": False, "errors": "replace", "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with N(mean, std): zero-initialised pad tokens, gates and norms all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("norm.weight") or "norm" in name.split(".")[-2:][0] else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module


def tiny_zimage_transformer(seed: int = 0, **overrides):
    """diffusers ZImageTransformer2DModel at tiny width: head_dim 32 split (8, 12, 12) like Z-Image's 1/4, 3/8, 3/8."""
    from diffusers import ZImageTransformer2DModel

    config = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=4, n_refiner_layers=2,
                  n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
                  t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512])
    config.update(overrides)
    torch.manual_seed(seed)
    return randomize(ZImageTransformer2DModel(**config), seed)


def tiny_qwen3(seed: int = 0, **overrides):
    """transformers Qwen3Model at tiny width, with grouped-query attention (4 heads, 2 kv heads)."""
    from transformers import Qwen3Config, Qwen3Model

    config = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                  max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                  tie_word_embeddings=True)
    config.update(overrides)
    torch.manual_seed(seed)
    return randomize(Qwen3Model(Qwen3Config(**config)).eval(), seed, std=0.2)


def tiny_vae(seed: int = 0, **overrides):
    """diffusers AutoencoderKL with the 16-channel layout at tiny width (2 blocks: downsampling 2)."""
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=0.3611, shift_factor=0.1159, sample_size=32)
    config.update(overrides)
    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**config).eval(), seed, std=0.05)


def tiny_zimage_pipeline(folder: Path, seed: int = 0, scheduler: dict | None = None, shard_size: str | None = None):
    """A whole ZImagePipeline folder (model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_qwen_tokenizer(Path(tmp)))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or dict(num_train_timesteps=1000, shift=3.0,
                                                                        use_dynamic_shifting=False))),
        vae=tiny_vae(seed),
        text_encoder=tiny_qwen3(seed),
        tokenizer=tokenizer,
        transformer=tiny_zimage_transformer(seed),
    )
    pipe.save_pretrained(folder, max_shard_size=shard_size) if shard_size else pipe.save_pretrained(folder)
    return folder
