"""A LLaMA-family decoder in one file: RMSNorm, rotary embedding (plain, linear, llama3, dynamic
NTK, YaRN), GQA attention with a KV cache, SwiGLU MLP, optional projection biases (Qwen2's q/k/v),
tied or untied head. One model serves Llama, Mistral and Qwen2 checkpoints (model/config.py).

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

import kernels
from model.config import LlamaConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's, when it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., D] -> [..., D]."""
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig, device=None, seq_len: int | None = None) -> torch.Tensor:
    """Rotation speed of each of the hd/2 pairs [hd/2]: theta^(-2i/hd), rescaled for long context
    as transformers' modeling_rope_utils does for each rope_type:

    linear:  all divided by `factor`.
    llama3:  (Llama 3.1) high frequencies kept, low ones (wavelength longer than the original
             context / low_freq_factor) divided by `factor`, a smooth blend in between.
    dynamic: (NTK) theta grows with the sequence length seq_len once it passes max_seq_len;
             below it plain rope. seq_len = the highest position + 1 of the current forward.
    yarn:    interpolated (divided by `factor`) below a ramp of pair indices, extrapolated
             (kept) above it; see `rope_attention_factor` for its cos/sin scale.
    """
    hd = config.head_dim
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd  # 2i/hd
    if kind == "yarn":
        return _yarn_inv_freq(config, exponents)
    theta = _dynamic_theta(config, seq_len) if kind == "dynamic" else config.rope_theta
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _dynamic_theta(config: LlamaConfig, seq_len: int | None):
    """NTK-aware base for a sequence of seq_len positions: theta * (factor * seq_len / max_seq_len
    - (factor - 1)) ^ (hd / (hd - 2)). Computed as transformers does at run time, from a tensor
    length in float32, so the frequencies match it to the last bit."""
    if seq_len is None or seq_len <= config.max_seq_len:
        return config.rope_theta
    factor, hd = config.rope_scaling["factor"], config.head_dim
    length = torch.tensor(seq_len, dtype=torch.int64)
    return config.rope_theta * ((factor * length / config.max_seq_len) - (factor - 1)) ** (hd / (hd - 2))


def _yarn_factor(config: LlamaConfig) -> float:
    scaling = config.rope_scaling
    if scaling["factor"] is not None:
        return scaling["factor"]
    return config.max_seq_len / scaling["original_max_position_embeddings"]


def _yarn_inv_freq(config: LlamaConfig, exponents: torch.Tensor) -> torch.Tensor:
    """YaRN: pair i keeps its speed (extrapolation) if it turns more than beta_fast times over the
    original context, is divided by `factor` (interpolation) if less than beta_slow times, and
    is blended linearly between the two pair indices."""
    scaling, hd, theta = config.rope_scaling, config.head_dim, config.rope_theta
    factor, old_ctx = _yarn_factor(config), scaling["original_max_position_embeddings"]
    pos_freqs = theta ** exponents
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def pair_index(turns: float) -> float:  # the (fractional) pair that turns `turns` times over old_ctx
        return hd * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(scaling.get("beta_fast") or 32), pair_index(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # a ramp of width 0 would divide by zero
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(exponents.device)
    keep = 1 - ramp  # share of the extrapolated (unscaled) speed
    return interpolated * (1 - keep) + extrapolated * keep


def rope_attention_factor(config: LlamaConfig) -> float:
    """The scale YaRN puts on cos and sin (so on every attention logit, squared): the config's
    attention_factor, else 0.1 ln(factor) + 1 (or the mscale / mscale_all_dim ratio). 1 otherwise."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = _yarn_factor(config)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """positions[B,T] (int) -> cos, sin [B,T,hd] (times `scale`), in fp32 then cast (as HF does)."""
    angles = positions[..., None].float() * inv_freq  # [B,T,hd/2]
    angles = torch.cat((angles, angles), dim=-1)      # rotate-half layout: both halves share angles
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rope_tables(config: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B,T,hd] for positions[B,T] under the config's rope type.

    Dynamic rope depends on the longest sequence: like transformers, the frequencies of a forward
    come from its highest position + 1. During KV-cache decoding the cached keys keep the
    rotation they were given when computed; each new token uses the frequencies of its own
    length. That is what transformers' generate does too (it recomputes inv_freq as the length
    grows and never re-rotates its cache).
    """
    dynamic = (config.rope_scaling or {}).get("rope_type") == "dynamic"
    seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else None
    inv_freq = rope_inv_freq(config, positions.device, seq_len)
    return rope_cos_sin(inv_freq, positions, dtype, rope_attention_factor(config))


class KVCache:
    """Keys and values of every layer for up to max_len positions, allocated once: per layer
    k/v [B, K, max_len, hd]; plus the rotary tables of those positions, cos/sin [max_len, hd],
    computed once (fp32, cast when read) instead of at every decoding step.

    Two ways to write it:
    - append (prefill, eager decoding): `update` stores the T new keys after the `length` filled
      positions and returns the filled part [B,K,S,hd]; Llama.forward advances `length`.
    - slot (the compiled one-token step of model.generate): `slot` is a [1] int tensor naming the
      position to write; `update` stores there and returns the whole buffers [B,K,max_len,hd], so
      every step has the same shapes and compiles once. Unfilled positions hold zeros; the
      step's attention mask (`key_mask` [B, max_len], True = filled and not padding) hides them.
    All rows advance together (left padding keeps them aligned).
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.max_len, self.length = max_len, 0
        self.slot: torch.Tensor | None = None
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.config, self.cos, self.sin = config, None, None
        # Dynamic rope changes its frequencies with the sequence length past max_seq_len, so its
        # table is only fixed while every position stays within it.
        if (config.rope_scaling or {}).get("rope_type") != "dynamic" or max_len <= config.max_seq_len:
            positions = torch.arange(max_len, device=device)
            self.cos, self.sin = rope_cos_sin(rope_inv_freq(config, device), positions, torch.float32,
                                              rope_attention_factor(config))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B,T,hd] for positions[B,T] (each < max_len): rows of the precomputed tables."""
        if self.cos is None:
            return rope_tables(self.config, positions, dtype)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v[B,K,T,hd]; return the keys/values to attend to (see the class docstring)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_mask(T: int, S: int, key_mask: torch.Tensor | None, device,
                   segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool [B or 1, 1, T, S] (True = may attend), or None when no mask is needed (plain causal
    attention; one query without padding).

    Query t sits at absolute position S-T+t and sees keys up to it (causal), minus padded keys.
    A left-padding query that would see no key at all is let to see itself: its output is never
    used, and this keeps softmax free of NaN.
    segments[B,T] (training, T == S): document id of each token of a packed block; a token sees
    only earlier tokens of its own document, so packed documents never attend to each other.
    """
    if key_mask is None and segments is None and T == S:
        return None
    if T == 1 and segments is None:
        # One query at the last position (a decoding step): causality hides nothing from it,
        # so only padding matters: None, or a view of the caller's mask (no allocation per
        # token). Its own key must be real, as the newest token of a left-padded row is.
        return None if key_mask is None else key_mask[:, None, None, :S].to(device)
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
        bias = config.proj_bias  # e.g. Qwen2: q, k and v
        self.q_proj = nn.Linear(D, H * hd, bias="q_proj" in bias)
        self.k_proj = nn.Linear(D, K * hd, bias="k_proj" in bias)
        self.v_proj = nn.Linear(D, K * hd, bias="v_proj" in bias)
        self.o_proj = nn.Linear(H * hd, D, bias="o_proj" in bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, segments: torch.Tensor | None = None):
        """x[B,T,D] -> [B,T,D]. segments[B,T]: document ids of a packed block (then mask is None)."""
        B, T, _ = x.shape
        hd = self.config.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B,H,T,hd]
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B,K,T,hd]
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self._attend(q, k, v, mask, segments)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, mask, segments=None):
        """q[B,H,T,hd], k/v[B,K,S,hd], mask None (causal) or bool [B,1,T,S] -> [B,H,T,hd].
        segments[B,T] (packed training, causal, no mask): kernels.attention keeps documents apart."""
        if segments is not None:
            return kernels.attention(q, k, v, segments=segments)
        backend = self.config.attention
        # Without a mask: causal, except for one query (a decoding step), which sees every key.
        # (SDPA's is_causal aligns the queries to the first keys, wrong for T=1 < S.)
        causal = mask is None and q.shape[2] > 1
        if backend == "eager":
            return kernels.attention_reference(q, k, v, causal=causal, mask=mask)
        if backend == "triton" and mask is None:
            return kernels.flash_attention(q, k, v, causal=causal)
        # sdpa, and triton with a padding/cache mask (generation), which the flash kernel does
        # not take: PyTorch's fused attention computes the same math.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.proj_bias
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias="gate_proj" in bias)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias="up_proj" in bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias="down_proj" in bias)

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

    def forward(self, x, cos, sin, mask, cache=None, segments=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segments)
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

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                return_hidden: bool = False, segments: torch.Tensor | None = None,
                loss_chunk_size: int = kernels.CHUNK_TOKENS) -> torch.Tensor:
        """tokens[B,T] -> logits[B,T,V] (or final hidden states [B,T,D] if return_hidden), or with
        labels[B,T] (next-token targets, already shifted; IGNORE_INDEX = no loss) the fp32 SUM of
        their cross-entropy (see `loss_sum`).

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
        window = self.config.sliding_window
        if window is not None and start + T > window:
            raise ValueError(f"{start + T} positions exceed sliding_window={window}: sliding-window "
                             "attention is not implemented")
        x = self.model.embed_tokens(tokens)
        cos, sin = (cache.rope(positions, x.dtype) if cache is not None
                    else rope_tables(self.config, positions, x.dtype))
        # Packed training documents reach kernels.attention as ids (it never needs a dense
        # [B,1,T,T] mask on GPU); padding and caches (generation) and eager attention use the mask.
        packed = segments is not None and key_mask is None and cache is None and self.config.attention != "eager"
        mask = None if packed else attention_mask(T, start + T, key_mask, tokens.device, segments)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache, segments if packed else None)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if labels is not None:
            return self.loss_sum(x, labels, loss_chunk_size)
        return x if return_hidden else self.lm_head(x)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor,
                 chunk_size: int = kernels.CHUNK_TOKENS) -> torch.Tensor:
        """hidden[B,T,D] (final norm applied), labels[B,T] -> fp32 scalar: the SUM of cross-entropy
        over tokens whose label != IGNORE_INDEX (0 if there is none).

        A sum, not a mean, so a trainer can divide by the loss-token count of a whole step. The
        head and the loss are fused (kernels.linear_cross_entropy): `chunk_size` tokens' logits
        exist at a time, never all [B*T, V]. Under autocast both inputs are cast to its dtype
        (the kernel's gradients are computed in forward, outside autocast's reach).
        """
        head = getattr(self.lm_head, "weight", None)
        if head is None or not head.is_floating_point():  # int8 codes are not the weights
            raise TypeError(f"Llama.loss_sum: the head is a quantised {type(self.lm_head).__name__} (inference "
                            "only); call the model without labels and score its logits")
        flat = labels.reshape(-1)
        count = (flat != kernels.IGNORE_INDEX).sum()
        dtype = compute_dtype(hidden)
        mean = kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).to(dtype),
                                            head.to(dtype), flat, kernels.IGNORE_INDEX, chunk_size)
        # The kernel divides by max(count, 1); multiplying back gives the exact sum.
        return mean.float() * count

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init as HF does: normal(0, std) for linear and embedding weights, ones for norms,
        zeros for biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
