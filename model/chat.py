"""Chat templates as code: llama2, mistral (v1 / v3 / two 2023 hub forms), llama3, llama3.1 /
llama3.2 and ChatML (SmolLM2, Qwen2.5, ...), each recognised from the model's stored Jinja.

A template turns messages [{"role": "system"|"user"|"assistant", "content": str}] into token ids
and a loss mask (True on the assistant's own tokens and its end-of-turn token, which the model
must learn to emit). Each family reproduces its hub Jinja template exactly (tested against
transformers' rendering of the real strings in tests/fixtures/chat_templates/), tools aside.

Safety, and where it differs from transformers: special tokens are inserted as ids, never parsed
out of text, so user text cannot forge them ("<|eot_id|>" typed by a user stays text; the Jinja
string + tokenizer of transformers' apply_chat_template turns it into the control id unless
called with sanitize_control_tokens=True). BOS appears once because the tokenizer is never
asked to add it.

Text between two special tokens is encoded in one piece, exactly as a reference tokenizer
encodes the rendered string; the loss mask is then derived from where each part's prefix ends,
so asking for a mask never changes the ids.

Choosing a template is never a guess: get_template(tokenizer) recognises the family from
tokenizer.chat_template (see recognise) and refuses an unknown or missing one with a line naming
--template; get_template(tokenizer, name) uses the named family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime


@dataclass
class Text:
    text: str
    trainable: bool = False


@dataclass
class Special:
    id: int
    trainable: bool = False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _encode_chunk(tokenizer, chunk: list[Text]) -> tuple[list[int], list[bool]]:
    """Encode consecutive Text parts as one string; credit each token to the first part whose
    cumulative prefix already produces it (a token spanning a boundary goes to the later part)."""
    ids = tokenizer.encode("".join(p.text for p in chunk))
    mask, start, prefix = [], 0, ""
    for i, part in enumerate(chunk):
        prefix += part.text
        end = len(ids) if i == len(chunk) - 1 else max(start, _common_prefix(tokenizer.encode(prefix), ids))
        mask += [part.trainable] * (end - start)
        start = end
    return ids, mask


def encode_parts(tokenizer, parts: list[Text | Special]) -> tuple[list[int], list[bool]]:
    """[Text | Special] -> (ids, loss mask)."""
    ids: list[int] = []
    mask: list[bool] = []
    chunk: list[Text] = []
    for part in parts + [None]:
        if isinstance(part, Text):
            if part.text:
                chunk.append(part)
            continue
        if chunk:
            chunk_ids, chunk_mask = _encode_chunk(tokenizer, chunk)
            ids += chunk_ids
            mask += chunk_mask
            chunk = []
        if part is not None:
            ids.append(part.id)
            mask.append(part.trainable)
    return ids, mask


def _split_tags(parts: list[Text | Special], tokenizer, tags: tuple[str, ...]) -> list[Text | Special]:
    """Cut the tag strings out of the assistant's content (the trainable Text parts) and put
    their special ids in their place, keeping each piece's loss flag."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    ids = {t: specials[t] for t in tags if t in specials}
    if not ids:
        return parts
    splitter = re.compile("(" + "|".join(map(re.escape, ids)) + ")")
    out: list[Text | Special] = []
    for part in parts:
        if isinstance(part, Text) and part.trainable:
            out += [Special(ids[p], True) if p in ids else Text(p, True) for p in splitter.split(part.text) if p]
        else:
            out.append(part)
    return out


class ChatTemplate:
    """Subclasses list a conversation's parts; rendering and masking are shared.
    system: default system prompt, used when the conversation has none. date: the date string
    of templates that print one (llama3.1/3.2), None for the template's own default."""
    name = "base"

    def __init__(self, tokenizer, system: str | None = None, date: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self.date = date

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               default_system: bool = True, tags: tuple[str, ...] = ()) -> list[int]:
        """Messages -> token ids, ending with the assistant header if add_generation_prompt."""
        return self.render_with_mask(messages, add_generation_prompt, default_system, tags)[0]

    def render_with_mask(self, messages: list[dict], add_generation_prompt: bool = False,
                         default_system: bool = True, tags: tuple[str, ...] = ()) -> tuple[list[int], list[bool]]:
        """-> (ids, mask): mask[i] True where ids[i] is assistant content or its end-of-turn.
        default_system=False renders no default system prompt unless the messages bring one
        (InsCP); a header the template always prints (llama3.1's dates) stays.
        tags: special tokens (TransLLM's <EN>, <RESPONSE>, <TH>) written as text in ASSISTANT
        contents, encoded as their ids; user text is never parsed, so it cannot forge one. A tag
        the tokenizer does not have stays text."""
        parts = self._parts(messages, add_generation_prompt, default_system)
        return encode_parts(self.tokenizer, _split_tags(parts, self.tokenizer, tags) if tags else parts)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False,
                    default_system: bool = True) -> str:
        """The conversation as the text the model's Jinja template renders (special tokens
        written out), e.g. to compare with transformers' apply_chat_template(tokenize=False)."""
        parts = self._parts(messages, add_generation_prompt, default_system)
        return "".join(p.text if isinstance(p, Text) else self.tokenizer.id_to_token(p.id) for p in parts)

    def _parts(self, messages: list[dict], add_generation_prompt: bool, default_system: bool) -> list[Text | Special]:
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role system|user|assistant and str content, got {m!r}")
        if default_system and self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}] + list(messages)
        return self.parts(messages, add_generation_prompt)

    def special(self, piece: str) -> int:
        return self.tokenizer.token_to_id(piece)

    def marker(self, text: str, trainable: bool = False) -> Text | Special:
        """A template string such as "[INST]": its special id when the tokenizer has it as a special
        token (Mistral v3), else text (v1) -- as transformers' tokenizer splits the rendered text."""
        i = (getattr(self.tokenizer, "special_tokens", None) or {}).get(text)
        return Text(text, trainable) if i is None else Special(i, trainable)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end the assistant's turn."""
        raise NotImplementedError

    def parts(self, messages: list[dict], add_generation_prompt: bool) -> list[Text | Special]:
        raise NotImplementedError


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(content of a leading system message or None, the other messages)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _alternating(messages: list[dict], template: str) -> None:
    """The [INST] templates' rule: user, assistant, user, ... (their Jinja raises otherwise)."""
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError(f"{template} template: after the optional system message, roles must alternate "
                             f"user/assistant/..., message {i} is {m['role']}")


class Llama2Template(ChatTemplate):
    """Meta's LLaMA-2-chat format: every exchange is its own <s>...</s>, and the system prompt is
    folded into the first user message:
    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]
    (The generation prompt is the open [INST] ... [/INST] itself, so add_generation_prompt is moot.)"""
    name = "llama2"

    def parts(self, messages, add_generation_prompt):
        tok, out = self.tokenizer, []
        system, messages = _split_system(messages)
        _alternating(messages, self.name)
        for i, m in enumerate(messages):
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if m["role"] == "user":
                out += [Special(tok.bos_id), Text(f"[INST] {content.strip()} [/INST]")]
            else:
                out += [Text(f" {content.strip()} ", True), Special(tok.eos_id, True)]
        return out

    @property
    def stop_ids(self):
        return [self.tokenizer.eos_id]


class MistralTemplate(ChatTemplate):
    """Mistral-7B-Instruct v0.1 / v0.2 ("mistral-v1", their current hub template):
    <s> [INST] {system}\\n\\n{user} [/INST] {answer}</s> [INST] {user} [/INST]
    The system prompt joins the FIRST user message. No generation-prompt handling (the open
    [/INST] is it). Subclasses change the spacing and where the system prompt goes."""
    name = "mistral-v1"
    open, close = " [INST] ", " [/INST]"  # around the user message
    system_on = "first"  # the user message the system prompt joins: "first", "last" or None (refused)
    answer_prefix, answer_suffix, trim_answer = " ", "", False  # around the answer; suffix after </s>

    def parts(self, messages, add_generation_prompt):
        system, messages = _split_system(messages)
        if system is not None and self.system_on is None:
            raise ValueError(f"{self.name} template: only user and assistant roles are supported (no system message)")
        _alternating(messages, self.name)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        joins = users[:1] if self.system_on == "first" else [len(messages) - 1] if self.system_on == "last" else []
        out: list[Text | Special] = [Special(self.tokenizer.bos_id)]
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "user":
                if system is not None and i in joins:
                    content = f"{system}\n\n{content}"
                out += self._wrapped(self.open, content, self.close)
            else:
                answer = content.strip() if self.trim_answer else content
                out += [Text(self.answer_prefix + answer, True), Special(self.tokenizer.eos_id, True)]
                out += [Text(self.answer_suffix)]
        return out

    def _wrapped(self, open_: str, content: str, close: str) -> list[Text | Special]:
        # " [INST] " -> " ", marker("[INST]"), " ": the marker is a special id where the tokenizer has one
        lead, tag, tail = re.match(r"(\s*)(\S+)(\s*)", open_).groups()
        c_lead, c_tag, c_tail = re.match(r"(\s*)(\S+)(\s*)", close).groups()
        return [Text(lead), self.marker(tag), Text(tail + content + c_lead), self.marker(c_tag), Text(c_tail)]

    @property
    def stop_ids(self):
        return [self.tokenizer.eos_id]


class MistralV3Template(MistralTemplate):
    """Mistral-7B-Instruct-v0.3 (tokenizer v3, [INST] and [/INST] are control tokens):
    <s>[INST] {user}[/INST] {answer}</s>[INST] {system}\\n\\n{user}[/INST]
    The system prompt joins the LAST message when it is a user message; a conversation ending
    with an answer renders no system prompt at all (as the hub template does). Answers trimmed."""
    name = "mistral-v3"
    open, close, system_on, trim_answer = "[INST] ", "[/INST]", "last", True


class MistralV1LegacyTemplate(MistralTemplate):
    """The 2023 hub template of Mixtral-8x7B-Instruct-v0.1 and Mistral-7B-Instruct-v0.2 (still
    inside many GGUF files): <s>[INST] {user} [/INST]{answer}</s>[INST] {user} [/INST]; no system."""
    name = "mistral-v1-legacy"
    open, close, system_on, answer_prefix = "[INST] ", " [/INST]", None, ""


class MistralV01LegacyTemplate(MistralV1LegacyTemplate):
    """The 2023 hub template of Mistral-7B-Instruct-v0.1: as mistral-v1-legacy with a space after
    each </s>: <s>[INST] {user} [/INST]{answer}</s> [INST] {user} [/INST]."""
    name = "mistral-v0.1-legacy"
    answer_suffix = " "


class Llama3Template(ChatTemplate):
    """<|begin_of_text|>(<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>)*"""
    name = "llama3"

    def parts(self, messages, add_generation_prompt):
        out = [Special(self.tokenizer.bos_id)] if messages else []
        for m in messages:
            out += self._turn(m["role"], m["content"].strip(), m["role"] == "assistant")
        if add_generation_prompt:
            out += self._header("assistant")
        return out

    def _header(self, role: str) -> list[Text | Special]:
        s = self.special
        return [Special(s("<|start_header_id|>")), Text(role), Special(s("<|end_header_id|>")), Text("\n\n")]

    def _turn(self, role: str, content: str, own: bool) -> list[Text | Special]:
        return self._header(role) + [Text(content, own), Special(self.special("<|eot_id|>"), own)]

    @property
    def stop_ids(self):
        return [self.special("<|eot_id|>"), self.tokenizer.eos_id]


class Llama31Template(Llama3Template):
    """Llama-3.1 (and 3.3): llama3 turns after a system header that is always there:
    <|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n
    Today Date: {date}\\n\\n{system}<|eot_id|>. date: the template's date_string; its default is
    the hub template's fixed "26 Jul 2024"."""
    name = "llama3.1"

    def today(self) -> str:
        return self.date if self.date is not None else "26 Jul 2024"

    def parts(self, messages, add_generation_prompt):
        system, messages = _split_system(messages)
        head = f"Cutting Knowledge Date: December 2023\nToday Date: {self.today()}\n\n{(system or '').strip()}"
        out = [Special(self.tokenizer.bos_id)] + self._turn("system", head, False)
        return out + super().parts(messages, add_generation_prompt)[1 if messages else 0:]

    @property
    def stop_ids(self):
        eom = self.tokenizer.special_tokens.get("<|eom_id|>")  # ends a tool call (ipython)
        return super().stop_ids + ([eom] if eom is not None else [])


class Llama32Template(Llama31Template):
    """Llama-3.2 (1B/3B): as llama3.1, but the hub template prints the day it is rendered
    (strftime_now("%d %b %Y"), local time), so the default date is today's; pass date= to pin it
    (training data then does not depend on the day it was tokenised)."""
    name = "llama3.2"

    def today(self) -> str:
        return self.date if self.date is not None else datetime.now().strftime("%d %b %Y")


class ChatMLTemplate(ChatTemplate):
    """(<|im_start|>{role}\\n{content}<|im_end|>\\n)* -- SmolLM2, Qwen2/2.5 (their default system
    prompt comes from the stored template), OpenHermes."""
    name = "chatml"

    def parts(self, messages, add_generation_prompt):
        s = self.special
        out = []
        for m in messages:
            own = m["role"] == "assistant"
            out += [Special(s("<|im_start|>")), Text(f"{m['role']}\n"), Text(m["content"], own),
                    Special(s("<|im_end|>"), own), Text("\n")]
        if add_generation_prompt:
            out += [Special(s("<|im_start|>")), Text("assistant\n")]
        return out

    @property
    def stop_ids(self):
        ids = [self.special("<|im_end|>")]
        eos = self.tokenizer.eos_id
        return ids if eos is None or eos in ids else ids + [eos]


TEMPLATES = {t.name: t for t in (Llama2Template, MistralTemplate, MistralV3Template, MistralV1LegacyTemplate,
                                 MistralV01LegacyTemplate, Llama3Template, Llama31Template, Llama32Template,
                                 ChatMLTemplate)}


# ================================================================ recognising a stored template
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
    for name in TEMPLATES:
        marks = _squashed_marks(name)
        if canon is None or not all(m in canon for m in marks):
            continue
        if any(f in canon for f in _FOREIGN.get(name, [])):
            continue
        if name == "llama3.2" and not _DATE.search(canon):
            continue
        found.append(name)
    if len(found) != 1:
        raise ValueError(f"{where} is not a known family ({', '.join(TEMPLATES)})"
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


def get_template(tokenizer, name: str | None = None, system: str | None = None,
                 date: str | None = None) -> ChatTemplate:
    """The template for a tokenizer. name None: the family recognised from the tokenizer's stored
    chat_template (a tokenizer with none, or with an unknown one, is refused: pass --template
    NAME). name given: that family, whatever is stored. system: default system prompt (else the
    stored template's own, when it is of the named family). date: llama3.1/3.2's date string."""
    if name is not None and name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}: choose one of {sorted(TEMPLATES)}")
    jinja = getattr(tokenizer, "chat_template", None)
    where = f"the stored chat_template (tokenizer {getattr(tokenizer, 'name', '?')})"
    if name is None:
        if not jinja:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name', '?')} has no stored chat_template: pass --template NAME "
                             f"(one of {', '.join(TEMPLATES)})")
        found = recognise(jinja, where)
    else:
        try:
            found = recognise(jinja, where) if jinja else None
        except ValueError:
            found = None
    family = name or found.name
    if system is None and found is not None and found.name == family:
        system = found.system
    return TEMPLATES[family](tokenizer, system, date)
