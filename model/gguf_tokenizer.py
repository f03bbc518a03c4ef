"""Tokenizer <-> GGUF tokenizer metadata (the `tokenizer.ggml.*` keys llama.cpp reads).

Export direction (`gguf_tokenizer_metadata`), in the form llama.cpp's convert_hf_to_gguf writes:

- byte-level BPE (SmolLM2, GPT-2, LLaMA-3): tokenizer.ggml.model "gpt2"; tokens are the
  vocabulary strings in GPT-2's byte-to-character form ('Ġthe'); token_type 1 normal, 3 control
  (special added tokens), 4 user-defined (other added tokens); merges "a b"; and
  tokenizer.ggml.pre, the name under which llama.cpp implements the pre-tokenizer regex ("smollm",
  "llama-bpe", "gpt2"). A pre-tokenizer llama.cpp has no name for is refused: llama.cpp would
  split the text differently.
- SentencePiece (LLaMA-2): tokenizer.ggml.model "llama"; tokens, scores and token types taken
  from the ModelProto itself (SentencePiece's piece types are llama.cpp's token types:
  1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), add_space_prefix and
  remove_extra_whitespaces from its normalizer spec.

Both: bos / eos / unknown / padding ids, add_bos_token (whether plain text starts with BOS;
add_eos_token when it ends with EOS) and tokenizer.chat_template (the model's own Jinja string).
A model whose embedding has more rows than the tokenizer has ids gets "[PAD<i>]" tokens of type
unused, as llama.cpp's converter does.

Import direction (`tokenizer_from_gguf`, at the end of this file): "gpt2" -> byte-level BPE with
the pre-tokenizer named by tokenizer.ggml.pre; "llama" -> SentencePiece, the ModelProto rebuilt
from tokens, scores and token types.
"""
from __future__ import annotations

import struct
from typing import Any, Iterator

from model.spm import SentencePieceTokenizer, pb_field, sp_piece
from model.tokenizer_base import Tokenizer
from model.tokenizer_json import LLAMA3_PRE, BPETokenizer, byte_level_json, byte_level_step, merges_from_ranks

# llama.cpp token types (llama_token_type / SentencePiece's ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_PAD_SCORE = -1000.0  # convert_hf_to_gguf's score for padding pieces
_FLOAT = struct.Struct("<f")

# Pre-tokenizer step fields that change how text is split; others (trim_offsets) only affect
# offsets, which GGUF does not carry.
_SPLIT_FIELDS = ("type", "pattern", "behavior", "invert", "individual_digits", "add_prefix_space", "use_regex")


def gguf_tokenizer_metadata(tokenizer, vocab_size: int) -> list[tuple[str, str, Any]]:
    """A Tokenizer -> [(key, GGUF value type, value)] for model.gguf.write_gguf.

    vocab_size: the model's embedding rows (>= the tokenizer's ids; extra rows become padding
    tokens). ValueError (one line) for a tokenizer GGUF cannot describe exactly.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                         f"{vocab_size} embedding rows")
    if isinstance(tokenizer, SentencePieceTokenizer):
        entries = _sentencepiece_entries(tokenizer, vocab_size)
    elif isinstance(tokenizer, BPETokenizer) and tokenizer.bpe.byte_level:
        entries = _byte_level_entries(tokenizer, vocab_size)
    else:
        raise ValueError(f"tokenizer {tokenizer.name} ({type(tokenizer).__name__}, not byte-level) has no "
                         "GGUF form: GGUF export supports byte-level BPE and SentencePiece models")
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                       ("unknown", getattr(tokenizer, "unk_id", None)), ("padding", tokenizer.pad_id)):
        if value is not None:
            entries.append((f"tokenizer.ggml.{key}_token_id", "UINT32", int(value)))
    entries.append(("tokenizer.ggml.add_bos_token", "BOOL", bool(tokenizer.add_bos)))
    if tokenizer.add_eos:  # llama.cpp's default is False; its converter writes the key when set
        entries.append(("tokenizer.ggml.add_eos_token", "BOOL", True))
    if tokenizer.chat_template:
        entries.append(("tokenizer.chat_template", "STRING", tokenizer.chat_template))
    return entries


# --- byte-level BPE ----------------------------------------------------------------------------

def _byte_level_entries(tok: BPETokenizer, vocab_size: int) -> list[tuple[str, str, Any]]:
    pre = gguf_pre_name(tok)
    if tok.spec.get("normalizer"):
        raise ValueError(f"tokenizer {tok.name}: a byte-level BPE with a normalizer "
                         f"({tok.spec['normalizer'].get('type')}) has no llama.cpp equivalent")
    special = {t["id"]: bool(t.get("special", True)) for t in tok.spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        try:
            tokens.append(tok.id_to_token(i))
        except IndexError:  # an id no token uses (a hole, or a padded embedding row)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        types.append(NORMAL if i not in special else CONTROL if special[i] else USER_DEFINED)
    merges = tok.spec["model"]["merges"]
    if merges is None:  # tiktoken ranks (LLaMA-3): the equivalent merges, as for tokenizer.json
        merges = merges_from_ranks(tok.spec["model"]["vocab"])
    return [("tokenizer.ggml.model", "STRING", "gpt2"), ("tokenizer.ggml.pre", "STRING", pre),
            ("tokenizer.ggml.tokens", "ARRAY:STRING", tokens), ("tokenizer.ggml.token_type", "ARRAY:INT32", types),
            ("tokenizer.ggml.merges", "ARRAY:STRING", [m if isinstance(m, str) else " ".join(m) for m in merges])]


def _split_steps(pre_tokenizer: dict | None) -> list[dict]:
    """A tokenizer.json pre_tokenizer as its list of steps, each reduced to _SPLIT_FIELDS."""
    if not pre_tokenizer:
        return []
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    return [{k: step[k] for k in _SPLIT_FIELDS if k in step} for step in steps]


def gguf_pre_name(tok: BPETokenizer) -> str:
    """The tokenizer.ggml.pre name whose pre-tokenizer (and merge rule) equals this tokenizer's."""
    ours = _split_steps(tok.spec.get("pre_tokenizer"))
    ignore_merges = bool(tok.spec["model"].get("ignore_merges")) or tok.spec["model"]["merges"] is None
    for name, steps in _GGUF_PRE.items():
        # llama.cpp ignores merges (whole-word lookup first) exactly for the llama3 pre-tokenizer
        if _split_steps({"type": "Sequence", "pretokenizers": steps}) == ours and \
                ignore_merges == (name in ("llama-bpe", "llama3")):
            return name
    raise ValueError(f"tokenizer {tok.name}: its pre-tokenizer {ours} (ignore_merges={ignore_merges}) matches "
                     f"none llama.cpp implements (known: {sorted(_GGUF_PRE)})")


# --- SentencePiece -------------------------------------------------------------------------------

def _sentencepiece_entries(tok: SentencePieceTokenizer, vocab_size: int) -> list[tuple[str, str, Any]]:
    pieces, normalizer = _read_model_proto(tok.proto)
    if normalizer.get("name", "identity") != "identity":
        raise ValueError(f"tokenizer {tok.name}: SentencePiece normalization {normalizer['name']!r} is not "
                         "applied by llama.cpp (only 'identity' is)")
    pad = range(len(pieces), vocab_size)
    return [("tokenizer.ggml.model", "STRING", "llama"), ("tokenizer.ggml.pre", "STRING", "default"),
            ("tokenizer.ggml.tokens", "ARRAY:STRING", [p for p, _, _ in pieces] + [f"[PAD{i}]" for i in pad]),
            ("tokenizer.ggml.scores", "ARRAY:FLOAT32", [s for _, s, _ in pieces] + [_PAD_SCORE] * len(pad)),
            ("tokenizer.ggml.token_type", "ARRAY:INT32", [t for _, _, t in pieces] + [UNUSED] * len(pad)),
            ("tokenizer.ggml.add_space_prefix", "BOOL", normalizer.get("add_dummy_prefix", True)),
            ("tokenizer.ggml.remove_extra_whitespaces", "BOOL", normalizer.get("remove_extra_whitespaces", True))]


def _read_model_proto(proto: bytes) -> tuple[list[tuple[str, float, int]], dict[str, Any]]:
    """A serialized SentencePiece ModelProto -> ([(piece, score, type)], normalizer spec fields).

    ModelProto: field 1 = SentencePiece {1: piece, 2: score (float), 3: type (default NORMAL)},
    field 3 = NormalizerSpec {1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces}.
    Repeated fields may occur anywhere and later scalars override earlier ones (protobuf rules),
    which is how vocabulary extension appends pieces.
    """
    pieces, normalizer = [], {}
    for field, value in _pb_fields(proto):
        if field == 1:
            piece = {1: b"", 2: 0.0, 3: NORMAL} | dict(_pb_fields(value))
            pieces.append((piece[1].decode("utf-8"), float(piece[2]), int(piece[3])))
        elif field == 3:
            for sub, v in _pb_fields(value):
                key = {1: "name", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}.get(sub)
                if key:
                    normalizer[key] = v.decode("utf-8") if sub == 1 else bool(v)
    return pieces, normalizer


def _pb_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """Top-level (field number, value) pairs of a protobuf message: varints as int, fixed32 as
    a little-endian float (the only fixed32 field read here is a score), length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = _FLOAT.unpack_from(buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"SentencePiece model: protobuf wire type {wire} at byte {pos} (corrupt model)")
        yield field, value


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


# --- import: GGUF metadata -> Tokenizer ------------------------------------------------------------

# GGUF tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer steps (as in each model's HF files).
_GGUF_PRE = {
    "gpt2": [byte_level_step()],
    "default": [byte_level_step()],
    "smollm": [{"type": "Digits", "individual_digits": True}, byte_level_step()],
    "llama-bpe": LLAMA3_PRE,
    "llama3": LLAMA3_PRE,
}


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """GGUF metadata (GGUFFile(...).metadata) -> Tokenizer. tokenizer.ggml.model "gpt2":
    byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre; "llama": SentencePiece
    (the ModelProto is rebuilt from tokens, scores and token types). add_bos / add_eos follow
    tokenizer.ggml.add_bos_token / add_eos_token, defaulting as llama.cpp does (BOS for
    SentencePiece models only)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok: Tokenizer = _gguf_bpe(metadata)
    elif kind == "llama":
        tok = _gguf_sentencepiece(metadata)
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2' or 'llama')")
    for attr, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            setattr(tok, f"{attr}_id", int(value))
    tok.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and tok.bos_id is not None
    tok.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and tok.eos_id is not None
    return tok


def _gguf_bpe(metadata: dict[str, Any]) -> BPETokenizer:
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _GGUF_PRE:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre_name!r} is not supported (known: {sorted(_GGUF_PRE)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = {t: i for i, t in enumerate(tokens) if types[i] in (UNKNOWN, CONTROL, USER_DEFINED)}
    spec = byte_level_json(vocab, list(metadata["tokenizer.ggml.merges"]), specials, _GGUF_PRE[pre_name],
                           ignore_merges=pre_name in ("llama-bpe", "llama3"), bos=None)
    return BPETokenizer(spec, "<gguf metadata>", name=f"gguf-bpe:{pre_name}")


def _gguf_sentencepiece(metadata: dict[str, Any]) -> SentencePieceTokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    pieces = b"".join(sp_piece(t, s, k) for t, s, k in zip(tokens, scores, types))
    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    trainer = (pb_field(3, 2) + pb_field(4, len(tokens))  # model_type BPE, vocab_size
               + pb_field(35, BYTE in types)  # byte_fallback: the model has <0xXX> pieces
               + b"".join(pb_field(n, -1 if ids[k] is None else int(ids[k]))
                          for n, k in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding"))))
    normalizer = (pb_field(1, "identity") + pb_field(3, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
                  + pb_field(4, bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False))))
    return SentencePieceTokenizer(pieces + pb_field(2, trainer) + pb_field(3, normalizer), "<gguf metadata>")
