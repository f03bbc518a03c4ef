"""Echoes and degenerate repetitions: answers that must not count as "written in the prompt's
language".

A small model asked in Thai or Chinese often copies the question back, or loops on a phrase until
its token budget runs out. Script-based language id calls such an answer "Thai" or "Traditional
Chinese", so the language share of a model that only parrots its prompt would be perfect. This
file labels those answers `echo/degenerate`; eval.alignment reports their share beside the
language shares and never counts them as aligned.

Both tests work on characters, so they treat English, Thai and Chinese alike: text is lower-cased
and all whitespace is removed first (as chrF does), so re-wrapped lines still match.

echo        at least ECHO_THRESHOLD (0.8) of the answer's characters lie inside a character
            ECHO_N-gram (4) that also occurs in the prompt, and the answer has at least
            ECHO_MIN_CHARS (8) characters: a word or two picked from an "A or B?" question
            ("Blue", "藍色") answers it.
            Why 4 and 0.8: 4 characters are two or three Chinese words, about one Thai syllable
            cluster, most of an English word; on the dev data, chance 4-gram overlap between a
            question and a text that answers it stays low (p99 0.16 for DRCD paragraphs, 0.10 for
            Thai TUD text, 0.41 / 0.36 for XQuAD Thai / English paragraphs), while a parroted prompt
            scores 0.9-1.0. Real short English answers restate the question
            ("What year was the first iPhone released?" -> "The first iPhone was released on June
            29, 2007.": 0.56), so the bar sits above that: 0.8 keeps every answer that adds a
            fifth of its own text. Known misses: answers to rewrite tasks, which legitimately copy
            the prompt's text (16 of 587 no-input Alpaca reference answers score >= 0.8).
degenerate  more than REPEAT_THRESHOLD (0.5) of the answer's character REPEAT_N-grams (10) repeat an
            earlier 10-gram of the same answer: Welleck et al.'s seq-rep-n ("Neural text
            degeneration with unlikelihood training", 2019), counted on characters so that it
            works without word boundaries. Why 10 and 0.5: 10 characters are a phrase in every
            script; over the 999 Alpaca reference answers (English) the largest value is 0.30,
            over DRCD paragraphs 0.14, XQuAD paragraphs 0.19, Thai TUD text 0.12; a greedy loop
            that fills the budget scores 0.6-0.95. Text shorter than 10 characters is never
            degenerate.
"""
from __future__ import annotations

ECHO_N = 4
ECHO_THRESHOLD = 0.8
ECHO_MIN_CHARS = 2 * ECHO_N
REPEAT_N = 10
REPEAT_THRESHOLD = 0.5
LABEL = "echo/degenerate"


def normalise(text: str) -> str:
    """Lower-cased, all whitespace removed: the characters the tests compare."""
    return "".join(text.lower().split())


def prompt_overlap(answer: str, prompt: str, n: int = ECHO_N) -> float:
    """Share (0..1) of the answer's characters covered by a character n-gram that also occurs in
    the prompt (0 for an answer shorter than n)."""
    a, p = normalise(answer), normalise(prompt)
    if len(a) < n:
        return 0.0
    in_prompt = {p[i:i + n] for i in range(len(p) - n + 1)}
    covered = [False] * len(a)
    for i in range(len(a) - n + 1):
        if a[i:i + n] in in_prompt:
            covered[i:i + n] = [True] * n
    return sum(covered) / len(a)


def repetition(answer: str, n: int = REPEAT_N) -> float:
    """seq-rep-n on characters: share (0..1) of the answer's n-grams that repeat an earlier one
    (0 for an answer shorter than n)."""
    a = normalise(answer)
    grams = [a[i:i + n] for i in range(len(a) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def classify(prompt: str, answer: str) -> str | None:
    """"echo", "degenerate" or None (a real answer, whatever its language). Echo is tested first:
    a prompt copied over and over is both, and it is the copying that matters."""
    if len(normalise(answer)) >= ECHO_MIN_CHARS and prompt_overlap(answer, prompt) >= ECHO_THRESHOLD:
        return "echo"
    if repetition(answer) > REPEAT_THRESHOLD:
        return "degenerate"
    return None
