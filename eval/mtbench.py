"""MT-bench: two-turn questions answered by the model, graded 1-10 by a judge model.

Questions: data/eval/mt_bench_en.jsonl (FastChat's 80, {question_id, category, turns}) and
data/eval/mt_bench_th.jsonl (TransLLM's Thai translation, {Instruct_id, instruction1(_th),
instruction2(_th)}, in the same order as the English file, which gives the Thai rows their category).

Answering (`generate_answers`): every first turn in one batched pass, then every second turn with
the first exchange in the context. The runner only needs `.answer(conversations) -> [str]`, so a
method with its own inference (TransLLM answers via English and rebuilds the second turn's
context from the English exchange) plugs in its own runner.

Grading (`judge`, single-answer grading of Zheng et al. 2023): the judge model is shown the
question (for turn 2, the whole conversation, and told to grade the second answer), asked for a
short explanation and then a rating in the form [[rating]] on a 1-10 scale. As InsCP does for
Traditional Chinese, the judge is also told which language the user wrote in and that an
answer in another language fails the user. The judge is any chat model loaded with
model.checkpoint.load (a small local judge gives noisy scores; report which judge was used).
Unlike FastChat we have no reference answers for math/reasoning/coding, so those categories are
graded without one. A judgement with no parsable rating scores -1 and is left out of the mean.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from eval.common import data_file, read_jsonl
from eval.langid import identify

LANG_NAMES = {"en": "English", "th": "Thai", "zh-Hant": "Traditional Chinese"}

JUDGE_SYSTEM = "You are a helpful assistant."

JUDGE_SINGLE = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as "
    "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
    "{language_rule}Begin your evaluation by providing a short explanation. Be as objective as possible. "
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    "following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

JUDGE_MULTI = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as "
    "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
    "Your evaluation should focus on the assistant's answer to the second user question. "
    "{language_rule}Begin your evaluation by providing a short explanation. Be as objective as possible. "
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    "following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "<|The Start of Assistant A's Conversation with User|>\n\n"
    "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
    "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)

# The language-alignment rule InsCP added to the judge prompt (wording ours).
LANGUAGE_RULE = ("The user wrote in {language}. The response must be written in {language}; if it is "
                 "mostly written in another language, rate it 1 no matter how good its content is. ")


def load_questions(lang: str = "en", limit: int | None = None) -> list[dict]:
    """-> [{"question_id", "category", "turns": [turn1, turn2], "lang"}] for lang en | th."""
    english = read_jsonl(data_file("eval", "mt_bench_en.jsonl"))
    if lang == "en":
        questions = [{"question_id": r["question_id"], "category": r["category"], "turns": list(r["turns"]),
                      "lang": "en"} for r in english]
    elif lang == "th":
        path = data_file("eval", "mt_bench_th.jsonl")
        by_first_turn = {r["turns"][0].strip(): r for r in english}
        questions = []
        for i, r in enumerate(read_jsonl(path), 1):
            en = by_first_turn.get(r["instruction1"].strip())
            questions.append({"question_id": en["question_id"] if en else f"th-{r['Instruct_id']}",
                              "category": en["category"] if en else "unknown",
                              "turns": [r["instruction1_th"], r["instruction2_th"]], "lang": "th"})
    else:
        raise ValueError(f"MT-bench language must be en or th, got {lang!r}")
    return questions[:limit] if limit is not None else questions


def generate_answers(runner, questions: list[dict], model_name: str = "model") -> list[dict]:
    """Two turns per question, batched per turn. -> answer records (FastChat-like); with a runner
    that thinks in English (model.tcot.TCOTRunner) each record also holds its English `thoughts`."""
    first = runner.answer([[{"role": "user", "content": q["turns"][0]}] for q in questions], desc="mt-bench turn 1")
    second = runner.answer([[{"role": "user", "content": q["turns"][0]},
                             {"role": "assistant", "content": a},
                             {"role": "user", "content": q["turns"][1]}] for q, a in zip(questions, first)],
                           desc="mt-bench turn 2")
    records = [{"question_id": q["question_id"], "category": q["category"], "lang": q["lang"], "model": model_name,
                "turns": q["turns"], "answers": [a1, a2]} for q, a1, a2 in zip(questions, first, second)]
    if hasattr(runner, "thoughts"):
        for r in records:
            r["thoughts"] = [runner.thoughts(q, a) for q, a in zip(r["turns"], r["answers"])]
    return records


def write_answers(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def judge_prompt(record: dict, turn: int, language_rule: bool = True) -> list[dict]:
    """Judge messages for turn 1 or 2 of an answer record."""
    rule = LANGUAGE_RULE.format(language=LANG_NAMES[record["lang"]]) if language_rule else ""
    q, a = record["turns"], record["answers"]
    if turn == 1:
        text = JUDGE_SINGLE.format(language_rule=rule, question=q[0], answer=a[0])
    elif turn == 2:
        text = JUDGE_MULTI.format(language_rule=rule, question_1=q[0], answer_1=a[0], question_2=q[1], answer_2=a[1])
    else:
        raise ValueError(f"turn must be 1 or 2, got {turn}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}]


_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgement: str) -> float:
    """The [[rating]] of a judgement (FastChat falls back to [rating]); -1 when there is none or
    it is outside 1..10."""
    found = _RATING.findall(judgement) or _RATING_LOOSE.findall(judgement)
    if not found:
        return -1.0
    value = float(found[-1])
    return value if 1 <= value <= 10 else -1.0


def judge(judge_runner, records: list[dict], language_rule: bool = True) -> dict:
    """Grade both turns of every record with a judge ChatRunner (greedy).

    -> {"score": mean over valid ratings, "turn1", "turn2", "per_category", "invalid", "lang_aligned",
        "judgements": [{"question_id", "turn", "rating", "judgement"}]}"""
    jobs = [(r, t) for r in records for t in (1, 2)]
    texts = judge_runner.answer([judge_prompt(r, t, language_rule) for r, t in jobs], desc="mt-bench judge")
    judgements = [{"question_id": r["question_id"], "category": r["category"], "turn": t,
                   "rating": parse_rating(text), "judgement": text} for (r, t), text in zip(jobs, texts)]
    return {**summarize(judgements),
            "lang_aligned": sum(identify(a).lang == r["lang"] for r in records for a in r["answers"])
            / max(2 * len(records), 1),
            "judgements": judgements}


def summarize(judgements: list[dict]) -> dict:
    """Means of the valid ratings: overall, per turn, per category."""
    def mean(values):
        values = [v for v in values if v >= 1]
        return sum(values) / len(values) if values else float("nan")
    cats = sorted({j["category"] for j in judgements})
    return {
        "score": mean([j["rating"] for j in judgements]),
        "turn1": mean([j["rating"] for j in judgements if j["turn"] == 1]),
        "turn2": mean([j["rating"] for j in judgements if j["turn"] == 2]),
        "per_category": {c: mean([j["rating"] for j in judgements if j["category"] == c]) for c in cats},
        "invalid": sum(j["rating"] < 1 for j in judgements),
    }
