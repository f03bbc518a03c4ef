"""The compiled one-token step (generate(compile=True)): the same greedy tokens as eager decoding
and as recomputing the whole sequence, for a left-padded batch, one prompt (the single-row
linear path), int8 and int4 layers; one graph serves every step and a second call of the same shapes.

CPU Inductor compiles each graph in 10-25 s on the project's 2 shared cores (a warm Inductor
cache makes later runs faster), so these are marked slow; they still run under plain pytest.
"""
from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from model import quantize as model_quantize
from model.generate import Sampling, generate
from model.quantize import quantize_int8
from model.quantize_int4 import quantize_int4
from tests.test_generate import greedy_by_recomputation, prompts, tiny_model

NEW = 10


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_greedy_equals_eager_and_recomputation():
    model = tiny_model()
    s = Sampling(max_new_tokens=NEW, stop_ids=[])
    eager = generate(model, prompts(), s)
    before = compiled_graphs()
    assert generate(model, prompts(), s, compile=True) == eager  # left-padded batch of 4
    assert compiled_graphs() == before + 1                       # one graph for all NEW - 1 steps
    assert generate(model, prompts(), s, compile=True) == eager  # same shapes: reused
    assert compiled_graphs() == before + 1
    one = prompts()[1]
    alone = generate(model, [one], s, compile=True)[0]           # batch 1: linears as multiply-sum
    assert alone == greedy_by_recomputation(model, one, NEW) == eager[1]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4], ids=["int8", "int4"])
def test_compiled_quantised_decoding_equals_eager(quantize, monkeypatch):
    model = quantize(tiny_model(seed=1))
    s = Sampling(max_new_tokens=NEW, stop_ids=[])
    eager = generate(model, prompts()[:2], s)
    assert len({tuple(row) for row in eager}) > 1
    assert generate(model, prompts()[:2], s, compile=True) == eager
    if quantize is quantize_int8:  # one row: Inductor's loops (forced, so each runs on any CPU)
        for path in ("multiply-sum", "words"):
            monkeypatch.setattr(model_quantize, "COMPILED_ONE_ROW", path)
            assert generate(model, prompts()[:1], s, compile=True) == generate(model, prompts()[:1], s)


@pytest.mark.slow
def test_a_model_changed_in_place_after_compiling_does_not_run_the_old_graph():
    """The step's guards skip modules whose __dict__ is unchanged (recursive dict tags, see
    model.generate._guard_config); a model whose layers were replaced in place (the same object,
    quantised) must get a graph of its own layers (traced anew, or an earlier int8 graph whose
    guards it passes), never the float model's graph."""
    model = tiny_model(seed=2)
    s = Sampling(max_new_tokens=NEW, stop_ids=[])
    three = prompts()[:3]
    float_tokens = generate(model, three, s, compile=True)
    quantize_int8(model)  # the same Llama object, its nn.Linear layers now Int8Linear
    int8_tokens = generate(model, three, s)
    assert int8_tokens != float_tokens  # so the float graph, run stale, could not pass
    assert generate(model, three, s, compile=True) == int8_tokens
