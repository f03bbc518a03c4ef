"""Chat templates as code: llama2, llama3 and ChatML.

A template turns messages [{"role": "system"|"user"|"assistant", "content": str}] into token ids
and a loss mask (True on the assistant's own tokens and its end-of-turn token, which the model
must learn to emit). Special tokens are inserted as ids, never parsed out of text, so user text
cannot forge them, and BOS appears once because the tokenizer is never asked to add it.

Text between two special tokens is encoded in one piece, exactly as a reference tokenizer
encodes the rendered string; the loss mask is then derived from where each part's prefix ends,
so asking for a mask never changes the ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


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
    """Subclasses list a conversation's parts; rendering and masking are shared."""
    name = "base"

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system  # default system prompt, used when the conversation has none

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               default_system: bool = True, tags: tuple[str, ...] = ()) -> list[int]:
        """Messages -> token ids, ending with the assistant header if add_generation_prompt."""
        return self.render_with_mask(messages, add_generation_prompt, default_system, tags)[0]

    def render_with_mask(self, messages: list[dict], add_generation_prompt: bool = False,
                         default_system: bool = True, tags: tuple[str, ...] = ()) -> tuple[list[int], list[bool]]:
        """-> (ids, mask): mask[i] True where ids[i] is assistant content or its end-of-turn.
        default_system=False renders no system prompt unless the messages bring one (InsCP).
        tags: special tokens (TransLLM's <EN>, <RESPONSE>, <TH>) written as text in ASSISTANT
        contents, encoded as their ids; user text is never parsed, so it cannot forge one. A tag
        the tokenizer does not have stays text."""
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role system|user|assistant and str content, got {m!r}")
        if default_system and self.system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}] + list(messages)
        parts = self.parts(messages, add_generation_prompt)
        return encode_parts(self.tokenizer, _split_tags(parts, self.tokenizer, tags) if tags else parts)

    def special(self, piece: str) -> int:
        return self.tokenizer.token_to_id(piece)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end the assistant's turn."""
        raise NotImplementedError

    def parts(self, messages: list[dict], add_generation_prompt: bool) -> list[Text | Special]:
        raise NotImplementedError


class Llama2Template(ChatTemplate):
    """Meta's LLaMA-2-chat format: every exchange is its own <s>...</s>, and the system prompt is
    folded into the first user message:
    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]
    (The generation prompt is the open [INST] ... [/INST] itself, so add_generation_prompt is moot.)"""
    name = "llama2"

    def parts(self, messages, add_generation_prompt):
        tok, out = self.tokenizer, []
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), list(messages[1:])
            first = messages[0]["content"] if messages else ""
            messages[:1] = [{"role": "user", "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{first}"}]
        for m in messages:
            if m["role"] == "user":
                out += [Special(tok.bos_id), Text(f"[INST] {m['content'].strip()} [/INST]")]
            elif m["role"] == "assistant":
                out += [Text(f" {m['content'].strip()} ", True), Special(tok.eos_id, True)]
            else:
                raise ValueError("llama2 template: a system message may only come first")
        return out

    @property
    def stop_ids(self):
        return [self.tokenizer.eos_id]


class Llama3Template(ChatTemplate):
    """<|begin_of_text|>(<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>)*"""
    name = "llama3"

    def parts(self, messages, add_generation_prompt):
        s = self.special
        out = [Special(self.tokenizer.bos_id)]
        for m in messages:
            own = m["role"] == "assistant"
            out += [Special(s("<|start_header_id|>")), Text(m["role"]), Special(s("<|end_header_id|>")),
                    Text("\n\n"), Text(m["content"].strip(), own), Special(s("<|eot_id|>"), own)]
        if add_generation_prompt:
            out += [Special(s("<|start_header_id|>")), Text("assistant"), Special(s("<|end_header_id|>")),
                    Text("\n\n")]
        return out

    @property
    def stop_ids(self):
        return [self.special("<|eot_id|>"), self.tokenizer.eos_id]


class ChatMLTemplate(ChatTemplate):
    """(<|im_start|>{role}\\n{content}<|im_end|>\\n)* — SmolLM2, Qwen."""
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


TEMPLATES = {t.name: t for t in (Llama2Template, Llama3Template, ChatMLTemplate)}


def default_system_from_jinja(jinja: str | None) -> str | None:
    """The system prompt a model's own (Jinja) chat template inserts when none is given, e.g.
    SmolLM2's '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM...'."""
    found = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", jinja or "")
    return found.group(1) if found else None


def get_template(tokenizer, name: str | None = None, system: str | None = None) -> ChatTemplate:
    """The template for a tokenizer: by name (llama2 | llama3 | chatml) or detected from its
    special tokens. system: default system prompt; else the one in the tokenizer's stored
    `chat_template`, if any."""
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    if name is None:
        name = "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else "llama2"
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}: choose one of {sorted(TEMPLATES)}")
    if system is None:
        system = default_system_from_jinja(getattr(tokenizer, "chat_template", None))
    return TEMPLATES[name](tokenizer, system)
