"""Batched generation with left padding and a KV cache.

Prompts of different lengths are left-padded to a common length P so that every row's next token
sits in the same column. Pad keys are masked out and each row's rotary positions start at 0 at
its first real token, so a padded row computes exactly what it would alone. One forward over the
prompts fills the cache (prefill); then one token per step is fed back (decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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


def choose_next(logits: torch.Tensor, s: Sampling, seen: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """logits[B,V] -> next ids [B]. seen[B,V] bool marks tokens already in each row."""
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


@torch.inference_mode()
def generate(model: Llama, prompts: list[list[int]], sampling: Sampling | None = None,
             on_token: Callable[[int, int], None] | None = None, pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt (token ids). Returns the new ids per prompt, stop token excluded.

    on_token(row, id) is called for every new token as soon as it is chosen (streaming).
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
    cache = KVCache(model.config, B, P + s.max_new_tokens, dtype, device)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens, key_mask)
    stop = torch.tensor(_stop_ids(s, model.config) or [-1], device=device)

    logits = model(tokens, positions=positions, cache=cache, key_mask=key_mask)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(s.max_new_tokens):
        nxt = choose_next(logits, s, seen, gen)
        finished_now = torch.isin(nxt, stop) & ~done
        for row in (~done & ~finished_now).nonzero().flatten().tolist():
            out[row].append(int(nxt[row]))
            if on_token:
                on_token(row, int(nxt[row]))
        done |= finished_now
        if done.all():
            break
        seen[torch.arange(B, device=device), nxt] = True
        positions = positions[:, -1:] + 1
        key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        logits = model(nxt[:, None], positions=positions, cache=cache, key_mask=key_mask)[:, -1]
    return out


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
