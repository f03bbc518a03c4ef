"""TransLLM (Geng et al. 2024): move a chat LLM to a new language in stages, with ONE LoRA adapter
carried through all of them.

  0  vocabulary: learn a target SentencePiece vocabulary, merge it into the model's, add the tags
     <EN> <RESPONSE> <TH>, grow embedding + head (model/vocab.py). A byte-level BPE model
     (SmolLM2, TinyStories) skips the extension and only gets the tags.
  1  target-language continual pre-training: monolingual text, plain (orgcp), lr 2e-4.
  2  translation pre-training: English text + parallel pairs in both orders (orgcp), lr 2e-4.
  3  transfer fine-tuning, lr 1e-4, loss on responses only, on a mix of TCOT samples (aligned
     QA, and recovery-KD answers with their translation), recovery-KD samples (the ORIGINAL
     model's own English answers) and translation SFT samples in both directions.

The adapter (r=64, alpha=128, dropout 0.05, all linear layers; embed_tokens and lm_head fully
trainable) is carried: stage k+1 loads stage k's out_dir/stageK/adapter onto the stage-0 model
with model.lora.load_adapter and continues training those very weights (optimizer state starts
afresh at each stage, as its learning rate and data change). Each stage is one Trainer run in
out_dir/stage{k}/ (config.json, metrics.jsonl, checkpoints/, final/, adapter/).

    python train/transllm.py                       # embedded demo: SmolLM2-135M-Instruct, CPU, minutes
    python train/transllm.py --stage all --model path/to/llama-2-7b-chat --template llama2 \\
        --system "You are a helpful assistant." --steps1 2000 --steps2 2000 --steps3 1000 --seq_len 512
    python train/transllm.py --stage 2 --out_dir runs/transllm     # needs runs/transllm/stage1/adapter
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # torchrun train/transllm.py from a checkout

import torch  # noqa: E402

from data import kd  # noqa: E402
from data import tcot as build  # noqa: E402
from data.readers import DataError, read_txt  # noqa: E402
from data.tokenfile import TokenFile, tokenizer_identity, write_token_file  # noqa: E402
from model.generate import Sampling  # noqa: E402
from model.runner import Runner  # noqa: E402
from train import distributed, runlock  # noqa: E402
from train.config import _meta, at_least, choice, parse_args, positive, zero_or_at_least  # noqa: E402
from train.errors import TrainError, writing  # noqa: E402
from train.recipe import RecipeConfig, add_adapters, chat_template, load_model, loaders, token_files  # noqa: E402
from train.trainer import Trainer, run_main  # noqa: E402


def _shared(*parts: str) -> str:
    from model.assets import shared_dir
    try:
        return str(shared_dir().joinpath(*parts))
    except FileNotFoundError:
        return ""


@dataclass
class TransLLMConfig(RecipeConfig):
    """TransLLM stages 0-3. The defaults are the embedded demo run (tiny steps, small data)."""
    stage: str = field(default="all", metadata=_meta("0 | 1 | 2 | 3 | all (0-3 in order)"))
    out_dir: str = field(default="runs/transllm", metadata=_meta("run folder; stage k writes out_dir/stage{k}", hash=False))
    system: str = field(default="", metadata=_meta("system prompt (default: the template's own; the paper: "
                                                   "'You are a helpful assistant.' with llama2)"))
    # stage 0
    target_text: list[str] = field(default_factory=lambda: [_shared("data", "mono", "th_tud.txt")],
                                   metadata=_meta("target-language monolingual .txt (stage 0 vocabulary, stage 1)"))
    vocab_size: int = field(default=2000, metadata=_meta("learnt target vocabulary size (SentencePiece models)"))
    vocab_lines: int = field(default=3000, metadata=_meta("lines of target_text the vocabulary is learnt on (0 = all)"))
    script: str = field(default="thai", metadata=_meta("new pieces must contain a character of this script"))
    tag: str = field(default="TH", metadata=_meta("target-language tag: <TH>"))
    init: str = field(default="mean", metadata=_meta("new embedding rows: mean | random"))
    # stage 1
    steps1: int = field(default=4, metadata=_meta("stage 1 optimizer steps"))
    lr1: float = field(default=2e-4, metadata=_meta("stage 1 learning rate"))
    mono_lines: int = field(default=200, metadata=_meta("stage 1: first N lines of target_text (0 = all)"))
    # stage 2
    steps2: int = field(default=4, metadata=_meta("stage 2 optimizer steps"))
    lr2: float = field(default=2e-4, metadata=_meta("stage 2 learning rate"))
    english_text: list[str] = field(default_factory=lambda: [_shared("data", "mono", "en_wiki_demo.txt")],
                                    metadata=_meta("English .txt for stage 2"))
    english_lines: int = field(default=10, metadata=_meta("stage 2: first N English lines (0 = all)"))
    parallel: str = field(default_factory=lambda: _shared("data", "parallel", "pud_en_th_zh.dev.jsonl"),
                          metadata=_meta("parallel text: .jsonl with fields src/tgt, or the source .txt"))
    parallel_target: str = field(default="", metadata=_meta("target .txt line-aligned with --parallel (.txt pairs)"))
    src: str = field(default="en", metadata=_meta("source (English) field of --parallel / the QA data"))
    tgt: str = field(default="th", metadata=_meta("target-language field of --parallel / the QA data"))
    parallel_lines: int = field(default=100, metadata=_meta("first N pairs (0 = all)"))
    # stage 3
    steps3: int = field(default=4, metadata=_meta("stage 3 optimizer steps"))
    lr3: float = field(default=1e-4, metadata=_meta("stage 3 learning rate"))
    seq_len3: int = field(default=0, metadata=_meta("stage 3 tokens per block (0 = seq_len; the paper: 2048)"))
    qa: str = field(default_factory=lambda: _shared("data", "qa", "xquad_en_th.dev.jsonl"),
                    metadata=_meta("aligned QA .jsonl for TCOT samples ('' = none)"))
    qa_limit: int = field(default=16, metadata=_meta("first N QA rows (0 = all)"))
    qa_context: bool = field(default=False, metadata=_meta("put the passage in the query (long samples)"))
    kd: str = field(default="", metadata=_meta("recovery-KD .jsonl of the ORIGINAL model (scripts/generate_kd.py); "
                                               "'' = generate out_dir/data/kd.jsonl now"))
    kd_instructions: str = field(default_factory=lambda: _shared("data", "instruct", "alpaca_en_demo.jsonl"),
                                 metadata=_meta("English instructions for KD generated here"))
    kd_limit: int = field(default=8, metadata=_meta("KD generated here: first N instructions"))
    kd_max_new_tokens: int = field(default=48, metadata=_meta("KD generated here: answer length"))
    tcot_translation: str = field(default="self", metadata=_meta(
        "TCOT samples from KD answers: self (the model being trained translates) | file (--kd_translations) | none"))
    kd_translations: str = field(default="", metadata=_meta(".jsonl {id, query, answer} in the target language"))
    translate_max_new_tokens: int = field(default=48, metadata=_meta("self-translation answer length"))
    translation_pairs: int = field(default=32, metadata=_meta("stage 3 translation SFT pairs per direction (0 = all)"))
    # the paper's LoRA, carried through all stages
    lora_r: int = field(default=64, metadata=_meta("LoRA rank"))
    lora_alpha: float = field(default=128.0, metadata=_meta("LoRA alpha"))
    trainable_modules: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"],
                                         metadata=_meta("modules trained in full beside LoRA"))
    eval_split: int = field(default=0, metadata=_meta("hold out every N-th record of each stage's data; 0 = no eval"))
    seq_len: int = field(default=256, metadata=_meta("tokens per block, stages 1-2 (the paper: 512)"))
    micro_batch_size: int = field(default=2, metadata=_meta("blocks per micro-batch per rank"))
    max_steps: int = field(default=1, metadata=_meta("unused: see steps1/steps2/steps3"))

    RULES = {
        "stage": choice("0", "1", "2", "3", "all"), "init": choice("mean", "random"),
        "tcot_translation": choice("self", "file", "none"),
        "finetune": lambda v: None if v == "lora" else "TransLLM carries one LoRA adapter through its stages: use lora",
        "steps1": at_least(1), "steps2": at_least(1), "steps3": at_least(1),
        "lr1": positive, "lr2": positive, "lr3": positive, "vocab_size": at_least(1),
        "vocab_lines": at_least(0, " (0 = all)"), "mono_lines": at_least(0, " (0 = all)"),
        "english_lines": at_least(0, " (0 = all)"), "parallel_lines": at_least(0, " (0 = all)"),
        "qa_limit": at_least(0, " (0 = all)"), "kd_limit": at_least(0, " (0 = all)"),
        "translation_pairs": at_least(0, " (0 = all)"), "seq_len3": zero_or_at_least(2, " (= --seq_len)"),
        "kd_max_new_tokens": at_least(1), "translate_max_new_tokens": at_least(1),
    }

    def problems(self) -> list[str]:
        out = super().problems()
        if self.tcot_translation == "file" and not self.kd_translations:
            out.append("--tcot_translation 'file': needs --kd_translations FILE")
        return out

    def warmup_bound(self) -> tuple[str, int]:
        # each stage warms up for min(warmup_steps, its own steps) (stage_config)
        return "the longest stage (steps1/steps2/steps3)", max(self.steps1, self.steps2, self.steps3)


# ------------------------------------------------------------------ paths and models
def stage_dir(cfg: TransLLMConfig, k: int) -> Path:
    return Path(cfg.out_dir) / f"stage{k}"


def base_model_path(cfg: TransLLMConfig) -> str:
    from model import assets
    return cfg.model or str(assets.smollm2_gguf())


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
    from model import vocab
    from model.checkpoint import save
    model, tokenizer = load_model(dataclasses.replace(cfg, seq_len=2))  # no context check here
    template_of(cfg, tokenizer)  # a bad --template stops the run here, before any stage works
    texts = _lines(cfg.target_text, 0)
    cut = max(1, len(texts) // 10)  # the last tenth is held out for the before/after token count
    train_texts = texts[:-cut][:cfg.vocab_lines] if cfg.vocab_lines else texts[:-cut]
    new_tok, report = vocab.extend_model(model, tokenizer, train_texts, cfg.vocab_size, cfg.script,
                                         vocab.tcot_tags(cfg.tag), cfg.init, eval_texts=texts[-cut:], seed=cfg.seed)
    if report.get("skipped"):
        print(f"stage 0: {report['skipped']}; only the tags {list(report['tag_ids'])} were added", flush=True)
    print(f"stage 0: vocabulary {report['old_vocab_size']} -> {report['new_vocab_size']}"
          + (f", tokens per {cfg.tag} sentence {report['tokens_per_sentence_before']} -> "
             f"{report['tokens_per_sentence_after']}" if "tokens_per_sentence_after" in report else ""), flush=True)
    out = stage0_model(cfg)
    save(model, new_tok, out)
    report["base_model"] = base_model_path(cfg)
    (stage_dir(cfg, 0) / "vocab_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return {"stage": 0, "model": str(out), **report}


def start_model(cfg: TransLLMConfig, k: int):
    """The model stage k trains: the stage-0 model with stage k-1's adapter loaded (stage 1: a
    fresh adapter). -> (model, tokenizer)."""
    from model.lora import load_adapter
    base = stage0_model(cfg)  # cfg: the run's config (out_dir = the run folder)
    if not (base / "config.json").exists():
        raise TrainError(f"--stage {k}: no stage-0 model at {base}; run --stage 0 (or all) first")
    model, tokenizer = load_model(dataclasses.replace(stage_config(cfg, k), model=str(base)))
    if k == 1:
        return add_adapters(model, cfg), tokenizer
    prev = stage_dir(cfg, k - 1) / "adapter"
    if not (prev / "adapter_model.safetensors").exists():
        raise TrainError(f"--stage {k}: no stage-{k - 1} adapter at {prev}; run --stage {k - 1} with this "
                         f"--out_dir first")
    try:
        load_adapter(model, prev)
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(f"--stage {k}: cannot load {prev}: {err}") from None
    return model, tokenizer


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


def stage_data(cfg: TransLLMConfig, k: int, model=None, tokenizer=None, template=None) -> dict[str, list]:
    """{format: [(jsonl file, prepare options)]} for stage k, written under out_dir/data/."""
    if k == 1:
        texts = _lines(cfg.target_text, cfg.mono_lines)
        return {"orgcp": [(_write([{"text": t} for t in texts], "stage1_target.jsonl", cfg), {})]}
    if k == 2:
        texts = [{"text": t} for t in _lines(cfg.english_text, cfg.english_lines)]
        return {"orgcp": [(_write(texts + build.translation_cp_texts(_pairs(cfg)), "stage2_translation_cp.jsonl",
                                  cfg), {})]}
    out: dict[str, list] = {"tcot": [], "recovery": [], "translation": []}
    kd_rows = kd_for_stage3(cfg)
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
    elif cfg.tcot_translation == "self":
        model.eval()  # no LoRA dropout while it translates
        translate = build.self_translator(model, tokenizer, template, cfg.translate_max_new_tokens,
                                             progress=cfg.progress)
        tcot_rows += build.tcot_from_kd(kd_rows, translate=translate, target_lang=target_lang)
    if tcot_rows:
        out["tcot"].append((_write(tcot_rows, "stage3_tcot.jsonl", cfg), {}))
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
    original = base_model_path(cfg)
    identity = build.model_identity(original)
    path = Path(cfg.kd) if cfg.kd else _data_dir(cfg) / "kd.jsonl"
    try:
        if not cfg.kd:
            rows, done = kd.pending(cfg.kd_instructions, path, identity, cfg.kd_limit)
            if rows:
                from model.checkpoint import load
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
def stage_config(cfg: TransLLMConfig, k: int) -> TransLLMConfig:
    steps, lr = {1: (cfg.steps1, cfg.lr1), 2: (cfg.steps2, cfg.lr2), 3: (cfg.steps3, cfg.lr3)}[k]
    seq = (cfg.seq_len3 or cfg.seq_len) if k == 3 else cfg.seq_len
    return dataclasses.replace(cfg, stage=str(k), out_dir=str(stage_dir(cfg, k)), max_steps=steps, lr=lr, seq_len=seq,
                               warmup_steps=min(cfg.warmup_steps, steps))


def run_stage(cfg: TransLLMConfig, k: int, info) -> dict:
    scfg = stage_config(cfg, k)
    model, tokenizer = start_model(cfg, k)
    template = template_of(scfg, tokenizer)
    data = stage_data(scfg, k, model, tokenizer, template)
    train_dirs, eval_dirs = [], []
    for fmt, files in data.items():
        for path, options in files:
            tr, ev = token_files(scfg, fmt, tokenizer, template, info, data=[path], eval_data=[], **options)
            train_dirs.append(tr)
            eval_dirs += [ev] if ev is not None else []
    vocab = model.config.vocab_size
    if len(train_dirs) > 1:  # the parts' folders are keyed on their content: so is the mix
        parts = json.dumps([str(d) for d in train_dirs + eval_dirs]).encode()
        root = Path(scfg.out_dir) / "tokens" / f"mix-{hashlib.sha256(parts).hexdigest()[:12]}"
        if info.is_main:
            mix(train_dirs, root / "train", tokenizer, vocab)
            if eval_dirs:
                mix(eval_dirs, root / "eval", tokenizer, vocab)
        distributed.barrier()
        train_dirs, eval_dirs = [root / "train"], ([root / "eval"] if eval_dirs else [])
    train_loader, eval_loader = loaders(scfg, train_dirs[0], eval_dirs[0] if eval_dirs else None, tokenizer, info)
    model.train()
    summary = Trainer(model, scfg, train_loader, eval_loader, tokenizer=tokenizer, dist_info=info).fit()
    if info.is_main:
        started = "a fresh adapter" if k == 1 else str(stage_dir(cfg, k - 1) / "adapter")
        (Path(scfg.out_dir) / "stage.json").write_text(json.dumps(
            {"stage": k, "started_from": started, "base": str(stage0_model(cfg)),
             "data": {f: [p for p, _ in v] for f, v in data.items()}}, indent=2))
        print(f"stage {k}: step {summary['step']}, loss {summary['loss']:.4f}, started from {started}; "
              f"adapter {summary.get('adapter')}", flush=True)
    return {"stage": k, **summary}


def main(argv=None) -> dict:
    cfg = parse_args(TransLLMConfig, argv)
    stages = [0, 1, 2, 3] if cfg.stage == "all" else [int(cfg.stage)]
    results = {}
    with distributed.session(cfg.device or None) as info, writing("the TransLLM run", cfg.out_dir):
        runlock.hold(cfg.out_dir)
        for k in stages:
            if k == 0:
                results[0] = distributed.on_main(run_stage0, cfg)
            else:
                results[k] = run_stage(cfg, k, info)
        if info.is_main and 3 in results:
            final = results[3].get("final")
            print(f"done. model {final}\nchat (TCOT): python scripts/chat.py --tcot --model {final}", flush=True)
    return results


if __name__ == "__main__":
    run_main(main)
