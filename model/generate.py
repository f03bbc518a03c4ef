"""Batched generation with left padding and a static KV cache.

Prompts of different lengths are left-padded to a common length P so that every row's next token
sits in the same column. Pad keys are masked out and each row's rotary positions start at 0 at
its first real token, so a padded row computes exactly what it would alone. One forward over the
prompts fills the cache (prefill); then one token per step is fed back (decode).

Nothing is rebuilt per token: the cache (model.llama.KVCache) is allocated once for P + the
answer budget, with the rotary tables of all its positions and a key mask that each step marks
one slot of. Eager decoding runs Llama.forward on the filled part of the cache (no mask at all
without padding, a view of the preallocated one with it). compile=True runs `decode_step` under
torch.compile instead: fixed shapes (attention over the whole cache, masked), one graph for
every step, the weights' matrix-vector products as Inductor loops (see _OneRowLinear; int8
layers on AVX-512 and AVX2 likewise, model.quantize.COMPILED_ONE_ROW), with DECODE_COMPILE_OPTIONS.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model.llama import KVCache, Llama


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (argmax).

    stop_ids: ids that end a row (excluded from the output). None = the model's own EOS ids
    (config.eos_id); a chat caller passes its template's end-of-turn ids (model.runner does);
    [] = never stop early (benchmarks, parity tests).
    """
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0                   # keep the k most likely tokens (0 = all)
    top_p: float = 1.0               # keep the smallest set with this much probability mass
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already in the row
    stop_ids: list[int] | None = None
    seed: int | None = None


def choose_next(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    """logits[B,V] -> next ids [B]. seen[B,V] bool marks tokens already in each row (needed only
    with a repetition penalty)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _stop_ids(s: Sampling, config) -> list[int]:
    if s.stop_ids is not None:
        return list(s.stop_ids)
    eos = config.eos_id
    return [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> tokens[B,P] left-padded with pad_id, and key_mask[B,P] (False on padding)."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        tokens[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = True
    return tokens.to(device), mask.to(device)


def decode_step(model: Llama, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row through the whole model -> logits [B,V]. tokens, positions [B,1].

    The cache is in slot mode (cache.slot: the position to write): every layer attends over the
    whole preallocated cache [B,K,max_len,hd], with cache.key_mask [B,max_len] (True = filled,
    not padding) as the mask. Every shape is the same at every step and the step reads no Python
    number that changes between steps, so `torch.compile` traces it once. (Llama.forward cannot
    serve here: it counts positions with cache.length, a Python int.) The layers are the model's
    own modules, so LoRA or int8 layers swapped in from outside run here too.
    """
    with _OneRowLinear():
        x = model.model.embed_tokens(tokens)
        cos, sin = cache.rope(positions, x.dtype)
        mask = cache.key_mask[:, None, None, :]
        for block in model.model.layers:
            x = block(x, cos, sin, mask, cache)
        return model.lm_head(model.model.norm(x))[:, -1]


class _OneRowLinear(TorchFunctionMode):
    """Inside the compiled step on CPU: a linear layer applied to a single row (batch 1) is
    computed as multiply-and-sum, which Inductor turns into one vectorised loop over the weight,
    split across the threads. MKL's matrix-vector product runs on one thread at this size:
    240 us vs 165 us (one thread) for SmolLM2's 1536x576 weights read from memory, measured
    on this project's AVX2 box. Eagerly the product would materialise [N,K]: compiled only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].device.type == "cpu" and args[0].numel() == args[1].shape[-1]:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)
            return y if bias is None else y + bias
        return func(*args, **kwargs)


# One compiled callable per device type for the process: torch.compile keeps a compiled graph
# per distinct (model, batch, cache length, dtype); later calls with the same shapes reuse it.
_compiled_steps: dict = {}
_compiled_keys: set = set()
log = logging.getLogger(__name__)


# Inductor options of the CPU step. Inductor inlines a pointwise producer (a norm, a residual add)
# into its consumer's loop; inlined into a matrix-vector product it is recomputed for every
# weight row: the head's loop redid the final norm 49152 times (int8: 3.4 ms of a 17 ms step;
# 1.2 ms stored once). A decoding step's activations are a few KB, so storing every non-trivial
# one costs nothing. emulate_precision_casts keeps the bf16 roundings the eager layers do
# (quantised layers round their input to bf16; Inductor would otherwise drop a bf16 round trip),
# so compiled and eager decoding compute the same numbers up to summation order. Other devices
# keep Inductor's defaults (not measured there: no GPU so far).
DECODE_COMPILE_OPTIONS = {"realize_opcount_threshold": 2, "emulate_precision_casts": True}


def compiled_decode_step(device_type: str = "cpu"):
    """decode_step under torch.compile (Inductor: C++ on CPU, Triton on CUDA). Inductor keeps
    its generated code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR, default
    /tmp/torchinductor_$USER), so a later process with the same shapes skips code generation."""
    if device_type not in _compiled_steps:
        options = DECODE_COMPILE_OPTIONS if device_type == "cpu" else None
        _compiled_steps[device_type] = torch.compile(decode_step, fullgraph=True, options=options)
    return _compiled_steps[device_type]


COMPILE_BUCKET = 256


def cache_length(needed: int, context: int, compile: bool) -> int:
    """Positions to allocate: exactly `needed` eagerly; compiled, rounded up to a multiple of
    COMPILE_BUCKET (within the context) so that calls of similar lengths share one graph."""
    if not compile:
        return needed
    return min(-(-needed // COMPILE_BUCKET) * COMPILE_BUCKET, context)


@torch.inference_mode()
def generate(model: Llama, prompts: list[list[int]], sampling: Sampling | None = None,
             on_token: Callable[[int, int], None] | None = None, pad_id: int = 0,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt (token ids). Returns the new ids per prompt, stop token excluded.

    on_token(row, id) is called for every new token as soon as it is chosen (streaming).
    compile: run the one-token decoding step under torch.compile (see decode_step); the first
    call for a new batch size / cache length compiles (logged at INFO with its time), the
    prefill runs eagerly. Greedy tokens are the same either way (tested).
    """
    s = sampling or Sampling()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    tokens, key_mask = left_pad(prompts, pad_id, device)
    P = tokens.shape[1]
    if P + s.max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens")
    cache = KVCache(model.config, B, cache_length(P + s.max_new_tokens, model.config.max_seq_len, compile),
                    dtype, device)
    padded = not bool(key_mask.all())
    cache.key_mask[:, :P] = key_mask
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens, key_mask)
    stop = set(_stop_ids(s, model.config))

    # Prefill: only the last position's logits are read, so the head runs on that row alone
    # (SmolLM2, 37 prompt tokens: the full head was 50 of 190 ms in fp32, 150 of 340 ms in int8,
    # whose wide path dequantises the 49152x576 head; one row takes int8pack).
    hidden = model(tokens, positions=positions, cache=cache, key_mask=key_mask if padded else None,
                   return_hidden=True)
    logits = model.lm_head(hidden[:, -1:])[:, -1]
    positions = positions[:, -1:].clone(memory_format=torch.contiguous_format)  # same strides every call
    if compile:
        cache.slot = torch.tensor([P], device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    rows = torch.arange(B, device=device)
    for step in range(s.max_new_tokens):
        nxt = choose_next(logits, s, seen, gen)
        for row, token in enumerate(nxt.tolist()):
            if done[row]:
                continue
            if token in stop:
                done[row] = True
                continue
            out[row].append(token)
            if on_token:
                on_token(row, token)
        if all(done) or step == s.max_new_tokens - 1:
            break
        if seen is not None:
            seen[rows, nxt] = True
        positions += 1
        cache.key_mask[:, P + step] = True
        if compile:
            logits = _compiled_decode(model, nxt[:, None], positions, cache, first=step == 0)
            cache.slot += 1
        else:
            logits = model(nxt[:, None], positions=positions, cache=cache,
                           key_mask=cache.key_mask if padded else None)[:, -1]
    return out


def _guard_config():
    """Dynamo checks its guards before every step: one per module attribute and tensor it read,
    ~3000 for SmolLM2 (1.5 ms of a 12 ms int8 step on the EPYC). With recursive dict tags it
    skips the subtree of a module whose __dict__ (and its children's) has not changed since the
    step was compiled: 0.64-0.75 ms. Replacing a submodule or parameter changes the tags."""
    return torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)


def _compiled_decode(model: Llama, tokens, positions, cache: KVCache, first: bool) -> torch.Tensor:
    """compiled_decode_step(device type)(...); the first call of a generate() for shapes not seen
    before in this process is where compilation happens: log its time."""
    key = (id(model), tokens.shape[0], cache.max_len, cache.k[0].dtype, tokens.device)
    start = time.perf_counter()
    with _guard_config():
        logits = compiled_decode_step(tokens.device.type)(model, tokens, positions, cache)
    if first and key not in _compiled_keys:
        _compiled_keys.add(key)
        log.info("compiled the decoding step (batch %d, cache %d positions) in %.1f s", tokens.shape[0],
                 cache.max_len, time.perf_counter() - start)
    return logits


class Streamer:
    """on_token callback that prints one row's text as it grows.

    Byte-level tokens can split a UTF-8 character, so the whole answer is re-decoded and only the
    new, complete text is printed (a trailing U+FFFD means a character is still incomplete).
    """

    def __init__(self, tokenizer, write: Callable[[str], None], row: int = 0):
        self.tokenizer, self.write, self.row = tokenizer, write, row
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        if row != self.row:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.write(text[self.printed:])
            self.printed = len(text)
