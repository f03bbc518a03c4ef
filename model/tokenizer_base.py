"""The one tokenizer interface every back end implements (model/spm.py, model/tokenizer_json.py).

encode(text, bos, eos) treats text as plain text: special-token strings in it are NOT turned into
special ids, so untrusted text cannot forge them (chat templates insert special ids themselves).
decode(ids) renders special tokens as their text. token_to_id / id_to_token; vocab_size,
bos_id, eos_id, pad_id, special_tokens, chat_template (the model's stored Jinja, or None), name;
add_bos / add_eos: whether the model's own tokenizer frames plain text with BOS / EOS (callers
encoding raw text pass encode(text, bos=tok.add_bos)); add_special_tokens(pieces) -> ids;
save(folder), readable by model.tokenizer.load_tokenizer and by transformers.AutoTokenizer.

It lives apart from the loaders (model/tokenizer.py) because the back ends subclass it and the
loaders import the back ends.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Tokenizer:
    """The shared interface; subclasses provide _encode, _decode_run, _piece, _vocab_id."""
    name = "base"

    def __init__(self):
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.pad_id: int | None = None
        self.add_bos = False  # set by the loaders from the post-processor / tokenizer_config.json
        self.add_eos = False
        self.special_tokens: dict[str, int] = {}
        self.chat_template: str | None = None

    # --- to be provided by back ends -------------------------------------------------------
    vocab_size: int

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_run(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _piece(self, i: int) -> str:
        raise NotImplementedError

    def _vocab_id(self, piece: str) -> int | None:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text -> ids, optionally with one BOS in front and one EOS at the end."""
        ids = self._encode(text)
        if bos:
            ids = [self._need(self.bos_id, "bos")] + ids
        if eos:
            ids = ids + [self._need(self.eos_id, "eos")]
        return ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text. Special tokens appear as their text; the ordinary tokens between them
        are decoded run by run (so a run's leading dummy-prefix space is dropped, as
        SentencePiece does at the start of a text)."""
        by_id = self._run_breaks()
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in by_id:
                if run:
                    out.append(self._decode_run(run))
                    run = []
                out.append(by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_run(run))
        return "".join(out)

    def token_to_id(self, piece: str) -> int:
        """A token's text (special tokens included) -> id; KeyError when unknown."""
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        i = self._vocab_id(piece)
        if i is None:
            raise KeyError(f"token {piece!r} is not in the {self.name} vocabulary ({self.vocab_size} tokens)")
        return i

    def id_to_token(self, i: int) -> str:
        """id -> the token's text as stored in the vocabulary (e.g. 'Ġthe', '▁the')."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
        return self._special_by_id().get(i) or self._piece(i)

    def add_special_tokens(self, pieces: list[str]) -> list[int]:
        """Register special tokens (e.g. '<EN>', '<TH>', '<RESPONSE>'): existing ones keep their
        id, new ones are appended after the vocabulary. Returns their ids."""
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> None:
        raise NotImplementedError

    def _special_by_id(self) -> dict[int, str]:
        return {i: s for s, i in self.special_tokens.items()}

    def _run_breaks(self) -> dict[int, str]:
        # The unknown token stays inside runs: the back end renders it in place (' ⁇ ' for
        # SentencePiece, '<unk>' for tokenizer.json) and its neighbours keep their spaces.
        unk = getattr(self, "unk_id", None)
        return {i: s for i, s in self._special_by_id().items() if i != unk}

    def _need(self, value: int | None, what: str) -> int:
        if value is None:
            raise ValueError(f"the {self.name} tokenizer has no {what} token")
        return value

    def frame(self) -> tuple[list[int], list[int]]:
        """(ids put before, ids put after) plain text by the model's own tokenizer."""
        return ([self.bos_id] if self.add_bos else []), ([self.eos_id] if self.add_eos else [])

    def framing_tokens(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """((text, id) of the token put before plain text, or None), same for after."""
        return tuple((self.id_to_token(ids[0]), ids[0]) if ids else None for ids in self.frame())

    def _config(self) -> dict[str, Any]:
        # tokenizer_config.json entries transformers needs to find bos/eos/pad by text.
        by_id = self._special_by_id()
        cfg: dict[str, Any] = {"clean_up_tokenization_spaces": False,
                               "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                cfg[key] = by_id.get(i) or self._piece(i)
        return cfg

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos})")


def update_config(folder: Path, entries: dict[str, Any]) -> None:
    """Merge entries into folder/tokenizer_config.json, keeping keys written by others."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    config.update(entries)
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
