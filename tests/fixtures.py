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


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PixelDiT state dict under the official L2P release's names (Z-Image keys, all_x_embedder.16-1.*,
    local_decoder.*), in bf16 as released."""
    out = {}
    for k, v in state.items():
        k = k.replace("detailer_head.", "local_decoder.", 1) if k.startswith("detailer_head.") else k.removeprefix("backbone.")
        out[k] = v.to(torch.bfloat16).contiguous()
    return out


# ----------------------------------------------------------------------------------------------------
# SD3 / FLUX text encoders and their tokenizers (docs/formats.md, "Text encoders" and "Tiny checkpoints")

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")  # bos, eos: the two largest ids, as in CLIP's 49406, 49407
CLIP_TINY_VOCAB = 1000
T5_TINY_VOCAB = 160


def gpt2_byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE in GPT-2 / CLIP order: "!" first (id 0 in CLIP's vocab)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", vocab_size: int = 700) -> Path:
    """A CLIP tokenizer folder as SD3 / FLUX ship it (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json; no tokenizer.json), with merges learnt on a small corpus and CLIP's vocab order:
    256 bytes, the same with "</w>", the merges, then <|startoftext|>, <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from tokenizer import CLIP_SPLIT_REGEX, CLIP_WORD_END

    learner = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=CLIP_WORD_END))
    learner.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    learner.train_from_iterator(TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, end_of_word_suffix=CLIP_WORD_END, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [m.split(" ") if isinstance(m, str) else m for m in json.loads(learner.to_str())["model"]["merges"]]
    chars = gpt2_byte_chars()
    tokens = list(dict.fromkeys(chars + [c + CLIP_WORD_END for c in chars] + ["".join(m) for m in merges]))
    tokens += list(CLIP_SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = CLIP_SPECIALS
    def entry(token):  # special_tokens_map.json's form of a token
        return {"content": token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": entry(bos), "eos_token": entry(eos), "pad_token": pad_token, "unk_token": entry(eos)}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "add_prefix_space": False, "clean_up_tokenization_spaces": True,
        "bos_token": bos, "eos_token": eos, "pad_token": pad_token, "unk_token": eos}, indent=2))
    return folder


def build_t5_tokenizer(folder: Path, vocab_size: int = T5_TINY_VOCAB) -> Path:
    """A T5-style tokenizer.json (unigram, whitespace split + metaspace, "$A </s>" post-processor; <pad> 0,
    </s> 1, <unk> 2), with the tokenizer_config.json of a T5TokenizerFast folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0, "clean_up_tokenization_spaces": True}, indent=2))
    return folder


def tiny_clip(seed: int = 0, projection: bool = True, **overrides):
    """transformers CLIPTextModelWithProjection (SD3) or CLIPTextModel (FLUX) at tiny width, keeping the legacy
    eos_token_id 2 of the hub configs (pooling at argmax(ids), so EOS must be the largest id)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(vocab_size=CLIP_TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config.update(overrides)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize(cls(CLIPTextConfig(**config)).eval(), seed, std=0.2)


def tiny_t5(seed: int = 0, **overrides):
    """transformers T5EncoderModel (v1.1: gated-gelu, untied) at tiny width."""
    from transformers import T5Config, T5EncoderModel

    config = dict(vocab_size=T5_TINY_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(seed)
    return randomize(T5EncoderModel(T5Config(**config)).eval(), seed, std=0.2)


# ----------------------------------------------------------------------------------------------------
# Whole SD3 / FLUX pipelines (docs/formats.md, "SD3" and "FLUX"): the reference classes, saved by save_pretrained

# SD3.5-Medium-like (docs/formats.md, "Tiny checkpoints"): qk norms, a dual-attention first block, a context_pre_only last block.
# joint_attention_dim = the T5 width, >= CLIP-L + bigG widths (32 + 48, zero-padded up to it); pooled = 32 + 40.
SD3_TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                            caption_projection_dim=32, pooled_projection_dim=72, pos_embed_max_size=16,
                            dual_attention_layers=(0,), qk_norm="rms_norm")
SD3_TINY_CLIP_G = dict(hidden_act="gelu", hidden_size=48, projection_dim=40, num_attention_heads=3)
SD3_TINY_T5 = dict(d_model=96, num_heads=2, d_kv=16)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3-Medium's scheduler_config.json (docs/formats.md, "SD3")
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)  # docs/formats.md, "VAE"
# FLUX.1-like: in_channels 16 latent channels x 2 x 2 packing, RoPE axes (4, 6, 6) summing to head_dim 16,
# pooled = the CLIP-L width (no projection), joint_attention_dim = the T5 width.
FLUX_TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 6, 6))
FLUX_SCHEDULERS = {  # the released scheduler_config.json files (docs/formats.md, "FLUX")
    "schnell": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    "dev": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
}


def save_with_hub_tokenizers(pipe, folder: Path, tokenizers: dict[str, Path]) -> Path:
    """save_pretrained, then each tokenizer folder replaced by the files the hub repositories hold: transformers 5
    re-saves a CLIP tokenizer as tokenizer.json only, while SD3 / FLUX ship vocab.json + merges.txt."""
    import shutil

    pipe.save_pretrained(folder)
    for name, built in tokenizers.items():
        shutil.rmtree(folder / name)
        shutil.copytree(built, folder / name)
    return folder


def tiny_sd3_pipeline(folder: Path, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline folder (SD3.5-Medium layout); without T5, text_encoder_3 and tokenizer_3 are
    [null, null] in model_index.json and the pipeline puts zeros in T5's place."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        built = {"tokenizer": build_clip_tokenizer(Path(tmp) / "tokenizer"),
                 "tokenizer_2": build_clip_tokenizer(Path(tmp) / "tokenizer_2", pad_token="!")}
        if t5:
            built["tokenizer_3"] = build_t5_tokenizer(Path(tmp) / "tokenizer_3")
        torch.manual_seed(0)
        pipe = StableDiffusion3Pipeline(
            transformer=randomize(SD3Transformer2DModel(**SD3_TINY_TRANSFORMER).eval(), seed=0),
            scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            vae=tiny_vae(seed=0, **SD3_VAE_FACTORS),
            text_encoder=tiny_clip(seed=1), tokenizer=CLIPTokenizer.from_pretrained(built["tokenizer"]),
            text_encoder_2=tiny_clip(seed=2, **SD3_TINY_CLIP_G),
            tokenizer_2=CLIPTokenizer.from_pretrained(built["tokenizer_2"]),
            text_encoder_3=tiny_t5(seed=3, **SD3_TINY_T5) if t5 else None,
            tokenizer_3=T5TokenizerFast.from_pretrained(built["tokenizer_3"]) if t5 else None,
        )
        return save_with_hub_tokenizers(pipe, folder, built)


def tiny_flux_pipeline(folder: Path, guidance: bool) -> Path:
    """A FluxPipeline folder: FLUX.1-dev-like (guidance embedding, dynamic shift) with `guidance`, else
    FLUX.1-schnell-like (shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        built = {"tokenizer": build_clip_tokenizer(Path(tmp) / "tokenizer"),
                 "tokenizer_2": build_t5_tokenizer(Path(tmp) / "tokenizer_2")}
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**FLUX_TINY_TRANSFORMER, guidance_embeds=guidance).eval()
        pipe = FluxPipeline(
            transformer=randomize(transformer, seed=0),
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS["dev" if guidance else "schnell"]),
            vae=tiny_vae(seed=0),
            text_encoder=tiny_clip(seed=1, projection=False),
            tokenizer=CLIPTokenizer.from_pretrained(built["tokenizer"]),
            text_encoder_2=tiny_t5(seed=3), tokenizer_2=T5TokenizerFast.from_pretrained(built["tokenizer_2"]),
        )
        return save_with_hub_tokenizers(pipe, folder, built)
