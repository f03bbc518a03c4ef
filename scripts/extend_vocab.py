"""Extend a model's vocabulary for a target language (TransLLM stage 0).

    python scripts/extend_vocab.py --model path/to/llama-2-7b-chat --texts ../shared/data/mono/th_tud.txt \\
        --vocab-size 2000 --script thai --out runs/llama2-th-extended
    python scripts/extend_vocab.py --tokenizer-only --model ../shared/assets/tokenizers/llama2/tokenizer.model \\
        --texts ../shared/data/mono/th_tud.txt --out runs/llama2-th-tokenizer

Learns a SentencePiece vocabulary on the texts (one sentence per line), merges its new pieces
(those with a character of --script) into the model's SentencePiece tokenizer, adds the TCOT tags
<EN> <RESPONSE> <TH>, grows the embedding and head (new rows: mean of the old rows of each new
piece's old spelling, --init mean), and writes an HF folder plus vocab_report.json with the
tokens per sentence before and after. A byte-level BPE tokenizer (SmolLM2, TinyStories) gets
only the tags: the extension is skipped, and the report says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.flags import Flags, at_least, flag, parse
from data.readers import read_txt
from model import vocab
from model.checkpoint import load, save
from model.tcot import tag_problem, tcot_tags
from model.tokenizer import load_tokenizer


@dataclass
class ExtendArgs(Flags):
    """Extend a model's vocabulary for a target language (TransLLM stage 0)."""
    model: str = flag(help="HF folder or .gguf (or, with --tokenizer-only, a tokenizer file)")
    texts: list[str] = flag(help="target-language .txt files, one sentence a line")
    out: str = flag(help="output folder")
    eval_texts: list[str] | None = flag(None, "held-out sentences for the before/after token count "
                                              "(default: the last 10% of --texts)")
    vocab_size: int = flag(2000, "size of the learnt target vocabulary", rule=at_least(1))
    max_lines: int = flag(0, "train on the first N lines only (0 = all)", rule=at_least(0))
    script: str = flag("thai", f"{'|'.join(vocab.SCRIPTS)} or a regex character class")
    tag: str = flag("TH", "target-language tag: the tags become <EN> <RESPONSE> <TAG> (model/tcot.tcot_tags)",
                    rule=tag_problem)
    init: str = flag("mean", "new embedding rows", choices=("mean", "random"))
    tokenizer_only: bool = flag(False, "extend and save only the tokenizer")


def read_lines(paths: list[str], limit: int = 0) -> list[str]:
    lines = [t for p in paths for t in read_txt(p)]
    return lines[:limit] if limit else lines


def parse_args(argv=None) -> ExtendArgs:
    return parse(ExtendArgs, argv, prog="extend_vocab.py", description=__doc__)


def main(argv=None) -> dict:
    args = parse_args(argv)
    lines = read_lines(args.texts)
    if args.eval_texts is None:
        cut = max(1, len(lines) // 10)
        lines, held = lines[:-cut], lines[-cut:]
    else:
        held = read_lines(args.eval_texts)
    if args.max_lines:
        lines = lines[:args.max_lines]
    tags = list(tcot_tags(args.tag))
    out = Path(args.out)
    if args.tokenizer_only:
        old = load_tokenizer(args.model)
        new, report = vocab.extend_tokenizer(old, lines, args.vocab_size, args.script, tags)
        before, after = vocab.token_stats(old, held), vocab.token_stats(new, held)
        report.update(tokens_per_sentence_before=round(before.per_sentence, 2),
                      tokens_per_sentence_after=round(after.per_sentence, 2), eval_sentences=before.sentences)
        new.save(out)
    else:
        model, old = load(args.model)
        new, report = vocab.extend_model(model, old, lines, args.vocab_size, args.script, tags, args.init,
                                         eval_texts=held)
        save(model, new, out)
    report.update(model=str(args.model), texts=args.texts, train_lines=len(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if report.get("skipped"):
        print(report["skipped"] + "; only the tags were added")
    print(f"vocabulary {report['old_vocab_size']} -> {report['new_vocab_size']} (+{report['added_pieces']} pieces, "
          f"tags {report['tag_ids']})")
    if "tokens_per_sentence_before" in report:
        print(f"tokens per target sentence ({report['eval_sentences']} held-out): "
              f"{report['tokens_per_sentence_before']} -> {report['tokens_per_sentence_after']}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
