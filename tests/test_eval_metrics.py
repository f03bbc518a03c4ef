"""The metrics that still say something at 135M parameters (answer NLL, echo-free language
alignment, end-of-turn rate, the quick before/after report), and BLEU / chrF++ against sacrebleu
on real PUD sentences."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from eval import alignment, answer_nll, echo, quick
from eval.bleu import corpus_bleu, corpus_chrf, tokenize_13a, tokenize_zh
from eval.common import ChatRunner, read_jsonl
from model import assets
from model.chat import Llama2Template
from model.config import preset
from model.generate import Sampling, generate
from model.llama import Llama
from tests.conftest import need, need_module
from tests.test_eval import CharTokenizer


def tiny_llama(seed=0, max_seq_len=256):
    return Llama(preset("tiny", max_seq_len=max_seq_len)).init_weights(std=0.2, seed=seed).eval()


# ------------------------------------------------------------------ BLEU / chrF++ vs sacrebleu

QUOTE_LINES = [  # Chinese text with curly quotes, dashes and ellipses, as real translations have
    "他說：“我明天會去台北。”",
    "這項為期10週的課程已經被英國情報機構GCHQ“認證”了。",
    "“你好”——他笑著說……然後離開了。",
    "她讀了‘紅樓夢’和“三國演義”兩本書。",
    "價格是 $3.50 ─ 比去年高 “一點”。",
]


def _pud(n=None):
    return read_jsonl(need(assets.shared_file, "data", "parallel", "pud_en_th_zh.dev.jsonl"), n)


def _hypotheses(refs: list[str]) -> list[str]:
    """System-like outputs: each reference with its last third replaced by the next line's start
    (partial matches at every n-gram order, different lengths)."""
    return [r[: 2 * len(r) // 3] + refs[(i + 1) % len(refs)][:8] for i, r in enumerate(refs)]


def test_zh_tokenizer_equals_sacrebleu_on_every_character_and_real_lines():
    sacrebleu = need_module("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
    theirs = TokenizerZh()
    # every code point (surrogates aside), in lines of 64, each character between two letters
    points = [cp for cp in range(0x21, 0x30000) if not 0xD800 <= cp <= 0xDFFF]
    for i in range(0, len(points), 64):
        line = "".join(f"a{chr(cp)}b" for cp in points[i:i + 64])
        assert tokenize_zh(line) == theirs(line).split(), f"code points from U+{points[i]:04X}"
    for line in QUOTE_LINES + [r["zh"] for r in _pud()]:
        assert tokenize_zh(line) == theirs(line).split(), line
    assert sacrebleu.__version__ >= "2"


@pytest.mark.parametrize("lang,tokenize", [("zh", "zh"), ("en", "13a"), ("th", "char")])
def test_corpus_bleu_and_chrf_equal_sacrebleu_on_pud(lang, tokenize):
    sacrebleu = need_module("sacrebleu")
    refs = [r[lang] for r in _pud()] + (QUOTE_LINES if lang == "zh" else [])
    hyps = _hypotheses(refs)
    ours = corpus_bleu(hyps, refs, tokenize=tokenize)
    theirs = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize)
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.sys_len == theirs.sys_len and ours.ref_len == theirs.ref_len
    assert ours.correct == theirs.counts and ours.total == theirs.totals
    chrf = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    assert corpus_chrf(hyps, refs) == pytest.approx(chrf, abs=1e-9)
    assert corpus_chrf(hyps, refs, word_order=0) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)


def test_quote_lines_score_like_sacrebleu_one_by_one():
    sacrebleu = need_module("sacrebleu")
    hyps = ["他說：“我明天去台北。”", "這項課程已經被GCHQ“認證”。", "“你好”他說。", "她讀了“紅樓夢”。", "價格是 $3.50。"]
    for hyp, ref in zip(hyps, QUOTE_LINES):
        assert corpus_bleu([hyp], [ref], tokenize="zh").score == pytest.approx(
            sacrebleu.corpus_bleu([hyp], [[ref]], tokenize="zh").score, abs=1e-9), ref
        assert corpus_chrf([hyp], [ref]) == pytest.approx(sacrebleu.corpus_chrf([hyp], [[ref]], word_order=2).score,
                                                          abs=1e-9), ref
    # the defect this guards: the curly quotes are tokens of their own, as sacrebleu makes them
    assert tokenize_zh("GCHQ“認證”了") == ["GCHQ", "“", "認", "證", "”", "了"]


def test_13a_tokenizer_equals_sacrebleu_on_real_lines():
    need_module("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    theirs = Tokenizer13a()
    for row in _pud():
        for lang in ("en", "th", "zh"):
            assert tokenize_13a(row[lang]) == theirs(row[lang]).split(), row[lang]


# ------------------------------------------------------------------ echo / degenerate

def test_echo_of_the_prompt_is_an_echo():
    prompt = "請用繁體中文介紹台灣的夜市。"
    assert echo.prompt_overlap(prompt, prompt) == 1.0
    # what InsCP's 40-step model answered (README): the prompt, after a fragment of itself
    assert echo.classify(prompt, "繁體中文台灣的夜市。請用繁體中文介紹台灣的夜市。") == "echo"
    assert echo.classify("What is the capital of France?", "what is the capital of france") == "echo"
    # 4-grams by hand: answer "abcdxyz" vs prompt "abcde": 'abcd' is in the prompt, no other
    # 4-gram is -> 4 of 7 characters covered
    assert echo.prompt_overlap("abcdxyz", "abcde") == pytest.approx(4 / 7)


def test_repetition_is_degenerate():
    answer = "ตลาดกลางคืน" + "สวัสดีครับผม" * 8   # a Thai loop filling the budget
    assert echo.classify("ช่วยแนะนำตลาดกลางคืนในไทยหน่อย", answer) == "degenerate"
    # seq-rep-10 by hand: "abcdefghijk" * 3 (33 chars) has 24 10-grams, of which the first 11
    # are distinct and the 13 after them repeat one -> 13 / 24
    assert echo.repetition("abcdefghijk" * 3) == pytest.approx(13 / 24)


def test_real_answers_in_the_prompts_language_are_answers():
    cases = [  # (prompt, a real answer in the prompt's language, its language)
        ("What year was the first iPhone released?", "The first iPhone was released on June 29, 2007.", "en"),
        ("請用繁體中文介紹台灣的夜市。",
         "台灣的夜市是晚上才開的市集，有很多小吃攤，例如蚵仔煎、臭豆腐和珍珠奶茶，也有賣衣服和玩具的攤位。", "zh-Hant"),
        ("ช่วยแนะนำอาหารไทยที่มีชื่อเสียงหน่อย", "อาหารไทยที่มีชื่อเสียง ได้แก่ ต้มยำกุ้ง ผัดไทย และส้มตำ ซึ่งมีรสชาติจัดจ้าน", "th"),
            ("Is the sky blue or green?", "Blue", "en"),   # a word picked from the question answers it
    ]
    for prompt, answer, lang in cases:
        assert echo.classify(prompt, answer) is None, answer
    got = alignment.score_alignment([p for p, _, _ in cases[:3]], [a for _, a, _ in cases[:3]], "en")
    assert got["langs"] == ["en", "zh-Hant", "th"] and got["echo_degenerate"] == 0.0


def test_real_reference_texts_are_neither_echo_nor_degenerate():
    """The thresholds' premise on real dev data: passages that answer a question (DRCD, XQuAD
    Thai) and Alpaca's reference answers to questions (no input text to rewrite) are real
    answers, nearly always."""
    drcd = read_jsonl(need(assets.shared_file, "data", "qa", "zh_tw_drcd.dev.jsonl"))[::10]
    xquad = read_jsonl(need(assets.shared_file, "data", "qa", "xquad_en_th.dev.jsonl"))[::10]
    alpaca = [r for r in read_jsonl(need(assets.shared_file, "data", "instruct", "alpaca_en_demo.jsonl"))
              if not r["input"]]
    assert all(echo.classify(r["question"], r["context"]) is None for r in drcd)
    assert all(echo.classify(r["question_th"], r["context_th"]) is None for r in xquad)
    flagged = [r for r in alpaca if echo.classify(r["instruction"], r["output"])]
    assert len(flagged) <= 0.04 * len(alpaca)      # rewrite tasks ("Write the opposite of ...")
    assert not any(echo.classify(r["instruction"], r["output"]) == "degenerate" for r in alpaca)


def test_alignment_never_counts_an_echo_as_the_prompts_language():
    prompts = ["ตลาดกลางคืนในกรุงเทพฯ อยู่ที่ไหนบ้าง", "請用繁體中文介紹台灣的夜市。", "Name a color."]
    answers = ["ตลาดกลางคืนในกรุงเทพฯ อยู่ที่ไหนบ้าง", "夜市" * 30, "這是紅色。"]
    got = alignment.score_alignment(prompts, answers, "th", stopped=[True, False, True])
    assert got["langs"] == [echo.LABEL, echo.LABEL, "zh-Hant"]
    assert got["echo"] == ["echo", "degenerate", None]
    assert got["aligned"] == 0.0 and got["aligned_with_echoes"] == pytest.approx(1 / 3)
    assert got["shares"] == {echo.LABEL: pytest.approx(2 / 3), "zh-Hant": pytest.approx(1 / 3)}
    assert got["echo_degenerate"] == pytest.approx(2 / 3) and got["end_of_turn"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 prompts, 3 answers"):
        alignment.score_alignment(prompts[:2], answers, "th")


# ------------------------------------------------------------------ answer NLL

def test_answer_nll_equals_the_hand_computed_value():
    model, tok = tiny_llama(), CharTokenizer()
    template = Llama2Template(tok)
    pairs = [("What is red?", "A ball."), ("Where did Lily play?", "In the park, all day long."), ("x", "y")]
    got = answer_nll.answer_nll(model, template, pairs, batch_size=2, desc=None)   # padding in a batch
    nlls, eot = [], []
    for prompt, answer in pairs:
        # llama2 without a system prompt: <s>[INST] {prompt} [/INST] {answer} </s>; the answer
        # tokens are ' {answer} ' and EOS, written out here without the template code
        context = [1] + tok.encode(f"[INST] {prompt} [/INST]")
        target = tok.encode(f" {answer} ") + [2]
        ids = context + target
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        nlls += [-logp[t - 1, ids[t]].item() for t in range(len(context), len(ids))]
        eot.append(-logp[-2, 2].item())                        # EOS after the whole answer
    assert got["tokens"] == len(nlls) and got["n"] == 3
    assert got["answer_nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert got["eot_nll"] == pytest.approx(sum(eot) / len(eot), rel=1e-5)


def test_answer_nll_sets_pick_the_same_items_by_characters():
    rows = read_jsonl(need(assets.shared_file, "data", "qa", "xquad_en_th.dev.jsonl"))
    need(assets.shared_file, "data", "qa", "zh_tw_drcd.dev.jsonl")
    th = answer_nll.load_pairs("xquad-th", limit=5, max_chars=500)
    en = answer_nll.load_pairs("xquad-en", limit=5, max_chars=500)
    by_th = {f"{r['context_th'].strip()}\n\n{r['question_th'].strip()}": r for r in rows}
    assert len(th) == len(en) == 5
    for (p_th, a_th), (p_en, a_en) in zip(th, en):     # the same items in both languages
        row = by_th[p_th]
        assert (a_th, p_en, a_en) == (row["answer_th"].strip(), f"{row['context_en'].strip()}\n\n"
                                      f"{row['question_en'].strip()}", row["answer_en"].strip())
    drcd = answer_nll.load_pairs("drcd-zh-Hant", limit=4, max_chars=300)
    assert len(drcd) == 4 and len({p.split("\n\n")[0] for p, _ in drcd}) == 4   # one question per passage
    assert all(len(p) + len(a) <= 300 for p, a in drcd)
    with pytest.raises(ValueError, match="no 'holdout' split"):
        answer_nll.set_file("alpaca-en", "holdout")


def test_a_set_with_no_item_short_enough_is_one_clear_error():
    """XQuAD's holdout half has no item of <= 400 characters: refused naming set, split and size,
    before any model work (the model here would fail if it were called)."""
    need(assets.shared_file, "holdout", "qa", "xquad_en_th.test.jsonl")
    assert answer_nll.load_pairs("xquad-th", None, 400, "holdout") == []
    with pytest.raises(ValueError, match=r"answer NLL xquad-th \(holdout split.*no item of at most 400 characters"):
        answer_nll.evaluate(None, None, ["xquad-th"], max_chars=400, split="holdout")


# ------------------------------------------------------------------ end of turn

class StopAt(Llama2Template):
    """The llama2 template with a chosen stop token."""

    def __init__(self, tokenizer, stop: int):
        super().__init__(tokenizer)
        self.stop = stop

    @property
    def stop_ids(self):
        return [self.stop]


def test_chat_runner_reports_whether_the_answer_stopped_within_the_budget():
    model, tok = tiny_llama(), CharTokenizer()
    prompt = Llama2Template(tok).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    free = generate(model, [prompt], Sampling(max_new_tokens=40, stop_ids=[]))[0]   # never stops
    # the stop token: the first one of the free run that did not occur before it, at position k
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    template = StopAt(tok, free[k])
    for budget, stopped in ((k + 5, True), (k + 1, True), (k, False)):
        got = ChatRunner(model, tok, template, max_new_tokens=budget).results([[{"role": "user", "content": "hi"}]])[0]
        assert got.stopped is stopped, budget
        assert got.ids == free[:k] and got.text == tok.decode(free[:k]).strip()


# ------------------------------------------------------------------ the quick report

def test_quick_report_and_compare_write_a_before_after_report(tmp_path):
    need(assets.shared_file, "data", "qa", "zh_tw_drcd.dev.jsonl")
    tok = CharTokenizer()
    sizes = quick.QuickSizes(nll_items=2, nll_max_chars=400, prompts=1, max_new_tokens=4, batch_size=4)
    model = tiny_llama(seed=0)
    model.train()
    template = Llama2Template(tok)                 # CharTokenizer stores no chat template
    before = quick.quick_report(model, tok, template, sizes=sizes)
    assert model.training                                    # training mode restored
    after = quick.quick_report(tiny_llama(seed=1), tok, template, sizes=sizes)
    assert set(before["answer_nll"]) == set(answer_nll.QA_SETS)
    assert all(r["n"] == 2 and r["answer_nll"] > 0 for r in before["answer_nll"].values())
    assert set(before["alignment"]) == {"en", "th", "zh-Hant"}
    stops = [e["stopped"] for r in before["alignment"].values() for e in r["examples"]]
    assert before["overall"]["end_of_turn"] == pytest.approx(sum(stops) / len(stops))
    assert set(before["samples"]) == {"zh-Hant", "en"}
    again = quick.quick_report(tiny_llama(seed=0), tok, template, sizes=sizes)   # same model, same numbers
    assert again["answer_nll"] == before["answer_nll"] and again["alignment"] == before["alignment"]

    out = quick.compare(before, after, tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert md == out["markdown"] and "| metric | before | after | change |" in md
    row = next(line for line in md.splitlines() if line.startswith("| answer_nll/xquad-th/answer_nll |"))
    b, a = before["answer_nll"]["xquad-th"]["answer_nll"], after["answer_nll"]["xquad-th"]["answer_nll"]
    assert row == f"| answer_nll/xquad-th/answer_nll | {b:.2f} | {a:.2f} | {'+' if a >= b else ''}{a - b:.2f} |"
    assert "請用繁體中文介紹台灣的夜市。" in md and "## Sample answers" in md
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["models"]["before"]["answer_nll"]["alpaca-en"]["answer_nll"] == pytest.approx(
        before["answer_nll"]["alpaca-en"]["answer_nll"])
    charts = {"chart_rate.svg", "chart_nll.svg", "chart_eot.svg"}
    assert {p.name for p in (tmp_path / "run").glob("chart_*.svg")} == charts
    assert "| answer_nll/drcd-zh-Hant/eot_nll |" in md
    for name in charts:
        ET.parse(tmp_path / "run" / name)
        assert f"]({name})" in md
    assert math.isfinite(before["seconds"]["total"])
