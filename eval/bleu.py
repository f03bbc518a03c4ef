"""Corpus BLEU and chrF++, written out by hand after sacrebleu's definitions.

BLEU (Papineni et al. 2002; sacrebleu defaults)
    Tokenise hypothesis and reference, count for n = 1..4 the hypothesis n-grams (`total`) and
    those also in the reference, each clipped to its count there (`correct`); sum both over the
    whole corpus. p_n = correct_n / total_n, with sacrebleu's 'exp' smoothing for an n whose
    correct count is 0: p_n = 1 / (2^k * total_n) for the k-th such n. The brevity penalty
    BP = exp(1 - r/c) when the corpus hypothesis length c is below the reference length r, else 1.
        BLEU = 100 * BP * exp(mean_n log p_n)
    With several references per segment, an n-gram is clipped to its largest count in any of
    them and r adds the reference length closest to the hypothesis length (shorter on a tie).

Tokenisers (the `tokenize` argument):
    "13a"  mteval-v13a, sacrebleu's default: split off punctuation, keep 3.5 and 1,000 whole.
    "zh"   sacrebleu's Chinese tokenizer: every CJK character is its own token, the rest is 13a.
    "char" every non-space character is a token: for Thai, which writes no spaces between words
           and has no rule-based word splitter (sacrebleu's own 'char' tokenizer does the same).
    `tokenizer_for(lang)` picks 13a for English, zh for Chinese, char for Thai.

chrF++ (Popović 2015, 2017; sacrebleu CHRF(word_order=2))
    Character n-grams n = 1..6 of the text with all whitespace removed, plus word n-grams n = 1..2
    of the whitespace-split words with one leading or trailing punctuation mark split off. For
    each of these 8 orders count hypothesis, reference and matched (min count) n-grams, summed
    over the corpus. Orders where both sides have n-grams are averaged:
        P = mean precision, R = mean recall,  chrF = 100 * (1 + beta^2) P R / (beta^2 P + R),
    beta = 2 (recall counts twice as much as precision). With several references the one giving
    the best segment score is used. For Thai and Chinese, the word part sees whole space-free
    chunks (as in sacrebleu), so there chrF++ is nearly plain chrF; the character part does the work.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

# ---------------------------------------------------------------- tokenisers

_13A_RULES = [
    # punctuation and symbols: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),   # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),   # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),         # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenisation, as sacrebleu's default: "Hello, world." -> [Hello , world .]."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return _regexp_tokenize(f" {line} ")


def _regexp_tokenize(line: str) -> list[str]:
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


# sacrebleu's tokenizer_zh ranges (CJK ideographs, CJK punctuation, full-width forms), as sacrebleu
# actually applies them. It writes two ranges with five-digit escapes, u'\u20000'..u'\u2a6d6' and
# u'\u2f800'..u'\u2fa1d', which Python reads as a four-digit character plus a digit; comparing one
# character with those two-character strings makes the ranges U+2001..U+2A6D (general punctuation
# such as the curly quotes “ ” and the dash —, arrows, math symbols) and U+2F81..U+2FA1, and leaves
# the supplementary-plane ideographs (U+20000...) out. Published BLEU scores are sacrebleu's, so we
# follow it; tests/test_eval_metrics.py checks every code point against sacrebleu.
_CJK_RANGES = [
    (0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9), (0x2001, 0x2A6D), (0x2F81, 0x2FA1), (0xFF00, 0xFFEF), (0x2E80, 0x2EFF),
    (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF), (0x3100, 0x312F),
    (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3200, 0x32FF), (0x3300, 0x33FF),
]


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _CJK_RANGES)


def tokenize_zh(line: str) -> list[str]:
    """Each CJK character (and CJK punctuation) a token; runs of other text tokenised as 13a."""
    spaced = "".join(f" {ch} " if _is_cjk(ch) else ch for ch in line.strip())
    return _regexp_tokenize(spaced)


def tokenize_char(line: str) -> list[str]:
    """Every non-whitespace character a token."""
    return [ch for ch in line if not ch.isspace()]


TOKENIZERS = {"13a": tokenize_13a, "zh": tokenize_zh, "char": tokenize_char}


def tokenizer_for(lang: str) -> str:
    """The BLEU tokeniser for a target language code: en -> 13a, zh* -> zh, th -> char."""
    if lang.startswith("zh") or lang in ("ja",):
        return "zh"
    if lang in ("th", "lo", "km", "my"):
        return "char"
    return "13a"


# ---------------------------------------------------------------- BLEU

def _ngrams(tokens: list, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _as_reference_lists(references) -> list[list[str]]:
    """Accept one reference per segment (list[str]) or several (list[list[str]])."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


@dataclass
class BLEUScore:
    score: float            # 0..100
    precisions: list[float]  # p_1..p_4 in percent, after smoothing
    bp: float               # brevity penalty
    sys_len: int
    ref_len: int
    correct: list[int]
    total: list[int]


def corpus_bleu(hypotheses: list[str], references, tokenize: str = "13a", max_order: int = 4,
                lowercase: bool = False) -> BLEUScore:
    """hypotheses[N], references[N] (str or list of str per segment) -> BLEUScore."""
    refs = _as_reference_lists(references)
    if len(hypotheses) != len(refs):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(refs)} references")
    tok = TOKENIZERS[tokenize]
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hyp, seg_refs in zip(hypotheses, refs):
        if lowercase:
            hyp, seg_refs = hyp.lower(), [r.lower() for r in seg_refs]
        h = tok(hyp)
        rs = [tok(r) for r in seg_refs]
        sys_len += len(h)
        # closest reference length; on a tie the shorter one
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_order + 1):
            hyp_counts = _ngrams(h, n)
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)  # union = elementwise max count
            total[n - 1] += sum(hyp_counts.values())
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
    return _bleu_from_counts(correct, total, sys_len, ref_len)


def _bleu_from_counts(correct, total, sys_len, ref_len) -> BLEUScore:
    order = len(correct)
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * order
    if not any(correct):  # no n-gram matches at all: 0 (sacrebleu returns early too)
        return BLEUScore(0.0, precisions, bp, sys_len, ref_len, list(correct), list(total))
    smooth = 1.0
    for n in range(order):
        if total[n] == 0:  # hypotheses too short to have n-grams: p_n stays 0, so BLEU is 0
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if min(precisions) == 0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / order)
    return BLEUScore(score, precisions, bp, sys_len, ref_len, list(correct), list(total))


# ---------------------------------------------------------------- chrF++

_PUNCTUATION = set(string.punctuation)


def chrf_words(sentence: str) -> list[str]:
    """Whitespace words with one leading or trailing ASCII punctuation mark split off
    (sacrebleu's rule: "world." -> "world", "."; "(hi)" -> "(hi", ")")."""
    words = []
    for w in sentence.split():
        if len(w) > 1 and w[-1] in _PUNCTUATION:
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _PUNCTUATION:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def _chrf_ngrams(sentence: str, char_order: int, word_order: int) -> list[Counter]:
    chars = "".join(sentence.split())
    grams = [Counter(chars[i:i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    words = chrf_words(sentence)
    grams += [_ngrams(words, n) for n in range(1, word_order + 1)]
    return grams


def _chrf_stats(hyp_grams: list[Counter], ref_grams: list[Counter]) -> list[int]:
    """Flat [hyp, ref, match] counts per order. Like sacrebleu, hypothesis n-grams of an order
    the reference lacks are not counted (that order then drops out of the average)."""
    stats = []
    for h, r in zip(hyp_grams, ref_grams):
        stats += [sum(h.values()) if r else 0, sum(r.values()), sum((h & r).values())]
    return stats


def _chrf_from_stats(stats: list[int], beta: float) -> float:
    precision = recall = 0.0
    effective = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i:i + 3]
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    if precision + recall == 0:
        return 0.0
    b2 = beta ** 2
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def corpus_chrf(hypotheses: list[str], references, char_order: int = 6, word_order: int = 2,
                beta: float = 2.0, lowercase: bool = False) -> float:
    """Corpus chrF (word_order=0) or chrF++ (word_order=2, the default), 0..100."""
    refs = _as_reference_lists(references)
    if len(hypotheses) != len(refs):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(refs)} references")
    corpus = [0] * (3 * (char_order + word_order))
    for hyp, seg_refs in zip(hypotheses, refs):
        if lowercase:
            hyp, seg_refs = hyp.lower(), [r.lower() for r in seg_refs]
        h = _chrf_ngrams(hyp, char_order, word_order)
        candidates = [_chrf_stats(h, _chrf_ngrams(r, char_order, word_order)) for r in seg_refs]
        best = max(candidates, key=lambda s: _chrf_from_stats(s, beta))  # first best on ties
        corpus = [a + b for a, b in zip(corpus, best)]
    return _chrf_from_stats(corpus, beta)
