"""Pre-tokenizers: split text into the pieces BPE runs on, with Python's `re` only.

Byte-level BPE tokenizers (GPT-2, SmolLM2, LLaMA-3) first cut text with a regex written in
Rust/Oniguruma syntax, e.g. GPT-2's

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

Python's `re` has no \\p{L} (letters) or \\p{N} (numbers), and its \\s is str.isspace(), which
differs from Unicode White_Space (it also counts U+001C..U+001F). `translate` rewrites such a
pattern into an equivalent `re` pattern with explicit character classes, generated once from
`unicodedata`. Both engines are backtracking and leftmost-first, so alternation order carries
over unchanged.
"""
from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Callable, Iterable

# GPT-2's pattern (the tokenizers ByteLevel pre-tokenizer with use_regex=True).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# LLaMA-3's pattern (llama_models/llama3/tokenizer.py, also its HF tokenizer.json Split).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Unicode White_Space, the meaning of \s in the Rust regex crate and in Oniguruma.
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000)]


def _ranges(prefix: str) -> list[tuple[int, int]]:
    """Code point ranges whose general category starts with `prefix` ('L' letters, 'N' numbers)."""
    out: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return out


def _class_body(ranges: Iterable[tuple[int, int]]) -> str:
    """Ranges -> the inside of a `re` character class, every character escaped as \\uXXXX."""
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731 - \U works for every code point, no quoting issues
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


@functools.lru_cache(maxsize=None)
def _classes() -> dict[str, str]:
    """Class bodies for \\p{L}, \\p{N}, \\s (built once per process: ~0.5 s)."""
    return {"L": _class_body(_ranges("L")), "N": _class_body(_ranges("N")), "s": _class_body(_WHITE_SPACE)}


@functools.lru_cache(maxsize=None)
def translate(pattern: str) -> re.Pattern:
    """A Rust/Oniguruma-style pattern using \\p{L}, \\p{N}, \\s, \\S -> a compiled `re` pattern
    with the same matches. Raises ValueError for constructs we cannot express (\\S inside [...],
    other \\p{..} properties)."""
    cls = _classes()
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1]
            if nxt == "p" and pattern[i + 2:i + 5] in ("{L}", "{N}"):
                body = cls[pattern[i + 3]]
                out.append(body if in_class else f"[{body}]")
                i += 5
                continue
            if nxt == "p":
                raise ValueError(f"unsupported property {pattern[i:i + 6]!r} in pre-tokenizer regex {pattern!r}")
            if nxt == "s":
                out.append(cls["s"] if in_class else f"[{cls['s']}]")
            elif nxt == "S":
                if in_class:
                    raise ValueError(f"\\S inside a character class is not supported: {pattern!r}")
                out.append(f"[^{cls['s']}]")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            if pattern[i + 1:i + 2] == "^":  # keep a leading ^ (negation) next to the bracket
                out.append("^")
                i += 1
        elif c == "]" and in_class:
            in_class = False
            out.append(c)
        else:
            out.append(c)
        i += 1
    return re.compile("".join(out))


Splitter = Callable[[str], list[str]]


def split_isolated(pattern: str) -> Splitter:
    """tokenizers' Split(behavior="Isolated"): every match is a piece, and so is every gap
    between matches (the patterns we use match everything, so gaps are rare)."""
    rx = translate(pattern)

    def split(text: str) -> list[str]:
        pieces, end = [], 0
        for m in rx.finditer(text):
            if m.start() > end:
                pieces.append(text[end:m.start()])
            if m.end() > m.start():
                pieces.append(m.group())
            end = m.end()
        if end < len(text):
            pieces.append(text[end:])
        return pieces

    return split


def chain(splitters: list[Splitter]) -> Splitter:
    """Apply splitters in turn, each to every piece of the one before (tokenizers' Sequence)."""

    def split(text: str) -> list[str]:
        pieces = [text] if text else []
        for s in splitters:
            pieces = [p for piece in pieces for p in s(piece)]
        return pieces

    return split
