"""Benchmark the Triton kernels against the plain-PyTorch references and torch.compile of them.

GPU mode (default; needs CUDA):
    python scripts/bench_kernels.py [--ops rmsnorm,rope,swiglu,cross_entropy,flash_attention,packed_attention]
For each op and each implementation (triton | torch reference | torch.compile(reference)) it
prints forward time, forward+backward time, peak extra CUDA memory of forward+backward, and the
achieved bandwidth = (minimum bytes the op must move) / time, also as a share of the device's
copy bandwidth measured first (a 1 GiB device-to-device copy: bytes read + written / time), the
ceiling of a memory-bound op. Attention and the fused linear cross-entropy are compute-bound, so
they also get TFLOP/s. Attention is also run through SDPA forced to its flash backend, and
packed documents (segments) through kernels.attention's Triton kernel versus FlexAttention
(compiled) and SDPA with a dense mask. Shapes are LLaMA-3-8B-like, bf16.
Without CUDA it says so and exits 0.

CPU attention mode:
    python scripts/bench_kernels.py --cpu-attention [--tokens 256 --doc-len 70 --dtype bf16]
One SmolLM2-sized attention layer (B=4, Hq=9, Hkv=3, hd=64, fp32 or --dtype) on packed documents of random
length 1 .. 2 x --doc-len, T = --tokens: kernels.attention's CPU path (one SDPA per document)
against SDPA with the dense [B,1,T,T] mask and against plain causal SDPA (no documents: the
cost of ignoring them), forward and forward+backward, best of 5.

CPU memory mode:
    python scripts/bench_kernels.py --cpu-memory [--tokens 8192 --vocab 128256 --dim 256]
Peak memory of linear cross-entropy forward+backward on CPU, materialised logits versus the
chunked reference (the Triton path's chunk loop with torch row steps). Each case runs in its own
subprocess, which reads its resident set size just before the step (/proc/self/statm) and its
peak resident set size after it (getrusage ru_maxrss); the difference is the step's peak extra
memory. Why RSS and not tracemalloc: torch's CPU allocations bypass Python's allocator, so
tracemalloc sees none of them. RSS is honest here because tensors of this size are mmap'd by
glibc and returned to the OS when freed, so the RSS high-water mark follows the high-water mark of
live tensors (plus a few MB of noise). --dim only changes the matmul cost and the constant size of
the weight and its gradient (inputs are allocated before the baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

# Run as a script from the repo root or installed: make the repo importable either way.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1024 ** 3


# ---- GPU benchmarks -----------------------------------------------------------------------

def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cases(ops):
    """Yield (name, make_inputs, {impl: fn}, fwd_bytes, fwdbwd_bytes, fwd_flops, fwdbwd_flops).

    make_inputs() returns fresh leaf tensors (requires_grad where they get a gradient); fn(*inputs)
    returns a tensor or tuple. Bytes are the minimum traffic: every input read once and every
    output written once (forward); backward additionally reads the upstream gradient and the
    saved inputs and writes one gradient per input.
    """
    import importlib

    import kernels
    from kernels import IGNORE_INDEX
    # importlib: `from kernels import swiglu` would give the dispatch function of that name.
    rmsnorm, rope, swiglu, cross_entropy, flash_attention = (
        importlib.import_module(f"kernels.{name}") for name in ("rmsnorm", "rope", "swiglu", "cross_entropy",
                                                                "flash_attention"))

    dev, bf16 = "cuda", torch.bfloat16
    e = 2  # bytes per bf16 element

    def impls(ref, tri):
        return {"triton": tri, "torch": ref, "torch.compile": torch.compile(ref, dynamic=False)}

    if "rmsnorm" in ops:
        N, D = 8192, 4096
        yield ("rmsnorm [8192x4096]",
               lambda: (torch.randn(N, D, device=dev, dtype=bf16, requires_grad=True),
                        torch.randn(D, device=dev, dtype=bf16, requires_grad=True)),
               impls(lambda x, w: rmsnorm.rms_norm_reference(x, w, 1e-5),
                     lambda x, w: rmsnorm.rms_norm_triton(x, w, 1e-5)),
               2 * N * D * e, (2 * N * D + 3 * N * D) * e, 0, 0)
    if "rope" in ops:
        B, H, K, T, hd = 4, 32, 8, 2048, 128
        qk = B * (H + K) * T * hd
        yield ("rope q[4,32,2048,128] k[4,8,...]",
               lambda: (torch.randn(B, H, T, hd, device=dev, dtype=bf16, requires_grad=True),
                        torch.randn(B, K, T, hd, device=dev, dtype=bf16, requires_grad=True),
                        *_rope_tables(B, T, hd, dev, bf16)),
               impls(rope.apply_rope_reference, rope.apply_rope_triton),
               2 * qk * e, 4 * qk * e, 0, 0)
    if "swiglu" in ops:
        N, F = 8192, 14336
        yield ("swiglu [8192x14336]",
               lambda: (torch.randn(N, F, device=dev, dtype=bf16, requires_grad=True),
                        torch.randn(N, F, device=dev, dtype=bf16, requires_grad=True)),
               impls(swiglu.swiglu_reference, swiglu.swiglu_triton),
               3 * N * F * e, (3 + 5) * N * F * e, 0, 0)
    if "cross_entropy" in ops:
        N, D, V = 8192, 4096, 128256
        targets = torch.randint(0, V, (N,), device=dev)
        # The torch column is the chunked reference (what kernels.linear_cross_entropy runs
        # without triton); "materialised" is the plain logits + F.cross_entropy path.
        ignore = IGNORE_INDEX
        fns = impls(lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, targets, ignore, 4096),
                    lambda h, w: cross_entropy.linear_cross_entropy_triton(h, w, targets, ignore, 4096))
        fns["materialised"] = lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, targets, ignore, 0)
        mm = 2 * N * D * V
        yield ("linear_cross_entropy N=8192 D=4096 V=128256",
               lambda: (torch.randn(N, D, device=dev, dtype=bf16, requires_grad=True),
                        (0.02 * torch.randn(V, D, device=dev, dtype=bf16)).requires_grad_()),
               fns, (N * D + V * D) * e, (N * D + V * D) * 2 * e, mm, 3 * mm)
    if "flash_attention" in ops:
        for hd in (128, 64):
            B, H, K, T = 2, 32, 8, 4096
            H = H if hd == 128 else 2 * H
            K = K if hd == 128 else 2 * K
            qo, kv = B * H * T * hd, B * K * T * hd
            flops = 4 * B * H * T * T * hd // 2  # two matmuls, causal half
            ref = lambda q, k, v: kernels.attention_reference(q, k, v, causal=True)  # noqa: E731
            fns = impls(ref, lambda q, k, v: flash_attention.flash_attention_triton(q, k, v, causal=True))
            fns["sdpa (flash backend)"] = _sdpa_flash
            yield (f"flash_attention B={B} Hq={H} Hkv={K} T={T} hd={hd} causal",
                   lambda H=H, K=K, hd=hd: (torch.randn(B, H, T, hd, device=dev, dtype=bf16, requires_grad=True),
                                            torch.randn(B, K, T, hd, device=dev, dtype=bf16, requires_grad=True),
                                            torch.randn(B, K, T, hd, device=dev, dtype=bf16, requires_grad=True)),
                   fns, (2 * qo + 2 * kv) * e, (2 * qo + 2 * kv + 2 * qo + 2 * kv) * e, flops, flops * 7 // 2)


    if "packed_attention" in ops:
        # Packed training blocks: documents of 256..1024 tokens filling T=4096 (fixed seed).
        B, H, K, T, hd = 2, 32, 8, 4096, 128
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(256, 1025, (B, T // 256), generator=gen)
        segments = torch.stack([torch.repeat_interleave(torch.arange(len(row)), row)[:T] for row in lengths]).to(dev)
        attention = importlib.import_module("kernels.torch_attention")
        seen = int(attention.dense_mask(T, T, True, segments, None, dev).sum())  # visible (query, key) pairs
        flops = 4 * H * seen * hd
        qo, kv = B * H * T * hd, B * K * T * hd
        fns = {"triton": lambda q, k, v: flash_attention.flash_attention_triton(q, k, v, causal=True,
                                                                               segments=segments),
               "flex (compiled)": lambda q, k, v: attention.flex_attention(q, k, v, segments, None, True),
               "sdpa (dense mask)": lambda q, k, v: attention.sdpa_attention(q, k, v, segments, None, True)}
        yield (f"packed documents B={B} Hq={H} Hkv={K} T={T} hd={hd}, docs 256-1024",
               lambda: tuple(torch.randn(B, h, T, hd, device=dev, dtype=bf16, requires_grad=True) for h in (H, K, K)),
               fns, (2 * qo + 2 * kv) * e, (4 * qo + 4 * kv) * e, flops, flops * 7 // 2)


def _sdpa_flash(q, k, v):
    """PyTorch's SDPA restricted to its FlashAttention backend (raises if it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: (bytes read + written) / time, in GB/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _rope_tables(B, T, hd, dev, dtype):
    inv_freq = 500000.0 ** (-torch.arange(0, hd, 2, device=dev).float() / hd)
    angles = torch.arange(T, device=dev).float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), -1).expand(B, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def bench_gpu(ops) -> None:
    import triton
    copy = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy bandwidth {copy:.0f} GB/s")
    print("| op | impl | fwd ms | fwd+bwd ms | peak extra MiB (fwd+bwd) | fwd GB/s | fwd+bwd GB/s | "
          "fwd+bwd % of copy | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    measured = []  # (case name, impl, fwd+bwd ms, fwd+bwd share of copy bandwidth) for the goals
    for name, make, fns, fwd_bytes, fb_bytes, fwd_flops, fb_flops in cases(ops):
        for impl, fn in fns.items():
            inputs = make()

            def fwd():
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd():
                out = fn(*inputs)
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(out, [torch.ones_like(o) for o in out])
                for x in inputs:
                    x.grad = None

            try:
                t_f, t_fb = cuda_time_ms(fwd), cuda_time_ms(fwd_bwd)
                peak = peak_extra_bytes(fwd_bwd)
            except Exception as err:  # e.g. out of memory for the materialised path
                print(f"| {name} | {impl} | failed: {type(err).__name__}: {str(err)[:80]} ||||||||")
                measured.append((name, impl, float("inf"), 0.0))  # a failed kernel misses its goal
                torch.cuda.empty_cache()
                continue
            tflops = f"{fb_flops / t_fb / 1e9:.1f}" if fb_flops else "-"
            fb_gbs = fb_bytes / t_fb / 1e6
            print(f"| {name} | {impl} | {t_f:.3f} | {t_fb:.3f} | {peak / 2**20:.0f} | "
                  f"{fwd_bytes / t_f / 1e6:.0f} | {fb_gbs:.0f} | {100 * fb_gbs / copy:.0f}% | {tflops} |", flush=True)
            measured.append((name, impl, t_fb, fb_gbs / copy))
            inputs = None  # frees this case's tensors before the next one
            torch.cuda.empty_cache()
    print_goals(measured)


ELEMENTWISE = ("rmsnorm", "rope", "swiglu")


def print_goals(measured) -> None:
    """One "GOAL" line per goal of issue 15: each elementwise Triton kernel's fwd+bwd at >= 85% of
    the copy bandwidth; Triton flash attention fwd+bwd at >= 0.9x the speed of SDPA's flash backend."""
    times = {(name, impl): (ms, share) for name, impl, ms, share in measured}
    for (name, impl), (ms, share) in times.items():
        if impl == "triton" and name.startswith(ELEMENTWISE):
            verdict = "met" if share >= 0.85 else "NOT met"
            print(f"GOAL kernels {name}: fwd+bwd >= 85% of copy bandwidth: {share:.0%} ({verdict})")
        if impl == "triton" and name.startswith("flash_attention"):
            sdpa = times.get((name, "sdpa (flash backend)"))
            if sdpa is None or sdpa[0] == float("inf"):
                print(f"GOAL kernels {name}: fwd+bwd >= 0.9x SDPA flash: no SDPA flash time (NOT met)")
                continue
            speed = sdpa[0] / ms
            verdict = "met" if speed >= 0.9 else "NOT met"
            print(f"GOAL kernels {name}: fwd+bwd >= 0.9x SDPA flash: {speed:.2f}x ({verdict})")


# ---- CPU memory of the linear cross-entropy -------------------------------------------------

def _current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_memory_child(tokens: int, vocab: int, dim: int, chunk: int) -> None:
    """In a fresh process: one forward+backward; print the peak extra RSS as JSON."""
    from kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_reference

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(vocab, dim, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    # Warm up torch's lazy initialisation on a tiny problem, and preallocate the gradients so
    # both cases count only what the loss itself keeps alive.
    linear_cross_entropy_reference(hidden[:8], weight[:16], targets[:8] % 16, IGNORE_INDEX, chunk).backward()
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    # Baseline: the *current* RSS. (ru_maxrss here could already hold a transient of the setup,
    # e.g. the unscaled randn weight, which would hide that much of the step's peak.)
    base = _current_rss()
    loss = linear_cross_entropy_reference(hidden, weight, targets, IGNORE_INDEX, chunk)
    after_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"chunk": chunk, "fwd_peak_extra": after_fwd - base, "peak_extra": peak - base,
                      "loss": loss.item()}))


def _limit_address_space(max_gib: float):
    """preexec_fn for a child: fail with MemoryError past max_gib instead of swapping or OOM-killing."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(max_gib * GiB), int(max_gib * GiB)))
    return limit


def bench_cpu_memory(tokens: int, vocab: int, dim: int, chunks, max_gib: float) -> None:
    logits = tokens * vocab * 4
    print(f"linear cross-entropy, fp32, tokens={tokens} vocab={vocab} dim={dim}: "
          f"one fp32 logits matrix = {logits / GiB:.2f} GiB")
    print("| path | peak extra RSS, forward | peak extra RSS, forward+backward | x one logits matrix |")
    print("|---|---|---|---|")
    for chunk in chunks:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(tokens), str(vocab), str(dim), str(chunk)]
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_address_space(max_gib))
        label = "materialised logits" if chunk <= 0 else f"chunked reference, chunk={chunk}"
        if done.returncode != 0:
            print(f"| {label} | failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {r['fwd_peak_extra'] / GiB:.2f} GiB | {r['peak_extra'] / GiB:.2f} GiB | "
              f"{r['peak_extra'] / logits:.2f} |  (loss {r['loss']:.4f})", flush=True)


def bench_cpu_attention(T: int, doc_len: int, dtype: torch.dtype = torch.float32, B: int = 4, H: int = 9, K: int = 3,
                        hd: int = 64) -> None:
    """Print a markdown table: the CPU attention paths on packed documents, seconds per call.
    In bf16 also the per-document path with every document kept in bf16 (no fp32 route)."""
    from kernels import torch_attention as attention
    from scripts.benchmarking import best_time
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B):  # documents of 1 .. 2 doc_len tokens, back to back, like data/packing.py
        lengths = torch.randint(1, 2 * doc_len + 1, (T,), generator=gen)
        rows.append(torch.repeat_interleave(torch.arange(T), lengths)[:T])
    segments = torch.stack(rows)
    lengths = attention.document_lengths(segments)
    work = sum(n * (n + 1) / 2 for row in lengths for n in row) / (B * T * (T + 1) / 2)
    q, k, v = (torch.randn(B, h, T, hd, generator=gen).to(dtype).requires_grad_() for h in (H, K, K))
    grad = torch.randn(B, H, T, hd, generator=gen).to(dtype)
    paths = {"per document (kernels.attention)": lambda: attention.attention_torch(q, k, v, segments),
             "SDPA, dense [B,1,T,T] mask": lambda: attention.sdpa_attention(q, k, v, segments),
             "SDPA, causal, documents ignored": lambda: attention.sdpa_attention(q, k, v)}
    if dtype != torch.float32:
        def in_dtype():
            below, attention.CPU_FP32_BELOW = attention.CPU_FP32_BELOW, 0
            try:
                return attention.attention_torch(q, k, v, segments)
            finally:
                attention.CPU_FP32_BELOW = below
        paths[f"per document, every document in {str(dtype)[6:]}"] = in_dtype
    print(f"B={B} Hq={H} Hkv={K} T={T} hd={hd} {str(dtype)[6:]}, {sum(map(len, lengths))} documents "
          f"(mean {B * T / sum(map(len, lengths)):.0f} tokens; causal work within documents: {work:.0%} of "
          f"the causal T x T), {torch.get_num_threads()} threads, best of 5")
    print("| path | forward ms | forward+backward ms |\n|---|---:|---:|")
    for name, run in paths.items():
        with torch.no_grad():
            fwd, _ = best_time(run, 5, "cpu")
        both, _ = best_time(lambda: run().backward(grad), 5, "cpu")
        print(f"| {name} | {fwd * 1e3:.1f} | {both * 1e3:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default="rmsnorm,rope,swiglu,cross_entropy,flash_attention,packed_attention")
    parser.add_argument("--cpu-memory", action="store_true", help="CE memory on CPU, chunked vs materialised")
    parser.add_argument("--cpu-attention", action="store_true", help="attention on packed documents on CPU")
    parser.add_argument("--doc-len", type=int, default=70, help="mean document length for --cpu-attention")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--cpu-attention: q, k, v dtype")
    parser.add_argument("--tokens", type=int, default=None, help="--cpu-memory: 8192 tokens; --cpu-attention: T=256")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunks", default="0,4096,1024", help="chunk sizes for --cpu-memory; 0 = materialised")
    parser.add_argument("--max-gib", type=float, default=18.0, help="address-space cap of each --cpu-memory child")
    parser.add_argument("--_child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        _cpu_memory_child(*args._child)
    elif args.cpu_attention:
        from train.parallelize import DTYPES
        bench_cpu_attention(args.tokens or 256, args.doc_len, DTYPES[args.dtype])
    elif args.cpu_memory:
        bench_cpu_memory(args.tokens or 8192, args.vocab, args.dim, [int(c) for c in args.chunks.split(",")],
                         args.max_gib)
    elif not torch.cuda.is_available():
        print("bench_kernels: the kernel benchmarks need a CUDA GPU; none found, nothing to measure. "
              "(`--cpu-memory` measures the chunked cross-entropy's memory on CPU.)")
    else:
        bench_gpu(set(args.ops.split(",")))


if __name__ == "__main__":
    main()
