"""Training formats: one record -> one sample (ids, loss_mask).

`loss_mask[i]` is True when token ids[i] is a training target (the model is trained to predict
it from ids[:i]). The loader shifts this into labels. Formats:

- `inscp`   InsCP (Chen & Lee 2024): the text as the assistant turn of the chat model's own
            template, after an EMPTY user turn, with no system prompt, ended by the end-of-turn
            token; loss on every token. Llama-3:
            <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\\n\\n{text}<|eot_id|>
- `orgcp`   the baseline: plain text (+ BOS when the tokenizer adds one) + EOS; loss on all.
- `sft`     a conversation in the chat template; loss on the assistant's tokens only.
- `tcot`    TransLLM translation chain-of-thought: user = target-language query, assistant =
            `<EN> {English query} <RESPONSE> {English answer} <TH> {target answer}`.
- `recovery` TransLLM recovery KD: English instruction, assistant = `<RESPONSE> {answer}`, where
            the answer is the frozen original chat model's own.
- `translation` TransLLM translation SFT: "translate this" instruction, answer = translation.
The three TransLLM formats train on the response only. Their tags come from model.tcot.tcot_tags
(`<TH>` is `--tag TH`; the one definition, shared with vocabulary extension and TCOT inference) and
are inserted as special-token ids when the tokenizer has them (after vocabulary extension), else
written as plain text.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from model.chat import ChatTemplate
from model.tcot import tcot_tags

Sample = tuple[list[int], list[bool]]

TRANSLATE_PROMPT = "Translate the following {source_lang} text into {target_lang}.\n\n{text}"


def inscp(template: ChatTemplate, text: str) -> Sample:
    """Text -> the assistant turn after an empty user turn, no system prompt; loss on all tokens.

    default_system=False keeps out the system prompt that some templates (ChatML/SmolLM2) add by
    default: InsCP's wrapper has none, so the model learns the text as a plain answer.
    """
    ids, _ = template.render_with_mask([{"role": "user", "content": ""},
                                        {"role": "assistant", "content": text}],
                                       default_system=False)
    # Loss on all tokens, the template's own included (the paper): the first token is never a
    # target anyway, since nothing precedes it.
    return ids, [True] * len(ids)


def orgcp(tokenizer, text: str) -> Sample:
    """Plain text + EOS (BOS first when the tokenizer adds one); loss on all tokens."""
    # add_bos: LLaMA-2/3 plain text starts with BOS; SmolLM2's does not (its bos is <|im_start|>).
    ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=True)
    return ids, [True] * len(ids)


def sft(template: ChatTemplate, messages: list[dict]) -> Sample:
    """Conversation -> template ids; loss on the assistant's tokens (and end-of-turn) only.
    The template's default system prompt is used when the conversation brings none."""
    return template.render_with_mask(messages)


def tcot(template: ChatTemplate, query: str, en_query: str, en_answer: str, answer: str,
         tag: str = "TH") -> Sample:
    """TransLLM TCOT sample: user = target-language query; assistant =
    `<EN> {en_query} <RESPONSE> {en_answer} <TAG> {answer}` (<TAG>: tcot_tags(tag)); loss on the
    assistant turn only."""
    tags = tcot_tags(tag)
    en, response, target = tags
    thought = f"{en} {en_query.strip()} {response} {en_answer.strip()} {target} {answer.strip()}"
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": thought}]
    return template.render_with_mask(messages, tags=tags)


def recovery(template: ChatTemplate, messages: list[dict]) -> Sample:
    """TransLLM recovery-KD sample: the conversation's last answer (the frozen chat model's own)
    trained as `<RESPONSE> {answer}`; loss on that answer only."""
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    tag = tcot_tags()[1]  # <RESPONSE>
    answer = messages[-1]["content"].strip()
    messages = list(messages[:-1]) + [{"role": "assistant", "content": f"{tag} {answer}"}]
    return template.render_with_mask(messages, tags=(tag,))


def translation(template: ChatTemplate, text: str, translated: str, source_lang: str = "English",
                target_lang: str = "Thai", prompt: str = TRANSLATE_PROMPT) -> Sample:
    """Translation SFT sample: user asks to translate `text`; answer = `translated`."""
    user = prompt.format(source_lang=source_lang, target_lang=target_lang, text=text.strip())
    return sft(template, [{"role": "user", "content": user}, {"role": "assistant", "content": translated}])


def conversation_texts(messages: list[dict]) -> list[str]:
    """The user and assistant contents of a conversation, each its own text (InsCP and orgCP
    train questions and answers as separate samples; a system prompt is not data)."""
    return [m["content"].strip() for m in messages if m["role"] != "system" and m["content"].strip()]


TEXT_FORMATS = ("inscp", "orgcp")
CHAT_FORMATS = ("sft", "tcot", "recovery", "translation")
FORMATS = TEXT_FORMATS + CHAT_FORMATS


def format_records(records: Iterable, fmt: str, tokenizer, template: ChatTemplate | None = None,
                   **options) -> Iterator[Sample]:
    """Records -> samples in format `fmt`.

    records: for inscp/orgcp, texts (str) or conversations (each turn becomes its own sample);
    sft and recovery: conversations; tcot: dicts {query, en_query, en_answer, answer};
    translation: dicts {source, target}. options go to the format function (tags, languages...).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "orgcp" and template is None:
        raise ValueError(f"format {fmt!r} needs a chat template")
    for record in records:
        if fmt in TEXT_FORMATS:
            for text in [record] if isinstance(record, str) else conversation_texts(record):
                yield inscp(template, text) if fmt == "inscp" else orgcp(tokenizer, text)
        elif fmt == "sft":
            yield sft(template, record)
        elif fmt == "recovery":
            yield recovery(template, record, **options)
        elif fmt == "tcot":
            yield tcot(template, record["query"], record["en_query"], record["en_answer"], record["answer"],
                       **options)
        else:
            yield translation(template, record["source"], record["target"], **options)
