"""Read training text from disk, one document or conversation at a time (streaming, no RAM).

Two kinds of record come out of a data file:
- a text: a plain string (monolingual pre-training data);
- a conversation: [{"role": "user"|"assistant"|"system", "content": str}, ...] (instruction data).

Files:
- `.txt`: one document per line, or (paragraphs=True) blank-line separated paragraphs, whose
  lines are joined with "\\n".
- `.jsonl`: one JSON object per line. Texts come from a configurable field ("text"); instruction
  records either carry a `messages` list or instruction/input/output fields (Alpaca style; any
  field names, e.g. question/context/answer for reading-comprehension data).

Every error is one line naming the file and line number, and says what to do, because a bad
record deep inside a 0.1B-token corpus must be findable without a debugger.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A data file is unusable; the message names the file (and line) and the fix."""


def _no_documents(path: Path, what: str) -> DataError:
    return DataError(f"data file {path} has no documents: {what}; "
                     "give a file with at least one non-empty record")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError:
            # The text layer decodes 8 KiB ahead of the line it hands out, so where it failed says
            # nothing about the line: find the bad byte again, line by line.
            raise DataError(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    """'file:line: not UTF-8 ...' for the first line of path that does not decode (lines split at
    b"\\n", as editors and `sed -n Np` count them; a UTF-8 sequence never contains that byte)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line, "
                        f"file offset {offset + err.start}: {err.reason}); convert the file to UTF-8")
            offset += len(raw)
    return f"{path}: not UTF-8 text; convert the file to UTF-8"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), streamed in 1 MiB reads: the content identity of a data
    file (token cache keys, token file provenance) and of checkpoint files (train/checkpointing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_txt(path: str | Path, paragraphs: bool = False) -> Iterator[str]:
    """Texts of a .txt file: one per non-empty line, or one per blank-line separated paragraph.

    Surrounding whitespace is stripped; empty documents are skipped.
    """
    path, count, block = Path(path), 0, []
    for _, line in _lines(path):
        if not paragraphs:
            if line.strip():
                count += 1
                yield line.strip()
        elif line.strip():
            block.append(line.strip())
        elif block:
            count += 1
            yield "\n".join(block)
            block = []
    if block:
        count += 1
        yield "\n".join(block)
    if count == 0:
        raise _no_documents(path, "it is empty or holds only blank lines")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl file."""
    path, count = Path(path), 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        count += 1
        yield number, record
    if count == 0:
        raise _no_documents(path, "it is empty or holds only blank lines")


def _field(record: dict, name: str, path: Path, number: int, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = ", ".join(sorted(record)) or "none"
        problem = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise DataError(f"{path}:{number}: field {name!r} is {problem} (fields: {found}); "
                        "choose the field names that match the file")
    return value


def read_texts(path: str | Path, field: str = "text", paragraphs: bool = False) -> Iterator[str]:
    """Texts of a .txt file (see read_txt) or of one string field of a .jsonl file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        for number, record in read_jsonl(path):
            text = _field(record, field, path, number).strip()
            if text:
                yield text
        return
    yield from read_txt(path, paragraphs)


@dataclass
class InstructionFields:
    """Field names of instruction records. The prompt is `instruction`, followed by `input` after
    a blank line when present; `output` is the answer; `system` optional. A record with a
    `messages` field is taken as a ready conversation instead."""
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    messages: str = "messages"


def _check_messages(messages, path: Path, number: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}:{number}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise DataError(f"{path}:{number}: message {i} needs role system|user|assistant and "
                            f"string content, got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path, fields: InstructionFields | None = None) -> Iterator[list[dict]]:
    """Conversations of a .jsonl instruction file: [system?, user, assistant, (user, assistant)*]."""
    path, fields = Path(path), fields or InstructionFields()
    if path.suffix != ".jsonl":
        raise DataError(f"data file {path}: instruction data must be .jsonl "
                        "(instruction/input/output fields or a messages list)")
    for number, record in read_jsonl(path):
        if fields.messages in record:
            yield _check_messages(record[fields.messages], path, number)
            continue
        prompt = _field(record, fields.instruction, path, number).strip()
        extra = _field(record, fields.input, path, number, required=False).strip()
        answer = _field(record, fields.output, path, number).strip()
        system = _field(record, fields.system, path, number, required=False).strip()
        user = f"{prompt}\n\n{extra}" if extra else prompt
        head = [{"role": "system", "content": system}] if system else []
        yield head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
