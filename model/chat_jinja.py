"""Recognising a model's stored Jinja chat template: which family of model/chat.py it is.

No Jinja engine runs here (jinja2 is not a run-time dependency). The template is put in a
canonical form (tags only, whitespace outside string literals dropped, literals in one quoting,
x['role'] written x.role) and must contain every tag that produces a family's format for
system / user / assistant messages (_MARKS), none that changes it (_FOREIGN), and no text
outside its tags that would reach the output. Tool branches are ignored: tools are never
rendered. Anything else is refused (one line naming --template), never guessed; the real hub
templates in tests/fixtures/chat_templates/ are checked against transformers' rendering.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Recognised:
    name: str
    system: str | None = None  # the default system prompt the template inserts


_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)
_CLOSE = {"{": "}}", "%": "%}", "#": "#}"}


@dataclass
class _Tag:
    kind: str  # "{" expression, "%" statement, "#" comment
    code: str
    strip_before: bool  # {{- / {%- / {#-
    strip_after: bool  # -}} / -%} / -#}
    start: int
    end: int


def _tags(jinja: str) -> list[_Tag]:
    """The template's tags, scanned as Jinja's lexer does (string literals may hold '}}')."""
    tags, pos = [], 0
    while (pos := jinja.find("{", pos)) >= 0:
        kind = jinja[pos + 1:pos + 2]
        if kind not in _CLOSE:
            pos += 1
            continue
        i = pos + 2
        while True:
            if kind != "#" and jinja[i:i + 1] in ("'", '"'):
                m = _LITERAL.match(jinja, i)
                if m is None:
                    raise ValueError(f"chat_template: unterminated string at character {i}")
                i = m.end()
            elif jinja.startswith(_CLOSE[kind], i) or i >= len(jinja):
                break
            else:
                i += 1
        if i >= len(jinja):
            raise ValueError(f"chat_template: tag at character {pos} is never closed")
        code = jinja[pos + 2:i]
        before, after = code.startswith("-"), code.endswith("-")
        tags.append(_Tag(kind, code[1 if before else 0:len(code) - (1 if after else 0)], before, after, pos, i + 2))
        pos = i + 2
    return tags


def _unquote(literal: str) -> str:
    # Jinja's own unescaping of a string literal (jinja2.lexer)
    return literal[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape")


def _squash_code(code: str) -> str:
    """A tag's code without whitespace, its string literals in one quoting (JSON-escaped, in
    double quotes) and subscripts by a literal written as attributes (x['role'] -> x.role)."""
    out, pos = [], 0
    for m in _LITERAL.finditer(code):
        out.append(re.sub(r"\s+", "", code[pos:m.start()]))
        out.append('"' + _unquote(m.group()).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"')
        pos = m.end()
    out.append(re.sub(r"\s+", "", code[pos:]))
    return re.sub(r'\[\"([A-Za-z_]\w*)\"\]', r".\1", "".join(out))


def squash(jinja: str) -> str | None:
    """A Jinja chat template in a canonical form (tags only, see _squash_code; comments dropped),
    or None when text outside the tags reaches the output (no recognised family has any)."""
    tags = _tags(jinja)
    out = []
    for k in range(len(tags) + 1):
        prev = tags[k - 1] if k else None
        nxt = tags[k] if k < len(tags) else None
        raw = jinja[prev.end if prev else 0:nxt.start if nxt else len(jinja)]
        if raw and not _silent(raw, prev, nxt):
            return None
        if nxt is not None and nxt.kind != "#":
            out.append("{" + nxt.kind + _squash_code(nxt.code) + _CLOSE[nxt.kind])
    return "".join(out)


def _silent(raw: str, prev: _Tag | None, nxt: _Tag | None) -> bool:
    """Whether whitespace between two tags renders to nothing under transformers' settings:
    a '-' strips it; trim_blocks drops the first newline after a block or comment tag;
    lstrip_blocks drops spaces and tabs that start the line of a block or comment tag."""
    if raw.strip():
        return False
    if (prev is not None and prev.strip_after) or (nxt is not None and nxt.strip_before):
        return True
    trimmed = prev is not None and prev.kind != "{" and raw.startswith("\n")
    rest = raw[1:] if trimmed else raw
    if nxt is not None and nxt.kind != "{":
        head = rest.rstrip(" \t")
        if head.endswith("\n") or (head == "" and (trimmed or prev is None)):
            rest = head
    return rest == ""


# Per family, the tags (written as in the hub templates, compared in squashed form) that produce
# its format for system/user/assistant messages; a template must contain all of them. Tool
# branches are ignored: this code never renders tools.
_MARKS: dict[str, list[str]] = {
    "llama2": [
        "{% if loop.index0 == 0 and system_message != false %}",
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}",
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}",
        "{{ ' ' + content.strip() + ' ' + eos_token }}"],
    "mistral-v1": [
        "{{ bos_token }}", "{% if loop.first and system_message is defined %}",
        "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}",
        "{{ ' [INST] ' + message['content'] + ' [/INST]' }}", "{{ ' ' + message['content'] + eos_token}}"],
    "mistral-v3": [
        "{{ bos_token }}", "{% if loop.last and system_message is defined %}",
        "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}",
        "{{ '[INST] ' + message['content'] + '[/INST]' }}", "{{ ' ' + message['content']|trim + eos_token}}"],
    "mistral-v1-legacy": [
        "{{ bos_token }}", "{{ '[INST] ' + message['content'] + ' [/INST]' }}",
        "{{ message['content'] + eos_token}}"],
    "mistral-v0.1-legacy": [
        "{{ bos_token }}", "{{ '[INST] ' + message['content'] + ' [/INST]' }}",
        "{{ message['content'] + eos_token + ' ' }}"],
    "llama3": [
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}",
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}",
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"],
    "llama3.1": [
        "{{ bos_token }}", "{% set system_message = messages[0]['content']|trim %}",
        "{% set date_string = '26 Jul 2024' %}",
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}", "{{ 'Cutting Knowledge Date: December 2023\\n' }}",
        "{{ 'Today Date: ' + date_string + '\\n\\n' }}", "{{ system_message }}{{ '<|eot_id|>' }}",
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
        " + '<|eot_id|>' }}",
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"],
    "chatml": [
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"],
}
_MARKS["llama3.2"] = _MARKS["llama3.1"]
# Tags that change the output of a family's conversations when present (other formats).
_FOREIGN: dict[str, list[str]] = {
    "llama2": ["USE_DEFAULT_PROMPT"],
    "llama3": ["Cutting Knowledge", "date_string"],
    "llama3.1": ["strftime_now"],
    "llama3.2": [],
    "chatml": ["bos_token", "eos_token", "<think>", "enable_thinking", "reasoning_content"],
}
_DATE = re.compile(r'\{%setdate_string=strftime_now\("%d %b %Y"\)%\}')
# A ChatML template's default system prompt, and the two ways Qwen2/SmolLM2 and Qwen2.5 insert it.
_CHATML_DEFAULT = re.compile(r'"<\|im_start\|>system\\n((?:[^"\\]|\\.)*?)<\|im_end\|>\\n"')
_CHATML_DEFAULT_WHEN = ["{% if loop.first and messages[0]['role'] != 'system' %}",
                        "{% if messages[0]['role'] == 'system' %}"
                        "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% else %}"]


def _squashed_marks(name: str) -> list[str]:
    return [squash(m) for m in _MARKS[name]]


def recognise(jinja: str, where: str = "chat_template") -> Recognised:
    """A stored Jinja chat template -> its family (and default system prompt). ValueError, one
    line naming --template, when it is no known family or matches more than one."""
    canon = squash(jinja)
    found = []
    for name in _MARKS:
        marks = _squashed_marks(name)
        if canon is None or not all(m in canon for m in marks):
            continue
        if any(f in canon for f in _FOREIGN.get(name, [])):
            continue
        if name == "llama3.2" and not _DATE.search(canon):
            continue
        found.append(name)
    if len(found) != 1:
        raise ValueError(f"{where} is not a known family ({', '.join(_MARKS)})"
                         f"{' (matches ' + ', '.join(found) + ')' if found else ''}: pass --template NAME")
    name = found[0]
    system = None
    if name == "chatml":
        default = _CHATML_DEFAULT.search(canon)
        if default:
            if not any(squash(w) in canon for w in _CHATML_DEFAULT_WHEN):
                raise ValueError(f"{where}: a ChatML template with a default system prompt inserted in an "
                                 "unknown way: pass --template NAME")
            system = _unquote('"' + default.group(1) + '"')
    return Recognised(name, system)
