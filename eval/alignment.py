"""Language alignment: does the model answer in the language it was asked in?

InsCP's headline metric (Table 1): the share of answers written in Traditional Chinese when the
prompt is in Traditional Chinese (instruct 0.09, orgCP 0.49, InsCP 0.99), with English prompts
still answered in English. We ask each prompt set, identify each answer's language with
`eval.langid` (script counts + the Traditional/Simplified table) and report the shares.

Prompt sets (dev split; the holdout split has the same sources):
    en       Alpaca-Eval instructions, English   (data/eval/alpaca_eval_th.dev.jsonl "instruction")
    th       the same instructions in Thai       ("instruction_th"; TransLLM's test set)
    zh-Hant  DRCD reading-comprehension questions, Traditional Chinese, asked without their
             passage (data/qa/zh_tw_drcd.dev.jsonl "question"), deduplicated
"""
from __future__ import annotations

from eval.common import data_file, read_jsonl
from eval.langid import identify, language_shares

PROMPT_SETS = {
    # name: (expected language, file under data/ or holdout/ by split, field)
    "en": ("en", {"data": "eval/alpaca_eval_th.dev.jsonl", "holdout": "eval/alpaca_eval_th.test.jsonl"},
           "instruction"),
    "th": ("th", {"data": "eval/alpaca_eval_th.dev.jsonl", "holdout": "eval/alpaca_eval_th.test.jsonl"},
           "instruction_th"),
    "zh-Hant": ("zh-Hant", {"data": "qa/zh_tw_drcd.dev.jsonl", "holdout": "qa/zh_tw_drcd.test.jsonl"},
                "question"),
}


def load_prompts(name: str, limit: int | None = None, split: str = "data") -> list[str]:
    """The first `limit` distinct prompts of a prompt set."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}: choose from {sorted(PROMPT_SETS)}")
    _, files, field = PROMPT_SETS[name]
    path = data_file(*files[split].split("/"), split=split)
    seen, prompts = set(), []
    for i, row in enumerate(read_jsonl(path), 1):
        text = row.get(field)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{i}: field {field!r} missing or not text")
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def score_alignment(answers: list[str], expected: str) -> dict:
    """-> {"aligned": share identified as `expected`, "shares": {lang: share}, "n", "langs": [...]}.

    For expected "zh-Hant", answers with Han characters but no distinguishing character ("zh")
    do not count as aligned; their share is reported under "zh" so the reader can see them."""
    langs = [identify(a).lang for a in answers]
    return {
        "expected": expected,
        "aligned": sum(lang == expected for lang in langs) / max(len(answers), 1),
        "shares": language_shares(answers),
        "n": len(answers),
        "langs": langs,
    }


def evaluate(runner, sets: list[str] = ("en", "th", "zh-Hant"), limit: int | None = 50,
             split: str = "data") -> dict:
    """runner: an eval.common.ChatRunner. -> {set name: score_alignment(...) + "answers"}."""
    results = {}
    for name in sets:
        expected = PROMPT_SETS[name][0]
        prompts = load_prompts(name, limit, split)
        answers = runner.ask(prompts, desc=f"alignment {name}")
        results[name] = {**score_alignment(answers, expected),
                         "examples": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]}
    return results
