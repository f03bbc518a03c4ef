"""model/llama.py against transformers.LlamaForCausalLM (test-only oracle), fp32, 1e-4 max-abs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.config import LlamaConfig, preset
from model.llama import KVCache, Llama
from tests.conftest import need, need_module
from model import assets

TOL = 1e-4


def hf_twin(config: LlamaConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM and our Llama holding the same weights."""
    transformers = need_module("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**config.to_hf(), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = Llama(config).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("rotary_emb.inv_freq") for k in missing), (missing, unexpected)
    return hf, ours


CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa_tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
    "head_dim_override": dict(n_heads=4, n_kv_heads=2, head_dim=32),
    "llama3_scaling": dict(n_heads=4, n_kv_heads=2, rope_theta=500000.0, max_seq_len=64,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_scaling": dict(n_heads=4, n_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, attention):
    config = preset("tiny", attention=attention, **CASES[case])
    hf, ours = hf_twin(config)
    # 48 positions: past original_max_position_embeddings=16 of the llama3 case, where
    # dropping the scaling would change the low frequencies.
    tokens = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_llama3_scaling_changes_logits_past_original_context():
    """Guards the test above: a model that ignored rope_scaling would differ from HF there."""
    scaled = preset("tiny", **CASES["llama3_scaling"])
    hf, _ = hf_twin(scaled)
    plain = Llama(scaled.replace(rope_scaling=None)).eval()
    plain.load_state_dict(hf.state_dict(), strict=False)
    tokens = torch.randint(0, scaled.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (plain(tokens) - hf(tokens).logits).abs().max().item() > 10 * TOL


def test_tinystories_real_weights():
    transformers = need_module("transformers")
    folder = need(assets.tinystories_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    config = LlamaConfig.from_hf(json.loads((folder / "config.json").read_text()))
    ours = Llama(config).eval()
    state = load_file(folder / "model.safetensors")  # only lm_head.weight: tied to the embedding
    ours.load_state_dict(hf.state_dict(), strict=False)
    assert torch.equal(ours.lm_head.weight, state["lm_head.weight"])
    tokens = torch.randint(3, config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < TOL


def test_kv_cache_matches_full_forward():
    config = preset("tiny", n_layers=3)
    model = Llama(config).init_weights(seed=0).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, batch=2, max_len=32, dtype=torch.float32, device="cpu")
        pieces = [model(tokens[:, :7], cache=cache)]
        for t in range(7, 20):  # one token at a time, as decoding does
            pieces.append(model(tokens[:, t:t + 1], cache=cache))
    assert cache.length == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


def test_left_padding_masks_pad_tokens():
    """A left-padded row with per-row positions gives the same logits as the unpadded row."""
    config = preset("tiny")
    model = Llama(config).init_weights(seed=0).eval()
    tokens = torch.randint(1, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], dim=1)
    key_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    for attention in ("sdpa", "eager"):
        model.config.attention = attention
        with torch.no_grad():
            ref = model(tokens)
            got = model(padded, positions=positions, key_mask=key_mask)[:, 5:]
        assert (got - ref).abs().max().item() < 1e-5, attention


def test_config_rejects_non_llama():
    with pytest.raises(ValueError, match="gpt2.*not a LLaMA"):
        LlamaConfig.from_hf({"model_type": "gpt2", "n_embd": 768}, source="x/config.json")
    with pytest.raises(ValueError, match="x/config.json: missing required field 'vocab_size'"):
        LlamaConfig.from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 1, "intermediate_size": 8}, source="x/config.json")


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-13b", "llama3-8b", "llama3.1-8b", "smollm2-135m"])
def test_presets_have_published_sizes(name):
    """Parameter counts from the shapes alone (meta device, no memory), vs the published sizes."""
    published = {"llama2-7b": 6.74e9, "llama2-13b": 13.02e9, "llama3-8b": 8.03e9,
                 "llama3.1-8b": 8.03e9, "smollm2-135m": 134.5e6}
    with torch.device("meta"):
        n = Llama(preset(name)).num_params()
    assert abs(n - published[name]) / published[name] < 0.01


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(attention):
    """Two documents packed in one block with segment ids and restarted positions give the
    logits each document gets on its own."""
    model = Llama(preset("tiny", attention=attention)).init_weights(seed=3).eval()
    a, b = torch.randint(0, model.config.vocab_size, (1, 5)), torch.randint(0, model.config.vocab_size, (1, 7))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = model(packed, positions=positions, segments=segments)
        want = torch.cat([model(a), model(b)], 1)
        crossed = model(packed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (crossed[:, 5:] - want[:, 5:]).abs().max() > 1e-3  # without segments b sees a
