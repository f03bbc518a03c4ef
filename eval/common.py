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
from model.chat import get_template
from model.generate import Sampling
from model.runner import Runner


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


def first_problem(checks: list[tuple[bool, str]]) -> str | None:
    """The message of the first (ok, message) pair that is not ok, or None."""
    return next((message for ok, message in checks if not ok), None)


def device_problem(device: str) -> str | None:
    """Why a --device value cannot be used here, as one line naming the flag, or None."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"--device {device!r}: not a torch device (cpu, cuda, cuda:N)"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device on this machine (use cpu)"
    return None


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


def score_tokens(model, sequences: list[list[int]], targets: list[list[bool]], batch_size: int = 8,
                 pad_id: int = 0, desc: str | None = None) -> list[tuple[float, int]]:
    """Sum of log p(token_t | tokens_<t) over the positions t where targets[i][t] is True.

    sequences[i]: token ids; targets[i]: bool per token, same length (position 0 has no context
    and is never scored). Returns one (sum log-prob, number of scored tokens) per sequence.
    """
    return [(sum(lps), len(lps)) for lps in token_logprobs(model, sequences, targets, batch_size, pad_id, desc)]


def _scored_logprobs(model, tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) at the positions where scored[B,T-1] is True -> [N].

    A model with an lm_head (a Llama) runs its head only at those positions: an answer scored
    after a long passage needs a few rows of [T, V] logits, not all (the head and its
    log-softmax over 49k-150k entries are most of the memory traffic). Anything else (e.g. a
    stub) gives full logits."""
    nxt = tokens[:, 1:][scored]                                     # [N] the predicted tokens
    if hasattr(model, "lm_head"):
        hidden = model(tokens, return_hidden=True)[:, :-1][scored]  # [N, D]
        logits = model.lm_head(hidden).float()                      # [N, V]
    else:
        logits = model(tokens)[:, :-1][scored].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)


@torch.inference_mode()
def token_logprobs(model, sequences: list[list[int]], targets: list[list[bool]], batch_size: int = 8,
                   pad_id: int = 0, desc: str | None = None) -> list[list[float]]:
    """log p(token_t | tokens_<t) at every position t where targets[i][t] is True, in order.

    sequences[i]: token ids; targets[i]: bool per token, same length (position 0 has no context
    and is never scored). -> [N][scored positions of sequence i].
    """
    if len(sequences) != len(targets):
        raise ValueError(f"{len(sequences)} sequences but {len(targets)} target masks")
    for i, (seq, tgt) in enumerate(zip(sequences, targets)):
        if len(seq) != len(tgt):
            raise ValueError(f"sequence {i}: {len(seq)} tokens but {len(tgt)} target flags")
    device = _device(model)
    results: list[list[float] | None] = [None] * len(sequences)
    for batch, tokens in _right_padded_batches(sequences, batch_size, pad_id, desc):
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, i in enumerate(batch):
            mask[row, :len(targets[i])] = torch.tensor(targets[i], dtype=torch.bool)
        tokens = tokens.to(device)
        scored = mask[:, 1:].to(device)                             # [B,T-1]: position t predicts token t+1
        picked = torch.zeros(scored.shape, device=device)
        picked[scored] = _scored_logprobs(model, tokens, scored)
        for row, i in enumerate(batch):
            results[i] = picked[row][scored[row]].tolist()
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
    """ids of plain text as the model reads it: BOS in front when this tokenizer adds one to plain
    text (`add_bos`: LLaMA-2/3 yes, SmolLM2 no; a tokenizer without the attribute: whenever it has
    a BOS). Scoring never scores position 0, which has no context."""
    bos = getattr(tokenizer, "bos_id", None)
    add = getattr(tokenizer, "add_bos", bos is not None)
    return tokenizer.encode(text, bos=bool(add and bos is not None and bos >= 0))


class ChatRunner(Runner):
    """eval's runner: model.runner.Runner (batched; the template's stop ids; prompts longer than
    the context minus the budget keep their newest tokens, counted in `truncated`, which eval.run
    reports; max_new_tokens capped at half the context) built from eval's flags, greedy by default.

    answer(conversations) -> [str]; results(conversations) -> [model.runner.Answer] (text, ids,
    and `stopped`: the answer ended with a stop id of the template within the budget).
    postprocess(str) -> str is applied to every decoded answer (e.g. TransLLM's "text after <TH>").
    """

    def __init__(self, model, tokenizer, template=None, max_new_tokens: int = 256, batch_size: int = 8,
                 temperature: float = 0.0, seed: int = 0, system: str | None = None,
                 postprocess: Callable[[str], str] | None = None, compile: bool = False):
        template = template if template is not None else get_template(tokenizer, system=system)
        super().__init__(model, tokenizer, template,
                         Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
                         batch_size=batch_size, postprocess=postprocess, compile=compile)
