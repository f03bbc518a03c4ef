"""Load a tokenizer from a folder or file; the one interface is model/tokenizer_base.Tokenizer.

Back ends: `SentencePieceTokenizer` (model/spm.py: a SentencePiece tokenizer.model, LLaMA-2) and
`BPETokenizer` (model/tokenizer_json.py: an HF tokenizer.json with a BPE model, or LLaMA-3's
tiktoken file). GGUF metadata is read by model/gguf_tokenizer.tokenizer_from_gguf.

Folder rule: a SentencePiece tokenizer.model wins over tokenizer.json (LLaMA-2 folders carry
both; the .model is the original and the one vocabulary extension edits), then tokenizer.json,
then a tiktoken tokenizer.model.

BOS/EOS (which ids, and whether plain text gets them: add_bos / add_eos) follow what the model's
own tokenizer does, i.e. what transformers 5 and `tokenizers` do with the same folder:
- a tokenizer.json post-processor decides add_bos/add_eos (TemplateProcessing, alone or inside
  a Sequence as in the LLaMA-3 hub file; Roberta/BertProcessing); transformers 5 ignores
  tokenizer_config.json's add_bos_token/add_eos_token when a tokenizer.json exists, so a flag
  that contradicts the post-processor is refused (transformers 4 honoured it);
- without a tokenizer.json the flags come from tokenizer_config.json, else the back end's
  default (SentencePiece: BOS when the model has one, as LlamaTokenizer; tiktoken: BOS);
- bos_token / eos_token / pad_token in tokenizer_config.json name the ids (a token the
  post-processor adds that is not the config's bos/eos is refused).
The stored chat template is read too: chat_template.jinja, else tokenizer_config.json's
chat_template (a string, or a list of named templates whose "default" one is used).
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from model import hf_pipeline
from model.bpe import bytes_to_unicode
from model.spm import SentencePieceTokenizer
from model.tokenizer_base import Tokenizer
from model.tokenizer_json import LLAMA3_PRE, BPETokenizer, byte_level_json

__all__ = ["Tokenizer", "BPETokenizer", "SentencePieceTokenizer", "LLAMA3_SPECIALS", "load_tokenizer",
           "load_tokenizer_json", "load_tiktoken"]

# LLaMA-3's special tokens, in order after the 128000 ranks (llama_models/llama3/tokenizer.py).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")
Frame = tuple[list[int], list[int]]  # (ids before, ids after) plain text


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A folder (SentencePiece tokenizer.model, else tokenizer.json, else tiktoken
    tokenizer.model, with its tokenizer_config.json) or one of those files -> Tokenizer.
    ValueError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".json":
        return load_tokenizer_json(path)
    kind = _kind(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path.read_bytes(), str(path))
    if kind == "tiktoken":
        return load_tiktoken(path)
    raise ValueError(f"{path}: unknown tokenizer format; expected a SentencePiece model, a tiktoken "
                     "BPE file ('base64 rank' lines) or an HF tokenizer.json")


def _load_folder(folder: Path) -> Tokenizer:
    model, js, cfg_file = folder / "tokenizer.model", folder / "tokenizer.json", folder / "tokenizer_config.json"
    config = _read_json(cfg_file) if cfg_file.exists() else {}
    if model.exists() and _kind(model) == "sentencepiece":
        tok: Tokenizer = SentencePieceTokenizer(model.read_bytes(), str(model))
        frame = hf_pipeline.post_processor(_read_json(js).get("post_processor"), str(js)) if js.exists() else None
        configure(tok, config, frame, str(cfg_file))
    elif js.exists():
        tok = load_tokenizer_json(js, config, str(cfg_file))
    elif model.exists():
        tok = load_tiktoken(model)
        configure(tok, config, None, str(cfg_file))
    else:
        raise ValueError(f"{folder}: no tokenizer.json or tokenizer.model in this folder")
    tok.chat_template = _stored_template(folder, config)
    return tok


def load_tokenizer_json(path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                        config_name: str = "tokenizer_config.json") -> BPETokenizer:
    """An HF tokenizer.json (BPE model) -> BPETokenizer; config: its tokenizer_config.json
    entries (bos/eos/pad tokens, add_*_token flags), config_name: where they came from."""
    path = Path(path)
    spec = _read_json(path)
    if "model" not in spec:
        raise ValueError(f"{path}: not a tokenizer.json (no 'model' entry)")
    tok = BPETokenizer(spec, str(path), name=f"bpe:{path.parent.name or path.name}")
    frame = hf_pipeline.post_processor(spec.get("post_processor"), f"{path}: post_processor")
    configure(tok, dict(config or {}), frame, config_name)
    return tok


def configure(tok: Tokenizer, config: Mapping[str, Any], frame: Frame | None, where: str) -> None:
    """Set tok's bos/eos/pad ids from tokenizer_config.json entries and add_bos/add_eos from the
    tokenizer.json post-processor's frame (None: no tokenizer.json, the config's flags decide)."""
    for attr in ("bos", "eos", "pad"):
        entry = config.get(f"{attr}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if text is not None:
            try:
                setattr(tok, f"{attr}_id", tok.token_to_id(text))
            except KeyError:
                raise ValueError(f"{where}: {attr}_token {text!r} is not in the vocabulary") from None
    if frame is None:
        for attr in ("bos", "eos"):
            flag = config.get(f"add_{attr}_token")
            if flag is not None:
                setattr(tok, f"add_{attr}", bool(flag))
            if getattr(tok, f"add_{attr}"):
                tok._need(getattr(tok, f"{attr}_id"), attr)
        return
    for attr, ids in zip(("bos", "eos"), frame):
        if len(ids) > 1:
            raise ValueError(f"{where}: the tokenizer.json post_processor adds {len(ids)} tokens "
                             f"{'before' if attr == 'bos' else 'after'} a text; only one {attr} token is supported")
        current = getattr(tok, f"{attr}_id")
        if ids and current is not None and current != ids[0]:
            raise ValueError(f"{where}: {attr}_token is id {current} but the tokenizer.json post_processor "
                             f"adds id {ids[0]}")
        if ids:
            setattr(tok, f"{attr}_id", ids[0])
        setattr(tok, f"add_{attr}", bool(ids))
        flag = config.get(f"add_{attr}_token")
        if flag is not None and bool(flag) != bool(ids):
            raise ValueError(f"{where}: add_{attr}_token={flag} contradicts the tokenizer.json post_processor "
                             f"({'adds' if ids else 'does not add'} {attr}); transformers 5 follows the "
                             "post_processor, transformers 4 the flag: fix one of them")


def load_tiktoken(path: str | os.PathLike) -> BPETokenizer:
    """LLaMA-3's tiktoken file ('base64-token rank' lines) -> byte-level BPETokenizer with the
    llama3 pre-tokenizer and its 256 special tokens. bos <|begin_of_text|> (added to plain
    text, as Meta's reference encode(bos=True)), eos <|end_of_text|>, pad <|finetune_right_pad_id|>."""
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
    specials = {s: len(vocab) + i for i, s in enumerate(LLAMA3_SPECIALS)}
    spec = byte_level_json(vocab, None, specials, LLAMA3_PRE, ignore_merges=True, bos="<|begin_of_text|>")
    tok = BPETokenizer(spec, str(path), name="llama3-tiktoken")
    tok.bos_id, tok.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
    tok.pad_id = specials["<|finetune_right_pad_id|>"]
    tok.add_bos = True
    return tok


def _stored_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The folder's Jinja chat template: chat_template.jinja (transformers 5 writes it there),
    else tokenizer_config.json's chat_template."""
    file = folder / "chat_template.jinja"
    if file.exists():
        return file.read_text(encoding="utf-8")
    stored = config.get("chat_template")
    if isinstance(stored, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in stored if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template lists {sorted(named)} but no 'default'")
        stored = named["default"]
    return stored


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


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
