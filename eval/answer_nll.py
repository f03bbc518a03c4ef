"""Answer likelihood: how well does the model predict a reference answer, given the question?

    answer NLL = - sum over the answer's tokens of log p(token | everything before it)
                 / number of answer tokens                       (all items of a set together)

Each item is a two-turn chat in the model's own template: the user turn holds the question (with
its passage for reading comprehension), the assistant turn the reference answer; the template's
default system prompt is kept, so the model sees what a chat would show it. Only the assistant's
tokens and its end-of-turn token are scored: the template's loss mask (model.chat
render_with_mask), the same tokens supervised fine-tuning trains. Nothing is generated, so there
is no decoding noise: at 135M parameters, where generated answers are mostly echoes, this number
still moves when training teaches the model a language. `eot_nll` is the NLL of the template's
end-of-turn token right after each complete reference answer: a model that has stopped ending its
turns (a known cost of continual pre-training) shows it here without generating anything; it
means most on alpaca-en, whose references are whole answers (the QA references are extracted
spans, after which a chat model rightly does not stop: SmolLM2 gives <|im_end|> about e^-24
after a DRCD span, e^-0.45 after an Alpaca answer). Lower is better for both; compare models only on
the same items (the items are chosen from the data by characters, never by tokens, so a model with
an extended vocabulary is scored on the same items). Per token, so it is comparable between
models with the same tokenizer only (a vocabulary extension changes what one token is).

Sets (items in file order, one question per passage, optionally only items of at most
`max_chars` characters):
    drcd-zh-Hant  DRCD (Traditional Chinese): "{passage}\\n\\n{question}" -> answer span
    xquad-th      XQuAD, Thai: "{passage}\\n\\n{question}" -> answer span
    xquad-en      the same XQuAD items in English
    alpaca-en     Alpaca (English): "{instruction}" or "{instruction}\\n\\n{input}" -> output
A prompt longer than the model's context loses its oldest tokens (counted in `truncated`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from eval.common import data_file, max_len_of, read_jsonl, token_logprobs


@dataclass(frozen=True)
class QASet:
    lang: str
    files: dict[str, str]                    # split -> file under data/ or holdout/
    pair: Callable[[dict], tuple[str, str]]  # row -> (user prompt, reference answer)
    key: Callable[[dict], str]               # rows with the same key share a passage
    size: Callable[[dict], int]              # characters of the row that count for max_chars


def _qa(context: str, question: str, answer: str) -> Callable[[dict], tuple[str, str]]:
    return lambda r: (f"{r[context].strip()}\n\n{r[question].strip()}", r[answer].strip())


def _xquad_size(r: dict) -> int:
    # both languages: xquad-th and xquad-en pick the same items
    return max(len(r[f"context_{x}"]) + len(r[f"question_{x}"]) + len(r[f"answer_{x}"]) for x in ("en", "th"))


def _alpaca(r: dict) -> tuple[str, str]:
    prompt = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r.get("input", "").strip() else "")
    return prompt, r["output"].strip()


_DRCD = {"data": "qa/zh_tw_drcd.dev.jsonl", "holdout": "qa/zh_tw_drcd.test.jsonl"}
_XQUAD = {"data": "qa/xquad_en_th.dev.jsonl", "holdout": "qa/xquad_en_th.test.jsonl"}
QA_SETS = {
    "drcd-zh-Hant": QASet("zh-Hant", _DRCD, _qa("context", "question", "answer"), lambda r: r["context"],
                          lambda r: len(r["context"]) + len(r["question"]) + len(r["answer"])),
    "xquad-th": QASet("th", _XQUAD, _qa("context_th", "question_th", "answer_th"), lambda r: r["context_en"],
                      _xquad_size),
    "xquad-en": QASet("en", _XQUAD, _qa("context_en", "question_en", "answer_en"), lambda r: r["context_en"],
                      _xquad_size),
    # no test half: Alpaca is instruction data, not a benchmark
    "alpaca-en": QASet("en", {"data": "instruct/alpaca_en_demo.jsonl"}, _alpaca, lambda r: r["instruction"],
                       lambda r: sum(len(r.get(f, "")) for f in ("instruction", "input", "output"))),
}


def sets_for(split: str = "data") -> list[str]:
    """The sets that have a file for this split (alpaca-en has no holdout half)."""
    return [name for name, spec in QA_SETS.items() if split in spec.files]


def set_file(name: str, split: str = "data"):
    """Path of a set's file; a set without this split is refused in one line."""
    if name not in QA_SETS:
        raise ValueError(f"unknown answer-NLL set {name!r}: choose from {', '.join(QA_SETS)}")
    files = QA_SETS[name].files
    if split not in files:
        raise ValueError(f"answer-NLL set {name!r} has no {split!r} split (it has {', '.join(files)})")
    return data_file(*files[split].split("/"), split=split)


def load_pairs(name: str, limit: int | None = None, max_chars: int | None = None,
               split: str = "data") -> list[tuple[str, str]]:
    """The first `limit` (prompt, answer) pairs of a set, one per passage, each of at most
    max_chars characters (None: any length)."""
    spec, path = QA_SETS[name], set_file(name, split)
    seen, pairs = set(), []
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            key, size = spec.key(row), spec.size(row)
            prompt, answer = spec.pair(row)
        except (KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{path}:{i}: missing or non-text field ({err})") from None
        if key in seen or (max_chars is not None and size > max_chars) or not answer:
            continue
        seen.add(key)
        pairs.append((prompt, answer))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def answer_ids(template, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
    """(ids, scored) of [user: prompt, assistant: answer] in the template, with its default system
    prompt; scored marks the answer's tokens and its end-of-turn token."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    ids, scored = template.render_with_mask(messages, add_generation_prompt=False)
    last = max(i for i, s in enumerate(scored) if s)
    if ids[last] not in template.stop_ids:  # eot_nll reads the last scored token as the end of turn
        raise ValueError(f"{template.name} template: the answer's loss mask ends in token {ids[last]}, "
                         f"not an end-of-turn id {template.stop_ids}")
    return ids, scored


def answer_nll(model, template, pairs: list[tuple[str, str]], batch_size: int = 8,
               desc: str | None = "answer nll") -> dict:
    """Mean NLL per answer token of the pairs, and mean NLL of the end-of-turn token after each
    answer (is the model ready to stop when the answer is complete?).
    -> {"answer_nll", "eot_nll", "tokens", "n", "truncated"}."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to score")
    limit = max_len_of(model)
    seqs, targets, truncated = [], [], 0
    for prompt, answer in pairs:
        ids, scored = answer_ids(template, prompt, answer)
        if len(ids) > limit:  # keep the end: the answer and the question just before it
            ids, scored, truncated = ids[-limit:], scored[-limit:], truncated + 1
        seqs.append(ids)
        targets.append(scored)
    scored = token_logprobs(model, seqs, targets, batch_size=batch_size, desc=desc)
    tokens = sum(len(lps) for lps in scored)
    # the last scored token of every item is the template's end-of-turn token (its loss mask ends there)
    return {"answer_nll": -sum(map(sum, scored)) / tokens, "eot_nll": -sum(lps[-1] for lps in scored) / len(scored),
            "tokens": tokens, "n": len(pairs), "truncated": truncated}


def evaluate(model, template, sets: list[str] | None = None, limit: int | None = 50, max_chars: int | None = None,
             split: str = "data", batch_size: int = 8) -> dict:
    """-> {set name: answer_nll(...) + "lang"} for each set (default: every set of the split)."""
    results = {}
    for name in sets or sets_for(split):
        pairs = load_pairs(name, limit, max_chars, split)
        if not pairs:  # e.g. XQuAD's holdout half has no item of <= 400 characters
            raise ValueError(f"answer NLL {name} ({split} split, {set_file(name, split)}): no item of at most "
                             f"{max_chars} characters: allow longer ones (the quick report's nll-max-chars size)")
        results[name] = {"lang": QA_SETS[name].lang,
                         **answer_nll(model, template, pairs, batch_size, desc=f"answer nll {name}")}
    return results
