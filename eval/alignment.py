"""Language alignment: does the model answer in the language it was asked in?

InsCP's headline metric (Table 1): the share of answers written in Traditional Chinese when the
prompt is in Traditional Chinese (instruct 0.09, orgCP 0.49, InsCP 0.99), with English prompts
still answered in English. We ask each prompt set, identify each answer's language with
`eval.langid` (script counts + the Traditional/Simplified table) and report the shares.

An answer that copies the prompt back or loops on a phrase (eval.echo) is written in the prompt's
script but answers nothing: it is labelled `echo/degenerate`, reported beside the language
shares, and never counted as aligned. `aligned_with_echoes` keeps the script-only number of
earlier reports. `end_of_turn` is the share of answers that ended with the template's stop token
within the token budget (a chat model that has forgotten how to end its turn rambles on).

Prompt sets (dev split; the holdout split has the same sources):
    en       Alpaca-Eval instructions, English   (data/eval/alpaca_eval_th.dev.jsonl "instruction")
    th       the same instructions in Thai       ("instruction_th"; TransLLM's test set)
    zh-Hant  DRCD reading-comprehension questions, Traditional Chinese, asked without their
             passage (data/qa/zh_tw_drcd.dev.jsonl "question"), deduplicated
"""
from __future__ import annotations

from collections import Counter

from eval import echo
from eval.common import data_file, read_jsonl
from eval.langid import identify

PROMPT_SETS = {
    # name: (expected language, file under data/ or holdout/ by split, field)
    "en": ("en", {"data": "eval/alpaca_eval_th.dev.jsonl", "holdout": "eval/alpaca_eval_th.test.jsonl"},
           "instruction"),
    "th": ("th", {"data": "eval/alpaca_eval_th.dev.jsonl", "holdout": "eval/alpaca_eval_th.test.jsonl"},
           "instruction_th"),
    "zh-Hant": ("zh-Hant", {"data": "qa/zh_tw_drcd.dev.jsonl", "holdout": "qa/zh_tw_drcd.test.jsonl"},
                "question"),
}


def prompt_file(name: str, split: str = "data"):
    """Path of a prompt set's file (FileNotFoundError names it when it is missing)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}: choose from {sorted(PROMPT_SETS)}")
    return data_file(*PROMPT_SETS[name][1][split].split("/"), split=split)


def load_prompts(name: str, limit: int | None = None, split: str = "data") -> list[str]:
    """The first `limit` distinct prompts of a prompt set."""
    path, field = prompt_file(name, split), PROMPT_SETS[name][2]
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


def score_alignment(prompts: list[str], answers: list[str], expected: str,
                    stopped: list[bool] | None = None) -> dict:
    """-> {"aligned": share of answers in `expected` that are neither echo nor degenerate,
    "shares": {language or "echo/degenerate": share} (sums to 1), "echo_degenerate": that share,
    "aligned_with_echoes": share whose script alone says `expected`, "end_of_turn": share of
    stopped answers (None without `stopped`), "n", "langs": per-answer label, "echo": per-answer
    "echo" | "degenerate" | None}.

    For expected "zh-Hant", answers with Han characters but no distinguishing character ("zh")
    do not count as aligned; their share is reported under "zh" so the reader can see them."""
    if len(prompts) != len(answers) or (stopped is not None and len(stopped) != len(answers)):
        raise ValueError(f"{len(prompts)} prompts, {len(answers)} answers"
                         + (f", {len(stopped)} stop flags" if stopped is not None else ""))
    scripts = [identify(a).lang for a in answers]
    kinds = [echo.classify(p, a) for p, a in zip(prompts, answers)]
    labels = [echo.LABEL if kind else lang for lang, kind in zip(scripts, kinds)]
    n = max(len(answers), 1)
    tally = Counter(labels)
    return {
        "expected": expected,
        "aligned": sum(label == expected for label in labels) / n,
        "echo_degenerate": tally[echo.LABEL] / n,
        "aligned_with_echoes": sum(lang == expected for lang in scripts) / n,
        "end_of_turn": None if stopped is None else sum(stopped) / n,
        "shares": {label: k / n for label, k in tally.most_common()},
        "n": len(answers),
        "langs": labels,
        "echo": kinds,
    }


def ask(runner, prompts: list[str], desc: str) -> tuple[list[str], list[bool] | None]:
    """Answers, and whether each stopped in time when the runner can tell (model.runner.Runner
    and eval.common.ChatRunner: .results; model.tcot.TCOTRunner cannot)."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if hasattr(runner, "results"):
        results = runner.results(conversations, desc=desc)
        return [r.text for r in results], [r.stopped for r in results]
    return runner.answer(conversations, desc=desc), None


def evaluate(runner, sets: list[str] = ("en", "th", "zh-Hant"), limit: int | None = 50,
             split: str = "data") -> dict:
    """runner: an eval.common.ChatRunner (or anything with .answer). -> {set name:
    score_alignment(...) + "examples": [{"prompt", "answer", "label", "stopped"}]}.

    Every set's prompts go to the runner in one call, so its batches are full across sets."""
    prompts = {name: load_prompts(name, limit, split) for name in sets}
    flat = [p for name in sets for p in prompts[name]]
    answers, stopped = ask(runner, flat, "alignment " + ",".join(sets))
    results, start = {}, 0
    for name in sets:
        end = start + len(prompts[name])
        part = None if stopped is None else stopped[start:end]
        scored = score_alignment(prompts[name], answers[start:end], PROMPT_SETS[name][0], part)
        results[name] = {**scored, "examples": [
            {"prompt": p, "answer": a, "label": label, "stopped": None if part is None else part[i]}
            for i, (p, a, label) in enumerate(zip(prompts[name], answers[start:end], scored["langs"]))]}
        start = end
    return results
