"""model.runner.Runner: batched answers equal one-at-a-time generation, stop ids come from the
template (None dropped), prompts are truncated from the front, and stops are reported."""
from __future__ import annotations

import torch

from model.chat import ChatTemplate, Special, Text
from model.config import preset
from model.generate import Sampling, generate
from model.llama import Llama
from model.runner import Runner, pad_id_of, stop_ids_of


class CharTokenizer:
    """One id per character (code point < 256); BOS 1, EOS 2, no pad."""
    bos_id, eos_id, pad_id, special_tokens, chat_template = 1, 2, None, {}, None

    def encode(self, text, bos=False, eos=False):
        return ([1] if bos else []) + [ord(c) % 256 for c in text] + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 32)


class ToyTemplate(ChatTemplate):
    """'<bos>U:{user}\\nA:{answer}<eos>' with an end-of-turn id that may be None (as templates
    whose tokenizer lacks a piece report)."""
    name = "toy"

    def __init__(self, tokenizer, stop=(2, None)):
        super().__init__(tokenizer)
        self._stop = list(stop)

    def parts(self, messages, add_generation_prompt):
        out = [Special(1)]
        for m in messages:
            if m["role"] == "user":
                out += [Text(f"U:{m['content']}\nA:")]
            else:
                out += [Text(m["content"], True), Special(2, True)]
        return out

    @property
    def stop_ids(self):
        return self._stop


def tiny(max_seq_len=96, seed=0):
    return Llama(preset("tiny", max_seq_len=max_seq_len)).init_weights(std=0.3, seed=seed).eval()


QUESTIONS = ["hello", "a much longer question", "x", "what now?", "ok"]


def convs(questions=QUESTIONS):
    return [[{"role": "user", "content": q}] for q in questions]


def test_batched_answers_equal_one_at_a_time_and_keep_order():
    model, tok = tiny(), CharTokenizer()
    template = ToyTemplate(tok, stop=(200, None))
    runner = Runner(model, tok, template, Sampling(max_new_tokens=10), batch_size=3)
    batched = runner.results(convs())
    assert len({tuple(a.ids) for a in batched}) > 1  # the questions lead to different answers
    for q, a in zip(QUESTIONS, batched):
        prompt = template.render([{"role": "user", "content": q}], add_generation_prompt=True)
        alone = generate(model, [prompt], Sampling(max_new_tokens=10, stop_ids=[200]))[0]
        assert a.ids == alone
        assert a.stopped == (len(alone) < 10)
    assert runner.answer(convs()) == [a.text for a in batched]


def test_stop_ids_come_from_the_template_without_none():
    tok = CharTokenizer()
    assert stop_ids_of(ToyTemplate(tok, stop=(7, None, 7, 9)), tok) == [7, 9]
    assert stop_ids_of(None, tok) == [2]
    runner = Runner(tiny(), tok, ToyTemplate(tok, stop=(5, None)))
    assert runner.sampling.stop_ids == [5]
    # An explicit list wins, [] included (never stop early).
    assert Runner(tiny(), tok, ToyTemplate(tok), Sampling(stop_ids=[])).sampling.stop_ids == []


def test_an_answer_that_emits_a_stop_id_is_reported_stopped():
    model, tok = tiny(), CharTokenizer()
    free = Runner(model, tok, ToyTemplate(tok, stop=(250,)), Sampling(max_new_tokens=12)).results(convs())
    row = next(a for a in free if len(a.ids) == 12)
    stop = row.ids[3]  # a token this answer emits at step 3 becomes the stop id
    stopped = Runner(model, tok, ToyTemplate(tok, stop=(stop,)), Sampling(max_new_tokens=12)).results(convs())
    for before, after in zip(free, stopped):
        if stop in before.ids:
            assert after.ids == before.ids[:before.ids.index(stop)] and after.stopped
        else:
            assert after.ids == before.ids and not after.stopped


def test_long_prompts_keep_their_newest_tokens_and_are_counted():
    model, tok = tiny(max_seq_len=40), CharTokenizer()
    template = ToyTemplate(tok, stop=(250,))
    runner = Runner(model, tok, template, Sampling(max_new_tokens=30))
    assert runner.max_new_tokens == 20  # capped at half the context
    long_q = "z" * 50
    prompt = template.render([{"role": "user", "content": long_q}], add_generation_prompt=True)
    answer = runner.results(convs([long_q, "hi"]))
    assert runner.truncated == 1 and answer[0].prompt_truncated and not answer[1].prompt_truncated
    expected = generate(model, [prompt[-20:]], Sampling(max_new_tokens=20, stop_ids=[250]))[0]
    assert answer[0].ids == expected


def test_pad_id_falls_back_to_eos_then_zero():
    tok = CharTokenizer()
    assert pad_id_of(tok) == 2
    tok.eos_id = None
    assert pad_id_of(tok) == 0
    tok.pad_id = 9
    assert pad_id_of(tok) == 9


def test_stream_writes_the_answer_text_as_it_grows():
    model, tok = tiny(), CharTokenizer()
    runner = Runner(model, tok, ToyTemplate(tok, stop=(250,)), Sampling(max_new_tokens=8))
    pieces = []
    streamed = runner.stream([{"role": "user", "content": "hello"}], pieces.append)
    assert "".join(pieces) == tok.decode(streamed.ids)
    assert streamed.ids == runner.results(convs(["hello"]))[0].ids
    assert torch.is_grad_enabled()  # generation's inference mode does not leak
