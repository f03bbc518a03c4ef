"""Every config we claim to read, as transformers 5 writes it, loads into our model with
transformers' logits, or is refused in one line before any tensor is read.

Each case is a random tiny model built by transformers (fixed seed) and saved by its own
save_pretrained, so config.json has the real transformers 5 form (rope_parameters, layer_types,
dtype...). Logits are compared in fp32 at 48 positions: past the original context of every
scaled rope (16 positions), where a dropped or misread scaling changes the numbers (guarded
below). The same weights in the transformers 4 form (top-level rope_theta / rope_scaling, written
by hand as old versions did) give the same numbers. Our save() writes a folder that transformers
loads as the right class with the same logits, and a config.json equal to its own.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import load, save
from model.config import FAMILIES, LlamaConfig
from model.llama import KVCache, Llama, rope_tables
from tests.conftest import need_module

TOL = 1e-4
SEQ = 48          # past ORIGINAL_CTX: the rotary frequencies there depend on the scaling
ORIGINAL_CTX = 16
CONFIG_CLASS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
# initializer_range 0.1 (not 0.02) makes attention far from uniform, so rotary errors show.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=128, max_position_embeddings=64, initializer_range=0.1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX}

CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "llama-head-dim-32": ("llama", dict(head_dim=32)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-pretraining-tp-2": ("llama", dict(pretraining_tp=2)),  # read by no transformers 5 code
    "llama-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0})),
    "llama-llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_CTX, "rope_theta": 500000.0})),
    # dynamic NTK scales past max_position_embeddings itself
    "llama-dynamic": ("llama", dict(max_position_embeddings=ORIGINAL_CTX,
                                    rope_parameters={"rope_type": "dynamic", "factor": 4.0})),
    "llama-yarn": ("llama", dict(rope_parameters=dict(YARN))),
    # 32 pairs, theta 100 and small betas put YaRN's ramp (pairs 3.7 to 11.3) inside the head, so
    # beta_fast, beta_slow and truncate each change the frequencies
    "llama-yarn-mscale": ("llama", dict(head_dim=64, rope_parameters={
        **YARN, "rope_theta": 100.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 1.5, "beta_slow": 0.5,
        "truncate": False})),
    "llama-yarn-attention-factor": ("llama", dict(head_dim=32, rope_parameters={**YARN, "attention_factor": 1.25})),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "mistral-window-at-context": ("mistral", dict(sliding_window=64)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-yarn-untied": ("qwen2", dict(rope_parameters=dict(YARN), rope_theta=1000000.0)),
    "qwen2-head-dim-32": ("qwen2", dict(head_dim=32, tie_word_embeddings=True)),
}
SCALED = [name for name, (_, kw) in CASES.items() if kw.get("rope_parameters", {}).get("rope_type")]


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (fp32, eager attention)."""
    transformers = need_module("transformers")
    config = getattr(transformers, CONFIG_CLASS[family])(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def tokens(n: int = SEQ, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, its save_pretrained folder, its logits on tokens()); built once."""
    built = {}

    def get(case):
        if case not in built:
            family, overrides = CASES[case]
            hf = hf_model(family, **overrides)
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            with torch.no_grad():
                built[case] = hf, folder, hf(tokens()).logits
        return built[case]
    return get


def logits(model: Llama, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if x is None else x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_saved_checkpoint_gives_transformers_logits(case, saved):
    hf, folder, expected = saved(case)
    ours, tokenizer = load(folder, tokenizer=False)
    assert tokenizer is None and ours.config.family == CASES[case][0]
    assert max_diff(logits(ours), expected) < TOL


@pytest.mark.parametrize("case", SCALED)
def test_scaled_cases_are_past_the_original_context(case, saved):
    """Guards the matrix: the same weights with plain rope differ from transformers there."""
    _, folder, expected = saved(case)
    ours, _ = load(folder, tokenizer=False)
    plain = Llama(ours.config.replace(rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    assert max_diff(logits(plain), expected) > 10 * TOL


@pytest.mark.parametrize("case", SCALED)
def test_rotary_tables_are_the_same_floats_as_transformers(case, saved):
    """Stronger than the logits: cos/sin at positions 0..47 (with YaRN's scale) bit for bit."""
    hf, folder, _ = saved(case)
    ours, _ = load(folder, tokenizer=False)
    positions = torch.arange(SEQ)[None]
    want_cos, want_sin = hf.model.rotary_emb(torch.zeros(1), positions)
    cos, sin = rope_tables(ours.config, positions, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def to_legacy(config: dict) -> dict:
    """config.json as transformers 4 wrote it: top-level rope_theta, rope_scaling (legacy 'type'
    for linear/dynamic as before 4.42, rope_type otherwise), no rope_parameters."""
    legacy = dict(config)
    rope = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    legacy["rope_scaling"] = None if kind == "default" else (
        {"type": kind, **rope} if kind in ("linear", "dynamic") else {"rope_type": kind, **rope})
    legacy["torch_dtype"] = legacy.pop("dtype")
    legacy["transformers_version"] = "4.44.2"
    return legacy


@pytest.mark.parametrize("case", SCALED + ["llama-gqa-tied"])
def test_transformers4_config_form_gives_the_same_numbers(case, saved, tmp_path):
    transformers = need_module("transformers")
    _, folder, expected = saved(case)
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    legacy = to_legacy(json.loads((folder / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    ours, _ = load(tmp_path, tokenizer=False)
    assert max_diff(logits(ours), expected) < TOL
    # and the hand-written legacy file means the same to transformers itself
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        assert max_diff(hf(tokens()).logits, expected) < TOL


def test_top_level_original_context_is_read_as_transformers_reads_it(saved, tmp_path):
    """transformers gives a top-level original_max_position_embeddings priority over the rope
    dict's (for Phi-3); a config that has it only there means the same to both of us."""
    transformers = need_module("transformers")
    _, folder, expected = saved("llama-llama3")
    config = json.loads((folder / "config.json").read_text())
    config["original_max_position_embeddings"] = config["rope_parameters"].pop("original_max_position_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    ours, _ = load(tmp_path, tokenizer=False)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == ORIGINAL_CTX
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        assert max_diff(logits(ours), expected) < TOL and max_diff(hf(tokens()).logits, expected) < TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_hf_writes_what_transformers_writes(case, saved):
    """Every key of transformers' own config.json, with its value, and nothing contradicting it."""
    _, folder, _ = saved(case)
    theirs = json.loads((folder / "config.json").read_text())
    ours = LlamaConfig.from_hf(theirs).to_hf()
    for key in set(theirs) - {"transformers_version", "dtype"}:
        assert ours.get(key, "<absent>") == theirs[key], key
    assert set(ours) - set(theirs) <= {"head_dim"}  # Qwen2Config writes head_dim only when given
    assert "rope_theta" not in ours and "rope_scaling" not in ours


@pytest.mark.parametrize("case", ["llama-llama3", "llama-yarn-mscale", "mistral-window-at-context",
                                  "qwen2-yarn-untied", "qwen2-tied"])
def test_our_save_loads_in_transformers_as_the_right_class(case, saved, tmp_path):
    transformers = need_module("transformers")
    _, folder, expected = saved(case)
    ours, _ = load(folder, tokenizer=False)
    out = save(ours, None, tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert "rope_theta" not in config and "rope_scaling" not in config
    assert config["rope_parameters"] == json.loads((folder / "config.json").read_text())["rope_parameters"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == FAMILIES[CASES[case][0]].architecture
    with torch.no_grad():
        assert max_diff(hf(tokens()).logits, expected) < TOL


def test_dynamic_rope_kv_cache_decoding_matches_transformers_generate(saved):
    """Greedy decoding from 10 to 30 positions, past max_position_embeddings=16: transformers
    recomputes the frequencies as the sequence grows and keeps its cached keys as they were
    rotated; our cache does the same, step logits within 1e-4."""
    transformers = need_module("transformers")
    _, folder, _ = saved("llama-dynamic")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()  # fresh rope state
    prompt = tokens(10, batch=1)
    out = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    ours, _ = load(folder, tokenizer=False)
    cache = KVCache(ours.config, batch=1, max_len=30, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        step = ours(prompt, cache=cache)[:, -1]
        generated = []
        for score in out.scores:
            assert max_diff(step, score) < TOL
            generated.append(step.argmax(-1))
            step = ours(generated[-1][:, None], cache=cache)[:, -1]
        full = ours(out.sequences[:, :-1])[:, -1]  # one forward: every key rotated at length 29
    assert torch.equal(torch.stack(generated, 1), out.sequences[:, 10:])
    # the cached keys' older rotation matters: a single full forward gives other numbers
    assert max_diff(full, out.scores[-1]) > 10 * TOL


def test_sliding_window_at_the_context_length_refuses_longer_sequences(saved):
    _, folder, _ = saved("mistral-window-at-context")
    ours, _ = load(folder, tokenizer=False)
    with pytest.raises(ValueError, match="65 positions exceed sliding_window=64"):
        logits(ours, tokens(65))


# ---- refused at load: one line naming config.json and the key, before any tensor is read ------

def _edit(config: dict, **changes) -> dict:
    return {**config, **changes}


REFUSED = {
    # name: (family, transformers overrides, hand edit of the saved config.json, expected words)
    "longrope": ("llama", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}),
                 None, "rope_parameters.rope_type='longrope' is not supported (default, linear, dynamic, llama3, yarn)"),
    "partial-rotary": ("llama", dict(partial_rotary_factor=0.5), None, "partial_rotary_factor=0.5"),
    "gelu": ("llama", dict(hidden_act="gelu"), None, "hidden_act='gelu'"),
    "attention-dropout": ("llama", dict(attention_dropout=0.1), None, "attention_dropout=0.1"),
    "softcapping": ("llama", dict(attn_logit_softcapping=30.0), None, "'attn_logit_softcapping'"),
    "mistral-window": ("mistral", dict(sliding_window=16), None, "sliding_window=16 is shorter than"),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), None,
                     "sliding_window=16 is shorter than"),
    # what our save() wrote before it knew rope_parameters: a stale top-level rope_theta
    "stale-rope-theta": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
                         lambda c: _edit(c, rope_theta=10000.0, rope_scaling=None),
                         "rope_theta=10000.0 contradicts rope_parameters.rope_theta=100000.0"),
    "scaling-contradicts-parameters": ("llama", dict(rope_parameters=dict(YARN)),
                                       lambda c: _edit(c, rope_scaling={"type": "linear", "factor": 2.0}),
                                       "contradicts rope_parameters"),
    "type-contradicts-rope-type": ("llama", {}, lambda c: _edit(c, rope_parameters={
        "rope_type": "linear", "type": "dynamic", "factor": 2.0}), "type='dynamic' contradicts"),
    "unused-rope-key": ("llama", {}, lambda c: _edit(c, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}),
        "rope_parameters.original_max_position_embeddings is not used by rope_type 'dynamic'"),
    "original-context-contradiction": ("llama", dict(rope_parameters=dict(YARN)),
                                       lambda c: _edit(c, original_max_position_embeddings=8),
                                       "original_max_position_embeddings=8 contradicts "
                                       "rope_parameters.original_max_position_embeddings=16"),
    "quantized": ("llama", {}, lambda c: _edit(c, quantization_config={"quant_method": "gptq", "bits": 4}),
                  "'quantization_config'"),
    "architecture": ("qwen2", {}, lambda c: _edit(c, architectures=["LlamaForCausalLM"]),
                     "do not match model_type 'qwen2'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_config_is_refused_before_any_tensor_is_read(case, tmp_path):
    family, overrides, edit, words = REFUSED[case]
    hf_model(family, **overrides).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(edit(config) if edit else config))
    (tmp_path / "model.safetensors").write_bytes(b"not read: the config is refused first")
    with pytest.raises(ValueError) as err:
        load(tmp_path, tokenizer=False)
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'config.json'}: " in message and words in message, message


def test_family_defaults_are_transformers_defaults():
    """A config.json may omit keys; ours must fill them as each transformers config class does."""
    transformers = need_module("transformers")
    # 32 heads: Mistral's default is 8 key/value heads and Qwen2's 32
    required = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=32, intermediate_size=96, vocab_size=128)
    for family, cls in CONFIG_CLASS.items():
        theirs = getattr(transformers, cls)(**required).to_dict()
        if family == "mistral":  # its default window (4096) is shorter than its default context
            with pytest.raises(ValueError, match=f"sliding_window={theirs['sliding_window']} is shorter than "
                                                 f"max_position_embeddings={theirs['max_position_embeddings']}"):
                LlamaConfig.from_hf({"model_type": family, **required})
            required_here = dict(required, sliding_window=None)
            theirs = getattr(transformers, cls)(**required_here).to_dict()
        else:
            required_here = required
        ours = LlamaConfig.from_hf({"model_type": family, **required_here}).to_hf()
        for key in ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                    "eos_token_id", "tie_word_embeddings", "rope_parameters", "sliding_window",
                    "use_sliding_window", "max_window_layers", "attention_bias", "mlp_bias"):
            assert ours.get(key, "<absent>") == theirs.get(key, "<absent>"), (family, key)


# ---- config.json files as the hub ships them ---------------------------------------------------
HUB_CONFIGS = json.loads((Path(__file__).parent / "fixtures" / "hub_configs.json").read_text())


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_files_load_with_transformers_rotary_tables(name):
    """The config.json of real hub models (written by transformers 4.x, with their exporters'
    extra keys: SmolLM2's is_llama_config/rope_interleaved, Qwen2.5's use_mrope...) load, and
    their rotary tables equal transformers' far past the original context."""
    transformers = need_module("transformers")
    hub = HUB_CONFIGS[name]
    ours = LlamaConfig.from_hf(hub, source=f"{name}/config.json")
    theirs = getattr(transformers, CONFIG_CLASS[hub["model_type"]])(**hub)
    modeling = importlib.import_module(f"transformers.models.{hub['model_type']}.modeling_{hub['model_type']}")
    emb = getattr(modeling, CONFIG_CLASS[hub["model_type"]].replace("Config", "RotaryEmbedding"))(config=theirs)
    positions = torch.tensor([[0, 1, 100, 4000, 9000, 30000]])
    want_cos, want_sin = emb(torch.zeros(1), positions)
    cos, sin = rope_tables(ours, positions, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert (ours.dim, ours.n_kv_heads, ours.head_dim) == (hub["hidden_size"], hub["num_key_value_heads"],
                                                         hub.get("head_dim", hub["hidden_size"] // hub["num_attention_heads"]))


@pytest.mark.parametrize("key", ["rope_interleaved", "use_mrope"])
def test_hub_marker_keys_are_refused_at_the_value_that_changes_numbers(key):
    hub = dict(HUB_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"], **{key: True})
    with pytest.raises(ValueError, match=f"{key}=True is not supported"):
        LlamaConfig.from_hf(hub, source="config.json")
