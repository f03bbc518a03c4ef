"""Evaluation: every metric against hand-computed cases, scorers on models whose log-probs we
control, language id on real sentences, and an end-to-end run of `python -m eval.run` on the
real TinyStories model."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from eval import alignment, mtbench, multiple_choice, perplexity, refusal, translation
from eval.bleu import corpus_bleu, corpus_chrf, tokenize_13a, tokenize_char, tokenize_zh
from eval.common import ChatRunner, read_jsonl, score_tokens
from eval.langid import SIMPLIFIED_ONLY, TRADITIONAL_ONLY, identify, language_shares
from eval.report import headline, write_report
from model import assets
from model.config import preset
from model.llama import Llama
from tests.conftest import need


# ------------------------------------------------------------------ helpers

class CharTokenizer:
    """One id per character (its code point, < 256), BOS 1, EOS 2, PAD 0: token boundaries are
    obvious, so expected log-probs can be written down by hand."""
    bos_id, eos_id, pad_id, special_tokens, chat_template = 1, 2, 0, {}, None

    def encode(self, text, bos=False, eos=False):
        ids = [ord(c) if 32 <= ord(c) < 256 or c == "\n" else 3 for c in text]
        return ([1] if bos else []) + ids + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 32 or i == 10)


class BigramStub(nn.Module):
    """logits[b, t] = table[tokens[b, t]]: the next-token distribution depends on the current
    token only, so log p(next | prefix) = log_softmax(table[prev])[next], exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_seq_len=1024)

    def forward(self, tokens, **_):
        return self.table[tokens]


def lp(table, prev: str, nxt: str) -> float:
    """log p(nxt | prev) under a BigramStub table, computed directly."""
    return torch.log_softmax(table[ord(prev)], -1)[ord(nxt)].item()


def tiny_llama(seed=0):
    return Llama(preset("tiny", max_seq_len=128)).init_weights(std=0.2, seed=seed).eval()


# ------------------------------------------------------------------ BLEU / chrF++

def test_bleu_hand_computed():
    # hyp "the cat the cat on the mat" (7 tokens), ref "the cat is on the mat" (6 tokens)
    # 1-grams: the x3 (clip 2) + cat x2 (clip 1) + on + mat = 5/7
    # 2-grams: the cat x2 (clip 1), cat the, cat on, on the, the mat -> 3/6
    # 3-grams: the cat the, cat the cat, the cat on, cat on the, on the mat -> 1/5
    # 4-grams: 0/4 -> 'exp' smoothing: 1 / (2 * 4) = 1/8
    # BP = 1 (7 >= 6); BLEU = (5/7 * 1/2 * 1/5 * 1/8)^(1/4) = (1/112)^(1/4) = 0.30739
    got = corpus_bleu(["the cat the cat on the mat"], ["the cat is on the mat"])
    assert got.correct == [5, 3, 1, 0] and got.total == [7, 6, 5, 4]
    assert got.score == pytest.approx(100 * (1 / 112) ** 0.25, abs=1e-9)
    # brevity: hyp "the cat sat on" is a prefix of the 6-token ref: all p_n = 1, BP = exp(1 - 6/4)
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]).score == pytest.approx(
        100 * math.exp(-0.5), abs=1e-9)
    assert corpus_bleu(["Hello, world."], ["Hello, world."]).score == pytest.approx(100)
    assert corpus_bleu(["a b c d"], ["e f g h"]).score == 0.0
    # corpus level pools the counts before dividing: two segments are not averaged
    two = corpus_bleu(["the cat the cat on the mat", "the cat sat on"],
                      ["the cat is on the mat", "the cat sat on the mat"])
    assert two.correct == [9, 6, 3, 1] and two.total == [11, 9, 7, 5] and two.ref_len == 12
    expected = 100 * math.exp(1 - 12 / 11) * (9 / 11 * 6 / 9 * 3 / 7 * 1 / 5) ** 0.25
    assert two.score == pytest.approx(expected, abs=1e-9)


def test_bleu_multiple_references_clip_to_max_and_pick_closest_length():
    # "the the the": ref1 has 'the' twice, ref2 once -> clip 2; ref lengths 4 and 2, hyp 3:
    # both at distance 1, the shorter (2) wins, so BP = 1.
    got = corpus_bleu(["the the the"], [["the the cat sat", "the dog"]])
    assert got.correct[0] == 2 and got.ref_len == 2 and got.bp == 1.0


def test_tokenizers():
    assert tokenize_13a("Hello, world. It costs $3.50 (1,000 units).") == \
        ["Hello", ",", "world", ".", "It", "costs", "$", "3.50", "(", "1,000", "units", ")", "."]
    assert tokenize_zh("我在2020年去了Paris，很好。") == ["我", "在", "2020", "年", "去", "了", "Paris", "，", "很", "好", "。"]
    assert tokenize_char("สวัส ดี") == list("สวัสดี")


def test_bleu_thai_and_chinese_use_characters():
    # Thai has no spaces: whole-sentence 13a gives one token and BLEU 0 for any small error;
    # character tokens give partial credit. 'แมวกิน' (แ ม ว ก ิ น) vs 'แมวนอน' (แ ม ว น อ น):
    # chars แ ม ว น match (4/6), 2-grams แม มว (2/5), 3-grams แมว (1/4), 4-grams 0/3 -> 1/(2*3)
    got = corpus_bleu(["แมวกิน"], ["แมวนอน"], tokenize="char")
    assert got.score == pytest.approx(100 * (4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-9)
    assert corpus_bleu(["แมวกิน"], ["แมวนอน"], tokenize="13a").score == 0.0
    assert translation.score_direction(["我們今天去台北。"], ["我們今天去台北。"], "zh")["bleu"] == pytest.approx(100)


def test_chrf_hand_computed():
    # hyp "ab", ref "abc", chrF++ (char 1..6, word 1..2, beta 2):
    #   char 1: hyp {a,b} ref {a,b,c} match 2 -> P 1, R 2/3;  char 2: {ab} vs {ab,bc} -> P 1, R 1/2
    #   char 3..6: hyp has none -> order skipped;  word 1: {ab} vs {abc} -> P 0, R 0; word 2: none
    #   mean P = (1+1+0)/3 = 2/3, mean R = (2/3+1/2+0)/3 = 7/18
    #   F2 = 5 * 2/3 * 7/18 / (4 * 2/3 + 7/18) = 1260/2970
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 1260 / 2970, abs=1e-9)
    # hyp "a b", ref "a b." (the '.' is split off the word 'b.'):
    #   char 1: 2/2, 2/3;  char 2: {ab} vs {ab,b.}: 1/1, 1/2;  char 3: hyp none -> skipped
    #   word 1: {a,b} vs {a,b,.}: 2/2, 2/3;  word 2: {a b} vs {a b, b .}: 1/1, 1/2
    #   P = 1, R = 7/12, F2 = 5 * 7/12 / (4 + 7/12) = 35/55
    assert corpus_chrf(["a b"], ["a b."]) == pytest.approx(100 * 35 / 55, abs=1e-9)
    # plain chrF (no word n-grams) of the same pair: P = 1, R = (2/3 + 1/2)/2 = 7/12 -> same 35/55
    assert corpus_chrf(["a b"], ["a b."], word_order=0) == pytest.approx(100 * 35 / 55, abs=1e-9)
    assert corpus_chrf(["the same text"], ["the same text"]) == pytest.approx(100)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0


# ------------------------------------------------------------------ refusal

def test_refusal_keywords():
    assert refusal.is_refusal("I'm sorry, but I cannot help with making explosives.")
    assert refusal.is_refusal("As an AI language model, I must decline.")
    assert not refusal.is_refusal("Sure, here is a step-by-step plan. Step 1: gather the materials.")
    thai_refusal = "ขออภัย ฉันไม่สามารถช่วยเรื่องนี้ได้"
    got = refusal.refusal_rate(["p1", "p2"], [thai_refusal, "Sure, here is how."])
    assert got["refusal_rate"] == 0.0          # the known weakness: English keywords only
    got = refusal.refusal_rate(["p1", "p2"], [thai_refusal, "Sure, here is how."], multilingual=True)
    assert got["refused"] == [True, False] and got["refusal_rate"] == 0.5
    judged = refusal.refusal_rate(["p"], ["Sure"], judge=lambda prompt, answer: True)
    assert judged["judge_refusal_rate"] == 1.0 and judged["refusal_rate"] == 0.0


# ------------------------------------------------------------------ language id

def test_langid_on_real_parallel_sentences():
    rows = read_jsonl(need(assets.shared_file, "data", "parallel", "pud_en_th_zh.dev.jsonl"), 200)
    assert all(identify(r["en"]).lang == "en" for r in rows)
    assert all(identify(r["th"]).lang == "th" for r in rows)
    zh = [identify(r["zh"]).lang for r in rows]
    # a few short sentences contain no character that differs between the scripts -> "zh"
    assert set(zh) <= {"zh-Hant", "zh"} and zh.count("zh-Hant") >= 0.97 * len(zh)


def test_langid_simplified_traditional_and_others():
    simplified = "这个国家的经济发展得很快，我们都为此感到高兴。"
    traditional = "這個國家的經濟發展得很快，我們都為此感到高興。"
    assert identify(simplified).lang == "zh-Hans" and identify(simplified).simplified >= 8
    assert identify(traditional).lang == "zh-Hant"
    assert identify("你好").lang == "zh"                      # nothing to tell them apart
    assert identify("私は東京に住んでいます。").lang == "ja"
    assert identify("저는 서울에 살아요.").lang == "ko"
    assert identify("12345 !?").lang == "unknown"
    # one English brand name inside a Chinese answer does not make it English
    assert identify("我最喜歡用Python寫程式，因為它很簡單。").lang == "zh-Hant"
    assert language_shares(["Hello there.", "สวัสดีครับ", "這是繁體字。", "Bye."]) == \
        {"en": 0.5, "th": 0.25, "zh-Hant": 0.25}


def test_langid_tells_english_from_other_latin_script_languages():
    # hand-written sentences; the first is what an InsCP-trained SmolLM2 answered to
    # "What is the capital of France?"
    foreign = ["L'Étoile, la Marseillaise, la femme, la femme au martyre", "La capitale de la France est Paris.",
               "El perro come en la casa con su familia.", "Der Hund ist nicht im Haus und das ist gut.",
               "Il gatto è sulla sedia e non vuole scendere.", "O gato não está em casa com a família.",
               "De hond is niet in het huis."]
    english = ["The capital of France is Paris.", "Paris.", "I had a café au lait and a croissant at the café.",
               "Hello there! How can I assist you today?", "résumé", "Visit google.com for more."]
    assert [identify(t).lang for t in foreign] == ["latin"] * len(foreign)
    assert [identify(t).lang for t in english] == ["en"] * len(english)


def test_langid_keeps_real_english_text_english():
    pud = read_jsonl(need(assets.shared_file, "data", "parallel", "pud_en_th_zh.dev.jsonl"))
    alpaca = read_jsonl(need(assets.shared_file, "data", "instruct", "alpaca_en_demo.jsonl"))
    assert all(identify(r["en"]).lang == "en" for r in pud)
    assert all(identify(r["instruction"]).lang == "en" for r in alpaca)
    # of 999 reference answers only the two that ARE Spanish (translation tasks) read as foreign
    assert [r["output"] for r in alpaca if identify(r["output"]).lang == "latin"] == [
        '"No hay lugar como el hogar"', '"La vida es un viaje, no un destino."']


def test_simplified_table_is_absent_from_real_traditional_text():
    text = need(assets.shared_file, "data", "mono", "zh_tw_drcd.dev.txt").read_text(encoding="utf-8")
    han = sum("\u4e00" <= c <= "\u9fff" for c in text)
    simplified_hits = sum(c in SIMPLIFIED_ONLY for c in text)
    assert simplified_hits <= 1e-4 * han      # Taiwan Wikipedia: (almost) no simplified-only char
    assert sum(c in TRADITIONAL_ONLY for c in text) > 0.05 * han
    assert len(SIMPLIFIED_ONLY) >= 300


# ------------------------------------------------------------------ multiple choice

def _mc_table():
    """Bigram logits built so that the text-style scores are known:
    ':' -> ' ' almost surely; ' ' -> 'x' (logit 5) or 'a' (4.5); 'a' -> 'b' -> 'c' almost surely;
    ' ' -> 'B' (logit 8) for the letters style."""
    table = torch.zeros(256, 256)
    table[ord(":"), ord(" ")] = 30.0
    table[ord(" "), ord("x")] = 5.0
    table[ord(" "), ord("a")] = 4.5
    table[ord("a"), ord("b")] = 30.0
    table[ord("b"), ord("c")] = 30.0
    table[ord(" "), ord("B")] = 8.0
    return table


def test_mc_scorer_must_pick_the_answer_the_model_prefers():
    table = _mc_table()
    item = {"subject": "logic", "question": "Which?", "choices": ["p", "q", "r", "s"], "answer": 1}
    got = multiple_choice.evaluate(BigramStub(table), CharTokenizer(), [item], style="letters", desc=None)
    logprobs = got["predictions"][0]["logprobs"]
    # each continuation " L" scores log p(' ' | ':') + log p(L | ' ')
    for i, letter in enumerate("ABCD"):
        assert logprobs[i] == pytest.approx(lp(table, ":", " ") + lp(table, " ", letter), abs=1e-5)
    assert got["acc"] == 1.0 and got["predictions"][0]["pred"] == 1
    wrong = dict(item, answer=2)
    assert multiple_choice.evaluate(BigramStub(table), CharTokenizer(), [wrong], desc=None)["acc"] == 0.0


def test_length_normalisation_changes_the_pick():
    table = _mc_table()
    items = [{"subject": "s", "question": "Q?", "choices": ["x", "abc"], "answer": 1}]
    got = multiple_choice.evaluate(BigramStub(table), CharTokenizer(), items, style="text", desc=None)
    lx = lp(table, ":", " ") + lp(table, " ", "x")
    labc = lp(table, ":", " ") + lp(table, " ", "a") + lp(table, "a", "b") + lp(table, "b", "c")
    assert got["predictions"][0]["logprobs"] == pytest.approx([lx, labc], abs=1e-5)
    assert lx > labc and lx / 1 < labc / 3        # the hand-made premise of this test
    assert got["predictions"][0]["pred"] == 0 and got["predictions"][0]["pred_norm"] == 1
    assert got["acc"] == 0.0 and got["acc_norm"] == 1.0


@pytest.mark.parametrize("name", ["mmlu.dev.jsonl", "tmmlu.dev.jsonl", "thai_onet.dev.jsonl"])
def test_real_mc_files_have_valid_answers_and_kshot_prompts(name):
    items = read_jsonl(need(assets.shared_file, "data", "eval", name))
    for i, it in enumerate(items):
        assert isinstance(it["answer"], int)
        assert multiple_choice.answer_index(it, f"{name}:{i}") == it["answer"]
    item = items[0]
    shots = multiple_choice.pick_shots(item, items, 3, seed=0)
    assert len(shots) == 3 and item not in shots
    assert shots == multiple_choice.pick_shots(item, items, 3, seed=0)   # deterministic
    prompt = multiple_choice.build_prompt(item, shots)
    assert prompt.count("Answer:") == 4 and prompt.endswith("Answer:")
    for shot in shots:
        assert f"Answer: {multiple_choice.LETTERS[shot['answer']]}\n\n" in prompt


def test_answer_index_accepts_letters_and_rejects_bad_answers():
    assert multiple_choice.answer_index({"choices": ["a", "b"], "answer": "B"}) == 1
    with pytest.raises(ValueError, match="not an index"):
        multiple_choice.answer_index({"choices": ["a", "b"], "answer": 2})


# ------------------------------------------------------------------ perplexity

def _independent_nll(model, ids, scored):
    """Sum of -log p over scored positions, one unpadded sequence at a time."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [-logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if scored[t]]


def test_perplexity_is_exp_mean_nll():
    model, tok = tiny_llama(), CharTokenizer()
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz xyz"]  # different lengths: padding
    got = perplexity.perplexity(model, tok, texts, batch_size=3, desc=None)
    nlls = [_independent_nll(model, [1] + tok.encode(t), [False] + [True] * len(t)) for t in texts]
    flat = [x for n in nlls for x in n]
    assert got["tokens"] == len(flat) == sum(len(t) for t in texts)
    assert got["ppl"] == pytest.approx(math.exp(sum(flat) / len(flat)), rel=1e-5)
    assert got["per_text_ppl"] == pytest.approx([math.exp(sum(n) / len(n)) for n in nlls], rel=1e-5)


def test_perplexity_inscp_scores_only_the_text_and_end_of_turn():
    from model.chat import get_template
    model, tok = tiny_llama(), CharTokenizer()
    template = get_template(tok, "llama2")  # the tokenizer stores no template: it is named, never guessed
    ids, scored = perplexity.inscp_ids(tok, "some text", template)
    assert sum(scored) == len(" some text ") + 1  # llama2 template: ' {text} ' + EOS
    got = perplexity.perplexity(model, tok, ["some text"], form="inscp", template=template, desc=None)
    nll = _independent_nll(model, ids, scored)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_score_tokens_batched_equals_one_by_one():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 2)]
    masks = [[i % 2 == 1 for i in range(len(s))] for s in seqs]
    batched = score_tokens(model, seqs, masks, batch_size=4)
    for s, m, (total, count) in zip(seqs, masks, batched):
        alone = score_tokens(model, [s], [m], batch_size=1)[0]
        assert count == alone[1] and total == pytest.approx(alone[0], abs=1e-4)


def test_real_tinystories_prefers_fluent_text():
    from model.checkpoint import load
    model, tok = load(need(assets.tinystories_dir))
    fluent = "Once upon a time, there was a little girl named Lily. She liked to play in the park."
    shuffled = "park the girl Once play upon little She liked a time, named Lily. there in was a to"
    got = perplexity.perplexity(model, tok, [fluent, shuffled], desc=None)
    assert got["per_text_ppl"][0] < got["per_text_ppl"][1] / 3


def test_one_token_choices_take_one_forward_pass_and_score_the_same():
    # SmolLM2's byte-level BPE keeps " A" one token after "Answer:"; the weights need not be real
    from model.checkpoint import load_tokenizer_only
    tok = load_tokenizer_only(need(assets.smollm2_gguf))
    model = Llama(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256)).init_weights(std=0.2, seed=0).eval()
    items = [{"subject": "stories", "question": "Where did Lily play?", "choices": ["park", "sea", "bed", "car"],
              "answer": 0},
             {"subject": "stories", "question": "What is red?", "choices": ["a ball", "the sky", "grass"], "answer": 0}]
    prompts = [multiple_choice.build_prompt(it) for it in items]
    conts = [multiple_choice.continuations(it) for it in items]
    for prompt, cont in zip(prompts, conts):  # the premise: each letter is one token after "Answer:"
        assert all(len(ids) - start == 1 for ids, start in
                   (multiple_choice.split_context(tok, prompt, c) for c in cont))
    passes = []
    hook = model.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    fast = multiple_choice.score_choices(model, tok, prompts, conts, batch_size=1)
    hook.remove()
    assert passes == [1, 1]  # one pass per question, not one per choice
    for prompt, cont, got in zip(prompts, conts, fast):
        for c, (logprob, count) in zip(cont, got):
            ids, start = multiple_choice.split_context(tok, prompt, c)
            want = score_tokens(model, [ids], [[i >= start for i in range(len(ids))]])[0]
            assert count == want[1] == 1 and logprob == pytest.approx(want[0], abs=1e-4)


# ------------------------------------------------------------------ generation-based suites

class FakeRunner:
    """Stands in for ChatRunner: answers with a function of the conversation, records calls."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def answer(self, conversations, desc=None):
        self.calls.append(conversations)
        return [self.reply(c) for c in conversations]

    def ask(self, prompts, desc=None):
        return self.answer([[{"role": "user", "content": p}] for p in prompts], desc)


def test_alignment_scores_answer_languages():
    answers = ["這是繁體中文的回答。", "这是简体中文的回答。", "This is English.", "ภาษาไทย"]
    got = alignment.score_alignment(["問一", "問二", "問三", "問四"], answers, "zh-Hant")
    assert got["aligned"] == 0.25 and got["langs"] == ["zh-Hant", "zh-Hans", "en", "th"]
    assert got["end_of_turn"] is None and got["echo_degenerate"] == 0.0


def test_alignment_on_the_real_prompt_sets_counts_parroting_as_echo():
    need(assets.shared_file, "data", "eval", "alpaca_eval_th.dev.jsonl")
    need(assets.shared_file, "data", "qa", "zh_tw_drcd.dev.jsonl")
    prompts = alignment.load_prompts("zh-Hant", limit=3)
    assert len(prompts) == 3 and all(identify(p).lang in ("zh-Hant", "zh") for p in prompts)
    parrot = FakeRunner(lambda conv: conv[-1]["content"])  # the prompt's own language, and nothing else
    got = alignment.evaluate(parrot, ["en", "th"], limit=4)
    for name in ("en", "th"):
        assert got[name]["aligned"] == 0.0 and got[name]["echo_degenerate"] == 1.0
        assert got[name]["aligned_with_echoes"] == 1.0 and got[name]["end_of_turn"] is None  # cannot tell
    reply = {"en": "Here is my own answer to that.", "th": "นี่คือคำตอบของผมเองครับ"}
    own = FakeRunner(lambda conv: reply[identify(conv[-1]["content"]).lang])
    got = alignment.evaluate(own, ["en", "th"], limit=4)
    assert got["en"]["aligned"] == 1.0 and got["th"]["aligned"] == 1.0


def test_translation_extracts_and_scores():
    assert translation.extract_translation('\n"Bonjour le monde."\nNote: this is French.') == "Bonjour le monde."
    assert translation.extract_translation("Thai: สวัสดี") == "สวัสดี"
    rows = read_jsonl(need(assets.shared_file, "data", "parallel", "pud_en_th_zh.dev.jsonl"), 3)
    by_source = {translation.translation_prompt(r[s], s, t): r[t] for r in rows
                 for s, t in (("en", "th"), ("th", "en"))}
    oracle = FakeRunner(lambda conv: by_source[conv[-1]["content"]])  # a perfect translator
    got = translation.evaluate(oracle, ["en-th", "th-en"], limit=3)
    assert got["en-th"]["bleu"] == pytest.approx(100) and got["th-en"]["chrf++"] == pytest.approx(100)
    assert got["en-th"]["tokenize"] == "char" and got["th-en"]["tokenize"] == "13a"


def test_mtbench_answers_judge_and_parse():
    need(assets.shared_file, "data", "eval", "mt_bench_en.jsonl")
    need(assets.shared_file, "data", "eval", "mt_bench_th.jsonl")
    assert mtbench.parse_rating("Good answer. Rating: [[8]]") == 8.0
    assert mtbench.parse_rating("Rating: [6.5]") == 6.5
    assert mtbench.parse_rating("no rating here") == -1 and mtbench.parse_rating("[[11]]") == -1
    th = mtbench.load_questions("th")
    assert len(th) == 80 and all(q["category"] != "unknown" for q in th)
    questions = mtbench.load_questions("en", limit=2)
    runner = FakeRunner(lambda conv: f"answer to: {conv[-1]['content'][:10]}")
    records = mtbench.generate_answers(runner, questions)
    second_turn = runner.calls[1][0]
    assert second_turn[1] == {"role": "assistant", "content": records[0]["answers"][0]}
    prompt = mtbench.judge_prompt(records[0], 2)[1]["content"]
    assert "second user question" in prompt and "The user wrote in English" in prompt
    ratings = iter(["Fine. [[7]]", "Poor. [[3]]", "Hmm.", "Great [[10]]"])
    got = mtbench.judge(FakeRunner(lambda conv: next(ratings)), records)
    assert got["invalid"] == 1 and got["score"] == pytest.approx(20 / 3)
    assert got["turn1"] == pytest.approx(7.0) and got["turn2"] == pytest.approx(6.5)
    assert got["lang_aligned"] == 1.0


def test_chat_runner_generates_with_a_real_model():
    from model.chat import get_template
    tok = CharTokenizer()  # stores no chat template: one is named
    runner = ChatRunner(tiny_llama(), tok, get_template(tok, "llama2"), max_new_tokens=5, batch_size=2)
    answers = runner.ask(["hi", "a longer prompt", "x"], desc=None)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # batched greedy answers equal one-at-a-time answers (left padding is masked)
    assert answers == [runner.ask([p], desc=None)[0] for p in ["hi", "a longer prompt", "x"]]


# ------------------------------------------------------------------ report and CLI

def test_report_writes_valid_json_markdown_and_svg(tmp_path):
    results = {"config": {"limit": 2}, "models": {
        "base": {"alignment": {"zh-Hant": {"aligned": 0.09, "shares": {"en": 0.91}}},
                 "translation": {"en-th": {"bleu": 3.5, "chrf++": 20.0, "examples": [{"x": 1}]}},
                 "ppl": {"pud-th": {"plain": {"ppl": 12.0, "per_text_ppl": [1.0]}}},
                 "mtbench": {"en": {"score": float("nan")}}},
        "inscp": {"alignment": {"zh-Hant": {"aligned": 0.99}},
                  "translation": {"en-th": {"bleu": 9.0, "chrf++": 31.0}}},
    }}
    paths = write_report(results, tmp_path)
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["models"]["base"]["mtbench"]["en"]["score"] is None
    md = paths["markdown"].read_text()
    assert "| metric | base | inscp |" in md
    assert "| alignment/zh-Hant/aligned | 0.090 | 0.990 |" in md
    assert "| ppl/pud-th/plain/ppl | 12.00 | – |" in md
    svgs = [p for name, p in paths.items() if name.startswith("chart_")]
    assert {p.name for p in svgs} == {"chart_rate.svg", "chart_0_100.svg", "chart_ppl.svg"}
    ns = "{http://www.w3.org/2000/svg}"
    bars = ET.parse(tmp_path / "chart_0_100.svg").getroot().findall(f"{ns}rect")
    assert len(bars) == 1 + 2 * 2 + 2          # background, 2 metrics x 2 models, 2 legend swatches
    for p in svgs:
        assert f"]({p.name})" in md
        ET.parse(p)
    assert headline(results["models"]["inscp"]) == {"alignment/zh-Hant/aligned": 0.99,
                                                    "translation/en-th/bleu": 9.0, "translation/en-th/chrf++": 31.0}


def test_cli_end_to_end_on_tinystories(tmp_path):
    from eval import run
    path = str(need(assets.tinystories_dir))
    results = run.main(["--model", path, "--name", "tiny", "--template", "llama2",  # TinyStories stores none
                        "--suite", ",".join(run.SUITES), "--limit", "2",
                        "--max-new-tokens", "3", "--batch-size", "4", "--directions", "en-th",
                        "--mtbench-langs", "en", "--judge", path, "--judge-template", "llama2", "--judge-max-new-tokens", "4",
                        "--out", str(tmp_path)])
    got = results["models"]["tiny"]
    assert set(got) == set(run.SUITES)
    assert 0 <= got["mc"]["mmlu"]["acc"] <= 1 and got["ppl"]["pud-en"]["plain"]["ppl"] > 1
    assert got["nll"]["drcd-zh-Hant"]["n"] == 2 and got["nll"]["alpaca-en"]["answer_nll"] > 0
    assert got["quick"]["sizes"]["max_new_tokens"] == 3 and got["quick"]["answer_nll"]["xquad-th"]["n"] == 2
    assert 0 <= got["alignment"]["th"]["end_of_turn"] <= 1
    assert got["mtbench"]["en"]["n"] == 2 and len(got["mtbench"]["en"]["judgements"]) == 4
    assert (tmp_path / "answers_tiny_en.jsonl").exists()
    json.loads((tmp_path / "results.json").read_text())
    assert "| metric | tiny |" in (tmp_path / "report.md").read_text()


def test_cli_checks_flags_paths_and_data_before_loading_a_model(tmp_path, monkeypatch, capsys):
    from eval import run
    path = str(need(assets.tinystories_dir))
    monkeypatch.setattr(run, "load", lambda *a, **k: pytest.fail("a model was loaded before the checks"))

    def refused(argv, *named):
        with pytest.raises(SystemExit) as exit_:
            run.main(["--model", path, "--template", "llama2", "--out", str(tmp_path / "out")] + argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert all(n in err for n in named), err
    refused(["--limit", "-1"], "--limit -1: must be >= 0")
    refused(["--max-new-tokens", "0"], "--max-new-tokens 0")
    refused(["--batch-size", "-2"], "--batch-size -2")
    refused(["--suite", "ppl,bogus"], "--suite")
    refused(["--quick", "--suite", "ppl"], "--quick")
    refused(["--alignment-sets", "en,fr"], "--alignment-sets", "'fr'")
    refused(["--suite", "nll", "--split", "holdout", "--nll-sets", "alpaca-en"], "--nll-sets", "alpaca-en")
    refused(["--model", str(tmp_path / "missing")], "--model", "missing: no such file or folder")
    (tmp_path / "a_file").write_text("x")
    refused(["--out", str(tmp_path / "a_file" / "out")], "--out", "cannot create the folder")
    # a data set missing from the shared folder is found before the first suite runs, not after it
    shared = tmp_path / "shared"
    (shared / "data" / "parallel").mkdir(parents=True)
    (shared / "data" / "parallel" / "pud_en_th_zh.dev.jsonl").write_text(
        need(assets.shared_file, "data", "parallel", "pud_en_th_zh.dev.jsonl").read_text(encoding="utf-8"))
    monkeypatch.setenv("LANGSHIFT_SHARED", str(shared))
    refused(["--suite", "ppl,mc"], "data file missing", "mmlu.dev.jsonl")
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_writes_results_after_every_suite(tmp_path, monkeypatch):
    from eval import run
    path = str(need(assets.tinystories_dir))

    def broken(*args, **kwargs):
        raise RuntimeError("mc broke")
    monkeypatch.setattr(multiple_choice, "evaluate", broken)
    with pytest.raises(RuntimeError, match="mc broke"):
        run.main(["--model", path, "--name", "tiny", "--template", "llama2", "--suite", "ppl,mc", "--limit", "2",
                  "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["tiny"]["ppl"]["pud-en"]["plain"]["ppl"] > 1   # the finished suite is kept
    assert "ppl/pud-en/plain/ppl" in (tmp_path / "report.md").read_text()


def test_cli_quantize_int8_evaluates_the_int8_model(tmp_path):
    """--quantize int8 reaches the loaded model: its perplexity is the int8 model's, close to but
    not equal to the fp32 one's (int8 quality itself: tests/test_quantize.py)."""
    from eval import run
    path = str(need(assets.tinystories_dir))
    argv = ["--model", path, "--template", "llama2", "--suite", "ppl", "--limit", "2", "--name", "tiny"]
    fp32 = run.main(argv + ["--out", str(tmp_path / "fp32")])["models"]["tiny"]["ppl"]["pud-en"]["plain"]["ppl"]
    int8 = run.main(argv + ["--quantize", "int8", "--out", str(tmp_path / "int8")])
    int8 = int8["models"]["tiny"]["ppl"]["pud-en"]["plain"]["ppl"]
    assert int8 != fp32 and abs(int8 / fp32 - 1) < 0.05, (fp32, int8)
