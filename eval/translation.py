"""Translation quality: ask the chat model to translate PUD sentences, score BLEU and chrF++.

The PUD treebanks give the same 1,000 sentences in English, Thai and Traditional Chinese
(data/parallel/pud_en_th_zh.dev.jsonl: {id, en, th, zh}). Each direction (default en->th,
th->en, en->zh, zh->en) asks, zero-shot and greedy:

    Translate the following {Source} text into {Target}. Reply with the translation only.

    {sentence}

The answer's first non-empty line is the translation (chat models like to add a note after
it), with a leading label ("Thai: ...") and surrounding quotes removed. Scores use the target language's tokeniser: 13a for
English, one token per CJK character for Chinese, one per character for Thai (eval/bleu.py).
"""
from __future__ import annotations

import re

from eval.bleu import corpus_bleu, corpus_chrf, tokenizer_for
from eval.common import data_file, read_jsonl

LANG_NAMES = {"en": "English", "th": "Thai", "zh": "Traditional Chinese"}
DEFAULT_DIRECTIONS = ("en-th", "th-en", "en-zh", "zh-en")
FILES = {"data": "parallel/pud_en_th_zh.dev.jsonl", "holdout": "parallel/pud_en_th_zh.test.jsonl"}


def translation_prompt(text: str, src: str, tgt: str) -> str:
    return (f"Translate the following {LANG_NAMES[src]} text into {LANG_NAMES[tgt]}. "
            f"Reply with the translation only.\n\n{text.strip()}")


_LABEL = re.compile(r"^(translation|english|thai|traditional chinese|chinese)\s*:\s*", re.IGNORECASE)


def extract_translation(answer: str) -> str:
    """First non-empty line of the answer, without a leading "Thai:"/"Translation:" label or
    wrapping quotes."""
    for line in answer.strip().splitlines():
        line = _LABEL.sub("", line.strip()).strip()
        if line:
            for left, right in ('""', "“”", "''", "「」"):
                if len(line) > 1 and line[0] == left and line[-1] == right:
                    line = line[1:-1].strip()
            return line
    return ""


def score_direction(hypotheses: list[str], references: list[str], tgt: str) -> dict:
    """-> {"bleu", "chrf++", "tokenize", "bp", "precisions"} for one direction."""
    bleu = corpus_bleu(hypotheses, references, tokenize=tokenizer_for(tgt))
    return {"bleu": bleu.score, "chrf++": corpus_chrf(hypotheses, references), "tokenize": tokenizer_for(tgt),
            "bp": bleu.bp, "precisions": bleu.precisions, "n": len(hypotheses)}


def evaluate(runner, directions=DEFAULT_DIRECTIONS, limit: int | None = 50, split: str = "data") -> dict:
    """runner: an eval.common.ChatRunner. -> {"en-th": {...scores, "examples"}, ...}."""
    rows = read_jsonl(data_file(*FILES[split].split("/"), split=split), limit)
    results = {}
    for direction in directions:
        src, tgt = direction.split("-")
        if src not in LANG_NAMES or tgt not in LANG_NAMES:
            raise ValueError(f"direction {direction!r}: languages must be among {sorted(LANG_NAMES)}")
        answers = runner.ask([translation_prompt(r[src], src, tgt) for r in rows], desc=f"translate {direction}")
        hyps = [extract_translation(a) for a in answers]
        refs = [r[tgt] for r in rows]
        results[direction] = {**score_direction(hyps, refs, tgt),
                              "examples": [{"source": r[src], "reference": ref, "hypothesis": h}
                                           for r, ref, h in zip(rows, refs, hyps)]}
    return results
