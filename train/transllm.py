"""TransLLM (Geng et al. 2024): move a chat LLM to a new language in stages, with ONE LoRA adapter
carried through all of them.

  0  vocabulary: learn a target SentencePiece vocabulary, merge it into the model's, add the tags
     <EN> <RESPONSE> <TAG> (model.tcot.tcot_tags(--tag), <TH> by default), grow embedding + head
     (model/vocab.py). A byte-level BPE model (SmolLM2, TinyStories) skips the extension and only
     gets the tags.
  1  target-language continual pre-training: monolingual text, plain (orgcp).
  2  translation pre-training: English text + parallel pairs in both orders (orgcp).
  3  transfer fine-tuning, loss on responses only, on a mix of TCOT samples (aligned QA, and
     recovery-KD answers with their translation), recovery-KD samples (the ORIGINAL model's own
     English answers) and translation SFT samples in both directions.

Stages 1-3 are `Stage(name, build_data, steps, lr, seq_len)` (see `stages`): each trains for
--max-steps at --lr on blocks of --seq-len tokens unless its own --stageK.steps / --stageK.lr /
--stageK.seq-len says otherwise. The defaults are a small CPU demo; `--preset paper` gives the
paper's values (stage 1/2: lr 2e-4, blocks of 512; stage 3: lr 1e-4, blocks of 2048; all the
data), the command line's own flags still win.

The adapter (r=64, alpha=128, dropout 0.05, all linear layers; embed_tokens and lm_head fully
trainable) is carried: stage k+1 loads stage k's out_dir/stageK/adapter onto the stage-0 model
with model.lora.load_adapter and continues training those very weights (optimizer state starts
afresh at each stage, as its learning rate and data change). Each stage is one Trainer run in
out_dir/stage{k}/ (config.json, metrics.jsonl, checkpoints/, final/, adapter/). A run that
includes stage 3 ends with the report of train/report.py: the stage-0 model vs the final one
(Thai prompts answered by TCOT).

    python -m train.transllm                       # embedded demo: SmolLM2-135M-Instruct, CPU, minutes
    python -m train.transllm --preset paper --model path/to/llama-2-7b-chat --template llama2 \\
        --system "You are a helpful assistant." --stage1.steps 2000 --stage2.steps 2000 --stage3.steps 1000
    python -m train.transllm --stage 2 --out-dir runs/transllm     # needs runs/transllm/stage1/adapter
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data import kd
from data import tcot as build
from data.flags import at_least, flag, positive, problem_line
from data.readers import DataError, read_txt
from data.tokenfile import TokenFile, tokenizer_identity, write_token_file
from model import assets, vocab
from model.checkpoint import load, save
from model.generate import Sampling
from model.lora import load_adapter
from model.runner import Runner
from model.tcot import tag_problem, tcot_tags
from train import distributed, report, runlock
from train.config import parse_args
from train.errors import TrainError, writing
from train.recipe import RecipeConfig, add_adapters, chat_template, load_model, loaders, model_path, token_files
from train.trainer import Trainer, run_main


def _shared(*parts: str) -> str:
    try:
        return str(assets.shared_dir().joinpath(*parts))
    except FileNotFoundError:
        return ""


@dataclass
class StageConfig:
    """One training stage's own values; one not given is the run's (--max-steps, --lr, --seq-len)."""
    steps: int | None = flag(None, "optimizer steps (not given: --max-steps)", rule=at_least(1))
    lr: float | None = flag(None, "peak learning rate (not given: --lr)", rule=positive)
    seq_len: int | None = flag(None, "tokens per packed block (not given: --seq-len)", rule=at_least(2))


@dataclass(frozen=True)
class Stage:
    """A training stage, resolved: what it trains on and how long, how fast, on which blocks."""
    name: str                 # stage1 | stage2 | stage3: its flags (--stage1.lr) and folder (out_dir/stage1)
    build_data: Callable      # (cfg, model, tokenizer, template) -> {format: [(.jsonl file, prepare options)]}
    steps: int
    lr: float
    seq_len: int

    @property
    def number(self) -> int:
        return int(self.name.removeprefix("stage"))


@dataclass
class TransLLMConfig(RecipeConfig):
    """TransLLM stages 0-3. The defaults are the embedded demo run (tiny steps, small data);
    --max-steps / --lr / --seq-len are every stage's, --stageK.steps / .lr / .seq-len one stage's."""
    stage: str = flag("all", "the stage to run (all: 0-3 in order)", choices=("0", "1", "2", "3", "all"))
    system: str = flag("", "system prompt (default: the template's own; the paper: 'You are a helpful assistant.' "
                           "with llama2)")
    # stage 0
    target_text: list[str] = flag(factory=lambda: [_shared("data", "mono", "th_tud.txt")],
                                  help="target-language monolingual .txt (stage 0 vocabulary, stage 1)")
    vocab_size: int = flag(2000, "learnt target vocabulary size (SentencePiece models)", rule=at_least(1))
    vocab_lines: int = flag(3000, "lines of target_text the vocabulary is learnt on (0 = all)",
                            rule=at_least(0, " (0 = all)"))
    script: str = flag("thai", "new pieces must contain a character of this script (model/vocab.SCRIPTS, or a "
                               "regex character class); the report answers prompts in it by TCOT")
    tag: str = flag("TH", "target-language tag: the TCOT tags are <EN> <RESPONSE> <TAG> (model/tcot.tcot_tags), "
                          "in the vocabulary, the samples and at inference", rule=tag_problem)
    init: str = flag("mean", "new embedding rows", choices=("mean", "random"))
    # stage 1
    mono_lines: int = flag(200, "stage 1: first N lines of target_text (0 = all)", rule=at_least(0, " (0 = all)"))
    # stage 2
    english_text: list[str] = flag(factory=lambda: [_shared("data", "mono", "en_wiki_demo.txt")],
                                   help="English .txt for stage 2")
    english_lines: int = flag(10, "stage 2: first N English lines (0 = all)", rule=at_least(0, " (0 = all)"))
    parallel: str = flag(factory=lambda: _shared("data", "parallel", "pud_en_th_zh.dev.jsonl"),
                         help="parallel text: .jsonl with fields src/tgt, or the source .txt")
    parallel_target: str = flag("", "target .txt line-aligned with --parallel (.txt pairs)")
    src: str = flag("en", "source (English) field of --parallel / the QA data")
    tgt: str = flag("th", "target-language field of --parallel / the QA data")
    parallel_lines: int = flag(100, "first N pairs (0 = all)", rule=at_least(0, " (0 = all)"))
    # stage 3
    qa: str = flag(factory=lambda: _shared("data", "qa", "xquad_en_th.dev.jsonl"),
                   help="aligned QA .jsonl for TCOT samples ('' = none)")
    qa_limit: int = flag(16, "first N QA rows (0 = all)", rule=at_least(0, " (0 = all)"))
    qa_context: bool = flag(False, "put the passage in the query (long samples)")
    recovery_kd: bool = flag(True, "stage 3: the recovery-KD samples (the ORIGINAL model's answers) and their "
                                   "TCOT samples; --no-recovery-kd leaves both out (the paper's ablation)")
    kd: str = flag("", "recovery-KD .jsonl of the ORIGINAL model (scripts/generate_kd.py); '' = generate "
                       "out_dir/data/kd.jsonl now")
    kd_instructions: str = flag(factory=lambda: _shared("data", "instruct", "alpaca_en_demo.jsonl"),
                                help="English instructions for KD generated here")
    kd_limit: int = flag(8, "KD generated here: first N instructions", rule=at_least(0, " (0 = all)"))
    kd_max_new_tokens: int = flag(48, "KD generated here: answer length", rule=at_least(1))
    tcot_translation: str = flag("self", "TCOT samples from KD answers: self (the model being trained translates) | "
                                         "file (--kd-translations) | none", choices=("self", "file", "none"))
    kd_translations: str = flag("", ".jsonl {id, query, answer} in the target language")
    translate_max_new_tokens: int = flag(48, "self-translation answer length", rule=at_least(1))
    translation_pairs: int = flag(32, "stage 3 translation SFT pairs per direction (0 = all)",
                                  rule=at_least(0, " (0 = all)"))
    # the training stages' own values (the rest: the run's --max-steps / --lr / --seq-len)
    stage1: StageConfig = flag(StageConfig(), "stage 1, target-language continual pre-training")
    stage2: StageConfig = flag(StageConfig(), "stage 2, translation pre-training")
    stage3: StageConfig = flag(StageConfig(lr=1e-4), "stage 3, transfer fine-tuning (the paper: lr 1e-4, "
                                                     "blocks of 2048)")

    # `--preset paper`: the paper's values (TransLLM, section 4 and its scripts): stages 1/2 at lr
    # 2e-4 on blocks of 512, stage 3 at lr 1e-4 on blocks of 2048, LoRA r=64 alpha=128 dropout
    # 0.05, all of every data set
    presets = {"paper": ["--lr", "2e-4", "--seq-len", "512", "--stage3.lr", "1e-4", "--stage3.seq-len", "2048",
                         "--lora-r", "64", "--lora-alpha", "128", "--lora-dropout", "0.05", "--mono-lines", "0",
                         "--english-lines", "0", "--parallel-lines", "0", "--qa-limit", "0", "--kd-limit", "0",
                         "--translation-pairs", "0"]}
    # the demo; the paper's LoRA (carried through all stages, embeddings and head trained in full)
    defaults = {"out_dir": "runs/transllm", "max_steps": 4, "lr": 2e-4, "seq_len": 256, "micro_batch_size": 2,
                "eval_split": 0, "lora_r": 64, "lora_alpha": 128.0, "trainable_modules": ["embed_tokens", "lm_head"]}

    def problems(self) -> list[str]:
        out = super().problems()
        if self.finetune != "lora":
            out.append(problem_line("finetune", self.finetune,
                                    "TransLLM carries one LoRA adapter through its stages: use lora"))
        if self.tcot_translation == "file" and not self.kd_translations:
            out.append("--tcot-translation 'file': needs --kd-translations FILE")
        for stage in stages(self):
            if self.min_lr > stage.lr > 0:
                out.append(f"--{stage.name}.lr {stage.lr!r}: must be >= --min-lr {self.min_lr!r}")
        return out


# ------------------------------------------------------------------ stages, paths and models
def stages(cfg: TransLLMConfig) -> list[Stage]:
    """Stages 1-3 with their data builders and resolved steps / lr / block length."""
    def resolved(name: str, build_data) -> Stage:
        own: StageConfig = getattr(cfg, name)
        return Stage(name, build_data, cfg.max_steps if own.steps is None else own.steps,
                     cfg.lr if own.lr is None else own.lr, cfg.seq_len if own.seq_len is None else own.seq_len)
    return [resolved("stage1", target_cp_data), resolved("stage2", translation_cp_data),
            resolved("stage3", transfer_data)]


def stage_dir(cfg: TransLLMConfig, k: int) -> Path:
    return Path(cfg.out_dir) / f"stage{k}"


def stage0_model(cfg: TransLLMConfig) -> Path:
    """The vocabulary-extended model every stage starts from."""
    return stage_dir(cfg, 0) / "model"


def template_of(cfg: TransLLMConfig, tokenizer):
    return chat_template(tokenizer, cfg.template, cfg.system or None)


def _lines(paths: list[str], limit: int) -> list[str]:
    try:
        lines = [t for p in paths if p for t in read_txt(p)]
    except DataError as err:
        raise TrainError(str(err)) from None
    if not lines:
        raise TrainError(f"no text in {paths}")
    return lines[:limit] if limit else lines


def run_stage0(cfg: TransLLMConfig) -> dict:
    """Extend the tokenizer and model; write out_dir/stage0/model and vocab_report.json."""
    model, tokenizer = load_model(dataclasses.replace(cfg, seq_len=2))  # no context check here
    template_of(cfg, tokenizer)  # a bad --template stops the run here, before any stage works
    texts = _lines(cfg.target_text, 0)
    cut = max(1, len(texts) // 10)  # the last tenth is held out for the before/after token count
    train_texts = texts[:-cut][:cfg.vocab_lines] if cfg.vocab_lines else texts[:-cut]
    new_tok, found = vocab.extend_model(model, tokenizer, train_texts, cfg.vocab_size, cfg.script,
                                        list(tcot_tags(cfg.tag)), cfg.init, eval_texts=texts[-cut:], seed=cfg.seed)
    if found.get("skipped"):
        print(f"stage 0: {found['skipped']}; only the tags {list(found['tag_ids'])} were added", flush=True)
    print(f"stage 0: vocabulary {found['old_vocab_size']} -> {found['new_vocab_size']}"
          + (f", tokens per {cfg.tag} sentence {found['tokens_per_sentence_before']} -> "
             f"{found['tokens_per_sentence_after']}" if "tokens_per_sentence_after" in found else ""), flush=True)
    out = stage0_model(cfg)
    save(model, new_tok, out)
    found["base_model"] = model_path(cfg)
    (stage_dir(cfg, 0) / "vocab_report.json").write_text(json.dumps(found, indent=2, ensure_ascii=False))
    return {"stage": 0, "model": str(out), **found}


def start_model(cfg: TransLLMConfig, stage: Stage):
    """The model a stage trains: the stage-0 model with the previous stage's adapter loaded
    (stage 1: a fresh adapter). -> (model, tokenizer, its LoRAConfig)."""
    k = stage.number
    base = stage0_model(cfg)  # cfg: the run's config (out_dir = the run folder)
    if not (base / "config.json").exists():
        raise TrainError(f"--stage {k}: no stage-0 model at {base}; run --stage 0 (or all) first")
    model, tokenizer = load_model(dataclasses.replace(stage_config(cfg, stage), model=str(base)))
    if k == 1:
        return model, tokenizer, add_adapters(model, cfg)
    prev = stage_dir(cfg, k - 1) / "adapter"
    if not (prev / "adapter_model.safetensors").exists():
        raise TrainError(f"--stage {k}: no stage-{k - 1} adapter at {prev}; run --stage {k - 1} with this "
                         f"--out-dir first")
    try:
        lora = load_adapter(model, prev)
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(f"--stage {k}: cannot load {prev}: {err}") from None
    return model, tokenizer, lora


# ------------------------------------------------------------------ stage data
def _data_dir(cfg: TransLLMConfig) -> Path:
    return Path(cfg.out_dir) / "data"


def _write(rows, name: str, cfg: TransLLMConfig) -> str:
    try:
        return str(build.write_jsonl(rows, _data_dir(cfg) / name))
    except DataError as err:
        raise TrainError(str(err)) from None


def _pairs(cfg: TransLLMConfig) -> list[tuple[str, str]]:
    try:
        pairs = build.read_parallel(cfg.parallel, cfg.parallel_target or None, cfg.src, cfg.tgt)
    except DataError as err:
        raise TrainError(str(err)) from None
    return pairs[:cfg.parallel_lines] if cfg.parallel_lines else pairs


def target_cp_data(cfg: TransLLMConfig, model=None, tokenizer=None, template=None) -> dict[str, list]:
    """Stage 1, target-language continual pre-training: the first --mono-lines of --target-text, plain."""
    texts = _lines(cfg.target_text, cfg.mono_lines)
    return {"orgcp": [(_write([{"text": t} for t in texts], "stage1_target.jsonl", cfg), {})]}


def translation_cp_data(cfg: TransLLMConfig, model=None, tokenizer=None, template=None) -> dict[str, list]:
    """Stage 2, translation pre-training: English text + each parallel pair as one text, both orders."""
    texts = [{"text": t} for t in _lines(cfg.english_text, cfg.english_lines)]
    return {"orgcp": [(_write(texts + build.translation_cp_texts(_pairs(cfg)), "stage2_translation_cp.jsonl",
                              cfg), {})]}


def transfer_data(cfg: TransLLMConfig, model=None, tokenizer=None, template=None) -> dict[str, list]:
    """Stage 3, transfer fine-tuning: TCOT samples (answer after <TAG>, --tag), recovery-KD samples
    and translation SFT in both directions, each its own format."""
    out: dict[str, list] = {"tcot": [], "recovery": [], "translation": []}
    kd_rows = kd_for_stage3(cfg) if cfg.recovery_kd else []
    if kd_rows:
        out["recovery"].append((_write(build.recovery_rows(kd_rows), "stage3_recovery.jsonl", cfg), {}))
    tcot_rows = []
    if cfg.qa:
        try:
            tcot_rows += build.tcot_from_qa(cfg.qa, cfg.qa_limit, cfg.qa_context, cfg.src, cfg.tgt)
        except DataError as err:
            raise TrainError(str(err)) from None
    target_lang = build.LANGS.get(cfg.tgt, cfg.tgt)
    if cfg.tcot_translation == "file":
        try:
            tcot_rows += build.tcot_from_kd(kd_rows, translations=build.read_translations(cfg.kd_translations))
        except DataError as err:
            raise TrainError(str(err)) from None
    elif cfg.tcot_translation == "self" and kd_rows:
        model.eval()  # no LoRA dropout while it translates
        translate = build.self_translator(model, tokenizer, template, cfg.translate_max_new_tokens,
                                          progress=cfg.progress)
        tcot_rows += build.tcot_from_kd(kd_rows, translate=translate, target_lang=target_lang)
    if tcot_rows:
        out["tcot"].append((_write(tcot_rows, "stage3_tcot.jsonl", cfg), {"tag": cfg.tag}))
    pairs = _pairs(cfg)
    pairs = pairs[-cfg.translation_pairs:] if cfg.translation_pairs else pairs
    forward, backward = build.translation_rows(pairs)
    src_lang = build.LANGS.get(cfg.src, cfg.src)
    out["translation"] += [
        (_write(forward, f"stage3_translation_{cfg.src}-{cfg.tgt}.jsonl", cfg), {"source_lang": src_lang, "target_lang": target_lang}),
        (_write(backward, f"stage3_translation_{cfg.tgt}-{cfg.src}.jsonl", cfg), {"source_lang": target_lang, "target_lang": src_lang})]
    return {f: v for f, v in out.items() if v}


def kd_for_stage3(cfg: TransLLMConfig) -> list[dict]:
    """The recovery-KD rows: --kd checked against the ORIGINAL model's fingerprint, or generated
    now by the original model (resumable, out_dir/data/kd.jsonl)."""
    original = model_path(cfg)
    identity = build.model_identity(original)
    path = Path(cfg.kd) if cfg.kd else _data_dir(cfg) / "kd.jsonl"
    try:
        if not cfg.kd:
            rows, done = kd.pending(cfg.kd_instructions, path, identity, cfg.kd_limit)
            if rows:
                print(f"stage 3: recovery KD: the original model {original} answers {len(rows)} instructions "
                      f"({done} already done)", flush=True)
                model, tokenizer = load(original, dtype=torch.float32)
                runner = Runner(model, tokenizer, template_of(cfg, tokenizer),
                                Sampling(max_new_tokens=cfg.kd_max_new_tokens))
                kd.generate_kd(runner, rows, path, identity, progress=cfg.progress)
                del model, runner
        return build.read_kd(path, expect=identity)
    except DataError as err:
        raise TrainError(str(err)) from None


def mix(parts: list[Path], out: Path, tokenizer, vocab_size: int) -> Path:
    """Concatenate token files (each written by data.prepare in its own format) into one: the
    loader shuffles blocks, so the formats are mixed in every batch. Streams; reused if present."""
    if (out / "meta.json").exists():
        return out
    files = [TokenFile(p) for p in parts]
    samples = (f.doc(i) for f in files for i in range(len(f)))
    write_token_file(samples, out, vocab_size, tokenizer_identity(tokenizer), fmt="transllm-mix",
                     extra={"parts": [str(p) for p in parts]}, progress=False)
    return out


# ------------------------------------------------------------------ stages 1-3
def stage_config(cfg: TransLLMConfig, stage: Stage) -> TransLLMConfig:
    """The Trainer's config for one stage: its steps, lr and block length, its own folder, and
    min(--warmup-steps, its steps) of warm-up."""
    return dataclasses.replace(cfg, stage=str(stage.number), out_dir=str(stage_dir(cfg, stage.number)),
                               max_steps=stage.steps, lr=stage.lr, seq_len=stage.seq_len,
                               warmup_steps=min(cfg.warmup_steps, stage.steps))


def run_stage(cfg: TransLLMConfig, stage: Stage, info) -> dict:
    k, scfg = stage.number, stage_config(cfg, stage)
    model, tokenizer, lora = start_model(cfg, stage)
    template = template_of(scfg, tokenizer)
    data = stage.build_data(scfg, model, tokenizer, template)
    train_dirs, eval_dirs = [], []
    for fmt, files in data.items():
        for path, options in files:
            tr, ev = token_files(scfg, fmt, tokenizer, template, info, data=[path], eval_data=[], **options)
            train_dirs.append(tr)
            eval_dirs += [ev] if ev is not None else []
    vocab_size = model.config.vocab_size
    if len(train_dirs) > 1:  # the parts' folders are keyed on their content: so is the mix
        parts = json.dumps([str(d) for d in train_dirs + eval_dirs]).encode()
        root = Path(scfg.out_dir) / "tokens" / f"mix-{hashlib.sha256(parts).hexdigest()[:12]}"
        if info.is_main:
            mix(train_dirs, root / "train", tokenizer, vocab_size)
            if eval_dirs:
                mix(eval_dirs, root / "eval", tokenizer, vocab_size)
        distributed.barrier()
        train_dirs, eval_dirs = [root / "train"], ([root / "eval"] if eval_dirs else [])
    train_loader, eval_loader = loaders(scfg, train_dirs[0], eval_dirs[0] if eval_dirs else None, tokenizer, info)
    model.train()
    summary = Trainer(model, scfg, train_loader, eval_loader, tokenizer=tokenizer, dist_info=info, lora=lora).fit()
    if info.is_main:
        started = "a fresh adapter" if k == 1 else str(stage_dir(cfg, k - 1) / "adapter")
        (Path(scfg.out_dir) / "stage.json").write_text(json.dumps(
            {"stage": k, "started_from": started, "base": str(stage0_model(cfg)),
             "data": {f: [p for p, _ in v] for f, v in data.items()}}, indent=2))
        print(f"stage {k}: step {summary['step']}, loss {summary['loss']:.4f}, started from {started}; "
              f"adapter {summary.get('adapter')}", flush=True)
    return {"stage": k, **summary}


# ------------------------------------------------------------------ the before/after report
def before_report(cfg: TransLLMConfig, info) -> dict:
    """The stage-0 model's quick report (train/report.py; reused from out_dir/report_before.json)."""
    def start():
        model, tokenizer = load(stage0_model(cfg), dtype=torch.float32)
        return model, tokenizer, template_of(cfg, tokenizer)
    return report.before_report(cfg.out_dir, str(stage0_model(cfg)), start, cfg.report_sizes, info,
                                {"template": cfg.template, "system": cfg.system})


def after_report(cfg: TransLLMConfig, before: dict, final: str, info) -> dict | None:
    """The final model's report against the stage-0 one: prompts in the target script by TCOT."""
    return report.after_report(
        cfg.out_dir, before, final, lambda tok: template_of(cfg, tok), cfg.report_sizes, info,
        names=("stage 0", "final"),
        runner_of=lambda m, tok, t: report.TargetTCOTRunner(m, tok, t, cfg.report_sizes, cfg.script, cfg.tag))


def main(argv=None) -> dict:
    cfg = parse_args(TransLLMConfig, argv)
    numbers = [0, 1, 2, 3] if cfg.stage == "all" else [int(cfg.stage)]
    training = {stage.number: stage for stage in stages(cfg)}
    reporting = cfg.report and 3 in numbers  # the report compares the stage-0 model with the final one
    results, before = {}, None
    with distributed.session(cfg.device or None) as info, writing("the TransLLM run", cfg.out_dir):
        runlock.hold(cfg.out_dir)
        if reporting:
            report.check_data()
        for k in numbers:
            if k == 0:
                results[0] = distributed.on_main(run_stage0, cfg)
                continue
            if reporting and before is None:  # at the start, before the first training stage
                before = before_report(cfg, info)
            results[k] = run_stage(cfg, training[k], info)
        if 3 in results:
            final = results[3].get("final")
            if before is not None:
                results["report"] = after_report(cfg, before, str(stage_dir(cfg, 3) / "final"), info)
            if info.is_main:
                print(f"done. model {final}\nchat (TCOT): python scripts/chat.py --tcot --tag {cfg.tag} "
                      f"--model {final}", flush=True)
    return results


if __name__ == "__main__":
    run_main(main)
