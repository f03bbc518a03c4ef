"""Evaluate one or more models on the project's suites and write a side-by-side report.

    python -m eval.run --model runs/inscp/final --model path/to/SmolLM2.gguf \\
        --suite alignment,ppl,mc,refusal,translation,mtbench --limit 50 --out runs/eval

Suites (all read the dev split of ../shared/data unless --split holdout, which is for final
numbers only):
    alignment    share of answers in the prompt's language (en, th, zh-Hant prompts)
    ppl          perplexity of PUD sentences (en, th, zh), plain and in the InsCP template
    mc           MMLU, TMMLU, Thai O-NET by log-likelihood (--shots k, --mc-style letters|text)
    refusal      AdvBench refusal rate (GCG keyword list)
    translation  PUD en<->th, en<->zh, BLEU and chrF++
    mtbench      two-turn answers in English and Thai (answers_<model>_<lang>.jsonl); graded
                 by --judge PATH when given (MT-bench has one split: --split does not apply);
                 --tcot answers the TransLLM way (model/tcot.py), English thoughts saved too
Greedy decoding and fixed seeds: the same command gives the same numbers. --limit N caps every
data set at N items (prompts, questions, sentences). Writes OUT/results.json, OUT/report.md and
OUT/chart_*.svg, rewritten after every model so a long run keeps what it has.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from eval import alignment, mtbench, multiple_choice, perplexity, refusal, translation
from eval.common import ChatRunner, data_file, read_jsonl, seed_everything
from eval.report import write_report
from model.chat import TEMPLATES, get_template
from model.tcot import TCOTRunner

SUITES = ("alignment", "ppl", "mc", "refusal", "translation", "mtbench")

MC_SETS = {  # name: (dev file, holdout file)
    "mmlu": ("eval/mmlu.dev.jsonl", "eval/mmlu.test2000.jsonl"),
    "tmmlu": ("eval/tmmlu.dev.jsonl", "eval/tmmlu.test.jsonl"),
    "thai_onet": ("eval/thai_onet.dev.jsonl", "eval/thai_onet.test.jsonl"),
}
ADVBENCH = ("eval/advbench.dev.jsonl", "eval/advbench.test.jsonl")
PPL_LANGS = ("en", "th", "zh")


def _file(pair: tuple[str, str], split: str) -> Path:
    rel = pair[0] if split == "data" else pair[1]
    return data_file(*rel.split("/"), split=split)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="HF folder or .gguf (repeat for several)")
    p.add_argument("--name", action="append", help="display name per --model (default: from the path)")
    p.add_argument("--suite", default="alignment,ppl,mc,refusal,translation",
                   help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--limit", type=int, default=50, help="items per data set (0 = all)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--split", choices=["data", "holdout"], default="data",
                   help="holdout = the test halves: final evaluation only, never for tuning")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shots", type=int, default=0, help="k-shot examples for mc")
    p.add_argument("--mc-style", choices=["letters", "text"], default="letters")
    p.add_argument("--alignment-sets", default="en,th,zh-Hant")
    p.add_argument("--directions", default=",".join(translation.DEFAULT_DIRECTIONS))
    p.add_argument("--mtbench-langs", default="en,th")
    p.add_argument("--tcot", action="store_true",
                   help="mtbench: the models are TransLLM models; answer by translation chain-of-thought")
    p.add_argument("--judge", help="judge model (HF folder or .gguf) for mtbench grading")
    p.add_argument("--judge-max-new-tokens", type=int, default=512, help="room for the judge's explanation")
    p.add_argument("--judge-template", choices=list(TEMPLATES), help="the judge's chat template (default: its stored one)")
    p.add_argument("--template", choices=list(TEMPLATES), help="chat template (default: recognised from the stored one)")
    p.add_argument("--system", help="system prompt for the evaluated models (default: the model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        p.error(f"unknown suite(s) {sorted(unknown)}: choose from {','.join(SUITES)}")
    if args.name and len(args.name) != len(args.model):
        p.error("give one --name per --model, or none")
    return args


def model_names(paths: list[str], names: list[str] | None) -> list[str]:
    """Display names: given, else the file stem / folder name, made unique."""
    out = []
    for i, path in enumerate(paths):
        name = names[i] if names else (Path(path).stem if Path(path).suffix == ".gguf" else Path(path).name)
        while name in out:
            name += "'"
        out.append(name)
    return out


def evaluate_model(model, tokenizer, args, name: str = "model", log=print) -> dict:
    """Run args.suites on one loaded model. -> {suite: result}. (mtbench answers only; grading
    happens in `main` once all models have answered, so only one model is in memory at a time.)"""
    from model.chat import get_template
    seed_everything(args.seed)
    limit = args.limit or None
    runner = ChatRunner(model, tokenizer, get_template(tokenizer, args.template, system=args.system),
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    results: dict = {}
    for suite in args.suites:
        start = time.time()
        if suite == "alignment":
            sets = [s for s in args.alignment_sets.split(",") if s]
            results[suite] = alignment.evaluate(runner, sets, limit, args.split)
        elif suite == "ppl":
            rows = read_jsonl(data_file(*translation.FILES[args.split].split("/"), split=args.split), limit)
            results[suite] = {f"pud-{lang}": {form: perplexity.perplexity(
                model, tokenizer, [r[lang] for r in rows], form=form, template=runner.template,
                batch_size=args.batch_size, desc=f"ppl {lang} {form}") for form in ("plain", "inscp")}
                for lang in PPL_LANGS}
        elif suite == "mc":
            results[suite] = {}
            for set_name, files in MC_SETS.items():
                items = read_jsonl(_file(files, args.split), limit)
                # k-shot examples: leave-one-out from the dev items, or the dev file for holdout
                pool = None if args.split == "data" else read_jsonl(_file(files, "data"))
                results[suite][set_name] = multiple_choice.evaluate(
                    model, tokenizer, items, k=args.shots, style=args.mc_style, pool=pool,
                    batch_size=args.batch_size, seed=args.seed, desc=f"mc {set_name}")
        elif suite == "refusal":
            goals = [r["goal"] for r in read_jsonl(_file(ADVBENCH, args.split), limit)]
            answers = runner.ask(goals, desc="advbench")
            scored = refusal.refusal_rate(goals, answers)
            scored["examples"] = [{"prompt": g, "answer": a, "refused": r}
                                  for g, a, r in zip(goals, answers, scored.pop("refused"))]
            results[suite] = {"advbench": scored}
        elif suite == "translation":
            directions = [d for d in args.directions.split(",") if d]
            results[suite] = translation.evaluate(runner, directions, limit, args.split)
        elif suite == "mtbench":
            results[suite] = {}
            mt_runner = TCOTRunner(model, tokenizer, runner.template, runner.max_new_tokens) if args.tcot else runner
            for lang in [x for x in args.mtbench_langs.split(",") if x]:
                records = mtbench.generate_answers(mt_runner, mtbench.load_questions(lang, limit), name)
                path = mtbench.write_answers(records, Path(args.out) / f"answers_{_safe(name)}_{lang}.jsonl")
                results[suite][lang] = {"answers_file": str(path), "n": len(records), "records": records}
        log(f"[{name}] {suite} done in {time.time() - start:.0f}s")
    if runner.truncated:
        log(f"[{name}] note: {runner.truncated} prompts were cut to fit the context")
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _grade_mtbench(results: dict, args, log=print) -> None:
    """Load the judge once and grade every model's MT-bench answers in place."""
    from model.checkpoint import load
    judge_model, judge_tok = load(args.judge, dtype=getattr(torch, args.dtype), device=args.device)
    judge_runner = ChatRunner(judge_model, judge_tok, get_template(judge_tok, args.judge_template),
                              max_new_tokens=args.judge_max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed)
    for name, per_model in results["models"].items():
        for lang, entry in per_model.get("mtbench", {}).items():
            log(f"[judge] grading {name} {lang}")
            entry.update(mtbench.judge(judge_runner, entry["records"]))
            entry["judge"] = str(args.judge)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from model.checkpoint import load
    out = Path(args.out)
    results = {"config": {k: v for k, v in vars(args).items() if k != "suites"}, "models": {}}
    for path, name in zip(args.model, model_names(args.model, args.name)):
        print(f"loading {name} from {path}")
        model, tokenizer = load(path, dtype=getattr(torch, args.dtype), device=args.device)
        results["models"][name] = evaluate_model(model, tokenizer, args, name)
        del model, tokenizer
        gc.collect()
        write_report(results, out)
    if "mtbench" in args.suites and args.judge:
        _grade_mtbench(results, args)
    paths = write_report(results, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    main()
