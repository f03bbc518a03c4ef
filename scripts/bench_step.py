"""Llama-3-8B-shaped benchmarks with random weights (no checkpoint needed): a training step and decoding.

    python scripts/bench_step.py train --mode lora                 # 8B shape, 32 layers, LoRA r=16, bf16, AC
    python scripts/bench_step.py train --mode full --layers 16     # full fine-tuning of 16 of the 32 layers
    python scripts/bench_step.py decode --batch 1 8                # bf16 greedy decoding, ours vs transformers
    python scripts/bench_step.py train --device cpu --preset tiny --steps 1 --precision fp32   # toy size

train: the trainer's real GPU path (train.Trainer.train_step: fp32 master weights, gradients and AdamW
state; bf16 compute through FSDP2's MixedPrecisionPolicy on one rank, see train/parallelize.py;
activation checkpointing of every block unless --no-ac; --compile compiles each block) on random
batches packed like the main job's: --docs documents per row, restarting positions, no loss across
documents (so attention runs kernels.attention with segments: the Triton flash kernel on CUDA).
Memory: fp32 masters + gradients + two AdamW moments are 16 bytes per trained parameter, so full
fine-tuning of all 32 layers (8.0B: 128 GB) does not fit an 80-141 GB GPU next to its activations;
--layers keeps the first N blocks (embedding, head and every block keep their 8B shapes), and the
report says how many were measured. LoRA trains 0.5% of the parameters: all 32 layers fit.

MFU = model FLOPs per step / (seconds x peak): 6 N tokens for full fine-tuning, 4 N tokens for LoRA
(forward 2N, input gradients 2N; the frozen weights get no weight gradient), N = the weights that
multiply every token (every block's linear layers and the head; not the embedding lookup, the
norms or LoRA's own small matrices). Recomputation by activation checkpointing is not counted
(it is the price of the memory saved). A second figure adds causal attention, 12 x layers x
heads x head_dim x (mean keys per query) per token. Peak: --peak-tflops, default 989 (H100/H200
SXM dense bf16) on CUDA; the measured rate of one large matmul in the compute dtype is printed
beside it. On CPU the measured matmul rate is the peak.

decode: the same random model in bf16 (--layers 32 by default: 16 GB), random prompts of
--prompt-len tokens (no padding), pure argmax for exactly --new-tokens steps: ours
(model.generate: static KV cache; `ours-compiled`: its torch.compile'd one-token step) and
transformers' LlamaForCausalLM holding the very same weights (its `generate`, no EOS stopping).
Time: the first call (compilation, warm-up) apart, then the best of --repeats. The weight-streaming
limit: a step reads every weight once, so tokens/s <= batch x bandwidth / weight bytes (bandwidth:
the measured device copy rate on CUDA, a read rate on CPU). Greedy tokens of random weights in bf16
may legitimately part after a few steps (near-tied logits, other kernels): the share of tokens
before each row's first difference is reported, not asserted.

Every result is printed and, with --json FILE, appended to FILE as one JSON line. Goal lines
start with "GOAL" (scripts/gpu_check.sh collects them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from kernels import IGNORE_INDEX  # noqa: E402
from model.config import preset  # noqa: E402
from model.llama import Llama  # noqa: E402
from scripts.bench_train import matmul_peak_gflops, timed_steps  # noqa: E402
from scripts.benchmarking import peak_memory_mib, reset_peak_memory  # noqa: E402
from train.parallelize import DTYPES  # noqa: E402
SPEC_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (the 1979 of the data sheet is with 2:4 sparsity)
MFU_GOAL = 0.45
DECODE_SIDES = ("ours", "ours-compiled", "transformers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("train", "decode"))
    p.add_argument("--preset", default="llama3-8b", help="model shape (model/config.py PRESETS)")
    p.add_argument("--layers", type=int, help="keep the first N blocks (default: all of the preset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=tuple(DTYPES), default="bf16",
                   help="train: compute dtype (masters stay fp32); decode: the weights' dtype")
    p.add_argument("--batch", type=int, nargs="+", help="rows (train: one value, default 2; decode: default 1 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append every result to this file, one JSON line each")
    t = p.add_argument_group("train")
    t.add_argument("--mode", choices=("lora", "full"), default="lora")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--docs", type=int, default=4, help="packed documents per row (equal lengths)")
    t.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    t.add_argument("--compile", action="store_true", help="torch.compile each block (train/parallelize.py)")
    t.add_argument("--peak-tflops", type=float, help=f"peak of the compute dtype (default: {SPEC_PEAK_TFLOPS:g} on "
                                                     "CUDA, the measured matmul rate on CPU)")
    d = p.add_argument_group("decode")
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--sides", default=",".join(DECODE_SIDES), help=f"comma-separated, from {','.join(DECODE_SIDES)}")
    args = p.parse_args(argv)
    args.batch = args.batch or ([2] if args.bench == "train" else [1, 8])
    if args.bench == "train" and len(args.batch) != 1:
        p.error("--batch: train takes one value")
    if args.bench == "train" and args.seq_len % args.docs:
        p.error(f"--seq-len {args.seq_len} must be a multiple of --docs {args.docs}")
    unknown = set(args.sides.split(",")) - set(DECODE_SIDES)
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {','.join(DECODE_SIDES)}")
    return args


# ---- shared pieces ---------------------------------------------------------------------------

def model_config(args):
    """The preset, cut to --layers blocks (refused above the preset's own count)."""
    config = preset(args.preset)
    layers = args.layers or config.n_layers
    if not 1 <= layers <= config.n_layers:
        sys.exit(f"bench_step: --layers {layers}: the {args.preset} preset has 1..{config.n_layers} layers")
    return config.replace(n_layers=layers)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_llama(config, device, dtype: torch.dtype, seed: int) -> Llama:
    """Llama(config) with HF-style random weights (model.llama init_weights), created and drawn
    directly on `device` in `dtype`: an 8B model never passes through host memory, nor through
    an fp32 copy when dtype is bf16."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return Llama(config).init_weights()


def matmul_params(model: Llama) -> int:
    """N of the FLOP counts: the weights every token multiplies (block linears and the head);
    the embedding table only where it is the (tied) head. LoRA matrices and norms left out."""
    total = 0
    for name, p in model.named_parameters():  # a tied table is listed once, as the embedding
        if ".lora_" in name or name.endswith(("norm.weight", ".bias")):
            continue
        if name == "model.embed_tokens.weight" and not model.config.tie_embeddings:
            continue
        total += p.numel()
    return total


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def emit(result: dict, json_path: str | None) -> None:
    """Print one result as a JSON line and append it to json_path."""
    line = json.dumps(result)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# ---- train -----------------------------------------------------------------------------------

class RandomBatches:
    """Loader stand-in (the Trainer calls next_batch only): random tokens of `vocab` ids, each row
    `docs` documents of T/docs tokens packed back to back the way data/packing.py packs them:
    segments[B,T] document ids, positions restarting at 0, and no loss on the last token of a
    document (its next token belongs to another one). All [B,T], CPU tensors."""

    def __init__(self, vocab: int, batch: int, seq_len: int, docs: int, seed: int):
        self.vocab, self.batch, self.seq_len, self.docs = vocab, batch, seq_len, docs
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict:
        B, T = self.batch, self.seq_len
        row = torch.randint(self.vocab, (B, T + 1), generator=self.gen)
        segments = (torch.arange(T) // (T // self.docs)).expand(B, T)
        positions = torch.arange(T) % (T // self.docs)
        labels = row[:, 1:].clone()
        labels[:, :-1][segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX
        return {"tokens": row[:, :-1], "labels": labels, "positions": positions.expand(B, T).clone(),
                "segments": segments.clone()}


def step_flops(n_matmul: int, config, tokens: int, doc_len: int, mode: str) -> tuple[float, float]:
    """(model FLOPs, causal attention FLOPs) of one training step of `tokens` tokens.

    Model: 6 N per token for full fine-tuning, 4 N for LoRA (see the module docstring).
    Attention: QK^T and PV are 2 x 2 x heads x head_dim FLOPs per visible key in forward, twice
    that in backward (both LoRA and full need dq, dk, dv); a causal query of a `doc_len` document
    sees (doc_len + 1) / 2 keys on average.
    """
    model = (6 if mode == "full" else 4) * n_matmul * tokens
    keys = (doc_len + 1) / 2
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * keys * tokens
    return float(model), float(attention)


def train_main(args) -> dict:
    """Build the random model, the Trainer on random packed batches, time --steps train_step()s."""
    from model.lora import apply_lora
    from train import distributed
    from train.config import TrainConfig
    from train.trainer import Trainer

    config = model_config(args)
    batch = args.batch[0]
    with distributed.session(args.device) as info, tempfile.TemporaryDirectory() as out_dir:
        model = random_llama(config, info.device, torch.float32, args.seed)  # fp32 masters (as the Trainer keeps them)
        lora = None
        if args.mode == "lora":  # the main job's LoRA: every linear layer of the blocks, alpha = 2r, dropout 0.05
            lora = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05)
        n_matmul, trained = matmul_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
        cfg = TrainConfig(out_dir=out_dir, max_steps=args.steps + 1, lr=1e-5, warmup_steps=0,
                          mixed_precision=args.precision, activation_checkpointing=not args.no_ac,
                          compile=args.compile, progress=False, export=False)
        loader = RandomBatches(config.vocab_size, batch, args.seq_len, args.docs, args.seed)
        trainer = Trainer(model, cfg, loader, dist_info=info, lora=lora)
        reset_peak_memory(args.device)
        timing = timed_steps(lambda: trainer.train_step()["loss"], args)
        peak_mib = peak_memory_mib(args.device)
        plan = trainer.plan.describe()
    tokens = batch * args.seq_len
    model_flops, attention_flops = step_flops(n_matmul, config, tokens, args.seq_len // args.docs, args.mode)
    measured = matmul_peak_gflops(DTYPES[args.precision], args.device,
                                  n=8192 if args.device.startswith("cuda") else 512) / 1e3
    peak = args.peak_tflops or (SPEC_PEAK_TFLOPS if args.device.startswith("cuda") else measured)
    seconds = timing["seconds"]
    return {"bench": "train", "mode": args.mode, "device": device_name(args.device), "torch": torch.__version__,
            "preset": args.preset, "layers": config.n_layers, "of_layers": preset(args.preset).n_layers,
            "params_matmul": n_matmul, "params_trained": trained, "batch": batch, "seq_len": args.seq_len,
            "docs": args.docs, "plan": plan, "steps": args.steps, "seconds": seconds, "first_s": timing["first"],
            "tokens_per_s": tokens / seconds, "peak_tflops": peak, "matmul_tflops_measured": measured,
            "mfu": model_flops / seconds / (peak * 1e12),
            "mfu_with_attention": (model_flops + attention_flops) / seconds / (peak * 1e12),
            "of_measured_matmul": model_flops / seconds / (measured * 1e12),
            "peak_mib": peak_mib, "first_loss": timing["first_loss"], "loss": timing["loss"]}


def print_train(r: dict) -> None:
    k = 6 if r["mode"] == "full" else 4
    print(f"{r['device']}, torch {r['torch']}: {r['preset']} shape, {r['layers']} of {r['of_layers']} layers, "
          f"{r['params_matmul'] / 1e6:.1f}M matmul weights, {r['params_trained'] / 1e6:.1f}M trained ({r['mode']})\n"
          f"[{r['plan']}] batch {r['batch']} x {r['seq_len']} tokens ({r['docs']} documents per row), "
          f"best of {r['steps']} steps after a warm-up of {r['first_s']:.1f} s\n"
          f"{r['tokens_per_s']:.0f} tokens/s, {r['seconds']:.3f} s/step, peak {r['peak_mib'] / 1024:.1f} GiB, "
          f"loss {r['first_loss']:.3f} -> {r['loss']:.3f}\n"
          f"MFU {r['mfu']:.1%} ({k}N tokens against {r['peak_tflops']:.4g} TFLOP/s assumed peak), "
          f"{r['mfu_with_attention']:.1%} with causal attention; {r['of_measured_matmul']:.1%} of the measured "
          f"{r['matmul_tflops_measured']:.4g} TFLOP/s matmul")
    if r["device"].startswith("cpu"):
        return
    verdict = "met" if r["mfu"] >= MFU_GOAL else "NOT met"
    print(f"GOAL train {r['mode']}: MFU >= {MFU_GOAL:.0%} for the 8B-shaped bf16 step: {r['mfu']:.1%} ({verdict})")


# ---- decode ----------------------------------------------------------------------------------

def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM holding a copy of `model`'s weights (same device, dtype);
    its generation config stops at no EOS."""
    import transformers
    p = next(model.parameters())
    # rope_theta at the top level too: what transformers 4 reads (5 reads rope_parameters, and takes both)
    hf_config = transformers.LlamaConfig(**model.config.to_hf(), rope_theta=model.config.rope_theta)
    with torch.device(p.device), _default_dtype(p.dtype):
        hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict())  # our names are HF's: every tensor must find its place
    hf.generation_config.eos_token_id = None
    return hf


def decode_side(side: str, model: Llama, hf, prompts: torch.Tensor, args) -> dict:
    """One side on one batch: the first call's seconds, the best of --repeats, the new ids [B][N]."""
    from model.generate import Sampling, generate
    if side == "transformers":
        def run():
            with torch.inference_mode():
                full = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                   max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            if full.shape[1] != prompts.shape[1] + args.new_tokens:  # a shorter run would inflate its tokens/s
                raise SystemExit(f"transformers stopped after {full.shape[1] - prompts.shape[1]} of "
                                 f"{args.new_tokens} tokens")
            return full[:, prompts.shape[1]:].tolist()
    else:
        sampling = Sampling(max_new_tokens=args.new_tokens, stop_ids=[])
        ids = prompts.tolist()

        def run():
            return generate(model, ids, sampling, compile=side == "ours-compiled")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "seconds": min(times[1:]), "out": out}


def stream_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, what was measured) for the weight-streaming limit."""
    if device.startswith("cuda"):
        from scripts.bench_kernels import copy_bandwidth_gbs
        return copy_bandwidth_gbs() * 1e9, "device copy"
    from scripts.bench_decode import read_bandwidth
    return read_bandwidth(), "cpu read"


def decode_main(args) -> list[dict]:
    from scripts.bench_decode import agreement
    from scripts.benchmarking import weight_bytes_per_step
    config = model_config(args)
    sides = [s for s in DECODE_SIDES if s in args.sides.split(",")]
    model = random_llama(config, args.device, DTYPES[args.precision], args.seed).eval()
    hf = hf_twin(model) if "transformers" in sides else None
    bandwidth, what = stream_bandwidth(args.device)
    weights = weight_bytes_per_step(model)
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for batch in args.batch:
        prompts = torch.randint(config.vocab_size, (batch, args.prompt_len), generator=gen).to(args.device)
        limit = batch * bandwidth / weights  # tokens/s if a step cost only its weight reads
        outs = {}
        for side in sides:
            r = decode_side(side, model, hf, prompts, args)
            outs[side] = r.pop("out")
            r.update(bench="decode", side=side, batch=batch, device=device_name(args.device), torch=torch.__version__,
                     preset=args.preset, layers=config.n_layers, precision=args.precision,
                     prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     tokens_per_s=batch * args.new_tokens / r["seconds"], weight_bytes=weights,
                     bandwidth_gbs=bandwidth / 1e9, bandwidth_of=what, limit_tokens_per_s=limit)
            r["of_limit"] = r["tokens_per_s"] / limit
            if side != "ours" and "ours" in outs:
                r["agree_with_ours"] = agreement(outs[side], outs["ours"])
            results.append(r)
    return results


def print_decode(results: list[dict]) -> None:
    r0 = results[0]
    print(f"{r0['device']}, torch {r0['torch']}: {r0['preset']} shape, {r0['layers']} layers, {r0['precision']} "
          f"weights ({r0['weight_bytes'] / 1e9:.2f} GB read per step), prompt {r0['prompt_len']} + "
          f"{r0['new_tokens']} new tokens; bandwidth {r0['bandwidth_gbs']:.0f} GB/s ({r0['bandwidth_of']})")
    print(f"{'batch':>5} {'side':<14}{'tokens/s':>10}{'vs HF':>7}{'first s':>9}{'limit tok/s':>12}{'of limit':>9}"
          f"  tokens vs ours")
    for r in results:
        hf = next((x for x in results if x["batch"] == r["batch"] and x["side"] == "transformers"), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        agree = f"{r['agree_with_ours']:.0%} agree" if "agree_with_ours" in r else "-"
        print(f"{r['batch']:>5} {r['side']:<14}{r['tokens_per_s']:>10.1f}{ratio:>7}{r['first_s']:>9.1f}"
              f"{r['limit_tokens_per_s']:>12.0f}{r['of_limit']:>9.1%}  {agree}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.bench == "train":
            result = train_main(args)
            emit(result, args.json)
            print_train(result)
        else:
            results = decode_main(args)
            for r in results:
                emit(r, args.json)
            print_decode(results)
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"bench_step {args.bench}: out of GPU memory with {args.preset} at --layers "
                 f"{args.layers or preset(args.preset).n_layers}, batch {args.batch}: try fewer --layers or a "
                 "smaller --batch")


if __name__ == "__main__":
    main()
