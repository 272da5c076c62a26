"""SD3 / FLUX text conditioning against the reference implementations, in float32 on tiny random weights:
CLIP (CLIP-L-like quick_gelu, bigG-like gelu) and T5 against transformers, their tokenizers against transformers'
CLIPTokenizer / T5Tokenizer, the assembled conditioning against diffusers' pipelines, and every single-file layout
a user may hold (docs/formats.md, "Layouts", "Text encoders")."""

import pytest
import torch
from safetensors.torch import save_file

import hub
from fixtures import CLIP_TINY_VOCAB, build_clip_tokenizer, build_t5_tokenizer, tiny_clip, tiny_t5
from tokenizer import flux_conditioning, sd3_conditioning

PROMPTS = [
    "a red circle above a blue square",
    "  A  Cat!!\n\tON a   MAT, it's 42 dogs' toys ",  # odd whitespace and case, "!" (SD3 tokenizer_2's pad)
    "Café naïve ÜNÏCÖDÉ <|endoftext|> inside",
    "long " * 100,  # truncated: 75 BPE tokens for CLIP, max length - 1 for T5
]
CLIP_BOS, CLIP_EOS = CLIP_TINY_VOCAB - 2, CLIP_TINY_VOCAB - 1  # EOS the largest id: pooling is at argmax(ids)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def clip_ids(lengths: list[int], pad: int, seed: int = 0) -> torch.Tensor:
    """[bos] + random ids + [eos], padded to 77: what a CLIP tokenizer produces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), 77), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, : n + 2] = torch.cat([torch.tensor([CLIP_BOS]), torch.randint(3, CLIP_BOS, (n,), generator=g),
                                     torch.tensor([CLIP_EOS])])
    return ids


def check_clip(ours, ref, ids: torch.Tensor):
    """All four outputs of ours against transformers' (CLIPTextModel or CLIPTextModelWithProjection)."""
    with torch.no_grad():
        out = ours(ids)
        expected = ref(ids, output_hidden_states=True)
    assert relative_error(out.penultimate, expected.hidden_states[-2]) < 1e-5
    assert relative_error(out.last_hidden, expected.last_hidden_state) < 1e-5
    pooled = expected.last_hidden_state[torch.arange(len(ids)), (ids == CLIP_EOS).int().argmax(-1)]
    assert relative_error(out.pooled, pooled) < 1e-5
    if hasattr(expected, "text_embeds"):
        assert relative_error(out.projected, expected.text_embeds) < 1e-5
    else:
        assert relative_error(out.pooled, expected.pooler_output) < 1e-5 and out.projected is None
    return out


# ----------------------------------------------------------------------------------------------------
# Encoders from transformers folders


@pytest.mark.parametrize("kind", ["clip_l", "clip_l_flux", "bigg"])
def test_clip_folder_matches_transformers(tmp_path, kind):
    """CLIP-L with projection (SD3 text_encoder), without (FLUX; transformers 5 saves it without `text_model.`),
    bigG-like with exact gelu (SD3 text_encoder_2), saved in shards for one of them."""
    overrides = {"bigg": dict(hidden_act="gelu", hidden_size=48, projection_dim=40, num_attention_heads=3,
                              num_hidden_layers=3)}.get(kind, {})
    ref = tiny_clip(seed=1, projection=kind != "clip_l_flux", **overrides)
    ref.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if kind == "bigg" else {}))
    assert kind != "bigg" or (tmp_path / "model.safetensors.index.json").is_file()
    ours = hub.load_clip(tmp_path, torch.float32, "cpu")
    check_clip(ours, ref, clip_ids([5, 0, 75], pad=CLIP_EOS if kind != "bigg" else 0))


@pytest.mark.parametrize("max_distance", [128, 20])
def test_t5_folder_matches_transformers(tmp_path, max_distance):
    """100 tokens reach the logarithmic buckets; max_distance 20 also the last, clamped, bucket."""
    ref = tiny_t5(seed=2, num_layers=3, relative_attention_max_distance=max_distance)
    ref.save_pretrained(tmp_path)
    ours = hub.load_t5(tmp_path, torch.float32, "cpu")
    ids = torch.randint(0, ref.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids), ref(ids).last_hidden_state) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Single files: SAI's text_encoders/*.safetensors and the bundled SD3 files


def clip_l_state(seed=3):
    """A CLIP-L-shaped state dict (hidden 768: the single-file rule picks quick_gelu) with few, narrow layers."""
    ref = tiny_clip(seed, hidden_size=768, num_attention_heads=12, intermediate_size=128, projection_dim=768)
    return ref, {k: v.contiguous() for k, v in ref.state_dict().items()}


def bigg_state(seed=4):
    """A bigG-shaped state dict: heads of 64, exact gelu, projection."""
    ref = tiny_clip(seed, hidden_size=128, num_attention_heads=2, intermediate_size=256, projection_dim=96,
                    hidden_act="gelu", num_hidden_layers=3)
    return ref, {k: v.contiguous() for k, v in ref.state_dict().items()}


def t5_state(seed=5):
    """What save_pretrained writes: `shared.weight` only, its tied copy encoder.embed_tokens.weight dropped."""
    ref = tiny_t5(seed, num_layers=2)
    return ref, {k: v.contiguous() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}


def test_clip_single_files(tmp_path):
    """SAI's clip_l.safetensors (no text_projection, a stray position_ids), the same without `text_model.`, and
    clip_g.safetensors: configs inferred from shapes give the reference outputs."""
    clip_l, l_state = clip_l_state()
    path = tmp_path / "clip_l.safetensors"
    sai = {k: v for k, v in l_state.items() if k != "text_projection.weight"}
    save_file(sai | {"text_model.embeddings.position_ids": torch.arange(77)[None]}, path)
    ours = hub.load_clip(path, torch.float32, "cpu")
    assert ours.cfg.hidden_act == "quick_gelu" and ours.cfg.num_attention_heads == 12 and ours.text_projection is None
    ids = clip_ids([4, 30], pad=CLIP_EOS)
    check = check_clip(ours, clip_l.text_model, ids)  # the CLIPTextModel inside: pooler_output, no projection
    unprefixed = tmp_path / "clip_l_v5.safetensors"
    save_file({k.removeprefix("text_model."): v for k, v in sai.items()}, unprefixed)
    assert torch.equal(hub.load_clip(unprefixed, torch.float32, "cpu")(ids).penultimate, check.penultimate)

    bigg, g_state = bigg_state()
    save_file(g_state, tmp_path / "clip_g.safetensors")
    ours = hub.load_clip(tmp_path / "clip_g.safetensors", torch.float32, "cpu")
    assert ours.cfg.hidden_act == "gelu" and ours.cfg.num_attention_heads == 2 and ours.cfg.num_hidden_layers == 3
    check_clip(ours, bigg, clip_ids([10, 2], pad=0))


def test_t5_single_files(tmp_path):
    """t5xxl_fp16.safetensors with both embedding copies, and a file with only encoder.embed_tokens.weight."""
    ref, state = t5_state()
    ids = torch.randint(0, ref.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    both = state | {"encoder.embed_tokens.weight": state["shared.weight"].clone()}
    only_copy = {k: v for k, v in both.items() if k != "shared.weight"}
    for name, tensors in (("t5xxl_fp16.safetensors", both), ("embed_tokens_only.safetensors", only_copy)):
        save_file(tensors, tmp_path / name)
        ours = hub.load_t5(tmp_path / name, torch.float32, "cpu")
        assert ours.cfg.num_heads == 4 and ours.cfg.d_kv == 8 and ours.cfg.num_layers == 2
        with torch.no_grad():
            assert relative_error(ours(ids), expected) < 1e-5


def test_bundled_sd3_file(tmp_path):
    """sd3_medium_incl_clips_t5xxlfp16-style: all three encoders under text_encoders.*.transformer., beside the
    transformer and VAE; each loads alone (`which` picks the CLIP) and gives its reference's outputs."""
    clip_l, l_state = clip_l_state()
    bigg, g_state = bigg_state()
    t5, t5_tensors = t5_state()
    bundle = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4),
              "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}
    for name, state in (("clip_l", l_state), ("clip_g", g_state), ("t5xxl", t5_tensors)):
        bundle |= {f"text_encoders.{name}.transformer.{k}": v for k, v in state.items()}
    path = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    save_file(bundle, path)
    check_clip(hub.load_clip(path, torch.float32, "cpu"), clip_l, clip_ids([6], pad=CLIP_EOS))
    check_clip(hub.load_clip(path, torch.float32, "cpu", which="clip_g"), bigg, clip_ids([6], pad=0))
    ids = torch.randint(0, t5.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(hub.load_t5(path, torch.float32, "cpu")(ids), t5(ids).last_hidden_state) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokenizer_matches_transformers(tmp_path, pad_token):
    """SD3's tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0), which is then also a special token."""
    from transformers import CLIPTokenizer

    folder = build_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad_token)
    ref = CLIPTokenizer.from_pretrained(folder)
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = hub.load_clip_tokenizer(folder)(PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and got[-1, -1] == ref.eos_token_id, "the long prompt must be truncated"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("length", [32, 256])
def test_t5_tokenizer_matches_transformers(tmp_path, length):
    from transformers import T5TokenizerFast

    folder = build_t5_tokenizer(tmp_path / "tokenizer")
    expected = T5TokenizerFast.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=length,
                                                      truncation=True, return_tensors="pt").input_ids
    got = hub.load_t5_tokenizer(folder)(PROMPTS, length)
    assert torch.equal(got, expected)
    assert length > 100 or got[-1, -1] == 1, "the long prompt must keep its </s>"


# ----------------------------------------------------------------------------------------------------
# Conditioning, against diffusers' encode_prompt on tiny components


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    """Tiny SD3 / FLUX text components saved by transformers, and the tokenizer folders."""
    root = tmp_path_factory.mktemp("text-parts")
    t5_tokenizer = build_t5_tokenizer(root / "tokenizer_3")
    parts = {
        "tokenizer": build_clip_tokenizer(root / "tokenizer"),
        "tokenizer_2": build_clip_tokenizer(root / "tokenizer_2", pad_token="!"),
        "tokenizer_3": t5_tokenizer,
        "text_encoder": tiny_clip(seed=6),
        "text_encoder_flux": tiny_clip(seed=6, projection=False),
        "text_encoder_2": tiny_clip(seed=7, hidden_act="gelu", hidden_size=48, projection_dim=40,
                                    num_attention_heads=3),
        "text_encoder_3": tiny_t5(seed=8, d_model=96, num_heads=2, d_kv=16),  # joint_attention_dim 96 >= 32 + 48
    }
    for name, module in parts.items():
        if name.startswith("text_encoder"):
            module.save_pretrained(root / name)
    return root, parts


def load_ours(root):
    return dict(
        clip_l=hub.load_clip(root / "text_encoder", torch.float32, "cpu"),
        clip_l_tokenizer=hub.load_clip_tokenizer(root / "tokenizer"),
        clip_g=hub.load_clip(root / "text_encoder_2", torch.float32, "cpu"),
        clip_g_tokenizer=hub.load_clip_tokenizer(root / "tokenizer_2"),
    )


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_conditioning_matches_diffusers(text_parts, with_t5):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    root, parts = text_parts
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=parts["text_encoder"], tokenizer=CLIPTokenizer.from_pretrained(parts["tokenizer"]),
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=CLIPTokenizer.from_pretrained(parts["tokenizer_2"]),
        text_encoder_3=parts["text_encoder_3"] if with_t5 else None,
        tokenizer_3=T5TokenizerFast.from_pretrained(parts["tokenizer_3"]) if with_t5 else None,
    )
    joint_attention_dim = 96
    # without T5 diffusers reads the zeros' width from the transformer config, and only that
    object.__setattr__(pipe, "transformer", type("Transformer", (), {"config": type("Config", (), {
        "joint_attention_dim": joint_attention_dim})})())
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                   do_classifier_free_guidance=False, max_sequence_length=40)
    t5 = dict(t5=hub.load_t5(root / "text_encoder_3", torch.float32, "cpu"),
              t5_tokenizer=hub.load_t5_tokenizer(root / "tokenizer_3")) if with_t5 else dict(t5=None, t5_tokenizer=None)
    ours = sd3_conditioning(PROMPTS, **load_ours(root), **t5, joint_attention_dim=joint_attention_dim, t5_tokens=40)
    assert ours[0].shape == (len(PROMPTS), 77 + 40, joint_attention_dim) and ours[1].shape == (len(PROMPTS), 32 + 40)
    assert relative_error(ours[0], context) < 1e-5
    assert relative_error(ours[1], pooled) < 1e-5


def test_flux_conditioning_matches_diffusers(text_parts):
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    root, parts = text_parts
    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts["text_encoder_flux"],
                        tokenizer=CLIPTokenizer.from_pretrained(parts["tokenizer"]),
                        text_encoder_2=parts["text_encoder_3"], tokenizer_2=T5TokenizerFast.from_pretrained(parts["tokenizer_3"]))
    with torch.no_grad():
        context, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=48)
    ours = flux_conditioning(PROMPTS, hub.load_clip(root / "text_encoder_flux", torch.float32, "cpu"),
                             hub.load_clip_tokenizer(root / "tokenizer"),
                             hub.load_t5(root / "text_encoder_3", torch.float32, "cpu"),
                             hub.load_t5_tokenizer(root / "tokenizer_3"), t5_tokens=48)
    assert relative_error(ours[0], context) < 1e-5
    assert relative_error(ours[1], pooled) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_files_name_the_expected_keys(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.randn(3, 3)}, path)
    with pytest.raises(hub.CheckpointError, match=r"not a CLIP text encoder.*text_model\.embeddings\.token_embedding"
                                                  r"\.weight.*text_encoders\.clip_g\.transformer\."):
        hub.load_clip(path, torch.float32, "cpu", which="clip_g")
    with pytest.raises(hub.CheckpointError, match=r"not a T5 encoder.*relative_attention_bias"):
        hub.load_t5(path, torch.float32, "cpu")


def test_bad_text_inputs(tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_clip(seed=0).state_dict().items()}, tmp_path / "clip32.safetensors")
    with pytest.raises(hub.CheckpointError, match="hidden size 32 is not a multiple of the head size 64"):
        hub.load_clip(tmp_path / "clip32.safetensors", torch.float32, "cpu")
    folder = build_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "merges.txt").unlink()
    with pytest.raises(hub.CheckpointError, match="no merges.txt"):
        hub.load_clip_tokenizer(folder)
    with pytest.raises(hub.CheckpointError, match="no tokenizer.json"):
        hub.load_t5_tokenizer(folder)
    t5 = {k: v for k, v in t5_state()[1].items() if k != "shared.weight"}
    save_file(t5, tmp_path / "t5.safetensors")
    with pytest.raises(hub.CheckpointError, match="without an embedding"):
        hub.load_t5(tmp_path / "t5.safetensors", torch.float32, "cpu")

