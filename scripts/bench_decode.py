"""Benchmark: fast decoding (static cache, compiled one-token step, int8 weights) vs transformers.

    python scripts/bench_decode.py            # SmolLM2-135M-Instruct GGUF, batch 1 and 4, 128 new tokens
    python scripts/bench_decode.py --batch 1 --new-tokens 32 --repeats 2 --sides fp32,int8-compiled

One HF copy of the model is read by every side, each (side, batch) in its own child process:

    transformers    fp32 `generate`, pure argmax for exactly N steps (scripts/bench_generate.py's side)
    fp32            ours, eager: static KV cache, one Llama.forward per token
    fp32-compiled   ours, generate(compile=True): the one-token step under torch.compile
    int8            ours, checkpoint.load(quantize="int8") (model/quantize.py), eager
    int8-compiled   the same, compiled
    int4            ours, checkpoint.load(quantize="int4") (model/quantize_int4.py: groups of 32 as
                    GGUF Q4_1), eager; int4-compiled: the same, compiled
    llama.cpp       llama-cpp-python on the very GGUF file (its own quantised kernels), batch 1 only,
                    the same prompt ids, greedy (top_k 1) for exactly N steps, the sides' thread
                    count; only when --model is a .gguf and llama_cpp is installed (a benchmark
                    tool, not a dependency: see LLAMA_CPP_INSTALL)

Every side is timed from its second call on (best of --repeats); the first call, which compiles
(compiled sides) and warms up, is reported apart. Greedy tokens: the fp32 sides must equal
transformers' (the script exits 1 naming the first differing row and step otherwise); int8
changes the numbers, so its agreement with transformers' tokens is reported instead: the share
of tokens before each row's first difference.

The weight-streaming limit: a decoding step reads every weight once (the head included, the
embedding row aside), whatever the batch, so steps/s <= read bandwidth / weight bytes. The read
bandwidth is measured here (best of 10 sums over a 512 MiB fp32 tensor, the sides' threads); "of limit"
is the measured steps/s over that bound. Compiled sides reuse Inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER): with --cold-compile each compiled
side gets a fresh cache folder, so its first call pays the full code generation.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from model.quantize import COMPILED_ONE_ROW  # noqa: E402
from scripts.bench_generate import chat_prompts, first_difference  # noqa: E402
from scripts.benchmarking import first_and_best, hf_copy, run_side, weight_bytes_per_step  # noqa: E402

OURS = ("fp32", "fp32-compiled", "int8", "int8-compiled", "int4", "int4-compiled")
SIDES = ("transformers",) + OURS + ("llama.cpp",)
LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
                     '-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python diskcache; '
                     'the build measured in the README, AMX off as the issue advises for this VM')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side, after the first call")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {','.join(SIDES)}")
    p.add_argument("--cold-compile", action="store_true", help="a fresh Inductor cache for each compiled side")
    p.add_argument("--threads", type=int, help="CPU threads of every side (OMP_NUM_THREADS; default: all cores)")
    p.add_argument("--side", choices=OURS + ("llama.cpp",), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sides.split(",")) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {','.join(SIDES)}")
    return args


def side_main(args) -> dict:
    """Child process: one of our sides on one batch -> JSON (timings, tokens, weight bytes)."""
    if args.side == "llama.cpp":
        return llama_cpp_main(args)
    from model.checkpoint import load
    from model.generate import Sampling, generate
    prompts, pad = chat_prompts(args.folder, args.batch[0])
    quantize = next((q for q in ("int8", "int4") if args.side.startswith(q)), None)
    model, _ = load(args.folder, quantize=quantize, tokenizer=False)
    sampling = Sampling(max_new_tokens=args.new_tokens, stop_ids=[])
    compile = args.side.endswith("compiled")
    first, best, out = first_and_best(lambda: generate(model, prompts, sampling, pad_id=pad, compile=compile),
                                      args.repeats)
    return {"seconds": best, "first": first, "out": out, "weight_bytes": weight_bytes_per_step(model)}


def llama_cpp_main(args) -> dict:
    """Child process: llama.cpp greedy decoding of the batch-1 prompt ids, timed like ours."""
    import llama_cpp
    (prompt,), _ = chat_prompts(args.folder, 1)
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=len(prompt) + args.new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run() -> list[int]:
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)  # EOS does not stop it: exactly new_tokens steps, as every side
            if len(out) == args.new_tokens:
                return out

    first, best, out = first_and_best(run, args.repeats)
    return {"seconds": best, "first": first, "out": [out], "weight_bytes": gguf_tensor_bytes(args.gguf)}


def gguf_tensor_bytes(path) -> int:
    """Bytes of a GGUF file's tensor data (what a decoding step streams; metadata and vocab aside)."""
    from model.gguf import GGUFFile
    return sum(t.nbytes for t in GGUFFile(path).tensors.values())


def read_bandwidth(mib: int = 512, repeats: int = 10) -> float:
    """Bytes/s of the best of `repeats` sums over a fresh fp32 tensor of `mib` MiB."""
    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def run_batch(folder, batch: int, args, sides: list[str]) -> dict:
    flags = ["--batch", str(batch), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    results = {}
    for side in sides:
        if side == "llama.cpp":
            if batch == 1:
                results[side] = run_side(__file__, side, folder, flags + ["--gguf", str(args.gguf)])
            continue
        if side == "transformers":
            script = str(Path(__file__).with_name("bench_generate.py"))
            results[side] = run_side(script, side, folder, flags + ["--device", "cpu", "--dtype", "float32"])
            continue
        with fresh_inductor_cache(args.cold_compile and side.endswith("compiled")):
            results[side] = run_side(__file__, side, folder, flags)
    return results


@contextlib.contextmanager
def fresh_inductor_cache(fresh: bool):
    """While open (if `fresh`), child processes get an empty Inductor cache folder."""
    if not fresh:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """Share of tokens before each row's first difference from the reference."""
    kept = 0
    for a, b in zip(ours, reference):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        kept += diff
    return kept / sum(map(len, reference))


def report(batch: int, results: dict, bandwidth: float, new_tokens: int) -> str | None:
    """Print one batch's table; -> an error line if an fp32 side's tokens differ from transformers'."""
    reference = results.get("transformers")
    error = None
    print(f"\nbatch {batch}, {new_tokens} new tokens")
    print(f"{'side':<15}{'tokens/s':>9}{'vs HF':>7}{'first call s':>13}{'MB/step':>9}{'limit tok/s':>12}"
          f"{'of limit':>9}  tokens vs transformers")
    for side, r in results.items():
        tokens_per_s = batch * new_tokens / r["seconds"]
        ratio = f"{reference['seconds'] / r['seconds']:.2f}x" if reference else "-"
        weights = r["weight_bytes"]
        limit = batch * bandwidth / weights
        first = f"{r['first']:.1f}" if "first" in r else "-"
        if side == "transformers":
            tokens = "reference"
        elif reference is None:
            tokens = "-"
        elif side.startswith("fp32"):
            diff = first_difference(r["out"], reference["out"])
            tokens = "identical" if diff is None else "DIFFER row %d step %d: %s vs %s" % diff
            if diff is not None and error is None:
                error = f"batch {batch} {side}: tokens differ from transformers at row {diff[0]}, step {diff[1]}"
        else:
            tokens = f"{agreement(r['out'], reference['out']):.1%} agree (before the first difference)"
        print(f"{side:<15}{tokens_per_s:>9.1f}{ratio:>7}{first:>13}{weights / 1e6:>9.0f}"
              f"{limit:>12.1f}{tokens_per_s / limit:>9.2f}  {tokens}")
    return error


def main(argv=None):
    args = parse_args(argv)
    if args.side:
        print(json.dumps(side_main(args)))
        return
    from model import assets
    source = args.model or assets.smollm2_gguf()
    sides = [s for s in SIDES if s in args.sides.split(",")]
    args.gguf = source if str(source).endswith(".gguf") else None
    if "llama.cpp" in sides and (args.gguf is None or importlib.util.find_spec("llama_cpp") is None):
        sides.remove("llama.cpp")
        print("llama.cpp side left out: " + ("--model is not a .gguf" if args.gguf is None else
                                              f"llama_cpp is not installed ({LLAMA_CPP_INSTALL})"))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in every child process
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"model {source}\ncpu, float32 activations, best of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, so compiled int8 batch-1 layers use "
          f"{COMPILED_ONE_ROW or 'int8pack'} (model/quantize.py, COMPILED_ONE_ROW)")
    errors = []
    with hf_copy(source) as folder:
        for batch in args.batch:
            errors.append(report(batch, run_batch(folder, batch, args, sides), bandwidth, args.new_tokens))
    errors = [e for e in errors if e]
    if errors:
        sys.exit("; ".join(errors))


if __name__ == "__main__":
    main()
