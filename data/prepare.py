"""Data file(s) -> format -> (optional perplexity filter) -> token file. One function, one CLI:

    python -m data.prepare --inputs data/samples/zh_tw.txt --format inscp \\
        --tokenizer <model or tokenizer path> --out runs/tokens/inscp/

Record kinds by format: inscp / orgcp read texts (.txt, or a .jsonl text field) or instruction
data (question and answer become separate samples); sft and recovery read instruction data;
tcot reads .jsonl {query, en_query, en_answer, answer} (the answer follows <TAG>, --tag); translation reads .jsonl pairs from
source_field / target_field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.filter import llama_scorer, perplexity_filter
from data.flags import Flags, at_least, fail, flag, make, optional, read_flags
from data.formats import FORMATS, TEXT_FORMATS, format_records
from data.readers import DataError, InstructionFields, file_digest, read_conversations, read_jsonl, read_texts
from data.tokenfile import tokenizer_identity, write_token_file
from model import assets
from model.chat import TEMPLATES, get_template
from model.checkpoint import load, load_tokenizer_only
from model.tcot import tag_problem
from model.tokenizer import load_tokenizer

TCOT_FIELDS = ("query", "en_query", "en_answer", "answer")


def _perplexity(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite perplexity > 0 (InsCP: 15)"


@dataclass
class PrepareConfig(Flags):
    """Data file(s) -> format -> (optional perplexity filter) -> token file."""
    inputs: list[str] = flag(help="data files (.txt / .jsonl), read in order",
                             rule=lambda v: None if v else "give at least one data file")
    out: str = flag("runs/tokens/", "token file folder (or prefix)")
    format: str = flag("inscp", "sample format (data/formats.py)", choices=FORMATS)
    tokenizer: str = flag("", "tokenizer file/folder or .gguf (default: SmolLM2-135M-Instruct)")
    template: str | None = flag(None, "chat template (default: recognised from the stored one)", choices=TEMPLATES)
    system: str | None = flag(None, "default system prompt of the chat formats")
    text_field: str = flag("text", "text field of .jsonl text files")
    paragraphs: bool = flag(False, ".txt files: blank-line separated documents (default: one per line)")
    instruction_field: str = flag("instruction", "instruction field of .jsonl instruction data")
    input_field: str = flag("input", "input field of .jsonl instruction data")
    output_field: str = flag("output", "output field of .jsonl instruction data")
    source_field: str = flag("source", "translation pairs: the source field")
    target_field: str = flag("target", "translation pairs: the target field")
    source_lang: str = flag("English", "translation: the source language's name in the prompt")
    target_lang: str = flag("Thai", "translation: the target language's name in the prompt")
    tag: str = flag("TH", "tcot: the target-language tag, <TAG> before the answer (model/tcot.tcot_tags)",
                    rule=tag_problem)
    vocab_size: int | None = flag(None, "id bound (default: the tokenizer's)", rule=optional(at_least(1)))
    ppl_model: str = flag("", "model (.gguf / HF folder) whose perplexity filters the samples")
    ppl_threshold: float = flag(15.0, "keep samples with perplexity <= this (InsCP: 15)", rule=_perplexity)
    ppl_batch_size: int = flag(8, "samples scored together by the perplexity filter", rule=at_least(1))
    device: str = flag("cpu", "where the perplexity model runs")


def _jsonl_dicts(path: Path, names: dict[str, str]) -> Iterator[dict]:
    """{our name: record[file's name]} for each record; a missing field names file:line."""
    for number, record in read_jsonl(path):
        missing = [src for src in names.values() if not isinstance(record.get(src), str)]
        if missing:
            raise DataError(f"{path}:{number}: field {missing[0]!r} missing or not a string "
                            f"(fields: {', '.join(sorted(record))})")
        yield {ours: record[src] for ours, src in names.items()}


def _is_text_jsonl(path: Path, text_field: str) -> bool:
    first = next(iter(read_jsonl(path)))[1]
    return text_field in first


def read_records(cfg: PrepareConfig) -> Iterator:
    """Every input file's records, in the form format_records expects for cfg.format."""
    fields = InstructionFields(cfg.instruction_field, cfg.input_field, cfg.output_field)
    for path in map(Path, cfg.inputs):
        if cfg.format in TEXT_FORMATS:
            if path.suffix != ".jsonl" or _is_text_jsonl(path, cfg.text_field):
                yield from read_texts(path, cfg.text_field, cfg.paragraphs)
            else:
                yield from read_conversations(path, fields)
        elif cfg.format in ("sft", "recovery"):
            yield from read_conversations(path, fields)
        elif cfg.format == "tcot":
            yield from _jsonl_dicts(path, {k: k for k in TCOT_FIELDS})
        else:
            yield from _jsonl_dicts(path, {"source": cfg.source_field, "target": cfg.target_field})


def sources(paths: list[str]) -> list[dict]:
    """What a token file was made from: each input's path, size and sha256 (its provenance; two
    token files with equal sources, format and tokenizer hold the same samples)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"data file {missing[0]} not found")
    return [{"path": str(p), "bytes": Path(p).stat().st_size, "sha256": file_digest(p)} for p in paths]


def prepare(cfg: PrepareConfig, tokenizer, template=None, score=None, progress: bool = True,
            keep_record=None) -> dict:
    """Write cfg.inputs as a token file at cfg.out in cfg.format; return its meta.

    template: a model.chat.ChatTemplate (needed by all formats but orgcp).
    score: optional perplexity scorer (data.filter); samples above cfg.ppl_threshold are dropped.
    keep_record(i) -> bool: keep only the input records whose running index i passes (e.g. a
    train/eval split; the split is by record, before formatting, so a QA pair stays together).
    """
    options = {}
    if cfg.format == "translation":
        options = {"source_lang": cfg.source_lang, "target_lang": cfg.target_lang}
    elif cfg.format == "tcot":
        options = {"tag": cfg.tag}
    records = read_records(cfg)
    if keep_record is not None:
        records = (r for i, r in enumerate(records) if keep_record(i))
    samples = format_records(records, cfg.format, tokenizer, template, **options)
    stats: dict = {}
    if score is not None:
        samples = perplexity_filter(samples, score, cfg.ppl_threshold, cfg.ppl_batch_size, stats=stats)
    extra = {"inputs": [str(p) for p in cfg.inputs], "sources": sources(cfg.inputs),
             "template": getattr(template, "name", None),
             "system": getattr(template, "system", None) if cfg.format not in TEXT_FORMATS else None}
    if score is not None:
        # the filter fills `stats` while the writer consumes the samples, before meta.json is written
        extra["ppl_filter"] = {"threshold": cfg.ppl_threshold, "model": cfg.ppl_model, "counts": stats}
    try:
        return write_token_file(samples, cfg.out, cfg.vocab_size or tokenizer.vocab_size,
                                tokenizer_identity(tokenizer), cfg.format, extra=extra, progress=progress)
    except ValueError as err:
        if stats.get("dropped") and not stats.get("kept"):
            raise DataError(f"the perplexity filter dropped all {stats['dropped']} samples (PPL > "
                            f"{cfg.ppl_threshold} under {cfg.ppl_model or 'the scorer'}): raise "
                            "--ppl-threshold or filter with a model that knows the language") from err
        raise


def load_any_tokenizer(path: str):
    """A tokenizer from a .gguf file or model folder (with its chat template), a tokenizer file,
    or, for "", the demo model SmolLM2-135M-Instruct."""
    p = Path(path) if path else assets.smollm2_gguf()
    return load_tokenizer_only(p) if p.suffix == ".gguf" or p.is_dir() else load_tokenizer(p)


def flag_problems(cfg: PrepareConfig, given: set[str]) -> list[str]:
    """The checks only a command line needs, beyond each field's own (checked when cfg was built):
    one 'flag value: allowed' line per problem, before any work."""
    out = []
    missing = [p for p in cfg.inputs if not Path(p).is_file()]
    if missing:
        out.append(f"--inputs {missing[0]}: no such file")
    if "ppl_threshold" in given and not cfg.ppl_model:
        out.append(f"--ppl-threshold {cfg.ppl_threshold!r}: needs --ppl-model (the model whose perplexity "
                   "is thresholded); without it no sample would be filtered")
    return out


def main(argv: list[str] | None = None) -> dict:
    given = read_flags(PrepareConfig, argv, description=__doc__)
    cfg = make(PrepareConfig, given)
    problems = flag_problems(cfg, set(given))
    if problems:
        fail(problems)
    try:
        tokenizer = load_any_tokenizer(cfg.tokenizer)
        template = get_template(tokenizer, cfg.template, cfg.system) if cfg.format != "orgcp" else None
        score = None
        if cfg.ppl_model:
            # The model's own perplexity (InsCP): same tokenizer, so its ids are the samples' ids.
            model, _ = load(cfg.ppl_model, device=cfg.device)
            score = llama_scorer(model, pad_id=tokenizer.pad_id or 0)
        meta = prepare(cfg, tokenizer, template, score)
    except (DataError, ValueError, FileNotFoundError) as err:  # bad data / tokenizer / template: one line
        fail([str(err)], code=1)
    print(f"wrote {cfg.out}: {meta['n_docs']} samples, {meta['n_tokens']} tokens "
          f"({meta['n_loss_tokens']} with loss), {meta['dtype']}"
          + (f"; PPL filter kept {meta['ppl_filter']['counts']}" if score else ""))
    return meta


if __name__ == "__main__":
    main()
