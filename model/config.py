"""LlamaConfig: every number that fixes a LLaMA-family model's shape, plus presets.

Field names are ours (short, gpt-fast style); `from_hf` / `to_hf` translate to and from the
Hugging Face `config.json` so checkpoints round-trip with transformers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class LlamaConfig:
    dim: int = 4096                  # hidden size
    n_layers: int = 32
    n_heads: int = 32                # query heads
    n_kv_heads: int | None = None    # key/value heads (GQA); None = n_heads (MHA)
    vocab_size: int = 32000
    ffn_dim: int = 11008             # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False     # lm_head shares the embedding matrix
    head_dim: int | None = None      # None = dim // n_heads
    attention: str = "sdpa"          # sdpa | eager | triton  (see model/llama.py)
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2
    extra: dict = field(default_factory=dict)  # other HF fields, kept for a faithful round trip

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.attention not in ("sdpa", "eager", "triton"):
            raise ValueError(f"attention={self.attention!r}: choose sdpa, eager or triton")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"rope_scaling type {kind!r} not supported (llama3, linear)")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from a transformers LlamaConfig dict; `source` names the file in errors."""
        model_type = hf.get("model_type")
        if model_type not in ("llama", "mistral", None) or (
                "architectures" in hf and not any("Llama" in a or "Mistral" in a for a in hf["architectures"])):
            raise ValueError(f"{source}: model_type={model_type!r} architectures={hf.get('architectures')} "
                             "is not a LLaMA-family model")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in hf:
                raise ValueError(f"{source}: missing required field {key!r}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not supported")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "max_position_embeddings", "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id"}
        return cls(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"],
            ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0), rope_scaling=hf.get("rope_scaling"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False), head_dim=hf.get("head_dim"),
            bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict:
        """The transformers config.json dict for this model."""
        hf = {k: v for k, v in self.extra.items() if k not in ("torch_dtype", "dtype")}
        hf.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "head_dim": self.head_dim,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
        })
        return hf

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008,
                             norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, ffn_dim=13824,
                              norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                             ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                             bos_id=128000, eos_id=[128001, 128009]),
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                               ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_SCALING), max_seq_len=131072,
                               bos_id=128000, eos_id=[128001, 128008, 128009]),
    "smollm2-135m": LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True, bos_id=1, eos_id=2),
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=128,
                        norm_eps=1e-5, max_seq_len=128),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A copy of a named preset with field overrides, e.g. preset('tiny', vocab_size=1000)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
