"""HF tokenizer.json: the BPE back end that follows one, and the writer of the documents.

`BPETokenizer` runs a tokenizer.json description by hand: normalizer, pre_tokenizer and decoder
through model/hf_pipeline.py, the merge loop through model/bpe.py. It covers byte-level BPE
(GPT-2 / SmolLM2 / Qwen2 from tokenizer.json or GGUF; LLaMA-3's tiktoken file, whose ranks become
the vocabulary) and SentencePiece-style BPE with byte fallback (TinyStories).

The writers (`hf_json`, `byte_level_json`, `template_processing`) build the documents that
save() writes and the loaders of tiktoken files and GGUF metadata describe themselves with, in
the layout transformers and `tokenizers` read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from model import hf_pipeline
from model.bpe import BPE
from model.pretokenize import LLAMA3_PATTERN
from model.tokenizer_base import Tokenizer, update_config


class BPETokenizer(Tokenizer):
    """Hand-written BPE following an HF tokenizer.json document `spec` (normalizer,
    pre_tokenizer, BPE model, decoder, added_tokens). spec["model"]["merges"] may be None:
    tiktoken ranks (LLaMA-3), merges derived only when saving. The loaders set bos/eos/pad and
    add_bos/add_eos (model/tokenizer.py)."""

    def __init__(self, spec: dict, source: str = "<tokenizer.json>", name: str = "bpe"):
        super().__init__()
        self.spec, self.source, self.name = spec, source, name
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{source}: expected a tokenizer.json with a BPE model, got model type {model.get('type')!r}")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise ValueError(f"{source}: BPE option {key}={model[key]!r} is not supported")
        self.normalize = hf_pipeline.normalizer(spec.get("normalizer"), source)
        self.split, byte_level = hf_pipeline.pre_tokenizer(spec.get("pre_tokenizer"), source)
        self._decoder = hf_pipeline.decoder(spec.get("decoder"), source)
        merges = model["merges"]
        if merges is not None:
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self.bpe = BPE(model["vocab"], merges, byte_fallback=bool(model.get("byte_fallback")),
                       unk=model.get("unk_token"), fuse_unk=bool(model.get("fuse_unk")),
                       ignore_merges=bool(model.get("ignore_merges")), byte_level=byte_level)
        self.special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self._id_to_piece = {i: s for s, i in model["vocab"].items()}
        self.unk_id = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
        self.vocab_size = 1 + max(list(self._id_to_piece) + list(self.special_tokens.values()))

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        word = self.bpe.encode_word
        for piece in self.split(self.normalize(text)):
            ids += word(piece)
        return ids

    def _decode_run(self, ids: list[int]) -> str:
        return "".join(self._decoder([self._piece(i) for i in ids]))

    def _piece(self, i: int) -> str:
        piece = self._id_to_piece.get(i)
        if piece is None:
            raise IndexError(f"token id {i} is not in the {self.name} vocabulary")
        return piece

    def _vocab_id(self, piece: str) -> int | None:
        return self.bpe.vocab.get(piece)

    def add_special_tokens(self, pieces: list[str]) -> list[int]:
        """New special tokens get ids from vocab_size on (added_tokens in tokenizer.json)."""
        for p in dict.fromkeys(pieces):
            if p not in self.special_tokens and p not in self.bpe.vocab:
                self.special_tokens[p] = self.vocab_size
                self.spec.setdefault("added_tokens", []).append(added_token(p, self.vocab_size))
                self.vocab_size += 1
        return [self.token_to_id(p) for p in pieces]

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (read here and by transformers). The stored
        post-processor is kept when it frames text as add_bos/add_eos say, else rewritten."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = dict(self.spec)
        if spec["model"]["merges"] is None:  # tiktoken ranks -> explicit merges for HF
            spec["model"] = {**spec["model"], "merges": merges_from_ranks(spec["model"]["vocab"])}
        if hf_pipeline.post_processor(spec.get("post_processor"), self.source) != self.frame():
            spec["post_processor"] = template_processing(*self.framing_tokens())
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        update_config(folder, {**self._config(), "tokenizer_class": "PreTrainedTokenizerFast"})


def merges_from_ranks(vocab: dict[str, int], order: Iterable[str] | None = None) -> list[list[str]]:
    """Merges equivalent to ranked tokens (tiktoken ranks, SentencePiece scores): every split
    (a, b) of a token t with both halves in the vocabulary gets t's place in `order` (default:
    by id), ties by the halves' ids; as transformers' converters build them."""
    merges = []
    for token in (sorted(vocab, key=vocab.__getitem__) if order is None else order):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [list(m) for m in sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    return merges


# ====================================================================== document writers
def added_token(content: str, i: int) -> dict:
    """One tokenizer.json added_tokens entry for a special token."""
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def hf_json(vocab: dict[str, int], merges: list[list[str]] | None, specials: dict[str, int], *, model_extra: dict,
            normalizer: dict | None, pre_tokenizer: dict | None, decoder: dict | None,
            post_processor: dict | None = None) -> dict:
    """A tokenizer.json document with a BPE model."""
    added = [added_token(s, i) for s, i in sorted(specials.items(), key=lambda x: x[1])]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    model.update(model_extra)
    model.update(vocab=vocab, merges=merges)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model}


def template_processing(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict | None:
    """A post-processor putting BOS before and/or EOS after a text, written as transformers'
    update_post_processor writes it ("bos $A eos", pair "bos $A eos bos $B eos"); None when
    neither is added."""
    if bos is None and eos is None:
        return None

    def special(tok, type_id):
        return [{"SpecialToken": {"id": tok[0], "type_id": type_id}}] if tok else []

    def seq(name, type_id):
        return special(bos, type_id) + [{"Sequence": {"id": name, "type_id": type_id}}] + special(eos, type_id)

    tokens = {t[0]: {"id": t[0], "ids": [t[1]], "tokens": [t[0]]} for t in (bos, eos) if t}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": tokens}


def byte_level_step(add_prefix_space=False, use_regex=True) -> dict:
    """The ByteLevel pre-tokenizer step."""
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


# LLaMA-3's pre-tokenizer: its regex, then bytes -> characters (as its hub tokenizer.json).
LLAMA3_PRE = [{"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
              byte_level_step(use_regex=False)]


def byte_level_json(vocab: dict[str, int], merges: list | None, specials: dict[str, int], pre: list[dict],
                    ignore_merges: bool, bos: str | None) -> dict:
    """A byte-level BPE tokenizer.json (GPT-2 style decoder); bos: a token put before text."""
    post = template_processing((bos, specials[bos]), None) if bos is not None else None
    return hf_json(vocab, merges, specials, model_extra={"ignore_merges": ignore_merges},
                   normalizer=None, pre_tokenizer={"type": "Sequence", "pretokenizers": pre},
                   decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                   post_processor=post)
