"""The pieces of an HF tokenizer.json around its BPE model, interpreted by hand.

tokenizer.json (the `tokenizers` library's format) describes a pipeline:
normalizer (text -> text) -> pre_tokenizer (text -> pieces) -> model (piece -> ids) ->
post_processor (special tokens around the ids), and back through a decoder (token strings ->
text). Only the components used by the tokenizers we ship
for are supported; anything else is a ValueError naming the component, never a silent
approximation.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

from model.bpe import from_byte_chars
from model.pretokenize import GPT2_PATTERN, Splitter, chain, split_isolated

Normalizer = Callable[[str], str]
Decoder = Callable[[list[str]], list[str]]


def normalizer(spec: dict | None, where: str) -> Normalizer:
    """tokenizer.json "normalizer" -> function."""
    if spec is None:
        return lambda s: s
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [normalizer(s, where) for s in spec["normalizers"]]

        def run(s: str) -> str:
            for p in parts:
                s = p(s)
            return s
        return run
    if kind == "Prepend":
        prefix = spec["prepend"]
        return lambda s: prefix + s if s else s  # tokenizers leaves an empty string empty
    if kind == "Replace":
        old, new = _string_pattern(spec, where), spec["content"]
        return lambda s: s.replace(old, new)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    raise ValueError(f"{where}: unsupported normalizer {kind!r}")


def pre_tokenizer(spec: dict | None, where: str) -> tuple[Splitter, bool]:
    """tokenizer.json "pre_tokenizer" -> (splitter, byte_level). byte_level: pieces must be
    mapped to GPT-2 byte characters before BPE (ByteLevel must come last to allow that)."""
    steps = [] if spec is None else spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    splitters: list[Splitter] = []
    byte_level = False
    for i, step in enumerate(steps):
        kind = step.get("type")
        if kind == "ByteLevel":
            if i != len(steps) - 1:
                raise ValueError(f"{where}: ByteLevel must be the last pre-tokenizer")
            byte_level = True
            if step.get("add_prefix_space"):
                splitters.append(lambda s: [s if s.startswith(" ") else " " + s])
            if step.get("use_regex", True):
                splitters.append(split_isolated(GPT2_PATTERN))
        elif kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ValueError(f"{where}: Split supports behavior=Isolated, invert=false only, got {step}")
            pat = step["pattern"]
            splitters.append(split_isolated(pat["Regex"] if "Regex" in pat else re.escape(pat["String"])))
        elif kind == "Digits":
            splitters.append(split_isolated(r"\p{N}" if step.get("individual_digits") else r"\p{N}+"))
        else:
            raise ValueError(f"{where}: unsupported pre_tokenizer {kind!r}")
    return chain(splitters), byte_level


def decoder(spec: dict | None, where: str) -> Decoder:
    """tokenizer.json "decoder" -> function over the list of token strings (as in tokenizers,
    each step maps the list; join the result for the text)."""
    if spec is None:
        return lambda toks: toks
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [decoder(s, where) for s in spec["decoders"]]

        def run(toks: list[str]) -> list[str]:
            for p in parts:
                toks = p(toks)
            return toks
        return run
    if kind == "ByteLevel":
        return lambda toks: [from_byte_chars("".join(toks)).decode("utf-8", errors="replace")]
    if kind == "Replace":
        old, new = _string_pattern(spec, where), spec["content"]
        return lambda toks: [t.replace(old, new) for t in toks]
    if kind == "ByteFallback":
        return _byte_fallback
    if kind == "Fuse":
        return lambda toks: ["".join(toks)]
    if kind == "Strip":
        return lambda toks: [_strip(t, spec["content"], spec["start"], spec["stop"]) for t in toks]
    raise ValueError(f"{where}: unsupported decoder {kind!r}")


_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")


def post_processor(spec: dict | None, where: str) -> tuple[list[int], list[int]]:
    """tokenizer.json "post_processor" -> (ids put before, ids put after) one text, as the
    `tokenizers` library frames it by default (add_special_tokens=True). The LLaMA-3 hub file
    hides its BOS in Sequence[ByteLevel, TemplateProcessing]; ByteLevel only fixes offsets."""
    if spec is None:
        return [], []
    kind = spec.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        before: list[int] = []
        after: list[int] = []
        for step in spec["processors"]:  # each step wraps what the previous ones produced
            b, a = post_processor(step, where)
            before, after = b + before, after + a
        return before, after
    if kind == "TemplateProcessing":
        return _template_single(spec, where)
    if kind in ("RobertaProcessing", "BertProcessing"):  # cls text sep: cls/sep are [token, id]
        return [int(spec["cls"][1])], [int(spec["sep"][1])]
    raise ValueError(f"{where}: unsupported post_processor {kind!r}")


def _template_single(spec: dict, where: str) -> tuple[list[int], list[int]]:
    """TemplateProcessing's "single" template: special tokens, then $A, then special tokens."""
    before: list[int] = []
    after: list[int] = []
    seen_text = False
    for item in spec["single"]:
        if "Sequence" in item:
            if item["Sequence"]["id"] != "A" or seen_text:
                raise ValueError(f"{where}: post_processor single template {spec['single']} is not '[specials] $A [specials]'")
            seen_text = True
        else:
            name = item["SpecialToken"]["id"]
            ids = spec.get("special_tokens", {}).get(name, {}).get("ids")
            if ids is None:
                raise ValueError(f"{where}: post_processor special token {name!r} has no ids in special_tokens")
            (after if seen_text else before).extend(int(i) for i in ids)
    if not seen_text:
        raise ValueError(f"{where}: post_processor single template has no $A")
    return before, after


def _byte_fallback(toks: list[str]) -> list[str]:
    """Runs of '<0xXX>' tokens -> their UTF-8 text; an invalid run gives one U+FFFD per byte."""
    out, pending = [], bytearray()

    def flush():
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(pending))
            pending.clear()

    for t in toks:
        m = _BYTE_TOKEN.fullmatch(t)
        if m:
            pending.append(int(m.group(1), 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _strip(token: str, content: str, start: int, stop: int) -> str:
    """Remove up to `start` leading and `stop` trailing `content` characters."""
    a = 0
    while a < start and a < len(token) and token[a] == content:
        a += 1
    b = len(token)
    while len(token) - b < stop and b > a and token[b - 1] == content:
        b -= 1
    return token[a:b]


def _string_pattern(spec: dict, where: str) -> str:
    pattern = spec["pattern"]
    if "String" not in pattern:
        raise ValueError(f"{where}: {spec['type']} with a regex pattern is not supported")
    return pattern["String"]
