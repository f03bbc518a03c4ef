"""int8 weight-only quantisation of a Llama's linear layers, for inference.

Each nn.Linear weight W [N,K] becomes int8 codes q [N,K] and one scale per output row s [N]
(bf16), W ~ q * s, with s = max|W_row| / 127 rounded to bf16 and q = round(W / s) clamped to
+-127: every weight is off by at most s/2. Activations stay in the model's dtype; norms,
biases and an untied embedding stay as they are (an embedding row is read once per token, so
int8 would save memory, not time). A tied embedding shares the head's int8 codes.

Decoding one token reads every weight once, so its speed is bounded by memory bandwidth: int8
reads a quarter of fp32's bytes. Which matmul reads int8 fast depends on the device:

- CPU: torch._weight_int8pack_mm with bf16 activations. `python scripts/bench_int8.py` on this
  project's 2-core AVX2 box (torch 2.13, SmolLM2's 1536x576 MLP shape, 30 distinct weights so
  they come from memory, candidates taking turns, best of 10; us per layer, 1 row / 4 rows):
      fp32 F.linear 378 / 884, fp32 multiply-sum compiled 254 / 803,
      int8pack bf16 89 / 191, int8pack fp32 826 / 3690,
      int8 dequantise + F.linear 336 / 1441 (eager), 1323 / 1700 (compiled),
      int8 multiply-sum compiled (Inductor's C++ loop, int8 loads) 636 / 2904.
  int8pack with bf16 activations is the only int8 candidate faster than fp32 (4.2x at 1 row),
  so it runs up to INT8PACK_MAX_ROWS rows (decoding, a chat prompt's prefill). Its kernel is a
  matrix-vector loop, so from ~128 rows the dequantised weight in one fp32 GEMM is faster,
  dequantisation included, and longer inputs (long prompts, scoring) take that path. On the
  AVX2 EPYC (1536x576, 30 weights, best of 4, us per layer, dequantise + GEMM / int8pack):
  8 rows 2676 / 418, 37 rows 5789 / 1378, 64 rows 6799 / 2258, 128 rows 4258 / 4378,
  256 rows 6360 / 8664 (a noisy afternoon; only the crossover is the point). Both compute the
  same function, y = bf16(bf16(x) @ (q*s)^T), up to fp32 summation order: rounding x and y to
  bf16 is what the fast kernel does, and the wide path does it too, so that scoring measures
  the numbers decoding produces (it costs the wide path up to 3x of an fp32 forward on this
  CPU). int8pack's results at 9-64 rows (K = 32, 64, 96, 576; N 1-100) were checked on the
  AVX2 EPYC: within bf16 rounding of the fp32 product.
  Inside the compiled decoding step, one row on an AVX-512 CPU is a multiply-sum over the codes
  instead (COMPILED_ONE_ROW = "multiply-sum"): Inductor writes it as one loop that converts 32
  codes at a time. On the AVX512-BF16 EPYC (torch 2.13, the shape above, 30 weights, best of
  15) it takes 33-42 us (21-27 GB/s, near that box's 30 GB/s) against 74-87 us for int8pack.
  Alone it also wins at 2 and 4 rows (56 vs 103 us, 109 vs 152), but inside the batch-4 step it
  made a step 9x slower (293 vs 31 ms), so several rows keep int8pack.
  Inductor's AVX2 code loads int8 (and int32) vectors through a scalar copy (ATen's
  Vectorized<int8_t>::loadu with a count), so there the same loop takes 391-692 us against
  106-130 us for int8pack. Its float loads are plain vector loads, though, so on AVX2 one row
  reads the codes as float32 words (COMPILED_ONE_ROW = "words", `one_row_words`: a view of
  the same bytes, bit-cast to int32 in registers, 4 codes per word split off by shifts): on an
  AVX2-only EPYC (Zen 3, 23.4 GB/s read) 64-71 us (12-14 GB/s) against 108-112 us for
  int8pack (`python scripts/bench_int8.py`), and the 49152x576 head 1.90 against 3.51 ms.
  The words are only loaded and bit-cast, never computed on as floats. Both loops compute the
  same function as int8pack.
- other devices (CUDA): F.linear(x, q.to(x.dtype)) * s, as gpt-fast does; under torch.compile
  Inductor fuses the dequantisation into the matmul. (Not measured here: no GPU.)

Quality, SmolLM2-135M-Instruct from its GGUF, perplexity on the last 100 PUD dev sentences:
+1.28% en, +0.96% zh, +0.97% th over fp32 (tests/test_quantize.py keeps it within PPL_DELTA).

GGUF Q8_0 tensors (one fp16 scale d per 32 weights) map to this layout without a float copy
of the tensor: `int8_from_q8_0` requantises each row to the row scale max_b(d_b), the scale
quantising the dequantised row would pick, since each Q8_0 block's largest weight is coded
+-127. Blocks whose d is the row maximum keep their codes exactly; the others are rounded again,
adding at most s/2 per weight. The result equals quantize_weight of the dequantised tensor.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gguf import hf_name, iter_hf_tensors, unpermute_rotary

SCALE_DTYPE = torch.bfloat16
# Compiled decoding of one row, by ATen's CPU capability (which Inductor's C++ follows; see the
# module docstring): "multiply-sum" over the int8 codes on AVX-512, "words" (the codes read 4 per
# 32-bit word) on AVX2, where Inductor's int8 loads go element by element; None: int8pack.
COMPILED_ONE_ROW = {"AVX512": "multiply-sum", "AVX2": "words"}.get(torch.backends.cpu.get_cpu_capability())
INT8PACK_MAX_ROWS = 64  # int8pack up to here; the dequantised fp32 GEMM wins from ~128 rows
# int8pack's CPU kernel reads K in vector steps without a tail: on the AVX2 EPYC (torch 2.13) it
# returned inf or garbage at K = 6, 10, 12, ... and crashed at K = 4, and was right at every
# multiple of 8 (N 1-100, 1-8 rows); AVX-512 runs were checked at K = 96, 576, 1536. Other K
# take the dequantised fp32 GEMM (correct, slower); every real model's K is a multiple of 32.
INT8PACK_K_MULTIPLE = 32
_CHUNK_ROWS = 4096     # rows quantised at a time: bounds the float temporaries of a big tensor


@dataclass
class Int8Weight:
    """A quantised weight: codes q int8 [N,K], scales s [N] (SCALE_DTYPE); W ~ q * s[:, None]."""
    q: torch.Tensor
    s: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[N,K] in dtype."""
        return self.q.to(dtype) * self.s.to(dtype)[:, None]


def quantize_weight(w: torch.Tensor) -> Int8Weight:
    """float [N,K] -> Int8Weight with one scale per row (see the module docstring).

    The scale is rounded to bf16 before the codes are formed, so q * s is the stored weight's
    best approximation. An all-zero row gets scale 0 and codes 0.
    """
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(w.shape[0], dtype=SCALE_DTYPE, device=w.device)
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        rows = w[start:start + _CHUNK_ROWS].float()
        scale = (rows.abs().amax(dim=1) / 127).to(SCALE_DTYPE)
        divisor = torch.where(scale == 0, 1.0, scale.float())[:, None]
        q[start:start + _CHUNK_ROWS] = (rows / divisor).round().clamp(-127, 127).to(torch.int8)
        s[start:start + _CHUNK_ROWS] = scale
    return Int8Weight(q, s)


def int8_from_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> Int8Weight:
    """GGUF Q8_0 bytes of a [N,K] tensor (N*K/32 blocks of: fp16 d, 32 int8 codes) -> Int8Weight.

    Works _CHUNK_ROWS rows at a time, so no float copy of the whole tensor is made; equal to
    quantize_weight(dequantised tensor) (tested against the gguf package's dequantiser).
    """
    n, k = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // 32, 34)
    q = torch.empty(shape, dtype=torch.int8)
    s = torch.empty(n, dtype=SCALE_DTYPE)
    for start in range(0, n, _CHUNK_ROWS):
        part = blocks[start:start + _CHUNK_ROWS]
        d = torch.from_numpy(np.ascontiguousarray(part[:, :, :2]).view("<f2").astype(np.float32))  # [n,k/32,1]
        codes = torch.from_numpy(np.ascontiguousarray(part[:, :, 2:]).view(np.int8))              # [n,k/32,32]
        # codes * d is exact in fp32 (8-bit codes times 11-bit mantissas): the dequantised rows
        rows = (codes.float() * d).reshape(len(part), k)
        w = quantize_weight(rows)
        q[start:start + len(part)], s[start:start + len(part)] = w.q, w.s
    return Int8Weight(q, s)


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + bias for x [..., K] -> [..., N]; q int8 [N,K], s [N] buffers."""

    def __init__(self, weight: Int8Weight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.register_buffer("weight", weight.q)
        self.register_buffer("scales", weight.s)
        self.bias = bias
        self._alias_words()

    def _alias_words(self):
        """`words`: the codes' bytes seen as float32 [N, K/4] (no copy; see one_row_words), a
        non-persistent buffer, so a compiled step receives a float32 tensor, whose loads
        Inductor's AVX2 code vectorises (its int8 and int32 loads go through a scalar copy)."""
        q = self.weight
        if self.in_features % 4 == 0 and q.is_contiguous() and q.dtype == torch.int8 and sys.byteorder == "little":
            self.register_buffer("words", q.view(torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # `words` is a view of `weight`, not a tensor of its own: moving or casting the module
        # must not copy (or round) it apart, so it is dropped and made again from the new weight
        self._buffers.pop("words", None)
        out = super()._apply(fn, recurse)
        self._alias_words()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = self._cpu(rows)
        else:
            y = F.linear(rows, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _cpu(self, rows: torch.Tensor) -> torch.Tensor:
        """bf16(bf16(rows) @ (q*s)^T) [M,N]: int8pack for few rows (one row compiled: a loop of
        Inductor's, COMPILED_ONE_ROW), one fp32 GEMM for many rows or a K int8pack gets wrong."""
        rows = rows.to(torch.bfloat16)
        if rows.shape[0] == 1 and torch.compiler.is_compiling():
            # Inductor's own loop over the codes (eagerly this would build a float [1,N,K])
            if COMPILED_ONE_ROW == "multiply-sum":
                y = (rows.float()[:, None, :] * self.weight.float()).sum(-1) * self.scales.float()
                return y.to(torch.bfloat16)
            if COMPILED_ONE_ROW == "words" and "words" in self._buffers:
                return one_row_words(rows, self.words, self.scales)
        if rows.shape[0] <= INT8PACK_MAX_ROWS and self.in_features % INT8PACK_K_MULTIPLE == 0:
            return torch._weight_int8pack_mm(rows, self.weight, self.scales)
        weight = Int8Weight(self.weight, self.scales).dequantize()
        return F.linear(rows.float(), weight).to(torch.bfloat16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def one_row_words(row: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16(row @ (q*s)^T) [M,N] for bf16 rows [M,K] (decoding: M = 1), from the codes q [N,K]
    as float32 words [N,K/4] (4 codes per word, code 4j+i in byte i: little-endian, as x86 is).

    Each word is bit-cast back to int32 in registers, and code i is its byte i sign-extended,
    (w << (24 - 8i)) >> 24: one contiguous 8-lane load gives Inductor 32 codes. The row is split
    the same way, x_i[j] = row[4j + i] (a [4, K/4] copy of 576 floats), so
        y = s * sum_j sum_i x_i[j] * code_i[j]
    which is row @ q^T summed in another order (fp32 throughout). Meant for Inductor: eagerly
    it builds [M, N, K/4] floats."""
    codes = words.view(torch.int32)
    parts = row.float().view(len(row), -1, 4).permute(0, 2, 1).contiguous()  # [M, 4, K/4]
    total = None
    for i in range(4):
        code = (codes << (24 - 8 * i) if i < 3 else codes) >> 24  # byte i, sign-extended
        term = parts[:, None, i, :] * code.float()  # [M, N, K/4]
        total = term if total is None else total + term
    return (total.sum(-1) * scales.float()).to(torch.bfloat16)


class Int8Embedding(nn.Module):
    """Rows of a tied head's int8 weight as embeddings: ids [...] -> [..., D] in `dtype`."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = [head], dtype  # a list: the head is not a submodule twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight[ids].to(self.dtype) * head.scales[ids].to(self.dtype)[..., None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a Llama (attention, MLP, head) by an Int8Linear, in place;
    a tied embedding then reads the head's codes. Returns the model (eval, inference only).

    Refuses a model with LoRA layers (merge them first: model.lora.merge_lora).
    """
    linears = plain_linears(model, "quantize_int8")
    dtype = model.model.embed_tokens.weight.dtype
    tied = model.config.tie_embeddings
    for name, module in linears:
        set_int8_linear(model, name, quantize_weight(module.weight.detach()), module.bias)
    if tied:
        model.model.embed_tokens = Int8Embedding(model.lm_head, dtype)
    return model.eval()


def plain_linears(model: nn.Module, who: str) -> list[tuple[str, nn.Linear]]:
    """The (name, module) of every plain nn.Linear, to be quantised; refuses, in one line naming
    `who` and the layer, a subclass (a LoRA layer: merge it first, model.lora.merge_lora)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            raise ValueError(f"{who}: {name} is a {type(module).__name__}; merge LoRA "
                             "adapters first (model.lora.merge_lora)")
    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at module path `name` (e.g. model.layers.0.mlp.up_proj)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def set_int8_linear(model: nn.Module, name: str, weight: Int8Weight, bias: nn.Parameter | None) -> None:
    """Put Int8Linear(weight, bias) at module path `name`."""
    set_module(model, name, Int8Linear(weight, bias))


# ---- loading straight into int8 (model.checkpoint.load(..., quantize="int8")) --------------

def is_quantized_weight(name: str) -> bool:
    """Whether an HF tensor name is a weight quantize_int8 turns into int8 (linear layers; the
    embedding of a tied model arrives as the head's weight, see checkpoint.load)."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def gguf_tensors_int8(gguf, config) -> Iterator[tuple[str, torch.Tensor | Int8Weight]]:
    """model.gguf.iter_hf_tensors, except that the Q8_0 weights of linear layers (and a tied
    embedding) come as Int8Weight straight from their blocks (int8_from_q8_0), q/k rows
    un-permuted as iter_hf_tensors does; every other tensor as it yields it."""
    direct = {}
    for name, info in gguf.tensors.items():
        target = hf_name(name) if info.ggml_type == "Q8_0" else None
        if target and (is_quantized_weight(target) or target == "model.embed_tokens.weight" and config.tie_embeddings):
            direct[name] = target
    rest = copy.copy(gguf)
    rest.tensors = {name: info for name, info in gguf.tensors.items() if name not in direct}
    yield from iter_hf_tensors(rest)
    heads = {"q_proj": config.n_heads, "k_proj": config.n_kv_heads}
    for name, target in direct.items():
        info = gguf.tensors[name]
        raw = np.memmap(gguf.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        rows = raw.reshape(info.shape[0], -1)  # one row of blocks per output row
        module = target.split(".")[-2]
        if module in heads:  # a row permutation: move each row's blocks as llama.cpp moved the row
            rows = unpermute_rotary(rows, heads[module])
        yield target, int8_from_q8_0(rows, info.shape)


def load_int8_tensor(model: nn.Module, name: str, tensor: torch.Tensor | Int8Weight, device) -> None:
    """Checkpoint loading: the linear weight `name` (a float tensor, or an Int8Weight from
    gguf_tensors_int8) becomes an Int8Linear on `device`; a tied model's embedding weight
    becomes the head's (tie_int8_embedding then shares it)."""
    module_name = "lm_head" if name == "model.embed_tokens.weight" else name.removesuffix(".weight")
    weight = tensor if isinstance(tensor, Int8Weight) else quantize_weight(tensor.to(device))
    weight = Int8Weight(weight.q.to(device), weight.s.to(device))
    set_int8_linear(model, module_name, weight, model.get_submodule(module_name).bias)


def tie_int8_embedding(model: nn.Module, dtype: torch.dtype) -> None:
    """After loading a tied model: the embedding reads the int8 head's rows."""
    model.model.embed_tokens = Int8Embedding(model.lm_head, dtype)
