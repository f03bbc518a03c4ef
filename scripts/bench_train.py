"""Benchmark: the LoRA training step of the main job (`train/inscp.py`) vs transformers + peft.

    python scripts/bench_train.py                         # fp32 (+ bf16 where the CPU runs it natively)
    python scripts/bench_train.py --compile --steps 5     # also ours with compiled blocks
    python scripts/bench_train.py --dtypes fp32,bf16 --profile 15

Ours is the real path of `python train/inscp.py` with its defaults: SmolLM2-135M-Instruct, the
bundled Traditional Chinese sample (data/samples/, or --data FILE ...) tokenised in the InsCP
chat template and packed into blocks of 4 x 256 tokens with document ids and restarting
positions (train.recipe: load_model, add_adapters, token_files, loaders), LoRA r=16, alpha 32,
dropout 0.05 on every linear layer of the blocks, train.Trainer.train_step (AdamW, clipping at
1.0), in the precision train/parallelize.py resolves for --mixed-precision.
Theirs is PeftModel(LlamaForCausalLM) with the same LoRA on the very same batches: input_ids,
position_ids (restarting: transformers then masks the packed documents apart too) and our
already-shifted labels as `shift_labels` (its loss over full fp32 logits), AdamW, clipping; for
bf16, torch.autocast around its forward and loss (the usual way to train it in bf16).

Each side runs in its own child process, so its peak memory is its own: CPU peak resident set
size (weights and runtime included), CUDA max_memory_allocated, from after loading through the
timed steps. Time: best of --steps steps after one warm-up step (which holds the compile time of
a compiled side). The matmul peak of each dtype is measured here (a 2048^3 matmul, best of 5);
the achieved fraction counts 4 * N * tokens FLOPs per LoRA step (N = parameters: 2N forward,
2N for the input gradients; the frozen weights need no weight gradient; attention not counted).
Those FLOPs at the peak are the step's floor, so transformers' seconds over the floor bound the
speed-up any implementation could show on this machine; the script prints that bound.
A benchmark, not a test: it prints numbers and asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from scripts.benchmarking import best_time, hf_copy, peak_memory_mib, reset_peak_memory, run_side  # noqa: E402

NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--data", nargs="*", default=None, help="text files (default: train/inscp.py's bundled sample)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved; best of all")
    p.add_argument("--dtypes", default="auto", help="fp32,bf16 | fp32 | bf16 | auto (bf16 only where native)")
    p.add_argument("--compile", action="store_true", help="also time ours with compiled blocks (--compile)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    p.add_argument("--profile", type=int, default=0, help="print the N costliest ops of one step of ours")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def inscp_config(args, out_dir: str, dtype: str, compile_: bool = False):
    """The main job's config (InsCPConfig defaults) with this benchmark's shape and precision."""
    from train.inscp import InsCPConfig
    extra = {"data": args.data} if args.data else {}
    return InsCPConfig(model=args.folder, out_dir=out_dir, seq_len=args.seq_len, micro_batch_size=args.batch,
                       max_steps=args.steps + 2, mixed_precision=dtype, compile=compile_, progress=False, export=False,
                       eval_split=0, report=False, device=args.device, **extra)


def real_loader(cfg, tokenizer, info):
    """train/inscp.py's data path: template, token files, packed loader."""
    from train.recipe import chat_template, loaders, token_files
    template = chat_template(tokenizer, cfg.template)
    train_dir, _ = token_files(cfg, cfg.format, tokenizer, template, info)
    return loaders(cfg, train_dir, None, tokenizer, info)[0]


def ours(args, dtype: str, compile_: bool) -> dict:
    """train/inscp.py's main() up to the Trainer, then timed train_step()s."""
    from train import distributed
    from train.recipe import add_adapters, load_model
    from train.trainer import Trainer
    with distributed.session(args.device) as info:
        cfg = inscp_config(args, str(Path(args.work) / f"ours-{dtype}-{int(compile_)}"), dtype, compile_)
        model, tokenizer = load_model(cfg)
        lora = add_adapters(model, cfg)
        loader = real_loader(cfg, tokenizer, info)
        trainer = Trainer(model, cfg, loader, tokenizer=tokenizer, dist_info=info, lora=lora)
        # N of 4 N tokens: the base model's parameters (the tied head counted once), LoRA left out
        n_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
        reset_peak_memory(args.device)
        result = timed_steps(lambda: trainer.train_step()["loss"], args)
        result.update(peak_mib=peak_memory_mib(args.device), params=n_params, plan=trainer.plan.describe())
        if args.profile:
            result["profile"] = profile(trainer.train_step, args.profile, args.device)
        return result


def theirs(args, dtype: str) -> dict:
    """PeftModel(LlamaForCausalLM) on the same batches (the same token files and loader)."""
    import contextlib

    import peft
    import transformers

    from model.checkpoint import load_tokenizer_only
    from train import distributed
    with distributed.session(args.device) as info:
        cfg = inscp_config(args, str(Path(args.work) / f"theirs-{dtype}"), dtype)
        loader = real_loader(cfg, load_tokenizer_only(args.folder), info)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).to(args.device)
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        batch = {k: v.to(args.device) for k, v in loader.next_batch().items()}
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=batch["tokens"], position_ids=batch["positions"], use_cache=False,
                         shift_labels=batch["labels"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss)
    reset_peak_memory(args.device)
    return dict(timed_steps(step, args), peak_mib=peak_memory_mib(args.device))


def timed_steps(step, args) -> dict:
    """One warm-up step (compile time included), then `steps` timed ones: best wall seconds, best
    CPU seconds of this process (less disturbed by other jobs on a shared machine than wall time
    when --threads 1), the losses of the first and last step."""
    t = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t
    walls, cpus = [], []
    for _ in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"seconds": min(walls), "cpu": min(cpus), "first": first, "loss": loss, "first_loss": first_loss}


def profile(step, top: int, device: str = "cpu") -> str:
    """The `top` costliest ATen ops of one step by wall time, with their call counts and the
    matmuls' total: each op timed around its own dispatch (a TorchDispatchMode; ~10 us of Python
    per op on top). Not torch.profiler: on the 2-core CPU boxes it inflated elementwise ops 3-5x
    (a 6 MB SwiGLU multiply: 6.5 ms profiled, 0.9 ms timed plainly), so its table overstated
    everything but the matmuls. On CUDA each op is synchronised before and after (its launch
    alone would return at once), which costs the step its overlap: a rough breakdown there."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    seconds, calls = Counter(), Counter()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sync()
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sync()
            name = func.name()
            seconds[name] += time.perf_counter() - start
            calls[name] += 1
            return out

    start = time.perf_counter()
    with Timed():
        step()
    wall = time.perf_counter() - start
    matmuls = sum(t for name, t in seconds.items() if name.split("::")[-1].split(".")[0] in MATMULS)
    lines = [f"one timed step {wall:.2f} s, its ops {sum(seconds.values()):.2f} s, of which matmuls {matmuls:.2f} s",
             f"{'op':<56}{'ms':>10}{'calls':>8}"]
    lines += [f"{name:<56}{t * 1e3:>10.1f}{calls[name]:>8}" for name, t in seconds.most_common(top)]
    return "\n".join(lines)


MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear"}


def matmul_peak_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """The best rate of an n x n x n matmul in dtype (2 n^3 FLOPs), GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds, _ = best_time(lambda: a @ b, repeats, device)
    return 2 * n ** 3 / seconds / 1e9


def chosen_dtypes(args) -> tuple[list[str], str | None]:
    """-> (dtypes to run, a note on what was left out and why)."""
    from train.parallelize import cpu_bf16_flags
    if args.dtypes != "auto":
        return args.dtypes.split(","), None
    if args.device.startswith("cuda") or cpu_bf16_flags():
        return ["fp32", "bf16"], None
    return ["fp32"], ("bf16 not run: this CPU has neither amx_bf16 nor avx512_bf16 (bf16 matmuls are emulated "
                      "there; --dtypes fp32,bf16 runs them anyway)")


def report(args, source, results: dict, peaks: dict, note: str | None) -> None:
    tokens = args.batch * args.seq_len
    n = next(r["params"] for r in results.values() if "params" in r)
    print(f"model {source} ({n / 1e6:.1f}M base parameters)\ndevice {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch} x {args.seq_len} tokens of train/inscp.py's data "
          f"(packed documents), LoRA r=16 dropout 0.05 on all linear layers, best of {args.steps} steps x "
          f"{args.rounds} round(s)")
    for dtype, peak in peaks.items():
        print(f"matmul peak {dtype}: {peak:.1f} GFLOP/s (2048^3)")
    if note:
        print(note)
    print(f"{'side':<24}{'tokens/s':>10}{'s/step':>9}{'cpu s':>8}{'peak MiB':>10}{'of peak':>9}{'1st step s':>12}"
          f"{'loss':>9}")
    for name, r in results.items():
        dtype = name.split()[-1]
        frac = 4 * n * tokens / r["seconds"] / 1e9 / peaks[dtype]
        print(f"{name:<24}{tokens / r['seconds']:>10.1f}{r['seconds']:>9.2f}{r['cpu']:>8.2f}{r['peak_mib']:>10.0f}"
              f"{frac:>9.0%}{r['first']:>12.1f}{r['loss']:>9.4f}")
    for dtype, peak in peaks.items():  # the bound every ratio below lives under
        floor = 4 * n * tokens / peak / 1e9
        if f"transformers {dtype}" in results:
            print(f"matmul floor {dtype}: {floor:.2f} s/step (the 4 N tokens FLOPs at the {dtype} peak, everything "
                  f"else free): no implementation can run more than "
                  f"{results[f'transformers {dtype}']['seconds'] / floor:.2f}x transformers {dtype}")
    for name, r in results.items():
        if name.startswith("ours"):
            dtype = name.split()[-1]
            base = results[f"transformers {dtype}"]
            print(f"{name} / transformers {dtype}: speed {base['seconds'] / r['seconds']:.2f}x "
                  f"(cpu time {base['cpu'] / r['cpu']:.2f}x), memory {r['peak_mib'] / base['peak_mib']:.2f}x, first loss {r['first_loss']:.4f} vs "
                  f"{base['first_loss']:.4f}  [{r['plan']}]")
        if "profile" in r:
            print(f"profile of one step, {name}:\n{r['profile']}")
    if "ours bf16" in results and "transformers fp32" in results:
        print(f"ours bf16 / transformers fp32: speed "
              f"{results['transformers fp32']['seconds'] / results['ours bf16']['seconds']:.2f}x")

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        who, dtype, compiled = args.side.split(":")
        result = ours(args, dtype, compiled == "1") if who == "ours" else theirs(args, dtype)
        print(json.dumps(result))
        return
    from model import assets
    source = args.model or assets.smollm2_gguf()
    dtypes, note = chosen_dtypes(args)
    flags = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
             "--device", args.device, "--profile", str(args.profile), "--threads", str(args.threads)] + (["--data", *args.data] if args.data else [])
    results, peaks = {}, {}
    with hf_copy(source) as folder, tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):  # interleaved, so every side sees the same shared machine
            for dtype in dtypes:
                peaks[dtype] = max(peaks.get(dtype, 0.0), matmul_peak_gflops(NAMES[dtype], args.device))
                sides = [("ours", "0"), ("transformers", "0")] + ([("ours", "1")] if args.compile else [])
                for who, compiled in sides:
                    name = f"{who}{' compiled' if compiled == '1' else ''} {dtype}"
                    result = run_side(__file__, f"{who}:{dtype}:{compiled}", folder, [*flags, "--work", work])
                    if name not in results or result["seconds"] < results[name]["seconds"]:
                        results[name] = result
    report(args, source, results, peaks, note)


if __name__ == "__main__":
    main()
