"""What every evaluation shares: reading JSONL data, scoring token log-likelihoods in batches,
and answering chat prompts in batches.

`model` is anything with the Llama forward signature, model(tokens[B,T]) -> logits[B,T,V], and
(for generation) `.config.max_seq_len`; `tokenizer` has encode(text, bos=False, eos=False),
decode(ids), bos_id, eos_id, pad_id.
"""
from __future__ import annotations

import os
import random
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data import readers as data_readers
from model import assets


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first `limit` (default: all) objects of a JSONL file; data.readers reads and checks
    them (a bad line names the file and line)."""
    return [record for _, record in islice(data_readers.read_jsonl(path), limit)]


def data_file(*parts: str, split: str = "data") -> Path:
    """A file of the shared data, e.g. data_file('eval', 'mmlu.dev.jsonl'). split='holdout' reads
    the test halves, which are for final evaluation only (see ../shared/README.md)."""
    if split not in ("data", "holdout"):
        raise ValueError(f"split must be 'data' or 'holdout', got {split!r}")
    return assets.shared_file(split, *parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def max_len_of(model, default: int = 4096) -> int:
    config = getattr(model, "config", None)
    return getattr(config, "max_seq_len", default) if config is not None else default


def _right_padded_batches(sequences: list[list[int]], batch_size: int, pad_id: int, desc: str | None):
    """Yield (indices, tokens[B,T]) over the sequences, longest first, right-padded with pad_id.

    With causal attention a real token never sees the pad after it, so no padding mask is needed
    and each row computes exactly what it would alone; sorting by length keeps padding small.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        T = max(len(sequences[i]) for i in batch)
        tokens = torch.full((len(batch), T), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        yield batch, tokens


@torch.inference_mode()
def score_tokens(model, sequences: list[list[int]], targets: list[list[bool]], batch_size: int = 8,
                 pad_id: int = 0, desc: str | None = None) -> list[tuple[float, int]]:
    """Sum of log p(token_t | tokens_<t) over the positions t where targets[i][t] is True.

    sequences[i]: token ids; targets[i]: bool per token, same length (position 0 has no context
    and is never scored). Returns one (sum log-prob, number of scored tokens) per sequence.
    """
    if len(sequences) != len(targets):
        raise ValueError(f"{len(sequences)} sequences but {len(targets)} target masks")
    for i, (seq, tgt) in enumerate(zip(sequences, targets)):
        if len(seq) != len(tgt):
            raise ValueError(f"sequence {i}: {len(seq)} tokens but {len(tgt)} target flags")
    device = _device(model)
    results: list[tuple[float, int] | None] = [None] * len(sequences)
    for batch, tokens in _right_padded_batches(sequences, batch_size, pad_id, desc):
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, i in enumerate(batch):
            mask[row, :len(targets[i])] = torch.tensor(targets[i], dtype=torch.bool)
        tokens = tokens.to(device)
        logits = model(tokens)[:, :-1].float()                      # [B,T-1,V] predicts tokens 1..T-1
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B,T-1]
        scored = mask[:, 1:].to(device)
        sums = (picked * scored).sum(-1).tolist()
        counts = scored.sum(-1).tolist()
        for row, i in enumerate(batch):
            results[i] = (sums[row], int(counts[row]))
    return results  # type: ignore[return-value]


@torch.inference_mode()
def next_token_logprobs(model, contexts: list[list[int]], candidates: list[list[int]], batch_size: int = 8,
                        pad_id: int = 0, desc: str | None = None) -> list[list[float]]:
    """log p(candidate | context) for every candidate token id of each context, from ONE forward
    pass per context (score_tokens would run one per candidate).

    contexts[i]: token ids; candidates[i]: token ids -> [N][C_i] log-probs.
    """
    device = _device(model)
    results: list[list[float] | None] = [None] * len(contexts)
    for batch, tokens in _right_padded_batches(contexts, batch_size, pad_id, desc):
        logits = model(tokens.to(device))                           # [B,T,V]
        last = torch.tensor([len(contexts[i]) - 1 for i in batch], device=device)
        logp = torch.log_softmax(logits[torch.arange(len(batch), device=device), last].float(), dim=-1)
        for row, i in enumerate(batch):
            results[i] = logp[row, candidates[i]].tolist()
    return results  # type: ignore[return-value]


def encode_with_bos(tokenizer, text: str) -> list[int]:
    """ids of text with BOS in front when the tokenizer has one (scoring needs a first context)."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None and bos >= 0 else []) + ids


def _pad_id(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0


class ChatRunner:
    """Answers conversations with a model through its chat template, batched and greedy by
    default. `answer(conversations)`: list of message lists -> list of answer strings.

    postprocess(str) -> str is applied to every decoded answer (e.g. TransLLM's "text after
    <TH>"). max_new_tokens is capped at half the model's context; prompts longer than the rest
    lose their oldest tokens (counted in `truncated`, which eval.run reports).
    """

    def __init__(self, model, tokenizer, template=None, max_new_tokens: int = 256, batch_size: int = 8,
                 temperature: float = 0.0, seed: int = 0, system: str | None = None,
                 postprocess: Callable[[str], str] | None = None):
        from model.chat import get_template
        self.model, self.tokenizer = model, tokenizer
        self.template = template or get_template(tokenizer, system=system)
        # at most half the context for the answer, so a long prompt still keeps half for itself
        self.max_new_tokens = min(max_new_tokens, max_len_of(model) // 2)
        self.batch_size = batch_size
        self.temperature, self.seed = temperature, seed
        self.postprocess = postprocess or (lambda s: s)
        self.truncated = 0

    def render(self, messages: list[dict]) -> list[int]:
        ids = self.template.render(messages, add_generation_prompt=True)
        room = max_len_of(self.model) - self.max_new_tokens
        if len(ids) > room:
            self.truncated += 1
            ids = ids[-room:]
        return ids

    def answer(self, conversations: list[list[dict]], desc: str | None = "generate") -> list[str]:
        from model.generate import Sampling, generate
        prompts = [self.render(c) for c in conversations]
        sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            stop_ids=[i for i in self.template.stop_ids if i is not None], seed=self.seed)
        out: list[str | None] = [None] * len(prompts)
        # similar lengths together: less left padding, same results (padding is masked)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            new = generate(self.model, [prompts[i] for i in batch], sampling, pad_id=_pad_id(self.tokenizer))
            for i, ids in zip(batch, new):
                # an answer cut by max_new_tokens can end inside a UTF-8 character: drop the U+FFFD
                out[i] = self.postprocess(self.tokenizer.decode(ids).rstrip("\ufffd")).strip()
        return out  # type: ignore[return-value]

    def ask(self, prompts: list[str], desc: str | None = "generate") -> list[str]:
        """Single-turn convenience: one user message each."""
        return self.answer([[{"role": "user", "content": p}] for p in prompts], desc)
