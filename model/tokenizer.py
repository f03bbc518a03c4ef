"""One tokenizer interface over three back ends; loading from folders, files and GGUF metadata.

Back ends:
- `SentencePieceTokenizer`: a SentencePiece `tokenizer.model` (LLaMA-2) run by the sentencepiece
  package; keeps the serialized ModelProto so vocabulary extension can edit it.
- `BPETokenizer`: hand-written BPE driven by an HF tokenizer.json description. It covers
  byte-level BPE (GPT-2 / SmolLM2 from tokenizer.json or GGUF; LLaMA-3's tiktoken file, whose
  ranks become the vocabulary) and SentencePiece-style BPE with byte fallback (TinyStories).

Interface (all back ends): encode(text, bos, eos) treats text as plain text (special-token
strings in it are NOT turned into special ids, so untrusted text cannot forge them; chat
templates insert special ids themselves); decode(ids) renders special tokens as their text;
token_to_id / id_to_token; vocab_size, bos_id, eos_id, pad_id, special_tokens, chat_template,
name; add_special_tokens(pieces) -> ids; save(folder), readable by load_tokenizer here and by
transformers.AutoTokenizer.

Folder rule: a SentencePiece tokenizer.model wins over tokenizer.json (LLaMA-2 folders carry
both; the .model is the original and the one vocabulary extension edits), then tokenizer.json,
then a tiktoken tokenizer.model.
"""
from __future__ import annotations

import base64
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

from model import hf_pipeline
from model.bpe import BPE, bytes_to_unicode
from model.pretokenize import LLAMA3_PATTERN


class Tokenizer:
    """The shared interface; subclasses provide _encode, _decode_run, _piece, _vocab_id."""
    name = "base"

    def __init__(self):
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.pad_id: int | None = None
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
    @property
    def add_bos(self) -> bool:
        """Whether plain text starts with BOS for this model (LLaMA-2/3: yes). Callers encoding
        raw text pass encode(text, bos=tokenizer.add_bos)."""
        return self.bos_id is not None

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

    def _config(self) -> dict[str, Any]:
        # tokenizer_config.json entries transformers needs to find bos/eos/pad by text.
        by_id = self._special_by_id()
        cfg: dict[str, Any] = {"clean_up_tokenization_spaces": False}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                cfg[key] = by_id.get(i) or self._piece(i)
        return cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _update_config(folder: Path, entries: dict[str, Any]) -> None:
    """Merge entries into folder/tokenizer_config.json, keeping keys written by others."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    config.update(entries)
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


# ===================================================================== SentencePiece back end
_SP_CONTROL, _SP_UNKNOWN = 3, 2  # SentencePiece piece types (ModelProto.SentencePiece.Type)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_field(number: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint (int/bool), fixed32 (float) or length-delimited (bytes/str)."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    return _varint(number << 3) + _varint(int(value))


def _sp_piece(piece: str, score: float, kind: int) -> bytes:
    """ModelProto field 1 (a SentencePiece: piece=1, score=2, type=3). Protobuf merges repeated
    fields wherever they occur, so appending this to a serialized model appends a piece."""
    return _pb_field(1, _pb_field(1, piece) + _pb_field(2, float(score)) + _pb_field(3, kind))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2: BPE, byte fallback, bos 1, eos 2, unk 0)."""
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
            proto = self.proto + b"".join(_sp_piece(p, 0.0, _SP_CONTROL) for p in new)
            template = self.chat_template
            self.__init__(proto, self.source)  # re-read every table from the extended model
            self.chat_template = template
        return [self._pieces[p] for p in pieces]

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.model (read here) + an equivalent tokenizer.json and tokenizer_config.json
        (read by transformers, which needs protobuf to convert a tokenizer.model itself)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(self.proto)
        (folder / "tokenizer.json").write_text(json.dumps(self.hf_json(), ensure_ascii=False))
        unk = self.sp.unk_id()
        _update_config(folder, {**self._config(), "tokenizer_class": "PreTrainedTokenizerFast",
                                "unk_token": self.sp.id_to_piece(unk) if unk >= 0 else None})

    def hf_json(self) -> dict:
        """The HF tokenizer.json equivalent of this BPE model (as transformers' LlamaConverter
        builds it: merges ranked by the score of the merged piece)."""
        sp = self.sp
        vocab = {sp.id_to_piece(i): i for i in range(self.vocab_size)}
        by_score = sorted(range(self.vocab_size), key=lambda i: -sp.get_score(i))
        merges = []
        for i in by_score:
            piece = sp.id_to_piece(i)
            local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))
        dummy = sp.encode("a", out_type=str)[0].startswith("▁")
        norm = [{"type": "Prepend", "prepend": "▁"}] if dummy else []
        norm.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
        dec = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
        if dummy:
            dec.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
        return _hf_json(vocab, [list(m) for m in merges], self.special_tokens,
                        model_extra={"byte_fallback": any(sp.is_byte(i) for i in range(self.vocab_size)),
                                     "unk_token": unk, "fuse_unk": True},
                        normalizer={"type": "Sequence", "normalizers": norm}, pre_tokenizer=None,
                        decoder={"type": "Sequence", "decoders": dec},
                        post_processor=_bos_template(sp.id_to_piece(self.bos_id), self.bos_id) if self.bos_id is not None else None)


def _hf_json(vocab: dict[str, int], merges: list[list[str]], specials: dict[str, int], *, model_extra: dict,
             normalizer: dict | None, pre_tokenizer: dict | None, decoder: dict | None,
             post_processor: dict | None = None) -> dict:
    """A tokenizer.json document with a BPE model."""
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(specials.items(), key=lambda x: x[1])]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    model.update(model_extra)
    model.update(vocab=vocab, merges=merges)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model}


# ============================================================================= BPE back end
class BPETokenizer(Tokenizer):
    """Hand-written BPE following an HF tokenizer.json document `spec` (normalizer,
    pre_tokenizer, BPE model, decoder, added_tokens). spec["model"]["merges"] may be None:
    tiktoken ranks (LLaMA-3), merges derived only when saving."""

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

    @property
    def add_bos(self) -> bool:
        """True when the tokenizer.json post-processor puts a special token first (LLaMA-3,
        TinyStories). SmolLM2 has a bos_id (<|im_start|>) but its plain text starts without one."""
        single = (self.spec.get("post_processor") or {}).get("single") or []
        return self.bos_id is not None and bool(single) and "SpecialToken" in single[0]

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
                self.spec.setdefault("added_tokens", []).append(
                    {"id": self.vocab_size, "content": p, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True})
                self.vocab_size += 1
        return [self.token_to_id(p) for p in pieces]

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (read here and by transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = self.spec
        if spec["model"]["merges"] is None:  # tiktoken ranks -> explicit merges for HF
            spec = {**spec, "model": {**spec["model"], "merges": tiktoken_merges(spec["model"]["vocab"])}}
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        _update_config(folder, {**self._config(), "tokenizer_class": "PreTrainedTokenizerFast"})


def tiktoken_merges(vocab: dict[str, int]) -> list[list[str]]:
    """Merges equivalent to tiktoken ranks: every split (a, b) of a token t with both halves in
    the vocabulary gets t's rank (ties by the halves' ranks), as transformers converts them."""
    merges = []
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [list(m) for m in sorted(local, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    return merges


# ================================================================================== loaders
# LLaMA-3's special tokens, in order after the 128000 ranks (llama_models/llama3/tokenizer.py).
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                    "<|python_tag|>", "<|image|>"]
_LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_SPECIALS))]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def _bos_template(bos: str, bos_id: int) -> dict:
    """A tokenizer.json post-processor that puts BOS in front, so transformers adds it by
    default as the original model expects (our encode adds it only when asked)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _byte_level_json(vocab: dict[str, int], merges: list | None, specials: dict[str, int], pre: list[dict],
                     ignore_merges: bool, bos: str | None) -> dict:
    post = _bos_template(bos, specials[bos]) if bos is not None else None
    return _hf_json(vocab, merges, specials, model_extra={"ignore_merges": ignore_merges},
                    normalizer=None, pre_tokenizer={"type": "Sequence", "pretokenizers": pre},
                    decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                    post_processor=post)


def _byte_level(add_prefix_space=False, use_regex=True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


_LLAMA3_PRE = [{"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
               _byte_level(use_regex=False)]
# GGUF tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer steps (as in each model's HF files).
_GGUF_PRE = {
    "gpt2": [_byte_level()],
    "default": [_byte_level()],
    "smollm": [{"type": "Digits", "individual_digits": True}, _byte_level()],
    "llama-bpe": _LLAMA3_PRE,
    "llama3": _LLAMA3_PRE,
}


def load_tiktoken(path: str | os.PathLike) -> BPETokenizer:
    """LLaMA-3's tiktoken file ('base64-token rank' lines) -> byte-level BPETokenizer with the
    llama3 pre-tokenizer and its 256 special tokens. bos <|begin_of_text|>, eos <|end_of_text|>,
    pad <|finetune_right_pad_id|> (as Meta's reference tokenizer)."""
    path = Path(path)
    table = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            vocab["".join(table[b] for b in base64.b64decode(token))] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: tiktoken ranks are not 0..{len(vocab) - 1}")
    if len(vocab) != 128000:
        raise ValueError(f"{path}: a tiktoken file of {len(vocab)} ranks; only LLaMA-3's (128000) is known")
    specials = {s: len(vocab) + i for i, s in enumerate(_LLAMA3_SPECIALS)}
    spec = _byte_level_json(vocab, None, specials, _LLAMA3_PRE, ignore_merges=True, bos="<|begin_of_text|>")
    tok = BPETokenizer(spec, str(path), name="llama3-tiktoken")
    tok.bos_id, tok.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
    tok.pad_id = specials["<|finetune_right_pad_id|>"]
    return tok


def load_tokenizer_json(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> BPETokenizer:
    """An HF tokenizer.json (BPE model) -> BPETokenizer. config: tokenizer_config.json entries
    naming bos/eos/pad tokens; without it, BOS is taken from the post-processor template."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a tokenizer.json ({err})") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise ValueError(f"{path}: not a tokenizer.json (no 'model' entry)")
    tok = BPETokenizer(spec, str(path), name=f"bpe:{path.parent.name or path.name}")
    config = dict(config or {})
    for attr in ("bos", "eos", "pad"):
        entry = config.get(f"{attr}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if text is not None:
            setattr(tok, f"{attr}_id", tok.token_to_id(text))
    if tok.bos_id is None:
        single = (spec.get("post_processor") or {}).get("single") or []
        first = single[0].get("SpecialToken") if single else None
        if first:
            tok.bos_id = tok.token_to_id(first["id"])
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A folder (SentencePiece tokenizer.model, else tokenizer.json, else tiktoken
    tokenizer.model) or one of those files -> Tokenizer. ValueError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        model, js = path / "tokenizer.model", path / "tokenizer.json"
        if model.exists() and _kind(model) == "sentencepiece":
            return _load_sentencepiece(model)
        if js.exists():
            cfg = path / "tokenizer_config.json"
            return load_tokenizer_json(js, json.loads(cfg.read_text()) if cfg.exists() else None)
        if model.exists():
            return load_tiktoken(model)
        raise ValueError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".json":
        return load_tokenizer_json(path)
    kind = _kind(path)
    if kind == "sentencepiece":
        return _load_sentencepiece(path)
    if kind == "tiktoken":
        return load_tiktoken(path)
    raise ValueError(f"{path}: unknown tokenizer format; expected a SentencePiece model, a tiktoken "
                     "BPE file ('base64 rank' lines) or an HF tokenizer.json")


def _kind(path: Path) -> str | None:
    """Sniff a tokenizer.model: tiktoken text, SentencePiece protobuf, or None."""
    with open(path, "rb") as f:
        head = f.read(256)
    if _TIKTOKEN_LINE.match(head):
        return "tiktoken"
    # A ModelProto starts with field 1 (pieces), wire type 2: byte 0x0A, then a length varint.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    return None


def _load_sentencepiece(path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path.read_bytes(), str(path))


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """GGUF metadata (GGUFFile(...).metadata) -> Tokenizer. tokenizer.ggml.model "gpt2":
    byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre; "llama": SentencePiece
    (the ModelProto is rebuilt from tokens, scores and token types)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _gguf_bpe(metadata)
    elif kind == "llama":
        tok = _gguf_sentencepiece(metadata)
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2' or 'llama')")
    for attr, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            setattr(tok, f"{attr}_id", int(value))
    return tok


def _gguf_bpe(metadata: Mapping[str, Any]) -> BPETokenizer:
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _GGUF_PRE:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre_name!r} is not supported (known: {sorted(_GGUF_PRE)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    specials = {t: i for i, t in enumerate(tokens) if types[i] in (2, 3, 4)}
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None
    spec = _byte_level_json(vocab, list(metadata["tokenizer.ggml.merges"]), specials, _GGUF_PRE[pre_name],
                            ignore_merges=pre_name in ("llama-bpe", "llama3"),
                            bos=tokens[bos_id] if add_bos else None)
    return BPETokenizer(spec, "<gguf metadata>", name=f"gguf-bpe:{pre_name}")


def _gguf_sentencepiece(metadata: Mapping[str, Any]) -> SentencePieceTokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pieces = b"".join(_sp_piece(t, s, k) for t, s, k in zip(tokens, scores, types))
    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    trainer = (_pb_field(3, 2) + _pb_field(4, len(tokens))  # model_type BPE, vocab_size
               + _pb_field(35, 6 in types)  # byte_fallback: the model has <0xXX> pieces
               + b"".join(_pb_field(n, -1 if ids[k] is None else int(ids[k]))
                          for n, k in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding"))))
    normalizer = (_pb_field(1, "identity") + _pb_field(3, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
                  + _pb_field(4, bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False))))
    proto = pieces + _pb_field(2, trainer) + _pb_field(3, normalizer)
    return SentencePieceTokenizer(proto, "<gguf metadata>")
