"""Everything that turns inputs into tokens and back.

Text: prompt tokenization with `tokenizers` (Z-Image's chat formatting of a Qwen3 byte-level BPE) and the
Qwen3 text encoder whose second-to-last hidden state conditions Z-Image.
Images: the 16-channel AutoencoderKL, the *latent* tokenizer that only the source model needs (synth.py).
The *pixel* tokenizer that replaces it after transfer is a plain reshape, `model.patchify`.

Module and parameter names mirror the transformers / diffusers layouts so hub safetensors load as stored.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

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
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        kwargs["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))
        kwargs.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        return cls(**kwargs)


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

    def forward(self, x, cos, sin, mask):
        # (B, L, D) -> (B, heads, L, head_dim)
        q = self.q_norm(self.q_proj(x).unflatten(-1, (-1, self.cfg.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).unflatten(-1, (-1, self.cfg.head_dim))).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (-1, self.cfg.head_dim)).transpose(1, 2)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
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

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
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
        inv_freq = 1.0 / self.cfg.rope_theta ** (
            torch.arange(0, self.cfg.head_dim, 2, dtype=torch.float32, device=ids.device) / self.cfg.head_dim
        )
        angles = torch.arange(L, dtype=torch.float32, device=ids.device)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
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
        names = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names and v is not None}
        return cls(**kwargs)


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
