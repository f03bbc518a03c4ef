"""Chat with a model: an interactive REPL that streams tokens, or one answer with --prompt.

    python scripts/chat.py                                  # SmolLM2-135M-Instruct (GGUF), REPL
    python scripts/chat.py --model runs/inscp/final --prompt "你好，請介紹台北。"
    python scripts/chat.py --model runs/transllm/stage3/final --tcot --prompt "..."   # TransLLM TCOT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from model import assets  # noqa: E402
from model.chat import TEMPLATES, get_template  # noqa: E402
from model.checkpoint import load  # noqa: E402
from model.generate import Sampling, Streamer, generate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt (default: the model's own, if its template has one)")
    p.add_argument("--template", choices=list(TEMPLATES), help="default: recognised from the stored chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tcot", action="store_true",
                   help="TransLLM model: it thinks <EN> query <RESPONSE> answer <TH> ...; show the English "
                        "thoughts and answer with the text after <TH> (greedy, no streaming)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def reply(model, tokenizer, template, messages, sampling) -> str:
    """Stream the assistant's answer to stdout and return it."""
    ids = template.render(messages, add_generation_prompt=True)
    streamer = Streamer(tokenizer, lambda text: print(text, end="", flush=True))
    out = generate(model, [ids], sampling, on_token=streamer)[0]
    print()
    return tokenizer.decode(out)


def main(argv=None):
    args = parse_args(argv)
    path = args.model or assets.smollm2_gguf()
    model, tokenizer = load(path, dtype=getattr(torch, args.dtype), device=args.device)
    template = get_template(tokenizer, args.template, system=args.system)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                        stop_ids=template.stop_ids, seed=args.seed)
    bot = None
    if args.tcot:
        from model.tcot import TCOTChat
        bot = TCOTChat(model, tokenizer, template, max_new_tokens=args.max_new_tokens, show_thoughts=True)
    messages: list[dict] = []
    if args.prompt is not None:
        print(f"user> {args.prompt}\nassistant> ", end="", flush=True)
        if bot:
            print(bot(args.prompt))
            return
        reply(model, tokenizer, template, [{"role": "user", "content": args.prompt}], sampling)
        return
    print(f"Chatting with {path} ({template.name} template). Empty line or Ctrl-D to quit, /reset to restart.")
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            messages = []
            if bot:
                bot.reset()
            continue
        if bot:
            print(f"assistant> {bot(text)}")
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(model, tokenizer, template, messages, sampling)})


if __name__ == "__main__":
    main()
