"""Every Triton kernel compiles for sm_80 (A100) and sm_90 (H100) within the hardware's limits.

No GPU needed: kernels/compile_check.py drives each op's real launch code with triton.compile
for GPUTarget("cuda", arch, 32) (the triton wheel ships ptxas) and reads each kernel's shared
memory from the compiled metadata and its registers and spills from `ptxas -v`. A case fails on
a compile error, shared memory above the architecture's per-block opt-in limit (sm_80 163 KiB,
sm_90 227 KiB), any register spill, or more registers than a block of its threads may hold. The
test id names op/config/dtype/arch; the message names the kernel and its constexprs.

By default the representative subset runs (bf16 and fp32 of the main configuration of each op on
both architectures; see kernels.compile_check.all_cases); LANGSHIFT_COMPILE_CHECK=full runs every
configuration the tile choosers can pick, fp16 included. Measured on the project's 2 shared
cores: default 60 cases (136 kernel compiles) in 47-71 s; full 204 cases (504 compiles) in 11 min.

Why a child process: the compile needs triton's compiler, while the rest of the suite runs the
kernels on CPU under TRITON_INTERPRET=1 (tests/conftest.py), which turns every @triton.jit
function into a Python function and patches triton.language. One child compiles every selected
case (two at a time) for the whole session; each test reads its case's report.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import compile_check
from kernels.compile_check import KernelReport, all_cases, check

pytest.importorskip("triton", reason="triton not installed (pip install -e .[triton]): kernel compiles unchecked")

FULL = os.environ.get("LANGSHIFT_COMPILE_CHECK") == "full"
CASES = [c for c in all_cases() if FULL or c.representative]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def compiled(request) -> dict:
    """{case id: compile_check result} for the cases this session selected, compiled in one child."""
    ids = [item.callspec.params["case"].id for item in request.session.items
           if getattr(item, "originalname", None) == "test_kernel_compiles"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    done = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", *ids], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["id"]: r for r in results}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_compiles(case, compiled):
    result = compiled[case.id]
    assert result["kernels"], f"{case.id}: no kernel was launched"
    problems = [f"{k['kernel']} {k['constexprs']}: {p}" for k in result["kernels"] for p in k["problems"]]
    assert not problems, "\n".join(problems)


def test_every_kernel_is_launched_by_a_case(monkeypatch):
    """Each @triton.jit kernel of kernels/ (a jit function calling tl.program_id; the others are
    inlined helpers) is launched by its op's cases: a new kernel cannot go unchecked. The launches
    are recorded here, not run or compiled."""
    launched = []
    kernel_type = type(importlib.import_module("kernels.swiglu")._swiglu_fwd)  # JITFunction or InterpretedFunction
    monkeypatch.setattr(kernel_type, "run", lambda self, *a, grid, warmup, **kw: launched.append(self.fn.__name__))
    for op, launch in compile_check.LAUNCHERS.items():
        module = importlib.import_module(f"kernels.{op}")
        defined = {name for name, obj in vars(module).items() if isinstance(obj, kernel_type)
                   and obj.fn.__module__ == module.__name__ and "tl.program_id(" in inspect.getsource(obj.fn)}
        launched.clear()
        for case in CASES:
            if case.op == op and case.arch == 90 and case.dtype == "bf16":
                launch(case.config, torch.bfloat16)
        assert defined and defined == set(launched), (op, defined, set(launched))


def test_check_flags_each_limit():
    """The verdict itself: a report over each limit fails, one within all of them passes."""
    ok = KernelReport("k", {}, shared=100 * 1024, registers=128, spill_stores=0, spill_loads=0, threads=256)
    assert check(ok, 80) == [] and check(ok, 90) == []
    big = KernelReport("k", {}, shared=200 * 1024, registers=128, spill_stores=0, spill_loads=0, threads=256)
    assert check(big, 80) and not check(big, 90)  # 200 KiB: over sm_80's 163, under sm_90's 227
    spills = KernelReport("k", {}, shared=0, registers=255, spill_stores=8, spill_loads=8, threads=128)
    assert "spills" in check(spills, 90)[0]
    crowded = KernelReport("k", {}, shared=0, registers=255, spill_stores=0, spill_loads=0, threads=512)
    assert "registers" in check(crowded, 90)[0]
    unread = KernelReport("k", {}, shared=0, registers=-1, spill_stores=-1, spill_loads=-1, threads=128)
    assert "log" in check(unread, 90)[0]
    assert check(KernelReport("k", {}, error="CompilationError: x"), 90)[0].startswith("compile error")
