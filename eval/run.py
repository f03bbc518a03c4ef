"""Evaluate one or more models on the project's suites and write a side-by-side report.

    python -m eval.run --model runs/inscp/final --model path/to/SmolLM2.gguf \\
        --suite alignment,ppl,mc,refusal,translation,mtbench --limit 50 --out runs/eval
    python -m eval.run --model path/to/SmolLM2.gguf --quick --out runs/quick      # < 2 min per 135M model

Suites (all read the dev split of ../shared/data unless --split holdout, which is for final
numbers only):
    alignment    share of answers in the prompt's language (en, th, zh-Hant prompts), echoes and
                 degenerate repetitions counted apart, and the end-of-turn rate
    nll          answer NLL: mean NLL per token of reference answers given the question, in the
                 chat template (DRCD zh-Hant, XQuAD th/en, Alpaca en; eval/answer_nll.py)
    ppl          perplexity of PUD sentences (en, th, zh), plain and in the InsCP template
    mc           MMLU, TMMLU, Thai O-NET by log-likelihood (--shots k, --mc-style letters|text)
    refusal      AdvBench refusal rate (GCG keyword list)
    translation  PUD en<->th, en<->zh, BLEU and chrF++
    mtbench      two-turn answers in English and Thai (answers_<model>_<lang>.jsonl); graded
                 by --judge PATH when given (MT-bench has one split: --split does not apply);
                 --tcot answers the TransLLM way (model/tcot.py; --tag: the run's target tag),
                 English thoughts saved too
    quick        eval/quick.py's report: answer NLL, echo-free alignment, end-of-turn rate and two
                 sample answers, sized for under 2 minutes on 2 idle CPU cores for a 135M
                 model (`--quick` = `--suite quick`; --limit, --max-new-tokens, --batch-size
                 change its sizes when given)
Greedy decoding and fixed seeds: the same command gives the same numbers. --limit N caps every
data set at N items (prompts, questions, sentences). Every flag, model path, data file and the
--out folder are checked before the first model is loaded; OUT/results.json, OUT/report.md and
OUT/chart_*.svg are rewritten after every suite, so a long run keeps what it has.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eval import alignment, answer_nll, mtbench, multiple_choice, perplexity, quick, refusal, translation
from data.flags import Flags, fail, flag, parse
from eval.common import ChatRunner, data_file, device_problem, first_problem, read_jsonl, seed_everything
from eval.report import write_report
from model.chat import TEMPLATES, get_template
from model.checkpoint import load, load_tokenizer_only
from model.tcot import TCOTRunner, missing_tags, tag_problem, tcot_tags

SUITES = ("alignment", "nll", "ppl", "mc", "refusal", "translation", "mtbench", "quick")
DEFAULT_SUITES = "alignment,nll,ppl,mc,refusal,translation"
DEFAULTS = {"limit": 50, "max_new_tokens": 256, "batch_size": 8}  # --quick has its own (eval.quick.QuickSizes)

MC_SETS = {  # name: (dev file, holdout file)
    "mmlu": ("eval/mmlu.dev.jsonl", "eval/mmlu.test2000.jsonl"),
    "tmmlu": ("eval/tmmlu.dev.jsonl", "eval/tmmlu.test.jsonl"),
    "thai_onet": ("eval/thai_onet.dev.jsonl", "eval/thai_onet.test.jsonl"),
}
ADVBENCH = ("eval/advbench.dev.jsonl", "eval/advbench.test.jsonl")
PPL_LANGS = ("en", "th", "zh")
MTBENCH_LANGS = ("en", "th")


def _file(pair: tuple[str, str], split: str) -> Path:
    rel = pair[0] if split == "data" else pair[1]
    return data_file(*rel.split("/"), split=split)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class EvalArgs(Flags):
    """The flags of eval.run (see the module doc)."""
    model: list[str] = flag(help="HF folder or .gguf (repeat, or list several)")
    name: list[str] | None = flag(None, "display name per --model (default: from the path)")
    suite: str | None = flag(None, f"comma-separated, from {','.join(SUITES)} (default: {DEFAULT_SUITES})")
    quick: bool = flag(False, "= --suite quick: the ~2-minute report of eval/quick.py")
    limit: int | None = flag(None, f"items per data set (0 = all; default {DEFAULTS['limit']})")
    out: str = flag("runs/eval", "output folder: results.json, report.md, charts, answers")
    split: str = flag("data", "holdout = the test halves: final evaluation only, never for tuning",
                      choices=("data", "holdout"))
    max_new_tokens: int | None = flag(None, f"answer budget (default {DEFAULTS['max_new_tokens']})")
    batch_size: int | None = flag(None, f"prompts / sequences per batch (default {DEFAULTS['batch_size']})")
    shots: int = flag(0, "k-shot examples for mc")
    mc_style: str = flag("letters", "mc: score the answer letter or the choice's text", choices=("letters", "text"))
    alignment_sets: str = flag("en,th,zh-Hant", "alignment prompt sets, comma-separated")
    nll_sets: str | None = flag(None, f"answer-NLL sets, from {','.join(answer_nll.QA_SETS)} "
                                      "(default: every set the split has)")
    directions: str = flag(",".join(translation.DEFAULT_DIRECTIONS), "translation directions, comma-separated")
    mtbench_langs: str = flag(",".join(MTBENCH_LANGS), "MT-bench languages, comma-separated")
    tcot: bool = flag(False, "mtbench: the models are TransLLM models; answer by translation chain-of-thought")
    tag: str = flag("TH", "--tcot: the target-language tag the models were trained with (train/transllm.py "
                          "--tag); <TAG> must be a special token of each model's tokenizer", rule=tag_problem)
    judge: str | None = flag(None, "judge model (HF folder or .gguf) for mtbench grading")
    judge_max_new_tokens: int = flag(512, "room for the judge's explanation")
    judge_template: str | None = flag(None, "the judge's chat template (default: its stored one)", choices=TEMPLATES)
    template: str | None = flag(None, "chat template (default: recognised from the stored one)", choices=TEMPLATES)
    system: str | None = flag(None, "system prompt for the evaluated models (default: the model's own)")
    seed: int = flag(0, "random seed (k-shot picks, sampling)")
    dtype: str = flag("float32", "weights dtype", choices=("float32", "bfloat16", "float16"))
    quantize: str | None = flag(None, "int8: int8 weight-only linear layers (model/quantize.py); int4: groups of "
                                      "32 (model/quantize_int4.py; CPU)", choices=("int8", "int4"))
    compile: bool = flag(False, "generate with the compiled one-token step (model.generate, compile=True)")
    device: str = flag(factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def parse_args(argv=None) -> EvalArgs:
    """Parse and check every flag (one line naming the flag and its allowed values, exit 2); the
    paths are checked by check_paths."""
    args = parse(EvalArgs, argv, prog="eval.run", description=__doc__)
    problem = check_flags(args)
    if problem:
        fail([problem], "eval.run")
    return args


def check_flags(args) -> str | None:
    """Resolve the defaults into args (args.suites, args.limit, ...); -> the first problem as one
    line naming the flag and what it allows, or None."""
    if args.quick and args.suite is not None:
        return "--quick runs the quick suite alone: give --quick or --suite, not both"
    args.suites = ["quick"] if args.quick else _names(args.suite if args.suite is not None else DEFAULT_SUITES)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown or not args.suites:
        return f"--suite {args.suite!r}: choose from {','.join(SUITES)}"
    # --quick keeps its own sizes unless these are given
    args.explicit = {k for k in DEFAULTS if getattr(args, k) is not None}
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    checks = [
        (args.limit >= 0, f"--limit {args.limit}: must be >= 0 (0 = every item)"),
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.shots >= 0, f"--shots {args.shots}: must be >= 0"),
        (args.judge_max_new_tokens >= 1, f"--judge-max-new-tokens {args.judge_max_new_tokens}: must be >= 1"),
        (not args.name or len(args.name) == len(args.model),
         f"--name: give one per --model ({len(args.model)}), or none"),
        (not (args.quick or "quick" in args.suites) or args.split == "data",
         "--split holdout: the quick suite reads the dev split only (it is for training runs)"),
        (not args.tcot or "mtbench" in args.suites, "--tcot: applies to --suite mtbench only"),
        (args.tcot or args.tag == "TH", f"--tag {args.tag}: applies to --tcot only"),
        (not args.judge or "mtbench" in args.suites, "--judge: applies to --suite mtbench only"),
        (not args.judge_template or args.judge, "--judge-template: needs --judge"),
    ]
    return first_problem(checks) or _check_names(args) or device_problem(args.device)


def _check_names(args) -> str | None:
    for name in _names(args.alignment_sets):
        if name not in alignment.PROMPT_SETS:
            return f"--alignment-sets: unknown set {name!r}: choose from {','.join(alignment.PROMPT_SETS)}"
    args.nll_set_list = _names(args.nll_sets) if args.nll_sets else answer_nll.sets_for(args.split)
    for name in args.nll_set_list:
        if name not in answer_nll.QA_SETS:
            return f"--nll-sets: unknown set {name!r}: choose from {','.join(answer_nll.QA_SETS)}"
        if args.split not in answer_nll.QA_SETS[name].files:
            return f"--nll-sets: {name} has no {args.split!r} split (sets with one: {','.join(answer_nll.sets_for(args.split))})"
    for direction in _names(args.directions):
        src, _, tgt = direction.partition("-")
        if src not in translation.LANG_NAMES or tgt not in translation.LANG_NAMES or src == tgt:
            return (f"--directions: {direction!r} is not SRC-TGT with two different languages from "
                    f"{','.join(translation.LANG_NAMES)}")
    for lang in _names(args.mtbench_langs):
        if lang not in MTBENCH_LANGS:
            return f"--mtbench-langs: unknown language {lang!r}: choose from {','.join(MTBENCH_LANGS)}"
    return None


def data_files(args) -> list[Path]:
    """Every data file the chosen suites read (data_file raises FileNotFoundError for a missing one)."""
    split, files = args.split, []
    for suite in args.suites:
        if suite == "alignment":
            files += [alignment.prompt_file(name, split) for name in _names(args.alignment_sets)]
        elif suite == "nll":
            files += [answer_nll.set_file(name, split) for name in args.nll_set_list]
        elif suite in ("ppl", "translation"):
            files.append(data_file(*translation.FILES[split].split("/"), split=split))
        elif suite == "mc":
            files += [_file(pair, split) for pair in MC_SETS.values()]
            files += [_file(pair, "data") for pair in MC_SETS.values()] if split == "holdout" else []  # k-shot pool
        elif suite == "refusal":
            files.append(_file(ADVBENCH, split))
        elif suite == "mtbench":
            files += [data_file("eval", f"mt_bench_{lang}.jsonl") for lang in ("en", *_names(args.mtbench_langs))]
        elif suite == "quick":
            files += quick.data_files()
    return list(dict.fromkeys(files))


def check_paths(args) -> str | None:
    """Before any model is loaded: the models, the judge, every data file, the --out folder (made
    and tested for writing), and each model's chat template (its tokenizer alone is read).
    -> the first problem as one line, or None."""
    for name, path in [("--model", m) for m in args.model] + ([("--judge", args.judge)] if args.judge else []):
        if not Path(path).exists():
            return f"{name} {path}: no such file or folder"
    try:
        data_files(args)
    except FileNotFoundError as err:
        return f"data file missing: {err}"
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--out {out}: cannot create the folder ({err.strerror or err})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out}: the folder is not writable"
    templates = [(p, args.template, args.system) for p in args.model]
    templates += [(args.judge, args.judge_template, None)] if args.judge and "mtbench" in args.suites else []
    for path, name, system in templates:
        try:
            tokenizer = load_tokenizer_only(path)
            get_template(tokenizer, name, system=system)
        except (ValueError, OSError, KeyError) as err:
            return f"{path}: {err}"
        missing = missing_tags(tokenizer, tcot_tags(args.tag)) if args.tcot and path in args.model else []
        if missing:
            return (f"--tag {args.tag}: {' '.join(missing)} is not a special token of the tokenizer of {path} "
                    "(TCOT needs the tags its TransLLM run added: train/transllm.py --tag)")
    return None


def model_names(paths: list[str], names: list[str] | None) -> list[str]:
    """Display names: given, else the file stem / folder name, made unique."""
    out = []
    for i, path in enumerate(paths):
        name = names[i] if names else (Path(path).stem if Path(path).suffix == ".gguf" else Path(path).name)
        while name in out:
            name += "'"
        out.append(name)
    return out


def quick_sizes(args) -> quick.QuickSizes:
    """QuickSizes, with --limit / --max-new-tokens / --batch-size where they were given."""
    sizes = quick.QuickSizes()
    if "limit" in args.explicit:
        sizes.nll_items = sizes.prompts = args.limit or None
    if "max_new_tokens" in args.explicit:
        sizes.max_new_tokens = args.max_new_tokens
    if "batch_size" in args.explicit:
        sizes.batch_size = args.batch_size
    return sizes


def evaluate_model(model, tokenizer, args, name: str = "model", log=print, results: dict | None = None,
                   on_suite=None) -> dict:
    """Run args.suites on one loaded model, filling `results` {suite: result} and calling
    on_suite() after each suite (eval.run's main rewrites the report there). (mtbench answers
    only; grading happens in `main` once all models have answered, so only one model is in memory
    at a time.)"""
    seed_everything(args.seed)
    limit = args.limit or None
    runner = ChatRunner(model, tokenizer, get_template(tokenizer, args.template, system=args.system),
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                        compile=args.compile)
    results = {} if results is None else results
    for suite in args.suites:
        start = time.time()
        if suite == "alignment":
            results[suite] = alignment.evaluate(runner, _names(args.alignment_sets), limit, args.split)
        elif suite == "nll":
            results[suite] = answer_nll.evaluate(model, runner.template, args.nll_set_list, limit, split=args.split,
                                                 batch_size=args.batch_size)
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
            results[suite] = translation.evaluate(runner, _names(args.directions), limit, args.split)
        elif suite == "mtbench":
            results[suite] = {}
            mt_runner = (TCOTRunner(model, tokenizer, runner.template, runner.max_new_tokens, tags=tcot_tags(args.tag),
                                    compile=args.compile) if args.tcot else runner)
            for lang in _names(args.mtbench_langs):
                records = mtbench.generate_answers(mt_runner, mtbench.load_questions(lang, limit), name)
                path = mtbench.write_answers(records, Path(args.out) / f"answers_{_safe(name)}_{lang}.jsonl")
                results[suite][lang] = {"answers_file": str(path), "n": len(records), "records": records}
        elif suite == "quick":
            results[suite] = quick.quick_report(model, tokenizer, runner.template, quick_sizes(args), log=log,
                                                compile=args.compile)
        log(f"[{name}] {suite} done in {time.time() - start:.0f}s")
        if on_suite:
            on_suite()
    if runner.truncated:
        log(f"[{name}] note: {runner.truncated} prompts were cut to fit the context")
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _grade_mtbench(results: dict, args, log=print) -> None:
    """Load the judge once and grade every model's MT-bench answers in place."""
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
    problem = check_paths(args)
    if problem:
        print(f"eval.run: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    internal = {"suites", "explicit", "nll_set_list"}
    if args.suites == ["quick"]:  # the quick suite's own sizes, not eval.run's defaults it ignores
        internal |= set(DEFAULTS) - args.explicit
    results = {"config": {k: v for k, v in vars(args).items() if k not in internal}, "models": {}}
    if "quick" in args.suites:
        results["config"]["quick_sizes"] = asdict(quick_sizes(args))
    for path, name in zip(args.model, model_names(args.model, args.name)):
        print(f"loading {name} from {path}")
        model, tokenizer = load(path, dtype=getattr(torch, args.dtype), device=args.device, quantize=args.quantize)
        results["models"][name] = {}
        evaluate_model(model, tokenizer, args, name, results=results["models"][name],
                       on_suite=lambda: write_report(results, out))
        del model, tokenizer
        gc.collect()
    if "mtbench" in args.suites and args.judge:
        _grade_mtbench(results, args)
    paths = write_report(results, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    main()
