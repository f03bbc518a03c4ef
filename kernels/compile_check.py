"""Compile every Triton kernel of kernels/ for a CUDA GPU, on a machine without one.

    python -m kernels.compile_check                   # the representative subset, sm_80 and sm_90
    python -m kernels.compile_check --full            # every configuration the choosers can pick
    python -m kernels.compile_check --json ID [ID..]  # the named cases, one JSON line each (tests)

The triton wheel ships ptxas, so triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32)) builds a real cubin anywhere. A case runs an op's real launch code -- the `_forward` /
`_backward` helpers its autograd Function calls -- on CPU tensors, with JITFunction.run replaced
by `_compile_instead_of_launch`: it binds the launch's arguments the way triton's launcher does
(same signature, constexprs, and 16-divisibility / ==1 specialisation of pointers and ints),
compiles for the target and records, per kernel, the shared memory (compiled metadata) and the
registers and spills (`ptxas -v`). Nothing runs, so the tensors' contents do not matter.

A kernel fails when it does not compile, needs more shared memory per block than the
architecture's opt-in limit, spills registers, or needs more registers than a block of its
threads can have. Shapes are those of the model families in scope (hd 64 and 128, GQA groups
of 4, LLaMA/SmolLM2/Qwen widths and vocabularies); inputs are aligned as in training (T a
multiple of 16) except decoding (T = 1 query, an odd cache length).

Needs TRITON_INTERPRET unset: under the interpreter @triton.jit gives Python functions, not
kernels (tests/test_kernels_compile.py runs this module in a child process for that reason).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (opt-in maximum)
REGISTERS_PER_SM = 65536  # per block, at most: registers x threads
ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One launch sequence of one op, in one configuration, dtype and architecture."""
    op: str
    config: str
    dtype: str
    arch: int
    representative: bool  # part of the default subset (else only with --full)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.config}/{self.dtype}/sm_{self.arch}"


@dataclass
class KernelReport:
    kernel: str
    constexprs: dict
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    threads: int = 0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


# ---- the configurations each op's chooser can pick ----------------------------------------------

# (name, Hq, Hkv, hd) of the families in scope: which rope/attention tiles they reach.
HEAD_LAYOUTS = [("smollm2", 9, 3, 64), ("llama3-8b", 32, 8, 128), ("llama2-13b", 40, 40, 128),
                ("tiny", 4, 2, 16), ("qwen2.5-0.5b", 14, 2, 64), ("llama2-7b", 32, 32, 128), ("llama3-70b", 64, 8, 128)]
REPRESENTATIVE_LAYOUTS = {"smollm2", "llama3-8b", "llama2-13b"}
# Widths: rmsnorm's BLOCK_D = next_pow2(D) (D <= rmsnorm.MAX_DIM) and its warps step at 2048 and 8192.
NORM_DIMS = [576, 4096, 8192, 64, 2048, 5120]
REPRESENTATIVE_NORM_DIMS = {576, 4096, 8192}
# Vocabularies: cross-entropy's BLOCK_V = min(next_pow2(V), 8192); warps step at 4096.
VOCABS = [128256, 256, 2048, 4096]
REPRESENTATIVE_VOCABS = {128256, 256}
# Flash attention: (name, causal, segments, key_mask, T, S, groups); T <= 16 is the decode tile class.
ATTENTION_VARIANTS = [
    ("causal", True, False, False, 256, 256, 4),
    ("causal+segments+key_mask", True, True, True, 256, 256, 4),
    ("decode+key_mask", True, False, True, 1, 257, 4),
    ("causal+segments", True, True, False, 256, 256, 4),
    ("causal+key_mask", True, False, True, 256, 256, 4),
    ("full", False, False, False, 256, 256, 4),
    ("causal-mha", True, False, False, 256, 256, 1),
    ("decode", True, False, False, 1, 257, 4),
]
REPRESENTATIVE_ATTENTION = {"causal", "causal+segments+key_mask", "decode+key_mask"}


def all_cases() -> list[Case]:
    """Every case, the representative ones marked. Representative: bf16 and fp32 of the main
    configurations on both architectures; fp16 and the remaining configurations with --full."""
    configs = []
    for name, *_ in ATTENTION_VARIANTS:
        for hd in (64, 128):
            configs.append(("flash_attention", f"hd{hd}-{name}", name in REPRESENTATIVE_ATTENTION))
    configs += [("rmsnorm", f"D{D}", D in REPRESENTATIVE_NORM_DIMS) for D in NORM_DIMS]
    configs += [("rope", name, name in REPRESENTATIVE_LAYOUTS) for name, *_ in HEAD_LAYOUTS]
    configs += [("swiglu", "block1024", True)]
    configs += [("cross_entropy", f"V{V}", V in REPRESENTATIVE_VOCABS) for V in VOCABS]
    return [Case(op, config, dtype, arch, rep and dtype != "fp16")
            for op, config, rep in configs for dtype in DTYPES for arch in ARCHS]


def _launch_flash(config: str, dtype: torch.dtype) -> None:
    flash = importlib.import_module("kernels.flash_attention")
    hd_text, name = config.split("-", 1)
    hd = int(hd_text[2:])
    _, causal, segments, key_mask, T, S, groups = next(v for v in ATTENTION_VARIANTS if v[0] == name)
    B, HKV = 2, 2
    H = HKV * groups
    # The model's layouts: q is a [B,T,H,hd] projection viewed as [B,H,T,hd]; decoding reads k/v
    # from a longer cache buffer.
    q = torch.empty(B, T, H, hd, dtype=dtype).transpose(1, 2)
    k = torch.empty(B, HKV, S + 15, hd, dtype=dtype)[:, :, :S]
    v = torch.empty_like(k)
    doc = (torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, T, dtype=torch.int32)) if segments else None
    km = torch.ones(B, S, dtype=torch.uint8) if key_mask else None
    tiles = flash.choose_tiles(hd, dtype, T, gpu=True)
    o, lse = flash._forward(q, k, v, causal, doc, km, tiles, dot_f32=False)
    if T > 16:  # decoding runs without gradients
        flash._backward(q, k, v, o, lse, torch.empty_like(o), causal, doc, km, tiles, dot_f32=False)


def _launch_rmsnorm(config: str, dtype: torch.dtype) -> None:
    rmsnorm = importlib.import_module("kernels.rmsnorm")
    D = int(config[1:])
    x, w = torch.empty(64, D, dtype=dtype), torch.empty(D, dtype=dtype)
    _, rstd = rmsnorm._forward(x, w, 1e-5)
    rmsnorm._backward(torch.empty_like(x), x, w, rstd)


def _launch_rope(config: str, dtype: torch.dtype) -> None:
    rope = importlib.import_module("kernels.rope")
    _, H, K, hd = next(layout for layout in HEAD_LAYOUTS if layout[0] == config)
    B, T = 2, 64
    q = torch.empty(B, T, H, hd, dtype=dtype).transpose(1, 2)
    k = torch.empty(B, T, K, hd, dtype=dtype).transpose(1, 2)
    cos, sin = torch.empty(B, T, hd, dtype=dtype), torch.empty(B, T, hd, dtype=dtype)
    rope._rope_launch(q, k, cos, sin, backward=False)
    rope._rope_launch(q, k, cos, sin, backward=True)


def _launch_swiglu(config: str, dtype: torch.dtype) -> None:
    swiglu = importlib.import_module("kernels.swiglu")
    gate, up = torch.empty(64, 1536, dtype=dtype), torch.empty(64, 1536, dtype=dtype)
    swiglu._forward(gate, up)
    swiglu._backward(torch.empty_like(gate), gate, up)


def _launch_cross_entropy(config: str, dtype: torch.dtype) -> None:
    ce = importlib.import_module("kernels.cross_entropy")
    V = int(config[1:])
    logits = torch.empty(64, V, dtype=dtype)
    block, warps = ce._launch_config(V, torch.device("cuda"))
    ce._launch_rows(logits, torch.zeros(64, dtype=torch.long), torch.empty(64), torch.ones((), dtype=torch.long),
                    ce.IGNORE_INDEX, block, warps)


LAUNCHERS = {"flash_attention": _launch_flash, "rmsnorm": _launch_rmsnorm, "rope": _launch_rope,
             "swiglu": _launch_swiglu, "cross_entropy": _launch_cross_entropy}


# ---- compiling instead of launching ----------------------------------------------------------------

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, reports: list[KernelReport]):
    """Within the block, `kernel[grid](...)` compiles for sm_<arch> and appends a KernelReport."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        named = {self.arg_names[path[0]]: value for path, value in constexprs.items()
                 if self.params[path[0]].is_constexpr}
        report = KernelReport(self.__name__, named)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                   options=options.__dict__)
        except Exception as err:  # the report names the kernel and the error; the case fails on it
            report.error = f"{type(err).__name__}: {str(err)[-1500:]}"
        else:
            text = log.getvalue()
            used, spills = _PTXAS_USED.findall(text), _PTXAS_SPILLS.findall(text)
            report.shared = compiled.metadata.shared
            report.threads = 32 * compiled.metadata.num_warps
            report.registers = int(used[-1]) if used else -1
            # No line found: -1, reported as a problem rather than read as "no spills".
            report.spill_stores, report.spill_loads = map(int, spills[-1]) if spills else (-1, -1)
        reports.append(report)

    saved = (JITFunction.run, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    JITFunction.run = run
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log is printed to stdout: captured above
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and its log with it
    try:
        yield
    finally:
        JITFunction.run, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def check(report: KernelReport, arch: int) -> list[str]:
    """What is wrong with one compiled kernel for sm_<arch> (empty: nothing)."""
    if report.error:
        return [f"compile error: {report.error}"]
    problems = []
    if report.shared > SHARED_LIMIT[arch]:
        problems.append(f"shared memory {report.shared} B > {SHARED_LIMIT[arch]} B of sm_{arch}")
    if report.registers < 0 or report.spill_stores < 0:
        problems.append("no register or spill count in the ptxas -v log")
    elif report.spill_stores or report.spill_loads:
        problems.append(f"register spills: {report.spill_stores} B stores, {report.spill_loads} B loads")
    elif report.registers * report.threads > REGISTERS_PER_SM:
        problems.append(f"{report.registers} registers x {report.threads} threads > {REGISTERS_PER_SM}")
    return problems


def run_case(case: Case) -> dict:
    """Compile one case: -> {"id", "kernels": [KernelReport fields + problems]}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.compile_check needs TRITON_INTERPRET unset (the interpreter has no kernels)")
    reports: list[KernelReport] = []
    with _compile_instead_of_launch(case.arch, reports):
        try:
            LAUNCHERS[case.op](case.config, DTYPES[case.dtype])
        except Exception as err:  # the launch code itself failed: report it as this case's failure
            reports.append(KernelReport("(launch code)", {}, error=f"{type(err).__name__}: {err}"))
    for r in reports:
        r.problems = check(r, case.arch)
    return {"id": case.id, "kernels": [r.__dict__ for r in reports]}


def run_cases(cases: list[Case], jobs: int):
    """Yield run_case results in order, `jobs` processes at a time, into a throwaway triton
    cache (every kernel is compiled afresh anyway)."""
    with tempfile.TemporaryDirectory(prefix="triton-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            yield from map(run_case, cases)
            return
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            yield from pool.map(run_case, cases)


def _summary(result: dict) -> str:
    lines = []
    for r in result["kernels"]:
        state = "FAIL " + "; ".join(r["problems"]) if r["problems"] else "ok"
        lines.append(f"  {r['kernel']:<18} shared {r['shared'] / 1024:6.1f} KiB  regs {r['registers']:>3} x "
                     f"{r['threads']:>3} threads  spills {r['spill_stores']}/{r['spill_loads']} B  {state}")
    return "\n".join([result["id"], *lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ids", nargs="*", help="case ids (default: the representative subset, or all with --full)")
    parser.add_argument("--full", action="store_true", help="every configuration, dtype and architecture")
    parser.add_argument("--json", action="store_true", help="one JSON line per case instead of a table")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.ids:
        known = {c.id: c for c in cases}
        unknown = [i for i in args.ids if i not in known]
        if unknown:
            parser.error(f"unknown case ids: {unknown[:5]}")
        cases = [known[i] for i in args.ids]
    elif not args.full:
        cases = [c for c in cases if c.representative]
    failed = 0
    for result in run_cases(cases, args.jobs):
        failed += any(r["problems"] for r in result["kernels"])
        print(json.dumps(result) if args.json else _summary(result), flush=True)
    if not args.json:
        print(f"{len(cases)} cases, {failed} failed")
    return 1 if failed and not args.json else 0


if __name__ == "__main__":
    sys.exit(main())
