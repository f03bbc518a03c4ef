"""The SentencePiece back end (LLaMA-2) and a minimal writer of its ModelProto.

`SentencePieceTokenizer` runs a serialized SentencePiece ModelProto with the sentencepiece
package and keeps the bytes, so vocabulary extension (model/vocab.py) and GGUF metadata
(model/gguf_tokenizer.py) can build or edit models at the protobuf wire level with `pb_field`
and `sp_piece`: a repeated field may occur anywhere in a message, so appending `sp_piece`
records to a serialized model appends pieces.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from model.tokenizer_base import Tokenizer, update_config
from model.tokenizer_json import hf_json, merges_from_ranks, template_processing

# SentencePiece piece types (ModelProto.SentencePiece.Type); llama.cpp's GGUF token types use
# the same numbers.
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def varint(n: int) -> bytes:
    """A protobuf varint (negative int32 values as 10-byte two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def pb_field(number: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint (int/bool), fixed32 (float) or length-delimited (bytes/str)."""
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return varint(number << 3 | 2) + varint(len(data)) + data
    return varint(number << 3) + varint(int(value))


def sp_piece(piece: str, score: float, kind: int) -> bytes:
    """ModelProto field 1 (a SentencePiece: piece=1, score=2, type=3). Protobuf merges repeated
    fields wherever they occur, so appending this to a serialized model appends a piece."""
    return pb_field(1, pb_field(1, piece) + pb_field(2, float(score)) + pb_field(3, kind))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2: BPE, byte fallback, bos 1, eos 2, unk 0). add_bos is
    True when the model has a BOS (LLaMA's convention; the loaders refine it from the folder's
    tokenizer.json / tokenizer_config.json)."""
    name = "sentencepiece"

    def __init__(self, proto: bytes, source: str = "<bytes>"):
        super().__init__()
        import sentencepiece  # a run-time dependency, imported here so BPE users never need it
        self.source = source
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except Exception as err:  # the library's own error says little about which file
            raise ValueError(f"{source}: not a valid SentencePiece model ({err})") from None
        self.proto = proto  # the serialized ModelProto, for vocabulary extension
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (x if x >= 0 else None for x in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self.add_bos = self.bos_id is not None
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if sp.is_control(i) or sp.is_unknown(i)}
        self._pieces = {sp.id_to_piece(i): i for i in range(self.vocab_size)}
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def _decode_run(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def _piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def _vocab_id(self, piece: str) -> int | None:
        return self._pieces.get(piece)

    def add_special_tokens(self, pieces: list[str]) -> list[int]:
        """New pieces become CONTROL pieces appended to the ModelProto: SentencePiece never
        produces them from text, and the ids stay in one table with the rest."""
        new = [p for p in dict.fromkeys(pieces) if p not in self._pieces]
        if new:
            proto = self.proto + b"".join(sp_piece(p, 0.0, SP_CONTROL) for p in new)
            kept = {k: getattr(self, k) for k in ("chat_template", "add_bos", "add_eos")}
            self.__init__(proto, self.source)  # re-read every table from the extended model
            self.__dict__.update(kept)
        return [self._pieces[p] for p in pieces]

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.model (read here) + an equivalent tokenizer.json and tokenizer_config.json
        (read by transformers, which needs protobuf to convert a tokenizer.model itself)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(self.proto)
        (folder / "tokenizer.json").write_text(json.dumps(self.hf_json(), ensure_ascii=False))
        unk = self.sp.unk_id()
        update_config(folder, {**self._config(), "tokenizer_class": "PreTrainedTokenizerFast",
                               "unk_token": self.sp.id_to_piece(unk) if unk >= 0 else None})

    def hf_json(self) -> dict:
        """The HF tokenizer.json equivalent of this BPE model (as transformers' LlamaConverter
        builds it: merges ranked by the score of the merged piece)."""
        sp = self.sp
        vocab = {sp.id_to_piece(i): i for i in range(self.vocab_size)}
        by_score = sorted(range(self.vocab_size), key=lambda i: -sp.get_score(i))
        merges = merges_from_ranks(vocab, [sp.id_to_piece(i) for i in by_score])
        dummy = sp.encode("a", out_type=str)[0].startswith("▁")
        norm = [{"type": "Prepend", "prepend": "▁"}] if dummy else []
        norm.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
        dec = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
        if dummy:
            dec.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
        return hf_json(vocab, merges, self.special_tokens,
                       model_extra={"byte_fallback": any(sp.is_byte(i) for i in range(self.vocab_size)),
                                    "unk_token": unk, "fuse_unk": True},
                       normalizer={"type": "Sequence", "normalizers": norm}, pre_tokenizer=None,
                       decoder={"type": "Sequence", "decoders": dec},
                       post_processor=template_processing(*self.framing_tokens()))
