"""train/cpu_heap.py: with keep_freed_memory, a tensor allocated again after a free reuses the
freed pages instead of faulting in fresh ones. Measured in child processes (the setting is for
the whole process, and the test process should keep glibc's defaults), by the kernel's count of
minor page faults (getrusage), not by time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from train.cpu_heap import keep_freed_memory
took = keep_freed_memory() if {keep} else None
faults = []
for _ in range(8):  # a step's pattern: allocate and touch 96 MiB (the logits buffer), free it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(24 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(json.dumps({{"took": took, "faults": faults}}))
"""


def faults(keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), keep=keep)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_buffer_is_reused_without_page_faults():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc and getrusage's fault count: Linux only")
    default, kept = faults(False), faults(True)
    if not kept["took"]:
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    pages = 96 * 2**20 // 4096
    # glibc's default serves 96 MiB by mmap and unmaps it at free: every allocation faults it in
    assert min(default["faults"]) > pages // 2, default
    # kept: the pages are faulted in once, sometimes twice more in the next allocations (torch's
    # 64-byte-aligned request asks glibc for a little more than the hole the last one left),
    # then reused by every allocation (seen: [24507, 0, 24576, 0, 0, 0, 0, 0])
    assert kept["faults"][0] > pages // 2 and max(kept["faults"][3:]) < pages // 50, kept
