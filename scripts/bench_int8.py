"""Benchmark: which int8 weight-only matmul is fast on this CPU (the choice in model/quantize.py).

    python scripts/bench_int8.py                      # SmolLM2's MLP shape 1536x576, 1 and 4 rows
    python scripts/bench_int8.py --shape 49152 576    # its head

Every candidate computes x [rows, K] @ W^T for `layers` distinct weights of one shape, so the
weights come from memory as in decoding (one layer's weights fit in cache, a model's do not);
each is timed as the best of --repeats passes over all of them, the candidates taking turns in
one process. Bytes/s counts the weight bytes read (int8 or fp32).

    fp32 F.linear              the float baseline (MKL)
    fp32 mul-sum compiled      (x * W).sum(-1) under torch.compile: Inductor's own loop
    int8pack bf16 / fp32       torch._weight_int8pack_mm with bf16 or fp32 activations
    int8 dequant + linear      F.linear(x, q.float()) * s, eager and compiled
    int8 mul-sum compiled      (x * q.float()).sum(-1) * s under torch.compile
    int8 words compiled        the codes read 4 per float32 word (model.quantize.one_row_words,
                               compiled with the decoding step's options: its AVX2 path)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.generate import DECODE_COMPILE_OPTIONS  # noqa: E402
from model.quantize import one_row_words  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=[1536, 576], metavar=("N", "K"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--layers", type=int, default=30, help="distinct weights (default: SmolLM2's 30 layers)")
    p.add_argument("--repeats", type=int, default=15)
    return p.parse_args(argv)


def candidates(weights, codes, scales):
    """name -> (fn(x) running every layer, bytes per weight element)."""
    bf16_scales = [s.bfloat16() for s in scales]

    def mul_sum(x, ws):
        return [(x[:, None, :] * w).sum(-1) for w in ws]

    def dequant_linear(x, qs, ss):
        return [F.linear(x, q.float()) * s for q, s in zip(qs, ss)]

    def int8_mul_sum(x, qs, ss):
        return [(x[:, None, :] * q.float()).sum(-1) * s for q, s in zip(qs, ss)]

    def int8_words(x, ws, ss):
        return [one_row_words(x.bfloat16(), w, s) for w, s in zip(ws, ss)]

    mul_sum_c, dequant_c, int8_c = torch.compile(mul_sum), torch.compile(dequant_linear), torch.compile(int8_mul_sum)
    words_c = torch.compile(int8_words, options=DECODE_COMPILE_OPTIONS)
    fns = {
        "fp32 F.linear": (lambda x: [F.linear(x, w) for w in weights], 4),
        "fp32 mul-sum compiled": (lambda x: mul_sum_c(x, weights), 4),
        "int8pack bf16": (lambda x: [torch._weight_int8pack_mm(x.bfloat16(), q, s)
                                     for q, s in zip(codes, bf16_scales)], 1),
        "int8pack fp32": (lambda x: [torch._weight_int8pack_mm(x, q, s) for q, s in zip(codes, scales)], 1),
        "int8 dequant + linear": (lambda x: dequant_linear(x, codes, scales), 1),
        "int8 dequant + linear compiled": (lambda x: dequant_c(x, codes, scales), 1),
        "int8 mul-sum compiled": (lambda x: int8_c(x, codes, scales), 1),
    }
    if codes[0].shape[1] % 4 == 0:  # 4 codes per word (Int8Linear has no words otherwise)
        words = [q.view(torch.float32) for q in codes]
        fns["int8 words compiled"] = (lambda x: words_c(x, words, bf16_scales), 1)
    return fns


def best_seconds(fns: dict, x, repeats: int) -> dict:
    """name -> best seconds of one pass; the candidates take turns, so that a busy moment of a
    shared machine costs all of them alike."""
    for fn, _ in fns.values():
        fn(x)  # warm-up (and compilation)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, (fn, _) in fns.items():
            start = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None):
    args = parse_args(argv)
    (n, k), g = args.shape, torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) * 0.02 for _ in range(args.layers)]
    codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(args.layers)]
    scales = [torch.rand(n, generator=g) * 1e-3 for _ in range(args.layers)]
    print(f"{n}x{k}, {args.layers} distinct weights, best of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for rows in args.rows:
        x = torch.randn(rows, k, generator=g)
        print(f"\n{rows} row(s)\n{'candidate':<32}{'us/layer':>10}{'GB/s':>8}")
        fns = candidates(weights, codes, scales)
        for name, seconds in best_seconds(fns, x, args.repeats).items():
            seconds /= args.layers
            print(f"{name:<32}{seconds * 1e6:>10.0f}{n * k * fns[name][1] / seconds / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
