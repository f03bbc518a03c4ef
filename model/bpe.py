"""The byte-pair-encoding merge loop, written by hand (no tokenizers / tiktoken at run time).

A word (one pre-tokenized piece) starts as a list of symbols, one per character; BPE then keeps
merging the adjacent pair of lowest rank, leftmost first, until no adjacent pair has a rank.
Two rank conventions exist and both are supported:

- merges list (GPT-2, SmolLM2, tokenizer.json): rank of (a, b) = its index in the merges list;
- tiktoken (LLaMA-3): rank of (a, b) = the vocabulary rank of the token a + b, if that exists.

Byte-level tokenizers first map each UTF-8 byte to a printable character (GPT-2's
`bytes_to_unicode`) so that every word is a string over a 256-character alphabet, and all 256
are in the vocabulary. SentencePiece-style tokenizers instead use characters directly and fall
back to byte tokens <0xXX> (or <unk>) for characters that are not in the vocabulary.
"""
from __future__ import annotations

import functools
import heapq

# Words up to this many symbols use the simple quadratic loop (fastest for short words in
# Python); longer ones (whole texts, when there is no pre-tokenizer) use a heap.
_SHORT_WORD = 48
_CACHE_LIMIT = 200_000
_CACHE_WORD_LEN = 256


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to
    themselves, the others to U+0100 and up (so a space becomes 'Ġ', a newline 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=None)
def _latin1_to_unicode() -> dict[int, str]:
    # str.translate table: after text.encode().decode("latin-1") every byte is one code point.
    return {b: c for b, c in bytes_to_unicode().items()}


@functools.lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of bytes_to_unicode."""
    return {c: b for b, c in bytes_to_unicode().items()}


def to_byte_chars(text: str) -> str:
    """UTF-8 bytes of text, each shown as its bytes_to_unicode character."""
    return text.encode("utf-8").decode("latin-1").translate(_latin1_to_unicode())


def from_byte_chars(chars: str) -> bytes:
    """Inverse of to_byte_chars (characters outside the map are kept as their UTF-8)."""
    table = unicode_to_bytes()
    out = bytearray()
    for c in chars:
        b = table.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


class BPE:
    """vocab: token string -> id. merges: list of (left, right) pairs in priority order, or None
    for tiktoken ranks (vocab id = rank, pair rank = rank of the concatenation).

    byte_fallback: a character missing from the vocabulary becomes its UTF-8 byte tokens
    '<0xXX>' (when all exist); otherwise it becomes `unk` (consecutive ones fused into one when
    fuse_unk), as in the tokenizers library. ignore_merges: a word that is itself a token is
    emitted whole (tiktoken always does this; tokenizer.json says so per model)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]] | None, *,
                 byte_fallback: bool = False, unk: str | None = None, fuse_unk: bool = False,
                 ignore_merges: bool = False, byte_level: bool = False):
        self.vocab = vocab
        self.byte_level = byte_level  # words are text, mapped to byte characters here
        self.merges = merges
        self.ranks = None if merges is None else {pair: i for i, pair in enumerate(merges)}
        self.byte_fallback, self.unk, self.fuse_unk = byte_fallback, unk, fuse_unk
        self.ignore_merges = ignore_merges or merges is None
        self._cache: dict[str, list[int]] = {}

    def rank(self, a: str, b: str) -> int | None:
        """The pair's merge priority (lower merges first), None when it never merges."""
        if self.ranks is None:
            return self.vocab.get(a + b)
        return self.ranks.get((a, b))

    def encode_word(self, word: str) -> list[int]:
        """One pre-tokenized word -> token ids (cached: real text repeats its words a lot)."""
        ids = self._cache.get(word)
        if ids is None:
            chars = to_byte_chars(word) if self.byte_level else word
            ids = [self.vocab[s] for s in self.merge(self.symbols(chars))]
            if len(word) <= _CACHE_WORD_LEN:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[word] = ids
        return ids

    def symbols(self, word: str) -> list[str]:
        """The word's starting symbols: its characters, with byte fallback / unk for unknown ones."""
        if self.ignore_merges and word in self.vocab:
            return [word]
        out: list[str] = []
        for c in word:
            if c in self.vocab:
                out.append(c)
                continue
            if self.byte_fallback:
                pieces = [f"<0x{b:02X}>" for b in c.encode("utf-8")]
                if all(p in self.vocab for p in pieces):
                    out += pieces
                    continue
            if self.unk is None:
                raise ValueError(f"character {c!r} is not in the vocabulary and there is no unk token")
            if not (self.fuse_unk and out and out[-1] is _UNK_MARK):
                out.append(_UNK_MARK)
        return [self.unk if s is _UNK_MARK else s for s in out]

    def merge(self, parts: list[str]) -> list[str]:
        """Merge symbols: repeatedly the lowest-ranked adjacent pair, leftmost on ties."""
        if len(parts) <= _SHORT_WORD:
            return self._merge_short(parts)
        return self._merge_heap(parts)

    def _merge_short(self, parts: list[str]) -> list[str]:
        rank = self.rank
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = rank(parts[i], parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return parts

    def _merge_heap(self, parts: list[str]) -> list[str]:
        # Symbols live in a doubly linked list; the heap holds (rank, left index, left, right).
        # An entry is stale when the symbols at that place changed since it was pushed.
        n = len(parts)
        sym: list[str | None] = list(parts)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = self.rank(sym[i], sym[i + 1])
            if r is not None:
                heap.append((r, i, sym[i], sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i] if sym[i] is not None else n
            if j >= n or sym[i] != a or sym[j] != b:
                continue
            sym[i], sym[j] = a + b, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < n:
                    r = self.rank(sym[left], sym[right])
                    if r is not None:
                        heapq.heappush(heap, (r, left, sym[left], sym[right]))
        return [s for s in sym if s is not None]


_UNK_MARK = object()  # placeholder so a literal token equal to the unk text is never fused
