"""Generation: KV cache vs full recomputation, left-padded batches vs one prompt at a time,
the static cache's slot step (attention over the whole preallocated cache) vs recomputation,
precomputed rotary tables vs the per-call ones, no mask built per decoding step, stop ids, and
the sampling filters on hand-built cases. (The compiled step: tests/test_decode_compile.py.)"""
from __future__ import annotations

import pytest
import torch

import model.generate as generate_module
from model.config import preset
from model.generate import Sampling, choose_next, decode_step, generate
from model.llama import KVCache, Llama, attention_mask, rope_tables


def tiny_model(seed=0):
    # std 0.3: peaked enough distributions that greedy paths vary from prompt to prompt
    return Llama(preset("tiny", n_layers=2, max_seq_len=96)).init_weights(std=0.3, seed=seed).eval()


def greedy_by_recomputation(model, prompt, n):
    """The definition: run the whole sequence again for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]


def test_kv_cache_greedy_equals_recomputation():
    model = tiny_model()
    for prompt in prompts():
        got = generate(model, [prompt], Sampling(max_new_tokens=20, stop_ids=[]))[0]
        assert got == greedy_by_recomputation(model, prompt, 20)


def test_left_padded_batch_equals_one_at_a_time():
    model = tiny_model()
    alone = [generate(model, [p], Sampling(max_new_tokens=15, stop_ids=[]))[0] for p in prompts()]
    assert len({tuple(a) for a in alone}) > 1  # the prompts really lead to different answers
    for attention in ("sdpa", "eager"):
        model.config.attention = attention
        assert generate(model, prompts(), Sampling(max_new_tokens=15, stop_ids=[])) == alone


def test_slot_step_over_the_whole_cache_equals_recomputation(monkeypatch):
    """generate(compile=True)'s step (fixed shapes: every layer attends over the whole padded
    cache through the key mask), here run eagerly: the same tokens as recomputing everything."""
    monkeypatch.setattr(generate_module, "compiled_decode_step", lambda device_type: decode_step)
    model = tiny_model()
    s = Sampling(max_new_tokens=12, stop_ids=[])
    got = generate(model, prompts(), s, compile=True)
    assert got == generate(model, prompts(), s)  # eager: equal to recomputation (tested above)
    assert generate(model, [prompts()[2]], s, compile=True)[0] == greedy_by_recomputation(model, prompts()[2], 12)


def test_the_head_computes_one_row_per_prompt_and_step():
    """Only the last position's logits are read, so the prefill gives the head one row per
    prompt (not all P), and each decoding step one; the tokens stay those of recomputation."""
    model = tiny_model()
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    try:
        got = generate(model, prompts(), Sampling(max_new_tokens=5, stop_ids=[]))
    finally:
        hook.remove()
    assert rows == [(4, 1)] * 5
    assert got[1] == greedy_by_recomputation(model, prompts()[1], 5)


def test_a_decoding_step_builds_no_mask():
    key_mask = torch.tensor([[False, True, True, True, False], [True] * 5])
    assert attention_mask(1, 4, None, "cpu") is None  # no padding: no mask at all
    view = attention_mask(1, 4, key_mask, "cpu")     # padding: a view of the caller's buffer
    assert view.shape == (2, 1, 1, 4) and view.data_ptr() == key_mask.data_ptr()
    assert view[:, 0, 0].tolist() == key_mask[:, :4].tolist()


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_cache_rotary_tables_equal_the_per_call_tables(rope_scaling):
    config = preset("tiny", rope_scaling=rope_scaling)
    cache = KVCache(config, batch=2, max_len=64, dtype=torch.float32, device="cpu")
    positions = torch.tensor([[0, 5, 63], [17, 2, 40]])
    for got, want in zip(cache.rope(positions, torch.float32), rope_tables(config, positions, torch.float32)):
        assert torch.equal(got, want)
    dynamic = preset("tiny", max_seq_len=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert KVCache(dynamic, 1, 32, torch.float32, "cpu").cos is None  # frequencies change past 16


def test_stop_ids_none_means_the_models_eos():
    model = tiny_model()
    full = generate(model, prompts(), Sampling(max_new_tokens=15, stop_ids=[]))
    model.config.eos_id = full[1][4]
    got = generate(model, prompts(), Sampling(max_new_tokens=15))  # stop_ids None
    assert got == generate(model, prompts(), Sampling(max_new_tokens=15, stop_ids=[full[1][4]]))
    assert got[1] == full[1][:full[1].index(full[1][4])]


def test_stop_ids_end_each_row_and_are_excluded():
    model = tiny_model()
    full = generate(model, prompts(), Sampling(max_new_tokens=15, stop_ids=[]))
    stop = full[1][4]  # a token row 1 emits at step 4
    got = generate(model, prompts(), Sampling(max_new_tokens=15, stop_ids=[stop]))
    for row, tokens in zip(got, full):
        cut = tokens.index(stop) if stop in tokens else len(tokens)
        assert row == tokens[:cut]


def test_streaming_callback_sees_every_token_in_order():
    model = tiny_model()
    seen = {}
    got = generate(model, prompts(), Sampling(max_new_tokens=6, stop_ids=[]), on_token=lambda r, t: seen.setdefault(r, []).append(t))
    assert [seen[r] for r in range(len(got))] == got


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    s = Sampling(max_new_tokens=12, temperature=1.0, seed=123, stop_ids=[])
    assert generate(model, prompts(), s) == generate(model, prompts(), s)


def test_top_k_and_top_p_keep_the_right_tokens():
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    top2 = choose_next(logits, Sampling(temperature=1.0, top_k=2), seen, g)
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: 0.5 < 0.7 so token 1 is needed; 0.5+0.3 >= 0.7 so token 2 is dropped
    nucleus = choose_next(logits, Sampling(temperature=1.0, top_p=0.7), seen, g)
    assert set(nucleus.tolist()) == {0, 1}
    share0 = (nucleus == 0).float().mean().item()
    assert abs(share0 - 0.5 / 0.8) < 0.03  # renormalised over the kept mass
    all4 = choose_next(logits, Sampling(temperature=1.0), seen, g)
    assert set(all4.tolist()) == {0, 1, 2, 3}


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, True]])
    # token 0 seen: 2.0 / 1.5 = 1.33 < 1.9, so greedy switches to token 1
    assert choose_next(logits, Sampling(repetition_penalty=1.5), seen, None).item() == 1
    assert choose_next(logits, Sampling(), seen, None).item() == 0
