"""A LLaMA-family decoder in one file: RMSNorm, rotary embedding, GQA attention with a KV cache,
SwiGLU MLP, tied or untied head.

Module and parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so an
HF state dict loads with no renaming, and q/k use HF's rotate-half rotary layout, so no
permutation either. The model knows nothing about FSDP, LoRA or the trainer: those are applied
from outside (train/, model/lora.py). Compute-heavy pieces go through the one kernel dispatch
point, `kernels`, which picks a Triton kernel or the plain-PyTorch reference.

Shapes: B batch, T new tokens, S keys seen (cache + new), D model dim, H query heads,
K key/value heads, hd head dim, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from model.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., D] -> [..., D]."""
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Rotation speed of each of the hd/2 pairs: theta^(-2i/hd), rescaled for long context.

    llama3 scaling (Llama 3.1) leaves high frequencies alone, divides low frequencies (wavelength
    longer than the original context / low_freq_factor) by `factor`, and interpolates smoothly
    in between. 'linear' divides all of them by `factor`.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions[B,T] (int) -> cos, sin [B,T,hd], computed in fp32 then cast (as HF does)."""
    angles = positions[..., None].float() * inv_freq  # [B,T,hd/2]
    angles = torch.cat((angles, angles), dim=-1)      # rotate-half layout: both halves share angles
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Keys and values of every layer for up to max_len positions: k/v [L, B, K, max_len, hd].

    `length` positions are filled; all rows advance together (left padding keeps them aligned).
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v[B,K,T,hd] after the filled part; return all keys/values so far [B,K,S,hd]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.k.shape[3]}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask(T: int, S: int, key_mask: torch.Tensor | None, device,
                   segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool [B or 1, 1, T, S] (True = may attend) or None when plain causal attention suffices.

    Query t sits at absolute position S-T+t and sees keys up to it (causal), minus padded keys.
    A left-padding query that would see no key at all is let to see itself: its output is never
    used, and this keeps softmax free of NaN.
    segments[B,T] (training, T == S): document id of each token of a packed block; a token sees
    only earlier tokens of its own document, so packed documents never attend to each other.
    """
    if key_mask is None and segments is None and T == S:
        return None
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)[None, None]
    if segments is not None:
        if T != S:
            raise ValueError("segments (packed documents) work without a KV cache only")
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :]).to(device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :S].to(device)
        diagonal = torch.zeros(T, S, dtype=torch.bool, device=device)
        diagonal[torch.arange(T, device=device), torch.arange(S - T, S, device=device)] = True
        allowed = allowed | diagonal
    return allowed


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        H, K, hd, D = config.n_heads, config.n_kv_heads, config.head_dim, config.dim
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, K * hd, bias=False)
        self.v_proj = nn.Linear(D, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """x[B,T,D] -> [B,T,D]."""
        B, T, _ = x.shape
        hd = self.config.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B,H,T,hd]
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B,K,T,hd]
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self._attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, mask):
        """q[B,H,T,hd], k/v[B,K,S,hd], mask None (causal) or bool [B,1,T,S] -> [B,H,T,hd]."""
        backend = self.config.attention
        if backend == "eager":
            return kernels.attention_reference(q, k, v, causal=mask is None, mask=mask)
        if backend == "triton" and mask is None:
            return kernels.flash_attention(q, k, v, causal=True)
        # sdpa, and triton with a padding/cache mask (generation), which the flash kernel does
        # not take: PyTorch's fused attention computes the same math.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        """x[B,T,D] -> down(silu(gate(x)) * up(x)) [B,T,D]."""
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's `model.*` submodule."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Activation checkpointing: recompute each block in backward instead of storing its
        # activations. Set from outside (the trainer), read only in forward.
        self.checkpoint_blocks = False

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                return_hidden: bool = False, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens[B,T] -> logits[B,T,V] (or final hidden states [B,T,D] if return_hidden).

        positions[B,T]: rotary positions (default: cache.length + 0..T-1).
        cache: a KVCache; the new keys/values are appended and cache.length advances by T.
        key_mask[B,S]: False at padded key positions (S = cache length + T); None = no padding.
        segments[B,T]: document ids of a packed training block (see `attention_mask`); pass
        positions that restart at 0 for each document with it.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, tokens.device), positions, x.dtype)
        mask = attention_mask(T, start + T, key_mask, tokens.device, segments)
        for block in self.model.layers:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init as HF does: normal(0, std) for linear and embedding weights, ones for norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
