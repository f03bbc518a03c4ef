"""Vocabulary extension (TransLLM stage 0): learn a target-language SentencePiece vocabulary,
merge its new pieces into the base model's SentencePiece model, add the TCOT tags, and grow the
model's embedding and output head to match.

Why: LLaMA-2 knows ~40 Thai characters and byte-falls-back on the rest, so a Thai sentence costs
several tokens per character. Pieces learnt on Thai text make it several times shorter, so the
same context and compute carry more Thai.

How the merge keeps the old model intact:
- old pieces keep their ids, scores and order; new pieces are appended as NORMAL pieces, then
  the tags (model.tcot.tcot_tags: `<EN>`, `<RESPONSE>`, `<TH>`) as CONTROL pieces, all at the protobuf wire level:
  a repeated field may occur anywhere in a message, so appending `field 1` records to the
  serialized ModelProto appends pieces (see model/spm.sp_piece);
- only pieces containing a character of the target script are added (`script`), so text
  without such a character cannot reach a new piece and encodes exactly as before. A Thai
  vocabulary learnt on real text also holds Latin pieces ('eration', '▁25'); adding those would
  re-segment English text;
- new pieces score below every old piece (in the target model's own order), so in mixed text
  every merge the old model would make still happens first.

New embedding rows (`init="mean"`): the mean of the old rows of the pieces the OLD tokenizer
splits the new piece into. The model then starts by reading a new token roughly as it read the
old spelling of it. (`init="random"`: normal with the old rows' std.)
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from model.spm import SP_NORMAL, SentencePieceTokenizer, pb_field, sp_piece
from model.tcot import tcot_tags

SCRIPTS = {  # character classes of target scripts; a new piece must contain one such character
    "thai": "[\u0e00-\u0e7f]",
    "cjk": "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]",
    "any": ".",
}


def train_sentencepiece(texts: Iterable[str], vocab_size: int, like: SentencePieceTokenizer | None = None,
                        model_type: str = "bpe", character_coverage: float = 1.0, seed_sentencepiece_size: int = 100000,
                        max_sentences: int = 0) -> bytes:
    """Train a SentencePiece model on `texts` (one sentence each) with sentencepiece's own
    trainer; returns the serialized ModelProto. `like`: copy the base tokenizer's whitespace
    handling (dummy prefix, extra-whitespace removal) so the learnt pieces fit its segmentation."""
    import sentencepiece as spm
    texts = [t.strip() for t in texts if t and t.strip()]
    if max_sentences:
        texts = texts[:max_sentences]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty training sentences")
    dummy, squeeze = True, False
    if like is not None:
        dummy = like.sp.encode("a", out_type=str)[0].startswith("▁")
        squeeze = like.sp.decode(like.sp.encode("a  b")) == "a b"
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, model_type=model_type, vocab_size=vocab_size,
        character_coverage=character_coverage, byte_fallback=False, add_dummy_prefix=dummy,
        remove_extra_whitespaces=squeeze, normalization_rule_name="identity", split_digits=False,
        seed_sentencepiece_size=seed_sentencepiece_size, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    return out.getvalue()


def _is_normal(sp, i: int) -> bool:
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))


def merge_sentencepiece(base: SentencePieceTokenizer, target_proto: bytes, script: str | None = "thai",
                        max_new: int = 0) -> tuple[SentencePieceTokenizer, list[str]]:
    """Append the target model's new NORMAL pieces to `base` -> (merged tokenizer, added pieces).

    script: a key of SCRIPTS or a regex character class; only pieces containing a match are
    added (None = all). Old ids, pieces and scores are untouched. max_new: cap (0 = no cap),
    keeping the target model's most frequent (highest-scoring) pieces.
    """
    import sentencepiece as spm
    if not isinstance(base, SentencePieceTokenizer):
        raise TypeError(f"vocabulary merging needs a SentencePiece tokenizer, got {type(base).__name__}")
    target = spm.SentencePieceProcessor(model_proto=target_proto)
    wanted = re.compile(SCRIPTS.get(script, script)) if script else None
    sp = base.sp
    old_scores = [sp.get_score(i) for i in range(base.vocab_size) if _is_normal(sp, i) and sp.get_score(i) > -1e8]
    floor = min(old_scores, default=0.0)
    order = sorted((i for i in range(target.get_piece_size()) if _is_normal(target, i)),
                   key=lambda i: -target.get_score(i))
    added: list[str] = []
    for i in order:
        piece = target.id_to_piece(i)
        if base._vocab_id(piece) is not None or (wanted and not wanted.search(piece)):
            continue
        added.append(piece)
        if max_new and len(added) >= max_new:
            break
    # Below every old piece, in the target model's order: old merges always win.
    records = b"".join(sp_piece(p, floor - 1.0 - k, SP_NORMAL) for k, p in enumerate(added))
    merged = SentencePieceTokenizer(base.proto + records, base.source)
    merged.chat_template = base.chat_template
    return merged, added


def extend_tokenizer(base, texts: Iterable[str] | None = None, vocab_size: int = 2000, script: str | None = "thai",
                     tags: list[str] | None = None, max_new: int = 0) -> tuple[object, dict]:
    """TransLLM stage 0 for a tokenizer -> (new tokenizer, report).

    A SentencePiece base with `texts` gets a learnt target vocabulary merged in; any other
    tokenizer (byte-level BPE: SmolLM2, TinyStories) only gets the tags — report["skipped"]
    says why. tags: default model.tcot.tcot_tags('TH'). The base tokenizer object is not modified.
    """
    import copy
    tags = list(tcot_tags()) if tags is None else list(tags)
    report: dict = {"old_vocab_size": base.vocab_size, "added_pieces": 0, "skipped": None}
    if isinstance(base, SentencePieceTokenizer) and texts is not None:
        texts = list(texts)
        proto = train_sentencepiece(texts, vocab_size, like=base)
        tok, added = merge_sentencepiece(base, proto, script, max_new)
        report["added_pieces"] = len(added)
    else:
        report["skipped"] = (f"vocabulary extension skipped: {type(base).__name__} is not a SentencePiece model"
                             if texts is not None else "vocabulary extension skipped: no target text given")
        tok = copy.deepcopy(base)
    report["tag_ids"] = dict(zip(tags, tok.add_special_tokens(tags)))
    report["new_vocab_size"] = tok.vocab_size
    return tok, report


# ------------------------------------------------------------------ the model side
def _no_prefix_processor(tok: SentencePieceTokenizer):
    """The same SentencePiece model with dummy prefix and whitespace squeezing off, so a piece's
    own text ('▁ก', 'ข') is split exactly as written. A later occurrence of an embedded message
    merges into the earlier one, so appending a normalizer_spec (field 3) with
    add_dummy_prefix (3) = false and remove_extra_whitespaces (4) = false overrides just those."""
    import sentencepiece as spm
    override = pb_field(3, pb_field(3, False) + pb_field(4, False))
    return spm.SentencePieceProcessor(model_proto=tok.proto + override)


def old_split(old, piece: str, _cache: dict | None = None) -> list[int]:
    """Ids the OLD tokenizer encodes a new token's text into. SentencePiece pieces are split
    with their '▁' (space) kept; other tokens (special tags) by their plain text."""
    if isinstance(old, SentencePieceTokenizer):
        key = id(old)
        proc = _cache.get(key) if _cache is not None else None
        if proc is None:
            proc = _no_prefix_processor(old)
            if _cache is not None:
                _cache[key] = proc
        ids = proc.encode(piece.replace("▁", " "))
    else:
        ids = old.encode(piece)
    if not ids:
        raise ValueError(f"the old tokenizer encodes new token {piece!r} to no ids")
    return ids


@torch.no_grad()
def resize_embeddings(model, old_tokenizer, new_tokenizer, init: str = "mean", seed: int = 0) -> dict[int, list[int]]:
    """Grow model.model.embed_tokens and model.lm_head to new_tokenizer.vocab_size rows (in place).

    Rows of ids below old_tokenizer.vocab_size are kept bit for bit, so old-token inputs give
    identical logits over the old vocabulary. Every id from old_tokenizer.vocab_size on gets a
    fresh row: init="mean" -> mean of the old rows of old_split(piece) (embedding and, when
    untied, head separately); "random" -> normal(0, std of the old rows). A tied head stays tied.
    Returns {new id: old ids it was initialised from} (empty lists for "random").
    """
    if init not in ("mean", "random"):
        raise ValueError(f"init={init!r}: choose mean or random")
    emb = model.model.embed_tokens.weight
    rows_old, dim = emb.shape
    n_old, n_new = old_tokenizer.vocab_size, new_tokenizer.vocab_size
    if n_new < n_old:
        raise ValueError(f"new tokenizer ({n_new}) is smaller than the old one ({n_old})")
    if n_old > rows_old:
        raise ValueError(f"old tokenizer has {n_old} ids but the embedding only {rows_old} rows")
    rows = max(rows_old, n_new)
    cache: dict = {}
    sources = {i: (old_split(old_tokenizer, new_tokenizer.id_to_token(i), cache) if init == "mean" else [])
               for i in range(n_old, n_new)}
    gen = torch.Generator().manual_seed(seed)

    def grown(weight: torch.Tensor) -> nn.Parameter:
        out = torch.empty(rows, dim, dtype=weight.dtype, device=weight.device)
        out[:rows_old] = weight
        std = weight[:n_old].float().std().item()
        for i, src in sources.items():
            if init == "mean":
                out[i] = weight[src].float().mean(0).to(weight.dtype)
            else:
                out[i] = (torch.randn(dim, generator=gen) * std).to(weight.dtype)
        return nn.Parameter(out, requires_grad=weight.requires_grad)

    tied = model.lm_head.weight is emb
    model.model.embed_tokens.weight = grown(emb)
    model.model.embed_tokens.num_embeddings = rows
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.lm_head.out_features = rows
    model.config.vocab_size = rows
    return sources


# ------------------------------------------------------------------ measuring
@dataclass
class TokenStats:
    sentences: int
    tokens: int
    characters: int

    @property
    def per_sentence(self) -> float:
        return self.tokens / max(self.sentences, 1)

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)


def token_stats(tokenizer, sentences: Iterable[str]) -> TokenStats:
    """Tokens the tokenizer spends on the sentences (no BOS/EOS)."""
    sentences = [s.strip() for s in sentences if s.strip()]
    return TokenStats(len(sentences), sum(len(tokenizer.encode(s)) for s in sentences),
                      sum(len(s) for s in sentences))


def extend_model(model, tokenizer, texts: Iterable[str] | None = None, vocab_size: int = 2000,
                 script: str | None = "thai", tags: list[str] | None = None, init: str = "mean",
                 eval_texts: Iterable[str] | None = None, max_new: int = 0, seed: int = 0) -> tuple[object, dict]:
    """Stage 0 end to end: extend_tokenizer + resize_embeddings (model modified in place).
    Returns (new tokenizer, report) with tokens per target sentence before and after, measured
    on eval_texts (default: texts; pass held-out sentences for an honest number)."""
    texts = None if texts is None else [t for t in texts if t.strip()]
    new_tok, report = extend_tokenizer(tokenizer, texts, vocab_size, script, tags, max_new)
    resize_embeddings(model, tokenizer, new_tok, init=init, seed=seed)
    sample = list(eval_texts) if eval_texts is not None else (texts or [])
    if sample:
        before, after = token_stats(tokenizer, sample), token_stats(new_tok, sample)
        report.update(eval_sentences=before.sentences, tokens_per_sentence_before=round(before.per_sentence, 2),
                      tokens_per_sentence_after=round(after.per_sentence, 2),
                      chars_per_token_before=round(before.chars_per_token, 3),
                      chars_per_token_after=round(after.chars_per_token, 3))
    report.update(init=init, model_vocab_size=model.config.vocab_size)
    return new_tok, report
