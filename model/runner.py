"""Runner: the one way to answer prompts with a chat model.

Every caller that turns conversations (or prompt ids) into answers goes through it: evaluation,
recovery-KD generation, TCOT inference, self-translation and the chat REPL. What it owns, once:

- the pad id (the tokenizer's pad, else its EOS, else 0: any id works, padded keys are masked);
- the stop ids (the template's end-of-turn ids, `None` dropped), unless Sampling names its own;
- prompt truncation: a prompt longer than the context minus the answer budget keeps its newest
  tokens (counted in `truncated`);
- batching: prompts sorted by length so a batch wastes little on left padding (padding is
  masked, so sorting never changes an answer);
- decoding: an answer cut by the budget can end inside a UTF-8 character; the partial U+FFFD
  is dropped.

    runner = Runner(model, tokenizer, template, Sampling(max_new_tokens=128), batch_size=8)
    runner.answer([[{"role": "user", "content": "Hi"}]])      -> ["Hello! How can I help?"]
    runner.results(conversations)                               -> [Answer(text, ids, stopped)]
    runner.complete([prompt_ids])                               -> [new ids]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from model.chat import ChatTemplate, get_template
from model.generate import Sampling, Streamer, generate


@dataclass
class Answer:
    """One generated answer. ids: the new token ids, stop token excluded; stopped: the model
    ended its turn (emitted a stop id) within the budget; prompt_truncated: the prompt lost its
    oldest tokens to fit the context."""
    text: str
    ids: list[int]
    stopped: bool
    prompt_truncated: bool = False


def pad_id_of(tokenizer) -> int:
    """The id used for left padding: pad, else EOS, else 0 (its value never matters: masked)."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def stop_ids_of(template: ChatTemplate | None, tokenizer) -> list[int]:
    """The ids that end an assistant turn: the template's, else the tokenizer's EOS."""
    ids = list(template.stop_ids) if template is not None else [getattr(tokenizer, "eos_id", None)]
    return list(dict.fromkeys(i for i in ids if i is not None))


class Runner:
    """Answers conversations (or continues prompt ids) with `model`, batched.

    template: a ChatTemplate (default: the tokenizer's own, see model.chat.get_template).
    sampling: max_new_tokens, temperature... (default greedy, 256 tokens); its stop_ids None means
    the template's stop ids. max_new_tokens is capped at half the model's context, so that a long
    prompt still keeps the other half.
    postprocess(str) -> str is applied to every decoded answer (e.g. TransLLM's text after <TH>).
    compile: decode with the compiled one-token step (model.generate.generate(compile=True)).
    """

    def __init__(self, model, tokenizer, template: ChatTemplate | None = None, sampling: Sampling | None = None,
                 batch_size: int = 8, postprocess: Callable[[str], str] | None = None, compile: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.template = template if template is not None else get_template(tokenizer)
        sampling = sampling or Sampling()
        context = model.config.max_seq_len
        stops = sampling.stop_ids if sampling.stop_ids is not None else stop_ids_of(self.template, tokenizer)
        self.sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, context // 2),
                                            stop_ids=stops)
        self.batch_size = batch_size
        self.pad_id = pad_id_of(tokenizer)
        self.postprocess = postprocess or (lambda s: s)
        self.truncated = 0  # prompts that lost their oldest tokens to fit the context
        self.compile = compile

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    # ---- prompts ---------------------------------------------------------------------------
    def render(self, messages: list[dict], tags: tuple[str, ...] = ()) -> list[int]:
        """A conversation -> prompt ids ending with the assistant header (tags: see ChatTemplate)."""
        return self.template.render(messages, add_generation_prompt=True, tags=tags)

    def fit(self, prompt: list[int]) -> tuple[list[int], bool]:
        """Keep the newest tokens of a prompt that leaves no room for the answer -> (ids, cut)."""
        room = self.model.config.max_seq_len - self.max_new_tokens
        if len(prompt) <= room:
            return prompt, False
        self.truncated += 1
        return prompt[-room:], True

    # ---- generation ------------------------------------------------------------------------
    def complete(self, prompts: list[list[int]], desc: str | None = None) -> list[list[int]]:
        """Prompt ids -> new ids per prompt (stop token excluded), in the prompts' order."""
        return [a.ids for a in self._run(prompts, desc)]

    def results(self, conversations: list[list[dict]], desc: str | None = None,
                tags: tuple[str, ...] = ()) -> list[Answer]:
        """Conversations -> one Answer each (text decoded and post-processed)."""
        return self._run([self.render(c, tags) for c in conversations], desc)

    def answer(self, conversations: list[list[dict]], desc: str | None = None) -> list[str]:
        """Conversations -> answer strings."""
        return [a.text for a in self.results(conversations, desc)]

    def ask(self, prompts: list[str], desc: str | None = None) -> list[str]:
        """Single-turn convenience: one user message each."""
        return self.answer([[{"role": "user", "content": p}] for p in prompts], desc)

    def stream(self, messages: list[dict], write: Callable[[str], None]) -> Answer:
        """Answer one conversation, writing its text as it grows (the chat REPL)."""
        prompt, cut = self.fit(self.render(messages))
        ids = generate(self.model, [prompt], self.sampling, on_token=Streamer(self.tokenizer, write),
                       pad_id=self.pad_id, compile=self.compile)[0]
        return self._answer(ids, cut)

    def _run(self, prompts: list[list[int]], desc: str | None) -> list[Answer]:
        fitted = [self.fit(p) for p in prompts]
        out: list[Answer | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(fitted[i][0]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            new = generate(self.model, [fitted[i][0] for i in batch], self.sampling, pad_id=self.pad_id,
                           compile=self.compile)
            for i, ids in zip(batch, new):
                out[i] = self._answer(ids, fitted[i][1])
        return out  # type: ignore[return-value]

    def _answer(self, ids: list[int], cut: bool) -> Answer:
        # generate() drops the stop token, so an answer shorter than the budget ended with one.
        stopped = len(ids) < self.max_new_tokens
        text = self.postprocess(self.tokenizer.decode(ids).rstrip("\ufffd")).strip()
        return Answer(text, ids, stopped, cut)
