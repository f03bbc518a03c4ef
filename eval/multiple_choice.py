"""Multiple-choice exams (MMLU, TMMLU, Thai O-NET) scored by log-likelihood.

Items are {"subject": str, "question": str, "choices": [str, ...], "answer": int} (the answer is
the 0-based index of the right choice; the dev files hold ints only, 2 to 5 choices, and a letter
"A".."E" is accepted too). The model never writes an answer: for every choice we compute
log p(continuation | prompt), and the prediction is the best-scoring choice. Two ways to ask:

    style="letters" (MMLU's original format, as in lm-eval-harness' `mmlu`):
        The following are multiple choice questions (with answers) about {subject}.

        {question}
        A. {choice 0}
        B. {choice 1}
        ...
        Answer:                      continuations " A", " B", ...
    style="text" (cloze): "Question: {question}\\nAnswer:", continuations " {choice}" — shows what a
        model that cannot yet map letters to answers knows (small models are at chance on letters).

k-shot prompts put k solved questions (same subject first) before the question.
Reported: acc (highest total log-prob) and acc_norm (highest log-prob per character of the
choice text, lm-eval's length normalisation: a long right answer pays for every token, so
without it the shortest choice tends to win in the text style).
"""
from __future__ import annotations

import random
from collections import defaultdict

from eval.common import encode_with_bos, max_len_of, next_token_logprobs, score_tokens

LETTERS = "ABCDEFGHIJ"


def answer_index(item: dict, where: str = "item") -> int:
    """The 0-based answer of an item, checked against its choices."""
    answer, n = item.get("answer"), len(item.get("choices") or [])
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
        answer = LETTERS.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < n:
        raise ValueError(f"{where}: answer {item.get('answer')!r} is not an index into {n} choices")
    return answer


def header(subject: str | None) -> str:
    subject = (subject or "").replace("_", " ").strip()
    about = f" about {subject}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def format_question(item: dict, style: str = "letters") -> str:
    """The question block, ending in 'Answer:' (no trailing space: the continuation has it)."""
    if style == "letters":
        lines = [item["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
        return "\n".join(lines) + "\nAnswer:"
    if style == "text":
        return f"Question: {item['question'].strip()}\nAnswer:"
    raise ValueError(f"style must be 'letters' or 'text', got {style!r}")


def continuations(item: dict, style: str = "letters") -> list[str]:
    """What is scored after the prompt, one per choice."""
    if style == "letters":
        return [f" {LETTERS[i]}" for i in range(len(item["choices"]))]
    return [f" {c}" for c in item["choices"]]


def build_prompt(item: dict, shots: list[dict] = (), style: str = "letters") -> str:
    """Header, k solved examples, then the question (ending in 'Answer:')."""
    parts = [header(item.get("subject"))]
    for shot in shots:
        right = continuations(shot, style)[answer_index(shot, "shot")]
        parts.append(f"{format_question(shot, style)}{right}\n\n")
    parts.append(format_question(item, style))
    return "".join(parts)


def pick_shots(item: dict, pool: list[dict], k: int, seed: int) -> list[dict]:
    """k examples from pool, never the item itself; same subject first, then any. Deterministic."""
    if k <= 0:
        return []
    rng = random.Random(f"{seed}:{item['question']}")
    others = [p for p in pool if p is not item and p["question"] != item["question"]]
    same = [p for p in others if p.get("subject") == item.get("subject")]
    rest = [p for p in others if p.get("subject") != item.get("subject")]
    rng.shuffle(same)
    rng.shuffle(rest)
    return (same + rest)[:k]


def split_context(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Encode context+continuation as one string (as the model would see it) and find where the
    continuation starts: the end of the longest common prefix with the context alone, since a
    token may merge across the boundary. -> (ids, index of the first continuation token)."""
    ctx = encode_with_bos(tokenizer, context)
    whole = encode_with_bos(tokenizer, context + continuation)
    start = 0
    while start < min(len(ctx), len(whole)) and ctx[start] == whole[start]:
        start += 1
    return whole, max(start, 1)  # position 0 has no context to be scored from


def score_choices(model, tokenizer, prompts: list[str], choice_lists: list[list[str]], batch_size: int = 8,
                  desc: str | None = None) -> list[list[tuple[float, int]]]:
    """Log-likelihood of each continuation given its prompt.

    prompts[N], choice_lists[N][C_i] -> [N][C_i] (sum log-prob, scored tokens).
    An item whose continuations are each ONE token after the same context (" A", " B", ... in the
    letters style) is scored by one forward pass of that context (next_token_logprobs); any other
    item by one pass per continuation (score_tokens). Both give log p(continuation | context).
    """
    limit = max_len_of(model)
    seqs, targets, owners = [], [], []
    contexts, candidates, single_owners = [], [], []
    for n, (prompt, choices) in enumerate(zip(prompts, choice_lists)):
        encoded = []
        for cont in choices:
            ids, start = split_context(tokenizer, prompt, cont)
            tgt = [False] * start + [True] * (len(ids) - start)
            if len(ids) > limit:  # keep the end: the continuation and the nearest context
                ids, tgt = ids[-limit:], tgt[-limit:]
            encoded.append((ids, tgt))
        if encoded and all(sum(tgt) == 1 and tgt[-1] and ids[:-1] == encoded[0][0][:-1] for ids, tgt in encoded):
            contexts.append(encoded[0][0][:-1])
            candidates.append([ids[-1] for ids, _ in encoded])
            single_owners.append(n)
            continue
        for c, (ids, tgt) in enumerate(encoded):
            seqs.append(ids)
            targets.append(tgt)
            owners.append((n, c))
    out: list[list[tuple[float, int]]] = [[None] * len(c) for c in choice_lists]  # type: ignore[list-item]
    for n, logprobs in zip(single_owners, next_token_logprobs(model, contexts, candidates, batch_size, 0, desc)):
        out[n] = [(lp, 1) for lp in logprobs]
    for (n, c), result in zip(owners, score_tokens(model, seqs, targets, batch_size=batch_size, pad_id=0,
                                                     desc=desc)):
        out[n][c] = result
    return out


def evaluate(model, tokenizer, items: list[dict], k: int = 0, style: str = "letters",
             pool: list[dict] | None = None, batch_size: int = 8, seed: int = 0,
             desc: str | None = "multiple choice") -> dict:
    """Accuracy of `items`. pool: where k-shot examples come from (default: the items themselves,
    leaving each question out of its own prompt). -> {"acc", "acc_norm", "n", "k", "style",
    "per_subject": {subject: acc}, "predictions": [{"pred", "pred_norm", "answer", "logprobs"}]}."""
    if not items:
        raise ValueError("no multiple-choice items to evaluate")
    answers = [answer_index(it, f"item {i}") for i, it in enumerate(items)]
    pool = items if pool is None else pool
    prompts = [build_prompt(it, pick_shots(it, pool, k, seed), style) for it in items]
    conts = [continuations(it, style) for it in items]
    scores = score_choices(model, tokenizer, prompts, conts, batch_size, desc)
    predictions, by_subject = [], defaultdict(list)
    for it, answer, cont, sc in zip(items, answers, conts, scores):
        logprobs = [s for s, _ in sc]
        # per character of the choice text (without the joining space), lm-eval's acc_norm
        per_char = [s / max(len(c.strip()), 1) for s, c in zip(logprobs, cont)]
        pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
        pred_norm = max(range(len(per_char)), key=lambda i: per_char[i])
        predictions.append({"pred": pred, "pred_norm": pred_norm, "answer": answer, "logprobs": logprobs})
        by_subject[it.get("subject", "")].append(pred == answer)
    n = len(items)
    return {
        "acc": sum(p["pred"] == p["answer"] for p in predictions) / n,
        "acc_norm": sum(p["pred_norm"] == p["answer"] for p in predictions) / n,
        "n": n, "k": k, "style": style,
        "chance": sum(1 / len(it["choices"]) for it in items) / n,
        "per_subject": {s: sum(v) / len(v) for s, v in sorted(by_subject.items())},
        "predictions": predictions,
    }
