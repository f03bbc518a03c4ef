"""TransLLM inference: translation chain-of-thought (TCOT).

Given a Thai question the trained model writes `<EN> {English question} <RESPONSE> {English
answer} <TH> {Thai answer}`; the user sees only the text after `<TH>`. Greedy decoding. `<TH>` is
the target-language tag of the run (`--tag TH`, tcot_tags): the same tokens as the vocabulary
extension added and the TCOT samples trained, passed here as `tags=tcot_tags(tag)`.

Two details from the paper's code:
- when the output misses a tag (the model stopped, or ran out of tokens, before `<RESPONSE>` or
  `<TH>`), the tag is appended and generation continues from there, so an answer always comes;
- a second turn is rebuilt from the first turn's ENGLISH exchange: the context is
  [user: English query, assistant: <RESPONSE> English answer] + the new Thai question. The model
  thinks in English across turns, as it was trained to (recovery samples use this very form).
"""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from model.chat import ChatTemplate
from model.generate import Sampling
from model.runner import Runner


def tag_problem(tag: str) -> str | None:
    """Why `tag` cannot be a target-language tag, or None (a flag rule: data.flags)."""
    return None if tag and tag.isascii() and tag.isalnum() else "a target-language tag is letters/digits, e.g. TH or ZH"


def tcot_tags(tag: str = "TH") -> tuple[str, str, str]:
    """The TransLLM special tokens for a target-language tag: ('<EN>', '<RESPONSE>', '<TAG>').
    The one definition: vocabulary extension (model/vocab.py) adds them, the formats
    (data/formats.tcot, recovery) train them, inference (below) reads them."""
    problem = tag_problem(tag)
    if problem:
        raise ValueError(f"--tag {tag!r}: {problem}")
    return ("<EN>", "<RESPONSE>", f"<{tag}>")


def missing_tags(tokenizer, tags) -> list[str]:
    """The tags that are not one special token of the tokenizer (a model that never went through
    TransLLM stage 0 with this --tag): TCOT on it would read the tag as plain text."""
    special = getattr(tokenizer, "special_tokens", None) or {}
    return [t for t in tags if t not in special]


TAGS = tcot_tags("TH")
Generate = Callable[[list[int]], list[int]]  # prompt ids -> new ids (stop token excluded)


def _tag_ids(tokenizer, tag: str) -> list[int]:
    tid = (getattr(tokenizer, "special_tokens", None) or {}).get(tag)
    return [tid] if tid is not None else tokenizer.encode(tag)


def render_with_tags(template: ChatTemplate, messages: list[dict], tags=TAGS) -> list[int]:
    """Messages -> prompt ids ending with the assistant header; tag strings inside ASSISTANT
    contents become their special ids (user text is never parsed, so it cannot forge a tag)."""
    return template.render(messages, add_generation_prompt=True, tags=tuple(tags))


def context_messages(history: list[dict] | None, question: str, response_tag: str = "<RESPONSE>") -> list[dict]:
    """The conversation fed to the model: every earlier turn as its English exchange, then the
    new target-language question."""
    messages = []
    for turn in history or []:
        messages += [{"role": "user", "content": turn["en_query"]},
                     {"role": "assistant", "content": f"{response_tag} {turn['en_answer']}"}]
    return messages + [{"role": "user", "content": question}]


def split_tcot(text: str, tags=TAGS) -> dict:
    """'<EN> q <RESPONSE> a <TH> t' -> {en_query, en_answer, answer} (missing parts: '')."""
    en, response, target = tags

    def between(start: str, end: str | None) -> str:
        if start not in text:
            return ""
        rest = text.split(start, 1)[1]
        return (rest.split(end, 1)[0] if end and end in rest else rest).strip()
    return {"en_query": between(en, response), "en_answer": between(response, target), "answer": between(target, None)}


def greedy_generator(model, template: ChatTemplate, max_new_tokens: int = 256, compile: bool = False) -> Generate:
    """Greedy generation through model.runner.Runner (stops at the template's end-of-turn ids;
    a prompt too long for the context keeps its newest tokens; compile: the compiled one-token step)."""
    runner = Runner(model, template.tokenizer, template, Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
                    batch_size=1, compile=compile)
    return lambda prompt: runner.complete([prompt])[0]


def generate_tcot(model, tokenizer, template: ChatTemplate, question: str, history: list[dict] | None = None,
                  max_new_tokens: int = 256, tags=TAGS, generate_fn: Generate | None = None) -> dict:
    """One TCOT turn -> {answer (text after <TH>), en_query, en_answer, raw (decoded output, tags
    included), question, appended (tags the model missed and we appended)}.

    history: earlier results of this function (their en_query / en_answer rebuild the context).
    generate_fn: prompt ids -> new ids; default greedy_generator(model, template, max_new_tokens).
    """
    gen = generate_fn or greedy_generator(model, template, max_new_tokens)
    en, response, target = tags
    prompt = render_with_tags(template, context_messages(history, question, response), tags)
    out: list[int] = []
    appended: list[str] = []
    for _ in range(3):  # at most: first pass, + <RESPONSE>, + <TH>
        out += gen(prompt + out)
        text = tokenizer.decode(out)
        if target in text:
            break
        missing = response if response not in text else target
        appended.append(missing)
        out += _tag_ids(tokenizer, missing)
    raw = tokenizer.decode(out).rstrip("\ufffd")
    return {"question": question, "raw": raw, "appended": appended, **split_tcot(raw, tags)}


class TCOTChat:
    """A multi-turn TCOT conversation for scripts/chat.py --tcot: call with a Thai message, get
    the Thai answer; the English exchanges are kept as the context of later turns."""

    def __init__(self, model, tokenizer, template: ChatTemplate, max_new_tokens: int = 256,
                 generate_fn: Generate | None = None, show_thoughts: bool = False, write=print, tags=TAGS,
                 compile: bool = False):
        self.model, self.tokenizer, self.template, self.tags = model, tokenizer, template, tuple(tags)
        self.generate_fn = generate_fn or greedy_generator(model, template, max_new_tokens, compile)
        self.show_thoughts, self.write = show_thoughts, write
        self.history: list[dict] = []

    def __call__(self, question: str) -> str:
        turn = generate_tcot(self.model, self.tokenizer, self.template, question, self.history,
                             tags=self.tags, generate_fn=self.generate_fn)
        self.history.append(turn)
        if self.show_thoughts:
            self.write(f"[EN query] {turn['en_query']}\n[EN answer] {turn['en_answer']}")
        return turn["answer"]

    def reset(self) -> None:
        self.history = []


class TCOTRunner:
    """eval's runner interface (`answer(conversations) -> [answer]`, as eval.common.ChatRunner)
    for a TransLLM model: the last user turn of each conversation is answered by generate_tcot,
    one conversation at a time, and earlier turns are rebuilt from their ENGLISH exchange.

    Earlier turns must be answers this runner gave (MT-bench asks turn 2 with the turn-1 answer
    in the context): it remembers each turn by (question, answer) and looks the exchange up.
    `thoughts(question, answer)` -> {en_query, en_answer} of such a turn, for the answer records.
    """

    def __init__(self, model, tokenizer, template: ChatTemplate, max_new_tokens: int = 256,
                 generate_fn: Generate | None = None, tags=TAGS, compile: bool = False):
        self.model, self.tokenizer, self.template, self.tags = model, tokenizer, template, tuple(tags)
        self.generate_fn = generate_fn or greedy_generator(model, template, max_new_tokens, compile)
        self.turns: dict[tuple[str, str], dict] = {}
        self.truncated = 0  # ChatRunner's counter; generate_tcot keeps the newest tokens itself

    def answer(self, conversations: list[list[dict]], desc: str | None = "tcot") -> list[str]:
        answers = []
        for messages in tqdm(conversations, desc=desc, disable=desc is None, leave=False):
            *earlier, last = messages
            history = [self._turn(q["content"], a["content"]) for q, a in zip(earlier[0::2], earlier[1::2])]
            turn = generate_tcot(self.model, self.tokenizer, self.template, last["content"], history,
                                 tags=self.tags, generate_fn=self.generate_fn)
            self.turns[(turn["question"], turn["answer"])] = turn
            answers.append(turn["answer"])
        return answers

    def thoughts(self, question: str, answer: str) -> dict:
        turn = self._turn(question, answer)
        return {"en_query": turn["en_query"], "en_answer": turn["en_answer"]}

    def _turn(self, question: str, answer: str) -> dict:
        try:
            return self.turns[(question, answer)]
        except KeyError:
            raise ValueError(f"TCOTRunner: the earlier turn {question[:40]!r} was not answered by this runner, so "
                             "its English exchange is unknown") from None
