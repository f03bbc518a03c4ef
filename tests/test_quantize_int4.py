"""int4 weight-only quantisation (model/quantize_int4.py): the group codes by hand and their
error bound, Int4Linear (torch's CPU int4 kernel) against a plain-torch reference, the refusals.
SmolLM2's int4 perplexity on held-out sentences: tests/test_quantize.py (PPL_DELTA_INT4)."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import load
from model.config import preset
from model.llama import Llama
from model.lora import apply_lora
from model.quantize import quantize_int8
from model.quantize_int4 import GROUP, Int4Linear, dequantize_groups, quantize_groups, quantize_int4


def test_group_codes_by_hand():
    # one group 0, 1, ..., 31: min 0, step 31/15 (bf16: 2.0625), codes round(v / step)
    w = torch.arange(32.0).reshape(1, 32)
    q, d, m = quantize_groups(w)
    step = torch.tensor(31 / 15).to(torch.bfloat16).item()
    assert d.item() == step == 2.0625 and m.item() == 0.0
    assert q.tolist() == [[min(15, round(v / step)) for v in range(32)]]
    assert q[0, 0] == 0 and q[0, -1] == 15  # the extremes are coded exactly
    constant = quantize_groups(torch.full((2, 64), 0.5))  # a step of 0: every code 0, w = m
    assert constant[0].eq(0).all() and dequantize_groups(*constant).eq(0.5).all()


def test_every_weight_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 4 * GROUP, generator=g) * 0.05
    w[::5, 7] = 1.2  # groups with one outlier: a coarse step for that group only
    q, d, m = quantize_groups(w)
    err = (dequantize_groups(q, d, m) - w).abs().reshape(48, 4, GROUP)
    # d/2 from rounding, plus the bf16 rounding of m (2^-9 relative) that shifts the whole group
    bound = d.float()[..., None] / 2 + m.float().abs()[..., None] * 2**-8 + 1e-7
    assert (err <= bound).all()
    assert err.amax(-1)[::5, 0].min() > err.amax(-1)[1::5, 0].max()  # outliers cost their own group


@pytest.mark.parametrize("rows", [1, 4, 70])
def test_int4_linear_matches_plain_torch(rows):
    g = torch.Generator().manual_seed(rows)
    base = torch.nn.Linear(3 * GROUP, 48)
    x = torch.randn(2, rows, 3 * GROUP, generator=g)
    layer = Int4Linear(base.weight, base.bias)
    want = x.to(torch.bfloat16).float() @ dequantize_groups(*quantize_groups(base.weight.detach())).t() + base.bias
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == torch.float32
    # bf16 activations and output, bf16 scale/zero: ~2^-8 of the largest output
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_quantize_int4_replaces_every_linear_and_refuses_lora_and_other_devices():
    model = Llama(preset("tiny")).init_weights(seed=0)
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = model(x)
        embed = model.model.embed_tokens.weight.clone()
        quantize_int4(model)
        got = model(x)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(model.lm_head, Int4Linear)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # a tied embedding keeps its floats
    # 16 levels per group on random Gaussian weights: each weight is off by up to ~15% of its
    # typical size, so logits move by ~10% (measured 12.5% of the largest here); real weights
    # are scored in the perplexity test below.
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    with pytest.raises(TypeError, match="the head is a quantised Int4Linear"):
        model(x, labels=x)

    lora = Llama(preset("tiny")).init_weights(seed=0)
    apply_lora(lora, r=2, alpha=4)
    with pytest.raises(ValueError, match="merge LoRA adapters first"):
        quantize_int4(lora)
    with torch.device("meta"):
        elsewhere = Llama(preset("tiny"))
    with pytest.raises(ValueError, match="int4 is implemented for CPU decoding only"):
        quantize_int4(elsewhere)
    odd = torch.nn.Sequential(torch.nn.Linear(64, 40))
    odd.config = model.config
    with pytest.raises(ValueError, match="0 is 64 -> 40; int4 needs in_features a multiple of 32 and out_features"):
        quantize_int4(odd)
    with pytest.raises(ValueError, match="quantize='int4' on cuda: int4 is implemented for CPU"):
        load("nowhere.gguf", quantize="int4", device="cuda")


def test_the_fused_loss_refuses_an_int8_head_too():
    # int8 keeps its codes in a buffer named `weight`: the fused head + loss would read the codes
    # as if they were the weights, without a word.
    model = quantize_int8(Llama(preset("tiny")).init_weights(seed=0))
    x = torch.randint(0, model.config.vocab_size, (1, 5))
    with pytest.raises(TypeError, match="the head is a quantised Int8Linear"):
        model(x, labels=x)

