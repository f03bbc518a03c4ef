"""What the ours-vs-theirs benchmarks share: one HF copy of the model for both sides, each side in
its own child process, peak memory of the measured phase only, best-of-N wall time."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def reset_peak_memory(device: str) -> None:
    """Start measuring the peak from now: after loading, so a loader's transient buffers (or a
    library's mmap of the file) do not count as the cost of generating or training."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM).
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: str) -> float:
    """Peak since reset_peak_memory: CUDA allocated bytes, or the CPU process's resident set
    size (weights and runtime included)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_and_best(fn, repeats: int, device: str = "cpu"):
    """Run fn once (warm-up: compiles, caches), then `repeats` times, each timed;
    -> (seconds of the first call, best seconds of the others, last output)."""
    times, out = [], None
    for _ in range(1 + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:], default=float("inf")), out


def best_time(fn, repeats: int, device: str):
    """Run fn once to warm up, then `repeats` times; -> (best seconds, last output)."""
    _, best, out = first_and_best(fn, repeats, device)
    return best, out


@contextlib.contextmanager
def hf_copy(source):
    """Load `source` (.gguf or HF folder) with our loader and write it as a temporary HF folder,
    so both sides read the very same weights."""
    from model.checkpoint import load, save
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(source)
        folder = save(model, tokenizer, Path(tmp) / "hf")
        del model
        yield folder


def run_side(script: str, side: str, folder: Path, flags: list[str]) -> dict:
    """Run `script --side SIDE --folder FOLDER *flags` in a child process; -> its last JSON line."""
    done = subprocess.run([sys.executable, script, "--side", side, "--folder", str(folder), *flags],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads, of our model or a transformers one (the same
    names): every linear layer's weight (int8 or int4 codes and their scales, or floats) and the
    norms; the embedding only when it is the head's tensor (a float embedding beside a quantised
    or untied head gives one row per token)."""
    seen, total = set(), 0
    head = getattr(model.lm_head, "weight", None)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.data_ptr() in seen or name == "model.embed_tokens.weight" and tensor is not head:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
