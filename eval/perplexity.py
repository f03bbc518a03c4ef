"""Perplexity of held-out text, plain or wrapped in the InsCP chat template.

    PPL = exp( total negative log-likelihood / number of scored tokens )

over all texts together (token-weighted, as the loss of a language model is), plus each text's
own PPL (InsCP keeps only instruction data whose PPL under the model itself is <= 15).

Plain:  [BOS] text            every token after BOS is scored.
InsCP:  the chat template with an empty user turn and the text as the assistant turn, no system
        prompt (DESIGN.md), e.g. for Llama-3
        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n{text}<|eot_id|>
        Only the text and its end-of-turn token are scored (the template's own tokens are
        predictable and would flatter the number).
Texts longer than the model's context (or max_len) are cut to their first max_len tokens.
"""
from __future__ import annotations

import math

from eval.common import encode_with_bos, max_len_of, score_tokens
from model.chat import get_template


def inscp_ids(tokenizer, text: str, template=None) -> tuple[list[int], list[bool]]:
    """(ids, scored) of text in the InsCP form; scored marks the assistant's text + end-of-turn."""
    template = template or get_template(tokenizer)
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
    return template.render_with_mask(messages, add_generation_prompt=False, default_system=False)


def perplexity(model, tokenizer, texts: list[str], form: str = "plain", template=None,
               max_len: int | None = None, batch_size: int = 8, desc: str | None = "perplexity") -> dict:
    """-> {"ppl", "nll", "tokens", "n", "form", "per_text_ppl": [...]}. form: plain | inscp."""
    if not texts:
        raise ValueError("no texts to score")
    limit = min(max_len or max_len_of(model), max_len_of(model))
    seqs, targets = [], []
    for text in texts:
        if form == "plain":
            ids = encode_with_bos(tokenizer, text)
            scored = [False] + [True] * (len(ids) - 1)
        elif form == "inscp":
            ids, scored = inscp_ids(tokenizer, text, template)
        else:
            raise ValueError(f"form must be 'plain' or 'inscp', got {form!r}")
        seqs.append(ids[:limit])
        targets.append(scored[:limit])
    scored = mean_nll(model, seqs, targets, batch_size=batch_size, desc=desc)
    return {"ppl": math.exp(scored["nll"]), "nll": scored["nll"], "tokens": scored["tokens"], "n": len(texts),
            "form": form, "per_text_ppl": [math.exp(x) for x in scored["per_text_nll"]]}


def mean_nll(model, sequences: list[list[int]], targets: list[list[bool]], batch_size: int = 8,
             desc: str | None = None) -> dict:
    """Token-weighted mean negative log-likelihood of the scored positions of all sequences
    (sequences[i]: ids; targets[i]: bool per id, as score_tokens takes them).
    -> {"nll", "tokens": scored tokens, "per_text_nll": [mean NLL of each sequence, nan if none]}."""
    results = score_tokens(model, sequences, targets, batch_size=batch_size, desc=desc)
    total_tokens = sum(n for _, n in results)
    if total_tokens == 0:
        raise ValueError("no token was scored (texts empty after tokenisation?)")
    return {"nll": -sum(s for s, _ in results) / total_tokens, "tokens": total_tokens,
            "per_text_nll": [-s / n if n else float("nan") for s, n in results]}
