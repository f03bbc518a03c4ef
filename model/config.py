"""LlamaConfig: every number that fixes a LLaMA-family model's shape, plus presets.

Field names are ours (short, gpt-fast style); `from_hf` / `to_hf` translate to and from the
Hugging Face `config.json` so checkpoints round-trip with transformers.

Families: Llama 2/3/3.1/3.2 (model_type llama), Mistral (mistral) and Qwen2/2.5 (qwen2, bias on
q/k/v). Both config generations are read: transformers < 5 (top-level `rope_theta` +
`rope_scaling`) and transformers 5 (`rope_parameters`); `to_hf` writes what transformers 5 writes.
Every key of a config.json is either honoured, known not to change the numbers, or refused in
one line naming the file and the key: a config never loads into something that computes other
numbers than transformers would.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJ, MLP_PROJ = PROJECTIONS[:4], PROJECTIONS[4:]

# rope_type -> (required, optional) keys of the rope dict besides rope_type and rope_theta; the
# same sets transformers' validators check. Any other key in the dict is refused.
ROPE_KEYS: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
               frozenset()),
    "yarn": (frozenset({"factor", "original_max_position_embeddings"}),
             frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
}
_NEEDS_ORIGINAL_CONTEXT = ("llama3", "yarn")  # transformers fills original_max_position_embeddings for these


@dataclass(frozen=True)
class Family:
    """What one HF model class reads from config.json, and its defaults for absent keys."""
    architecture: str
    keys: frozenset       # family-specific config keys (beyond COMMON_KEYS)
    defaults: dict        # the transformers config class's defaults (tests compare them)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", frozenset({"attention_bias", "mlp_bias"}),
                    {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
                     "num_key_value_heads": None}),
    "mistral": Family("MistralForCausalLM", frozenset({"sliding_window"}),
                      {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2,
                       "num_key_value_heads": 8, "sliding_window": 4096}),
    "qwen2": Family("Qwen2ForCausalLM",
                    frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
                    {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
                     "num_key_value_heads": 32, "use_sliding_window": False, "sliding_window": 4096,
                     "max_window_layers": 28}),
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Keys every family reads; each is honoured or checked against the one value we implement.
COMMON_KEYS = frozenset(_REQUIRED + (
    "model_type", "architectures", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id", "hidden_act", "attention_dropout",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
    # seen in hub files; accepted only at the value that means plain LLaMA (checked in from_hf)
    "rope_interleaved", "use_mrope"))
# Keys that cannot change the logits (training setup, generation defaults, bookkeeping).
IGNORED_KEYS = frozenset({
    "pad_token_id", "initializer_range", "use_cache", "dtype", "torch_dtype", "transformers_version",
    "_name_or_path", "name_or_path", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "id2label",
    "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "transformers.js_config", "_commit_hash",
    "keys_to_ignore_at_inference", "use_return_dict",
    # markers written by real exporters: SmolLM2's hub config, unsloth's saves
    "is_llama_config", "unsloth_version", "unsloth_fixed",
    # Llama's pretraining_tp: transformers 5 no longer reads it (4.x split the matmuls into
    # pretraining_tp slices: the same product up to rounding)
    "pretraining_tp",
    # which attention kernel transformers runs: the same math
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_flash_attn_2_enabled",
    # generation settings transformers 4 still wrote into config.json (they live in generation_config.json)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens"})
_NOT_WRITTEN = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path", "name_or_path"})
_QWEN2_WINDOW_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


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
    # None (plain rope) or HF's dict without rope_theta: {"rope_type": "llama3" | "linear" |
    # "dynamic" | "yarn", "factor": ..., ...}; see model/llama.py for each type's frequencies.
    rope_scaling: dict | None = None
    max_seq_len: int = 4096          # max_position_embeddings (dynamic rope scales past it)
    tie_embeddings: bool = False     # lm_head shares the embedding matrix
    head_dim: int | None = None      # None = dim // n_heads
    attention: str = "sdpa"          # sdpa | eager | triton  (see model/llama.py)
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2
    family: str = "llama"            # HF model_type: llama | mistral | qwen2
    proj_bias: tuple[str, ...] = ()  # projections with a bias, e.g. ("q_proj", "k_proj", "v_proj") in Qwen2
    sliding_window: int | None = None  # Mistral/Qwen2 window; only accepted >= max_seq_len (see from_hf)
    extra: dict = field(default_factory=dict)  # other HF fields, kept for a faithful round trip

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        self.proj_bias = tuple(self.proj_bias)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.attention not in ("sdpa", "eager", "triton"):
            raise ValueError(f"attention={self.attention!r}: choose sdpa, eager or triton")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: choose one of {sorted(FAMILIES)}")
        if not set(self.proj_bias) <= set(PROJECTIONS):
            raise ValueError(f"proj_bias={self.proj_bias}: names must be among {PROJECTIONS}")
        if self.sliding_window is not None and self.family == "llama":
            raise ValueError("sliding_window: Llama models have no sliding-window attention")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default")
            _check_rope_keys(kind, set(self.rope_scaling) - {"rope_type"}, "LlamaConfig", "rope_scaling")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from a transformers config.json dict (either generation); `source` names the file
        in errors. Raises ValueError, one line, for any key that would change the numbers and is
        not implemented."""
        family = _family(hf, source)
        for key in _REQUIRED:
            if key not in hf:
                raise ValueError(f"{source}: missing required field {key!r}")
        _check_known_keys(hf, family, source)
        get = lambda key, default=None: hf.get(key, FAMILIES[family].defaults.get(key, default))  # noqa: E731
        _require_value(hf, "hidden_act", ("silu", "swish"), "silu", source)
        _require_value(hf, "attention_dropout", (0, 0.0, None), 0.0, source)
        _require_value(hf, "rope_interleaved", (False, None), False, source)  # True: GPT-J-style pairs
        _require_value(hf, "use_mrope", (False, None), False, source)  # True: Qwen2-VL multimodal rope
        max_seq_len = get("max_position_embeddings")
        rope_theta, rope_scaling = _rope_from_hf(hf, max_seq_len, source)
        return cls(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=get("num_key_value_heads"), vocab_size=hf["vocab_size"],
            ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta, rope_scaling=rope_scaling, max_seq_len=max_seq_len,
            tie_embeddings=hf.get("tie_word_embeddings", False), head_dim=hf.get("head_dim"),
            bos_id=get("bos_token_id"), eos_id=get("eos_token_id"), family=family,
            proj_bias=_proj_bias(hf, family), sliding_window=_sliding_window(hf, family, max_seq_len, source),
            extra={k: v for k, v in hf.items()
                   if (k in IGNORED_KEYS or (family == "qwen2" and k in _QWEN2_WINDOW_KEYS)) and k not in _NOT_WRITTEN},
        )

    def to_hf(self) -> dict:
        """The transformers config.json dict for this model, in the form transformers 5 writes:
        rope settings only under rope_parameters (no top-level rope_theta / rope_scaling)."""
        hf = dict(self.extra)
        hf.update({
            "architectures": [FAMILIES[self.family].architecture], "model_type": self.family,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps, "max_position_embeddings": self.max_seq_len,
            "rope_parameters": {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_embeddings, "head_dim": self.head_dim,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "hidden_act": "silu",
            "attention_dropout": 0.0,
        })
        hf.update(self._family_keys_to_hf())
        return hf

    def _family_keys_to_hf(self) -> dict:
        """The keys through which this family's HF class learns about biases and windows."""
        bias = set(self.proj_bias)
        if self.family == "llama" and all(bias.isdisjoint(group) or bias >= set(group)
                                          for group in (ATTENTION_PROJ, MLP_PROJ)):
            return {"attention_bias": bias >= set(ATTENTION_PROJ), "mlp_bias": bias >= set(MLP_PROJ),
                    "pretraining_tp": self.extra.get("pretraining_tp", 1)}
        if self.family == "mistral" and not bias:
            return {"sliding_window": self.sliding_window}
        if self.family == "qwen2" and bias == {"q_proj", "k_proj", "v_proj"}:
            return self._qwen2_window_keys()
        raise ValueError(f"proj_bias={self.proj_bias} cannot be expressed in a transformers {self.family} config")

    def _qwen2_window_keys(self) -> dict:
        """The stored Qwen2 window keys, completed as transformers 5's Qwen2Config does."""
        get = lambda key: self.extra.get(key, FAMILIES["qwen2"].defaults.get(key))  # noqa: E731
        window = get("sliding_window") if get("use_sliding_window") else None
        layer_types = self.extra.get("layer_types") or [
            "sliding_attention" if window is not None and i >= get("max_window_layers") else "full_attention"
            for i in range(self.n_layers)]
        return {"use_sliding_window": get("use_sliding_window"), "sliding_window": window,
                "max_window_layers": get("max_window_layers"), "layer_types": layer_types}

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


# ---- reading config.json: one check per concern, each failing in one line ---------------------

def _family(hf: dict, source: str) -> str:
    """model_type, checked against architectures; ValueError for anything but our families."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type={model_type!r} architectures={hf.get('architectures')} "
                         f"is not a LLaMA-family model (supported: {', '.join(FAMILIES)})")
    expected = FAMILIES[model_type].architecture
    if hf.get("architectures") not in (None, [expected]):
        raise ValueError(f"{source}: architectures={hf['architectures']} do not match model_type "
                         f"{model_type!r} (expected [{expected!r}])")
    return model_type


def _check_known_keys(hf: dict, family: str, source: str) -> None:
    """Refuse a key we neither implement nor know to be harmless: it may change the numbers."""
    known = COMMON_KEYS | FAMILIES[family].keys | IGNORED_KEYS
    for key in hf:
        if key not in known:
            raise ValueError(f"{source}: key {key!r} is not supported for model_type {family!r} "
                             "(it may change the numbers; known keys are honoured or provably harmless)")


def _require_value(hf: dict, key: str, allowed: tuple, default, source: str) -> None:
    if hf.get(key, default) not in allowed:
        raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {allowed[0]!r})")


def _rope_from_hf(hf: dict, max_seq_len: int, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either config generation, as transformers 5 reads
    them: a non-empty legacy rope_scaling wins over rope_parameters, rope_theta inside the dict
    wins over the top-level one. Any disagreement between two places is refused instead."""
    legacy, current = hf.get("rope_scaling") or None, hf.get("rope_parameters") or None
    where = "rope_scaling" if legacy else "rope_parameters"
    rope = dict(legacy or current or {})
    if legacy and current:
        other = {k: v for k, v in _with_rope_type(dict(current), "rope_parameters", source).items()
                 if k != "rope_theta"}
        if other != {k: v for k, v in _with_rope_type(dict(rope), where, source).items() if k != "rope_theta"}:
            raise ValueError(f"{source}: rope_scaling={legacy} contradicts rope_parameters={current} "
                             "(transformers 5 uses rope_scaling; remove one)")
    rope = _with_rope_type(rope, where, source)
    kind = rope.pop("rope_type")
    theta = _one_value(hf, rope, "rope_theta", where, source, 10000.0)
    partial = _one_value(hf, rope, "partial_rotary_factor", where, source, 1.0)
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (rotary on the whole head only)")
    if kind not in ROPE_KEYS:
        raise ValueError(f"{source}: {where}.rope_type={kind!r} is not supported ({', '.join(ROPE_KEYS)})")
    if "original_max_position_embeddings" in hf:
        if kind not in _NEEDS_ORIGINAL_CONTEXT:
            raise ValueError(f"{source}: original_max_position_embeddings is not used by rope_type {kind!r}; remove it")
        # transformers gives the top-level value priority over the rope dict's (the Phi-3 rule)
        _one_value(hf, rope, "original_max_position_embeddings", where, source, None)
        rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    if kind in _NEEDS_ORIGINAL_CONTEXT:
        rope.setdefault("original_max_position_embeddings", max_seq_len)
    _check_rope_keys(kind, set(rope), source, where)
    return float(theta), (None if kind == "default" else {"rope_type": kind, **rope})


def _with_rope_type(rope: dict, where: str, source: str) -> dict:
    """rope dict with 'rope_type' (the legacy name is 'type'; both present must agree)."""
    if "type" in rope:
        legacy = rope.pop("type")
        if rope.setdefault("rope_type", legacy) != legacy:
            raise ValueError(f"{source}: {where}.type={legacy!r} contradicts {where}.rope_type={rope['rope_type']!r}")
    rope.setdefault("rope_type", "default")
    return rope


def _one_value(hf: dict, rope: dict, key: str, where: str, source: str, default):
    """A setting that may sit at the top level or in the rope dict (popped from it): one value."""
    inner, outer = rope.pop(key, None), hf.get(key)
    if inner is not None and outer is not None and inner != outer:
        raise ValueError(f"{source}: {key}={outer} contradicts {where}.{key}={inner} "
                         "(transformers 5 reads the rope dict's; remove the other)")
    return inner if inner is not None else outer if outer is not None else default


def _check_rope_keys(kind: str, keys: set, source: str, where: str) -> None:
    """Refuse an unknown rope_type, a missing required key or a key this type does not use."""
    if kind not in ROPE_KEYS:
        raise ValueError(f"{source}: {where}.rope_type={kind!r} is not supported ({', '.join(ROPE_KEYS)})")
    required, optional = ROPE_KEYS[kind]
    missing, unused = sorted(required - keys), sorted(keys - required - optional)
    if missing:
        raise ValueError(f"{source}: {where}.{missing[0]} is required for rope_type {kind!r}")
    if unused:
        raise ValueError(f"{source}: {where}.{unused[0]} is not used by rope_type {kind!r} (not supported)")


def _proj_bias(hf: dict, family: str) -> tuple[str, ...]:
    """Which projections carry a bias: Qwen2 always q/k/v; Llama per attention_bias/mlp_bias."""
    if family == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    if family == "llama":
        return (ATTENTION_PROJ if hf.get("attention_bias") else ()) + (MLP_PROJ if hf.get("mlp_bias") else ())
    return ()


def _sliding_window(hf: dict, family: str, max_seq_len: int, source: str) -> int | None:
    """The attention window some layer uses, or None. Sliding-window attention is not
    implemented: a window shorter than the model's context is refused here, and a longer one is
    kept so that Llama.forward refuses any sequence that would reach it."""
    defaults = FAMILIES[family].defaults
    window = hf.get("sliding_window", defaults.get("sliding_window"))
    if family == "qwen2":
        window = window if hf.get("use_sliding_window", False) else None
        n_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", defaults["max_window_layers"]) else "full_attention"
            for i in range(n_layers)]
        if len(layer_types) != n_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"{source}: layer_types={layer_types} is not {n_layers} of full_attention/sliding_attention")
        if "sliding_attention" not in layer_types:
            window = None
    if window is not None and window < max_seq_len:
        raise ValueError(f"{source}: sliding_window={window} is shorter than max_position_embeddings="
                         f"{max_seq_len}; sliding-window attention is not supported")
    return window


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
