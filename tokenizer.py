"""Everything that turns inputs into tokens and back.

Text: prompt tokenization with `tokenizers` (Z-Image's chat formatting of a Qwen3 byte-level BPE, CLIP's BPE,
T5's unigram) and the text encoders: Qwen3, whose second-to-last hidden state conditions Z-Image; CLIP-L,
OpenCLIP bigG and T5, whose outputs `sd3_conditioning` / `flux_conditioning` assemble as SD3 and FLUX expect.
Run to its last layer, Z-Image's Qwen3 is also the chat model that writes and audits the corpus's prompts.
Images: the 16-channel AutoencoderKL, the *latent* tokenizer that only the source model needs (synth.py).
The *pixel* tokenizer that replaces it after transfer is a plain reshape, `model.patchify`.

Module and parameter names mirror the transformers / diffusers layouts so hub safetensors load as stored.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from model import RMSNorm

# ----------------------------------------------------------------------------------------------------
# Prompt tokenization

ZIMAGE_MAX_TOKENS = 512  # pipeline_z_image.py max_sequence_length
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen2/Qwen3's pre-tokenizer split, as in their tokenizer.json
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Qwen3's chat template for plain turns (as tokenizer_config.json ships it, reduced to what Z-Image uses): a
# generation prompt opens the assistant turn; enable_thinking=False (only) adds an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def zimage_chat_prompt(prompt: str) -> str:
    """Z-Image's prompt formatting: the Qwen3 chat template with one user turn, `add_generation_prompt=True`
    and `enable_thinking=True` (which adds no <think> block)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class PromptTokenizer:
    """Byte-level BPE from a repository's tokenizer.json, applied to chat-formatted prompts."""

    def __init__(self, tokenizer_json: Path, pad_token: str | None = None, max_tokens: int = ZIMAGE_MAX_TOKENS):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.max_tokens = max_tokens
        # With right padding and a causal encoder the pad id never reaches a kept token; any valid id works.
        self.pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None:
            self.pad_id = 0

    @classmethod
    def from_folder(cls, folder: Path) -> "PromptTokenizer":
        """A diffusers `tokenizer/` folder: tokenizer.json plus the pad token from tokenizer_config.json."""
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(folder / "tokenizer.json", pad)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) right-padded to the longest prompt (at most max_tokens), and the bool mask."""
        encoded = [self.tokenizer.encode(zimage_chat_prompt(p), add_special_tokens=True).ids for p in prompts]
        encoded = [ids[: self.max_tokens] for ids in encoded]  # truncation, as transformers' truncation=True
        length = max(len(ids) for ids in encoded)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, row in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask


def train_qwen_style_bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
    """A small byte-level BPE with Qwen3's pipeline (NFC, regex split + byte level, the chat special tokens),
    for toy models and test fixtures: the same tokenizer.json format a real Qwen3 repository ships."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return tok


# ----------------------------------------------------------------------------------------------------
# Qwen3 text encoder (transformers Qwen3Model), truncated to what Z-Image reads: hidden_states[-2]


def config_fields(cls, d: dict) -> dict:
    """The fields of config dataclass `cls` that a hub config.json sets (null counts as unset), lists as tuples."""
    names = {f.name for f in fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names and v is not None}


@dataclass(frozen=True)
class Qwen3Config:
    """Fields of the hub's text_encoder/config.json (Qwen3-4B values as defaults)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default" or d.get("use_sliding_window"):
            raise ValueError("Qwen3 config: only default RoPE and full attention are supported")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias"):
            raise ValueError("Qwen3 config: expected hidden_act silu and no attention bias")
        kwargs = config_fields(cls, d)
        kwargs["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))
        kwargs.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        return cls(**kwargs)


def rope_cos_sin(cfg: Qwen3Config, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles of integer `positions`, any shape -> (*positions.shape, head_dim)."""
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=positions.device) / cfg.head_dim
    )
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style RoPE on (B, heads, L, head_dim): the two halves of head_dim form the rotated pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Qwen3Attention(nn.Module):
    """Grouped-query attention with per-head RMS q/k norms."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: "LayerKV | None" = None):
        # (B, L, D) -> (B, heads, L, head_dim)
        q = self.q_norm(self.q_proj(x).unflatten(-1, (-1, self.cfg.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).unflatten(-1, (-1, self.cfg.head_dim))).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (-1, self.cfg.head_dim)).transpose(1, 2)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        if cache is not None:  # generation: attend to every earlier token's keys and values too
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: "LayerKV | None" = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nn.Module):
    """Qwen3 decoder run as an encoder. Returns hidden_states[-2]: the input of the last layer, un-normed.

    So the last layer and the final norm are never computed and not even built (`unused_keys`).
    """

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers - 1)])

    @staticmethod
    def unused_keys(cfg: Qwen3Config, key: str) -> bool:
        """Stored tensors that hidden_states[-2] never reads: last layer, final norm, a causal-LM head."""
        return key.startswith(f"layers.{cfg.num_hidden_layers - 1}.") or key in ("norm.weight", "lm_head.weight")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, L) -> hidden states (B, L, hidden). Positions count from 0 whatever the padding."""
        B, L = ids.shape
        x = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.cfg, torch.arange(L, device=ids.device), x.dtype)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        attend = causal[None, None] & mask[:, None, None, :].to(ids.device)  # (B, 1, L, L)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return x


@torch.no_grad()
def encode_prompts(encoder: Qwen3TextEncoder, tokenizer: PromptTokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Prompts -> one (L_i, hidden) feature tensor per prompt, valid tokens only (as the Z-Image pipeline)."""
    device = encoder.embed_tokens.weight.device
    ids, mask = tokenizer(prompts)
    hidden = encoder(ids.to(device), mask.to(device))
    return [h[m] for h, m in zip(hidden, mask.to(device))]


# ----------------------------------------------------------------------------------------------------
# Qwen3 as a causal LM (transformers Qwen3ForCausalLM): the same layers run to the end, to write text
#
# Z-Image's text_encoder folder holds the whole Qwen3-4B chat model: 36 layers, the final norm, and word
# embeddings tied to the output head (tie_word_embeddings, so no lm_head.weight is stored). The encoder above
# stops at hidden_states[-2]; run to the end, the same weights write and audit the corpus's prompts
# (synth.py prompts), with no second model to download.

QWEN3_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # the end of an assistant turn, the end of a text
QWEN3_PAD_TOKEN = "<|endoftext|>"  # tokenizer_config.json's pad_token; padded positions are never attended


def qwen3_chat_prompt(system: str, user: str) -> str:
    """Qwen3's chat template with a system and a user turn, `add_generation_prompt=True` and
    `enable_thinking=False`: the empty think block makes the hybrid-thinking model answer at once."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")


class LayerKV:
    """One layer's keys and values for a batch, preallocated (B, kv_heads, max_len, head_dim) and filled in order:
    a decoding step then costs one token's projections, not the whole sequence's."""

    def __init__(self, cfg: Qwen3Config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, L, head_dim) new keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting valid tokens from 0, as transformers' generate derives them from the attention
    mask: a left-padded row gets the positions it would have alone (padding gets 0, and is never attended)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class Qwen3CausalLM(nn.Module):
    """All the layers, the final norm and the output head; tied, the head is the word embedding matrix itself
    (logits = h @ embed_tokens.weight.T), else its own lm_head."""

    def __init__(self, cfg: Qwen3Config, tie_word_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
               cache: list[LayerKV] | None = None) -> torch.Tensor:
        """ids, positions (B, Lq): new tokens; key_mask (B, T) bool: which of all T tokens so far (the cached ones,
        then these) are real -> final normed hidden states (B, Lq, hidden)."""
        x = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, Lq, head_dim): the same angles for every head
        Lq, T = ids.shape[1], key_mask.shape[1]
        key = torch.arange(T, device=ids.device)
        query = key[T - Lq :, None]  # (Lq, 1): the new tokens are the last Lq of the T
        # causal, over real keys; a padding query sees itself, so its softmax row is never empty (NaN)
        attend = (key <= query) & (key_mask[:, None, None, :] | (key == query))  # (B, 1, Lq, T)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, None if cache is None else cache[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L), padded on either side -> logits (B, L, vocab)."""
        return self.logits(self.hidden(ids, position_ids(mask), mask))


@dataclass(frozen=True)
class Sampling:
    """How one reply is drawn. temperature 0 is greedy decoding; top_p keeps the smallest set of most likely
    tokens whose probability reaches it (nucleus sampling, Holtzman et al. 2020)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """(B, vocab) float logits -> (B,) next tokens, each row with its own temperature, top_p and uniform draw in
    [0, 1): inverse-CDF sampling over the row's nucleus, so the token depends on that row alone."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # the mass of the more likely tokens; 0 for the first, which always stays
    cdf = probs.masked_fill(before >= top_p[:, None], 0.0).cumsum(-1)
    pick = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)
    sampled = order.gather(-1, pick[:, None])[:, 0]
    return torch.where(temperature == 0, logits.argmax(-1), sampled)


@torch.no_grad()
def generate_tokens(model: Qwen3CausalLM, prompts: list[list[int]], seeds: list[int], samplings: list[Sampling],
                    stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Token ids -> the new ids of each prompt, up to and including its first stop id or max_new_tokens.

    One batch, LEFT padded: every row's last prompt token is then in the last column, so one column of next tokens
    extends all rows, and position_ids gives a padded row the positions it has alone. Each row draws from its own
    CPU generator seeded by its seed, so a reply does not depend on the batch it shares (up to the rounding of
    batched matmuls: none seen in float32, rare token flips possible in bf16) or on the device.
    """
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    steps = max(s.max_new_tokens for s in samplings)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.bool)
    for i, row in enumerate(prompts):
        ids[i, P - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, P - len(row) :] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = position_ids(mask)
    cache = [LayerKV(model.cfg, B, P + steps, dtype, device) for _ in model.layers]
    hidden = model.hidden(ids, positions, mask, cache)[:, -1]  # the prompt at once (prefill)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    temperature = torch.tensor([s.temperature for s in samplings], device=device)
    top_p = torch.tensor([s.top_p for s in samplings], device=device)
    stop = set(stop_ids)
    replies: list[list[int]] = [[] for _ in range(B)]
    live = [True] * B
    position = positions[:, -1:]
    for _ in range(steps):
        uniform = torch.tensor([torch.rand((), generator=g).item() for g in generators], device=device)
        tokens = sample_tokens(model.logits(hidden).float(), temperature, top_p, uniform)
        for i, token in enumerate(tokens.tolist()):
            if live[i]:
                replies[i].append(token)
                live[i] = token not in stop and len(replies[i]) < samplings[i].max_new_tokens
        if not any(live):
            break
        # finished rows keep decoding with the batch; what they add is never read
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        position = position + 1
        hidden = model.hidden(tokens[:, None], position, mask, cache)[:, -1]  # one token per row
    return replies


@dataclass(frozen=True)
class ChatRequest:
    """One chat turn to answer: the system and user messages, and how the reply is drawn."""

    system: str
    user: str
    seed: int
    sampling: Sampling


class Qwen3Chat:
    """A Qwen3 causal LM and its tokenizer behind one call: `generate(requests) -> reply texts`."""

    def __init__(self, model: Qwen3CausalLM, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = [tokenizer.token_to_id(t) for t in QWEN3_STOP_TOKENS if tokenizer.token_to_id(t) is not None]
        self.pad_id = tokenizer.token_to_id(QWEN3_PAD_TOKEN) or 0

    def generate(self, requests: list[ChatRequest]) -> list[str]:
        prompts = [self.tokenizer.encode(qwen3_chat_prompt(r.system, r.user)).ids for r in requests]
        replies = generate_tokens(self.model, prompts, [r.seed for r in requests], [r.sampling for r in requests],
                                  self.stop_ids, self.pad_id)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in replies]


# ----------------------------------------------------------------------------------------------------
# CLIP and T5 prompt tokenization (SD3 / FLUX), with transformers' CLIPTokenizer / T5Tokenizer behaviour

CLIP_MAX_TOKENS = 77  # the CLIP tokenizers' model_max_length = the text encoders' max_position_embeddings
# transformers' CLIPTokenizer pre-tokenizer split (kept matches only, so whitespace disappears)
CLIP_SPLIT_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_WORD_END = "</w>"  # CLIP's BPE marks the last piece of each word instead of a leading space
CLIP_DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                         "pad_token": "<|endoftext|>"}  # transformers' CLIPTokenizer defaults
T5_DEFAULT_SPECIALS = {"pad_token": "<pad>"}  # id 0; </s> comes from tokenizer.json's post-processor


def special_tokens(folder: Path, defaults: dict[str, str]) -> dict[str, str]:
    """The special tokens named in `defaults`, as a tokenizer folder sets them: tokenizer_config.json over
    special_tokens_map.json over the defaults. Entries are strings or {"content": ...} dicts (transformers
    writes both)."""
    found = dict(defaults)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        path = folder / name
        config = json.loads(path.read_text()) if path.is_file() else {}
        for key in defaults:
            value = config.get(key)
            if value is not None:
                found[key] = value["content"] if isinstance(value, dict) else value
    return found


def padded_ids(tokenizer: Tokenizer, prompts: list[str], length: int, pad_token: str) -> torch.Tensor:
    """(B, length) ids: special tokens added, truncated so they survive, padded on the right, exactly as
    transformers' `padding="max_length", truncation=True` drives the same `tokenizers` backend."""
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(prompts)], dtype=torch.long)


class CLIPPromptTokenizer:
    """CLIP's byte-level BPE from a tokenizer folder's vocab.json + merges.txt (SD3 and FLUX repositories ship
    no tokenizer.json): [bos] + bpe[:75] + [eos], padded to 77 with the folder's pad token (SD3's tokenizer
    pads with <|endoftext|>, its tokenizer_2 with "!", id 0). Text is NFC-normalised, whitespace runs become one
    space and everything is lower-cased, as transformers' CLIPTokenizer does."""

    def __init__(self, folder: Path):
        specials = special_tokens(folder, CLIP_DEFAULT_SPECIALS)
        vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=CLIP_WORD_END,
                                   unk_token=specials["unk_token"], fuse_unk=False))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # transformers registers every named special token (a pad "!" included) as an added token, so a prompt's
        # literal "!" becomes that token, not the BPE piece "!</w>"
        tok.add_special_tokens(list(dict.fromkeys(specials.values())))
        bos, eos = specials["bos_token"], specials["eos_token"]
        tok.post_processor = processors.RobertaProcessing((eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)),
                                                          trim_offsets=False, add_prefix_space=False)
        self.tokenizer, self.pad_token = tok, specials["pad_token"]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, 77)."""
        return padded_ids(self.tokenizer, prompts, CLIP_MAX_TOKENS, self.pad_token)


class T5PromptTokenizer:
    """T5's SentencePiece unigram from the folder's tokenizer.json, whose post-processor appends </s>; padded
    with <pad> (id 0) to a fixed length and truncated to it, the </s> kept."""

    def __init__(self, folder: Path):
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.pad_token = special_tokens(folder, T5_DEFAULT_SPECIALS)["pad_token"]

    def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
        """Token ids (B, length)."""
        return padded_ids(self.tokenizer, prompts, length, self.pad_token)


# ----------------------------------------------------------------------------------------------------
# CLIP text encoder (transformers CLIPTextModel / CLIPTextModelWithProjection): OpenAI CLIP-L and OpenCLIP bigG

QUICK_GELU_SCALE = 1.702  # x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU
CLIP_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(QUICK_GELU_SCALE * x), "gelu": F.gelu}  # as ACT2FN


@dataclass(frozen=True)
class CLIPTextConfig:
    """Fields of a text_encoder*/config.json (CLIP-L values as defaults); `has_projection` says whether the
    checkpoint carries `text_projection.weight` (CLIPTextModelWithProjection)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = CLIP_MAX_TOKENS
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    has_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(CLIP_ACTIVATIONS)})")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        return cls(**config_fields(cls, d), has_projection="CLIPTextModelWithProjection" in d.get("architectures", ()))


class CLIPOutput(NamedTuple):
    penultimate: torch.Tensor  # (B, L, hidden) hidden_states[-2]: the last layer's input, no final LayerNorm
    last_hidden: torch.Tensor  # (B, L, hidden) after the final LayerNorm
    pooled: torch.Tensor  # (B, hidden) last_hidden at the EOS token (pooler_output)
    projected: torch.Tensor | None  # (B, projection_dim) text_projection(pooled) (text_embeds), if the model has one


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        # (B, L, D) -> (B, heads, L, head_dim); causal, as CLIP's text transformer was trained
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = CLIP_ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoderLayers(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoderLayers(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP's causal text transformer. Module names are transformers' keys (`text_model.…`, `text_projection`), so
    CLIP-L (quick_gelu) and OpenCLIP bigG (gelu) checkpoints load as stored."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
                                if cfg.has_projection else None)

    def forward(self, ids: torch.Tensor) -> CLIPOutput:
        """ids (B, L), L <= max_position_embeddings, EOS the largest id in the vocabulary."""
        x = self.text_model.embeddings(ids)
        *inner, last = self.text_model.encoder.layers
        for layer in inner:
            x = layer(x)
        last_hidden = self.text_model.final_layer_norm(last(x))
        # Pool at argmax(ids): the hub configs keep the legacy eos_token_id 2, for which transformers takes the
        # first occurrence of the largest id, i.e. the first EOS (docs/formats.md, "Text encoders")
        pooled = last_hidden[torch.arange(len(ids), device=ids.device), ids.argmax(-1)]
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPOutput(x, last_hidden, pooled, projected)


# ----------------------------------------------------------------------------------------------------
# T5 v1.1 encoder (transformers T5EncoderModel), SD3's third and FLUX's second text encoder


@dataclass(frozen=True)
class T5Config:
    """Fields of a T5 config.json (T5-v1.1-XXL values as defaults); only the gated-GELU feed-forward of v1.1."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"T5 config: feed_forward_proj {d['feed_forward_proj']!r} is not supported (expected "
                             "gated-gelu, as T5 v1.1)")
        return cls(**config_fields(cls, d))


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets for key - query offsets: half the buckets per direction, of those half exact
    offsets and half logarithmic bins up to max_distance (transformers T5Attention._relative_position_bucket)."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bin = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bin.clamp(max=half - 1))


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d_kv) scaling (T5 folds it into the initialisation) and without biases."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.heads = cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        # (buckets, heads); stored in block 0 only, whose bias every block adds
        self.relative_attention_bias = (nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
                                        if has_relative_bias else None)

    def forward(self, x, position_bias):
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).flatten(2))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)  # transformers' key name
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, position_bias):
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5GatedFeedForward(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU with transformers' gelu_new (tanh approximation)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(cfg)  # transformers' key name
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_relative_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x, position_bias):
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 encoder with transformers' T5EncoderModel keys (`shared.weight`, `encoder.block.{i}.layer…`). Returns
    last_hidden_state. Run in float32 or bfloat16: T5 v1.1 activations overflow float16."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, heads, L, L) additive attention bias from block 0's relative position table."""
        position = torch.arange(length, device=device)
        offsets = position[None, :] - position[:, None]  # (L, L): key position - query position
        buckets = relative_position_bucket(offsets, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, d_model). No attention mask: SD3 and FLUX attend to the padding too."""
        x = self.shared(ids)
        bias = self.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------------
# SD3 / FLUX conditioning, as diffusers' StableDiffusion3Pipeline and FluxPipeline encode_prompt

SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline max_sequence_length (SAI's reference pads T5 to only 77)
FLUX_DEV_T5_TOKENS = 512  # FluxPipeline default and BFL's dev setting
FLUX_SCHNELL_T5_TOKENS = 256  # BFL's schnell setting


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class PooledText(NamedTuple):
    """SD3 / FLUX conditioning of a batch of prompts: per-token `context` (B, L, joint_attention_dim) and one
    `pooled` vector per prompt (B, pooled_dim). `+` joins two batches (the sampler's [cond, uncond] batch), as it
    joins Z-Image's lists of caption features, so samplers and trainers need not know which they hold."""

    context: torch.Tensor
    pooled: torch.Tensor

    def __add__(self, other: "PooledText") -> "PooledText":
        return PooledText(torch.cat([self.context, other.context]), torch.cat([self.pooled, other.pooled]))


@torch.no_grad()
def sd3_conditioning(prompts: list[str], clip_l: CLIPTextEncoder, clip_l_tokenizer: CLIPPromptTokenizer,
                     clip_g: CLIPTextEncoder, clip_g_tokenizer: CLIPPromptTokenizer, t5: T5Encoder | None,
                     t5_tokenizer: T5PromptTokenizer | None, joint_attention_dim: int,
                     t5_tokens: int = SD3_T5_TOKENS) -> PooledText:
    """Prompts -> (context (B, 77 + t5_tokens, joint_attention_dim), pooled (B, proj_l + proj_g)).

    Context: CLIP-L and bigG penultimate states side by side (77 x (768 + 1280)), zero-padded on channels to
    the T5 width, then T5's last hidden state along the sequence; without T5, zeros in its place.
    Pooled: both projected pooled outputs; a CLIP-L without text_projection (SAI's clip_l.safetensors)
    contributes its un-projected pooled output, as SAI's reference does (docs/formats.md, "SD3").
    """
    device = device_of(clip_l)
    outputs = [encoder(tokenizer(prompts).to(device_of(encoder)))
               for encoder, tokenizer in ((clip_l, clip_l_tokenizer), (clip_g, clip_g_tokenizer))]
    clip = torch.cat([out.penultimate.to(device) for out in outputs], dim=-1)  # (B, 77, hidden_l + hidden_g)
    if t5 is None:
        t5_hidden = torch.zeros(len(prompts), t5_tokens, joint_attention_dim, dtype=clip.dtype, device=device)
    else:
        t5_hidden = t5(t5_tokenizer(prompts, t5_tokens).to(device_of(t5))).to(device)
    context = torch.cat([F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1])), t5_hidden], dim=1)
    pooled = torch.cat([(out.projected if out.projected is not None else out.pooled).to(device) for out in outputs],
                       dim=-1)
    return PooledText(context, pooled)


@torch.no_grad()
def flux_conditioning(prompts: list[str], clip_l: CLIPTextEncoder, clip_tokenizer: CLIPPromptTokenizer, t5: T5Encoder,
                      t5_tokenizer: T5PromptTokenizer,
                      t5_tokens: int = FLUX_DEV_T5_TOKENS) -> PooledText:
    """Prompts -> (T5 last hidden state (B, t5_tokens, d_model), CLIP-L pooled output without projection (B, 768))."""
    context = t5(t5_tokenizer(prompts, t5_tokens).to(device_of(t5)))
    pooled = clip_l(clip_tokenizer(prompts).to(device_of(clip_l))).pooled
    return PooledText(context, pooled.to(context.device))


# ----------------------------------------------------------------------------------------------------
# A source's text side behind one call: `text(prompts)` -> the conditioning its backbone's forward takes


@dataclass
class ZImageText:
    """Qwen3 features of the valid tokens: a list of (L_i, hidden) tensors, one per prompt."""

    encoder: Qwen3TextEncoder
    tokenizer: PromptTokenizer

    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        return encode_prompts(self.encoder, self.tokenizer, prompts)


@dataclass
class SD3Text:
    """CLIP-L, OpenCLIP bigG and (optionally) T5, assembled by `sd3_conditioning`."""

    clip_l: CLIPTextEncoder
    clip_l_tokenizer: CLIPPromptTokenizer
    clip_g: CLIPTextEncoder
    clip_g_tokenizer: CLIPPromptTokenizer
    t5: T5Encoder | None
    t5_tokenizer: T5PromptTokenizer | None
    joint_attention_dim: int
    t5_tokens: int = SD3_T5_TOKENS

    def __call__(self, prompts: list[str]) -> PooledText:
        return sd3_conditioning(prompts, self.clip_l, self.clip_l_tokenizer, self.clip_g, self.clip_g_tokenizer,
                                self.t5, self.t5_tokenizer, self.joint_attention_dim, self.t5_tokens)


@dataclass
class FluxText:
    """T5 context and CLIP-L pooled output, assembled by `flux_conditioning`."""

    clip_l: CLIPTextEncoder
    clip_tokenizer: CLIPPromptTokenizer
    t5: T5Encoder
    t5_tokenizer: T5PromptTokenizer
    t5_tokens: int = FLUX_DEV_T5_TOKENS

    def __call__(self, prompts: list[str]) -> PooledText:
        return flux_conditioning(prompts, self.clip_l, self.clip_tokenizer, self.t5, self.t5_tokenizer, self.t5_tokens)


def conditioning_parts(conditioning) -> list[dict[str, torch.Tensor]]:
    """A batch's conditioning as one dict of tensors per prompt: what train.py's feature cache stores."""
    if isinstance(conditioning, PooledText):
        return [{"context": c, "pooled": p} for c, p in zip(conditioning.context, conditioning.pooled)]
    return [{"features": f} for f in conditioning]


def conditioning_from_parts(parts: list[dict[str, torch.Tensor]]):
    """Inverse of `conditioning_parts`."""
    if "pooled" in parts[0]:
        return PooledText(torch.stack([p["context"] for p in parts]), torch.stack([p["pooled"] for p in parts]))
    return [p["features"] for p in parts]


# ----------------------------------------------------------------------------------------------------
# The 16-channel AutoencoderKL (FLUX / SD3 / Z-Image VAE), diffusers layout

VAE_NORM_EPS = 1e-6
VAE_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class VAEConfig:
    """Fields of the hub's vae/config.json (FLUX / Z-Image values as defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config: act_fn {d['act_fn']!r} is not supported (expected silu)")
        return cls(**config_fields(cls, d))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=VAE_NORM_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=VAE_NORM_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels of the lowest-resolution feature map."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=VAE_NORM_EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.to_out[0](out).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 conv after an asymmetric (right, bottom) zero pad, as the LDM VAE."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_resnets)])
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if down else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1) for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups  # up_blocks[0] is the lowest resolution
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < len(ch) - 1) for i in range(len(ch))]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> model latents, with the config's shift and scale applied on both sides."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> raw posterior mean and log-variance (B, latent, H/f, W/f)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*VAE_LOGVAR_RANGE)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model latents (z - shift) * scale, from the posterior mean, or a posterior sample with a generator."""
        mean, logvar = self.encode_moments(images)
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * noise.to(mean.device)
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> images in about [-1, 1] (unclamped)."""
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
