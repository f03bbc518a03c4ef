"""Builders of TransLLM's training records: JSONL files that data.prepare's formats read.

    tcot        {query, en_query, en_answer, answer}   (TCOT: Thai query -> <EN> q <RESPONSE> a <TH> t)
    recovery    {instruction, input, output}           (the frozen chat model's own English answers)
    translation {source, target}                       (one file per direction, both directions)
    orgcp text  {text}                                 (stage 2: a pair as one document)

Sources:
- aligned QA (XQuAD en/th): question + context in Thai is the query; the English side is the
  chain of thought; the Thai answer is the answer;
- recovery-KD files (data/kd.py, scripts/generate_kd.py): English instructions answered by the ORIGINAL
  chat model. Each line records the model's identity (path + weights fingerprint); a file made
  by another model is refused, since recovering *this* model's knowledge needs *its* answers;
  with a translation source (a user-supplied translated file, or self-translation by the model
  being trained) they also become TCOT records;
- parallel text: a .jsonl with language fields, or two line-aligned text files.
Errors are DataError, one line naming the file (and line).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from data.formats import TRANSLATE_PROMPT
from data.kd import kd_query, model_identity, read_kd  # noqa: F401  (KD rows feed TCOT/recovery records)
from data.readers import DataError, _lines, read_jsonl
from model.generate import Sampling
from model.runner import Runner

LANGS = {"en": "English", "th": "Thai", "zh": "Traditional Chinese"}


# ------------------------------------------------------------------ parallel text
def read_parallel(source: str | os.PathLike, target: str | os.PathLike | None = None,
                  src: str = "en", tgt: str = "th") -> list[tuple[str, str]]:
    """Aligned (src, tgt) sentence pairs from a .jsonl with fields src/tgt, or from two
    line-aligned text files (source, target). Unequal line counts are an error: a shifted
    alignment would teach wrong translations silently."""
    source = Path(source)
    if target is None:
        pairs = []
        for number, row in read_jsonl(source):
            a, b = row.get(src), row.get(tgt)
            if not isinstance(a, str) or not isinstance(b, str):
                raise DataError(f"{source}:{number}: fields {src!r} and {tgt!r} must be strings "
                                f"(fields: {', '.join(sorted(row))})")
            if a.strip() and b.strip():
                pairs.append((a.strip(), b.strip()))
        return pairs
    target = Path(target)
    left = [line for _, line in _lines(source)]
    right = [line for _, line in _lines(target)]
    if len(left) != len(right):
        raise DataError(f"parallel files {source} ({len(left)} lines) and {target} ({len(right)} lines) "
                        "have different line counts; they must be line-aligned")
    return [(a.strip(), b.strip()) for a, b in zip(left, right) if a.strip() and b.strip()]


def translation_rows(pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """Pairs (a, b) -> translation records for a->b and for b->a."""
    return [{"source": a, "target": b} for a, b in pairs], [{"source": b, "target": a} for a, b in pairs]


def translation_cp_texts(pairs: list[tuple[str, str]]) -> list[dict]:
    """Stage-2 translation pre-training documents: each pair as one text, in both orders."""
    return [{"text": f"{a}\n{b}"} for a, b in pairs] + [{"text": f"{b}\n{a}"} for a, b in pairs]


# ------------------------------------------------------------------ TCOT / recovery
def tcot_from_qa(path: str | os.PathLike, limit: int = 0, with_context: bool = True,
                 src: str = "en", tgt: str = "th") -> list[dict]:
    """Aligned QA rows {context_en, question_en, answer_en, context_th, question_th, answer_th}
    -> TCOT records. The query is the (context +) question in the target language."""
    path, out = Path(path), []
    for number, row in read_jsonl(path):
        need = [f"question_{src}", f"answer_{src}", f"question_{tgt}", f"answer_{tgt}"]
        if with_context:
            need += [f"context_{src}", f"context_{tgt}"]
        missing = [k for k in need if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}:{number}: aligned QA row without {missing[0]!r}")

        def ask(lang):
            q = row[f"question_{lang}"].strip()
            return f"{row[f'context_{lang}'].strip()}\n\n{q}" if with_context else q
        out.append({"query": ask(tgt), "en_query": ask(src), "en_answer": row[f"answer_{src}"].strip(),
                    "answer": row[f"answer_{tgt}"].strip()})
        if limit and len(out) >= limit:
            break
    return out


def recovery_rows(kd_rows: list[dict]) -> list[dict]:
    """KD rows -> recovery records (data.prepare format 'recovery' reads instruction/input/output)."""
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in kd_rows]


def read_translations(path: str | os.PathLike) -> dict[str, dict]:
    """A user-supplied translation of KD rows: .jsonl {id, query, answer} (target language)."""
    path, out = Path(path), {}
    for number, row in read_jsonl(path):
        if not all(isinstance(row.get(k), str) for k in ("query", "answer")) or row.get("id") is None:
            raise DataError(f"{path}:{number}: a translation row needs id, query and answer (strings)")
        out[str(row["id"])] = row
    return out


Translate = Callable[[list[str], str, str], list[str]]  # (texts, source lang, target lang) -> texts


def tcot_from_kd(kd_rows: list[dict], translations: dict[str, dict] | None = None,
                 translate: Translate | None = None, target_lang: str = "Thai") -> list[dict]:
    """KD rows + a translation source -> TCOT records (query/answer in the target language,
    en_query/en_answer the original English exchange). translations: {id: {query, answer}}
    (rows without one are skipped); translate: self-translation, e.g. self_translator(...)."""
    if (translations is None) == (translate is None):
        raise ValueError("tcot_from_kd: give exactly one of translations (a file) or translate (self-translation)")
    if translations is not None:
        return [{"query": translations[r["id"]]["query"], "en_query": kd_query(r), "en_answer": r["output"],
                 "answer": translations[r["id"]]["answer"]} for r in kd_rows if r["id"] in translations]
    queries = translate([kd_query(r) for r in kd_rows], "English", target_lang)
    answers = translate([r["output"] for r in kd_rows], "English", target_lang)
    return [{"query": q, "en_query": kd_query(r), "en_answer": r["output"], "answer": a}
            for r, q, a in zip(kd_rows, queries, answers) if q.strip() and a.strip()]


def self_translator(model, tokenizer, template, max_new_tokens: int = 128, batch_size: int = 8,
                    progress: bool = True) -> Translate:
    """Translation by a model through the translation SFT prompt (data.formats.TRANSLATE_PROMPT),
    batched and greedy (model.runner.Runner)."""
    runner = Runner(model, tokenizer, template, Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size)

    def translate(texts: list[str], source_lang: str, target_lang: str) -> list[str]:
        prompts = [TRANSLATE_PROMPT.format(source_lang=source_lang, target_lang=target_lang, text=t.strip())
                   for t in texts]
        return runner.ask(prompts, desc=f"self-translate -> {target_lang}" if progress else None)
    return translate


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as .jsonl (atomically); an empty list is an error (nothing to train on)."""
    path = Path(path)
    rows = list(rows)
    if not rows:
        raise DataError(f"no records to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
