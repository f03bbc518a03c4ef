"""Chat with a model: an interactive REPL that streams tokens, or one answer with --prompt.

    python scripts/chat.py                                  # SmolLM2-135M-Instruct (GGUF), REPL
    python scripts/chat.py --model runs/inscp/final --prompt "你好，請介紹台北。"
    python scripts/chat.py --model runs/transllm/stage3/final --tcot --prompt "..."   # TransLLM TCOT (--tag TH)

Every flag is checked before the model is loaded (one line naming the flag and what it allows,
exit 2). In the REPL a conversation that outgrows the model's context drops its oldest turns
(said once); a message too long on its own is refused and the conversation goes on. Ctrl-C
while the model answers stops that answer (what was shown stays in the conversation); Ctrl-C or
Ctrl-D at the prompt, or an empty line, ends the session.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data.flags import Flags, flag, parse
from eval.common import device_problem, first_problem
from model import assets
from model.chat import TEMPLATES, get_template
from model.checkpoint import load
from model.generate import Sampling
from model.runner import Runner
from model.tcot import TCOTChat, context_messages, missing_tags, render_with_tags, tag_problem, tcot_tags

PROG = "chat.py"
SAMPLING_FLAGS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}  # the greedy defaults


@dataclass
class ChatArgs(Flags):
    """Chat with a model (REPL, or one answer with --prompt)."""
    model: str | None = flag(None, "HF folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    prompt: str | None = flag(None, "answer this one message and exit")
    system: str | None = flag(None, "system prompt (default: the model's own, if its template has one)")
    template: str | None = flag(None, "chat template (default: recognised from the stored one)", choices=TEMPLATES)
    max_new_tokens: int = flag(256, "answer budget: 1 .. half the model's context")
    temperature: float = flag(0.0, ">= 0; 0 = greedy")
    top_k: int = flag(0, ">= 0; 0 = all tokens")
    top_p: float = flag(1.0, "in (0, 1]; 1 = all tokens")
    repetition_penalty: float = flag(1.0, "> 0; 1 = none")
    seed: int = flag(0, "sampling seed")
    tcot: bool = flag(False, "TransLLM model: it thinks <EN> query <RESPONSE> answer <TAG> ...; show the English "
                             "thoughts and answer with the text after <TAG> (greedy, no streaming)")
    tag: str = flag("TH", "--tcot: the target-language tag the model was trained with (train/transllm.py --tag); "
                          "<TAG> must be a special token of its tokenizer", rule=tag_problem)
    dtype: str = flag("float32", "weights dtype", choices=("float32", "bfloat16", "float16"))
    quantize: str | None = flag(None, "int8: int8 weight-only linear layers (model/quantize.py; ~4x less to read "
                                      "per token); int4: groups of 32 as GGUF Q4_1 (model/quantize_int4.py; CPU)",
                                choices=("int8", "int4"))
    compile: bool = flag(False, "decode with the compiled one-token step (the first answer pays the compile)")
    device: str = flag(factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", help="torch device")

    def problems(self) -> list[str]:
        problem = flag_problem(self)
        return super().problems() or ([problem] if problem else [])


def parse_args(argv=None) -> ChatArgs:
    return parse(ChatArgs, argv, prog=PROG, description=__doc__)


def flag_problem(args) -> str | None:
    """The first bad flag as one line naming it and its allowed values, or None."""
    checks = [
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (math.isfinite(args.temperature) and args.temperature >= 0,
         f"--temperature {args.temperature}: must be >= 0 (0 = greedy)"),
        (args.top_k >= 0, f"--top-k {args.top_k}: must be >= 0 (0 = all tokens)"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1] (1 = all tokens)"),
        (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0,
         f"--repetition-penalty {args.repetition_penalty}: must be > 0 (1 = none)"),
        (args.model is None or Path(args.model).exists(), f"--model {args.model}: no such file or folder"),
        (args.tcot or args.tag == "TH", f"--tag {args.tag}: applies to --tcot only"),
    ]
    if args.tcot:  # TCOT decodes greedily: a sampling flag would be ignored without a word
        checks += [(getattr(args, k) == v, f"--{k.replace('_', '-')}: --tcot decodes greedily; drop the flag")
                   for k, v in SAMPLING_FLAGS.items()]
    return first_problem(checks) or device_problem(args.device)


class Fail(Exception):
    """A problem the user can fix, said in one line."""


def setup(args, path):
    """Load the model and template; -> (model, tokenizer, template). Fail names what is wrong."""
    try:
        model, tokenizer = load(path, dtype=getattr(torch, args.dtype), device=args.device, quantize=args.quantize)
    except (OSError, ValueError, KeyError) as err:
        raise Fail(f"--model {path}: {err}") from None
    try:
        template = get_template(tokenizer, args.template, system=args.system)
    except ValueError as err:
        raise Fail(f"--template: {err}") from None
    missing = missing_tags(tokenizer, tcot_tags(args.tag)) if args.tcot else []
    if missing:
        raise Fail(f"--tag {args.tag}: {' '.join(missing)} is not a special token of the tokenizer of {path} "
                   "(TCOT needs the tags its TransLLM run added: train/transllm.py --tag)")
    half = model.config.max_seq_len // 2
    if args.max_new_tokens > half:
        raise Fail(f"--max-new-tokens {args.max_new_tokens}: must be 1..{half} "
                   f"(half the model's context of {model.config.max_seq_len} tokens)")
    return model, tokenizer, template


class Session:
    """One conversation: its messages, fitted to the context before every answer."""

    def __init__(self, model, tokenizer, template, args, write=print, note=None):
        self.args, self.write = args, write
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))
        self.context = model.config.max_seq_len
        self.room = self.context - args.max_new_tokens       # tokens the prompt may use
        self.runner = Runner(model, tokenizer, template, Sampling(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed), compile=args.compile)
        self.bot = TCOTChat(model, tokenizer, template, max_new_tokens=args.max_new_tokens, show_thoughts=True,
                            write=write, tags=tcot_tags(args.tag), compile=args.compile) if args.tcot else None
        self.messages: list[dict] = []
        self.trim_noted = False

    def reset(self) -> None:
        self.messages = []
        if self.bot:
            self.bot.reset()

    def _turns(self) -> list:
        """The earlier turns that trimming drops from: TCOT's turn records or our messages."""
        return self.bot.history if self.bot else self.messages

    def _length(self, text: str, turns: list) -> int:
        """Prompt tokens of `turns` followed by a new user message `text`."""
        if self.bot:
            return len(render_with_tags(self.runner.template, context_messages(turns, text), self.bot.tags))
        return len(self.runner.render(turns + [{"role": "user", "content": text}]))

    def fit(self, text: str) -> None:
        """Drop the oldest turns until the conversation and `text` leave room for the answer.
        Fail (the conversation untouched) when `text` alone does not fit."""
        alone = self._length(text, [])
        if alone > self.room:
            raise Fail(f"this message is {alone} tokens with the template; with --max-new-tokens "
                       f"{self.args.max_new_tokens} the model's context of {self.context} tokens leaves "
                       f"{self.room}: shorten it")
        turns = self._turns()
        while self._length(text, turns) > self.room:
            del turns[:1 if self.bot else 2]                   # the oldest exchange: user + assistant
            if not self.trim_noted:
                self.note(f"[note] the conversation outgrew the model's context of {self.context} tokens: "
                          "its oldest turns are dropped from now on")
                self.trim_noted = True

    def answer(self, text: str) -> str:
        """Answer one user message (streamed unless TCOT) and keep the exchange. Ctrl-C stops
        the answer: what was shown so far is kept as the answer."""
        self.fit(text)
        if self.bot:  # TCOT: the English thoughts are shown first, then the answer
            try:
                answer = self.bot(text)
            except KeyboardInterrupt:
                self.write("[stopped]")
                return ""
            self.write(f"assistant> {answer}")
            return answer
        self.write("assistant> ", end="", flush=True)
        shown: list[str] = []

        def stream(piece: str) -> None:
            shown.append(piece)
            self.write(piece, end="", flush=True)
        self.messages.append({"role": "user", "content": text})
        try:
            answer = self.runner.stream(self.messages, stream).text
            self.write()
        except KeyboardInterrupt:
            answer = "".join(shown).strip()
            self.write("\n[stopped]")
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        else:  # nothing was said: forget the question too, so turns keep alternating
            self.messages.pop()
        return answer


def repl(session: Session, banner: str) -> None:
    print(banner)
    while True:
        try:
            text = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            return
        if text == "/reset":
            session.reset()
            continue
        try:
            session.answer(text)
        except Fail as err:
            print(f"error: {err}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        try:
            path = args.model or assets.smollm2_gguf()
        except FileNotFoundError as err:
            raise Fail(f"--model not given and the default is missing: {err}") from None
        model, tokenizer, template = setup(args, path)
        session = Session(model, tokenizer, template, args)
        if args.prompt is not None:
            print(f"user> {args.prompt}")
            session.answer(args.prompt)
            return 0
        repl(session, f"Chatting with {path} ({template.name} template). "
                      "Empty line, Ctrl-D or Ctrl-C to quit, /reset to restart.")
        return 0
    except Fail as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
