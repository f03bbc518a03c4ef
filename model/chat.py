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
tokenizer.chat_template (model/chat_jinja.recognise) and refuses an unknown or missing one with a line naming
--template; get_template(tokenizer, name) uses the named family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from model.chat_jinja import recognise


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
