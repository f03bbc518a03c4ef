"""scripts/chat.py as a user meets it: bad flags refused in one line before the model loads, a
conversation longer than the context trimmed instead of lost, Ctrl-C and Ctrl-D ending cleanly.

The model is a tiny random Llama saved in HF form with the real TinyStories tokenizer (a 2048-token
BPE) and driven with --template llama2 (TinyStories stores no chat template). Its EOS row of the
output layer is zero, so EOS (logit 0) never beats the best of 2047 random logits: every answer
uses its whole budget, which makes token counts predictable and generation long enough to be
interrupted."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import assets
from model.checkpoint import load_tokenizer_only, save
from model.config import preset
from model.llama import Llama
from scripts import chat
from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"short": folder of a 128-token-context model, "long": the same weights, 4096 tokens}."""
    tok = load_tokenizer_only(need(assets.tinystories_dir))
    model = Llama(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=4096, tie_embeddings=False))
    model.init_weights(std=0.2, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0.0
    root = tmp_path_factory.mktemp("chat_models")
    folders = {"long": save(model, tok, root / "long")}
    model.config.max_seq_len = 128
    folders["short"] = save(model, tok, root / "short")
    return folders


def run_main(monkeypatch, capsys, argv, stdin=""):
    """main(argv) with `stdin` as the typed input -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = chat.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flags,named", [
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be >= 0"),
    (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["--tcot", "--temperature", "0.7"], "--temperature: --tcot decodes greedily"),
    (["--device", "cuda:x"], "--device 'cuda:x': not a torch device"),
])
def test_bad_flags_are_refused_in_one_line_before_loading(monkeypatch, capsys, flags, named):
    monkeypatch.setattr(chat, "load", lambda *a, **k: pytest.fail("the model was loaded before the flags were checked"))
    with pytest.raises(SystemExit) as exit_:
        chat.main(flags + ["--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and named in err, err


def test_budget_larger_than_half_the_context_and_missing_template(monkeypatch, capsys, models):
    code, _, err = run_main(monkeypatch, capsys, ["--model", str(models["short"]), "--template", "llama2",
                                                  "--max-new-tokens", "100", "--prompt", "hi"])
    assert code == 2 and err == ("chat.py: error: --max-new-tokens 100: must be 1..64 (half the model's "
                                 "context of 128 tokens)\n")
    code, _, err = run_main(monkeypatch, capsys, ["--model", str(models["short"]), "--prompt", "hi"])
    assert code == 2 and err.startswith("chat.py: error: --template: ") and "no stored chat_template" in err
    assert err.count("\n") == 1


def test_a_long_conversation_drops_its_oldest_turns_and_goes_on(monkeypatch, capsys, models):
    # each message is ~20 tokens + 16 answer tokens per exchange: the 128-token context holds
    # two or three exchanges, so six messages need trimming; a 300-word message never fits.
    messages = [f"Tell me story number {i} about a cat and a dog in the park." for i in range(6)]
    too_long = " ".join(["word"] * 300)
    stdin = "\n".join(messages[:3] + [too_long] + messages[3:]) + "\n"
    code, out, err = run_main(monkeypatch, capsys, ["--model", str(models["short"]), "--template", "llama2",
                                                    "--max-new-tokens", "16"], stdin)
    assert code == 0 and "Traceback" not in out + err
    assert out.count("assistant> ") == 6                         # every message that fits is answered
    assert err.count("[note] the conversation outgrew the model's context of 128 tokens") == 1
    refusal = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1 and "this message is" in refusal[0] and "leaves 112: shorten it" in refusal[0]


def test_session_keeps_what_fits_and_the_newest_turns(models):
    from model.checkpoint import load
    from model.chat import get_template
    model, tok = load(models["short"])
    args = chat.parse_args(["--template", "llama2", "--max-new-tokens", "16"])
    session = chat.Session(model, tok, get_template(tok, "llama2"), args, write=lambda *a, **k: None,
                           note=lambda text: None)
    for i in range(6):
        session.answer(f"Message {i} about the cat.")
        assert session.runner.truncated == 0                   # every prompt fitted whole ...
        assert session.messages[-2]["content"] == f"Message {i} about the cat."   # ... with the newest turn
    assert session.trim_noted and len(session.messages) < 12
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * (len(session.messages) // 2)


def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(models):
    from model.checkpoint import load
    from model.chat import get_template
    model, tok = load(models["long"])
    args = chat.parse_args(["--template", "llama2", "--max-new-tokens", "64"])
    shown = []
    presses = iter([False, False, True])                        # Ctrl-C as the third piece is shown

    def write(*parts, end="\n", flush=False):
        shown.append("".join(map(str, parts)) + end)
        if parts and parts[0] not in ("assistant> ", "\n[stopped]") and next(presses, False):
            raise KeyboardInterrupt
    session = chat.Session(model, tok, get_template(tok, "llama2"), args, write=write)
    partial = session.answer("Tell me a story.")
    assert "\n[stopped]\n" in shown and partial
    assert session.messages == [{"role": "user", "content": "Tell me a story."},
                                {"role": "assistant", "content": partial}]
    full = session.answer("And another one.")                  # the next answer runs to its budget
    assert len(session.messages) == 4 and session.messages[-1]["content"] == full


def test_ctrl_c_and_ctrl_d_at_the_prompt_end_cleanly(monkeypatch, capsys, models):
    argv = ["--model", str(models["short"]), "--template", "llama2", "--max-new-tokens", "4"]
    code, out, err = run_main(monkeypatch, capsys, argv, "hello\n")        # then end of input: Ctrl-D
    assert code == 0 and out.count("assistant> ") == 1 and "Traceback" not in err

    def ctrl_c(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", ctrl_c)
    code, out, err = run_main(monkeypatch, capsys, argv)
    assert code == 0 and err == ""


def test_sigint_during_generation_in_a_real_process(models):
    """The real thing: SIGINT while tokens stream stops that answer and returns to the prompt;
    end of input then ends the session with exit code 0 and no traceback."""
    cmd = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--model", str(models["long"]),
           "--template", "llama2", "--max-new-tokens", "2048"]
    # Python turns SIGINT into KeyboardInterrupt only when it starts with the default handler
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"Tell me a very long story.\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.time() + 120
        while seen.count(b"assistant> ") < 1 or len(seen.split(b"assistant> ", 1)[1]) < 10:
            assert time.time() < deadline, seen
            seen += os.read(proc.stdout.fileno(), 64)        # tokens are streaming now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"", timeout=120)           # then end of input (Ctrl-D)
    finally:
        proc.kill()
    text = (seen + out).decode()
    assert proc.returncode == 0, err.decode()
    assert "[stopped]" in text and text.rstrip().endswith("user>")   # back at the prompt, then ended
    assert "Traceback" not in err.decode()


def test_quantize_int8_and_compile_reach_the_loaded_model_and_the_decoder(monkeypatch, capsys, models):
    """--quantize int8 loads int8 linear layers (the answer is the int8 model's greedy answer, not
    the fp32 one's); --compile reaches the Runner (compiled decoding itself: test_decode_compile)."""
    from model.quantize import Int8Linear, quantize_int8
    from model.runner import Runner, Sampling
    argv = ["--model", str(models["short"]), "--template", "llama2", "--max-new-tokens", "6", "--quantize", "int8"]
    args = chat.parse_args(argv + ["--compile"])
    model, tokenizer, template = chat.setup(args, args.model)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert chat.Session(model, tokenizer, template, args).runner.compile is True

    reference, _, _ = chat.setup(chat.parse_args(argv[:-2]), args.model)
    assert not any(isinstance(m, Int8Linear) for m in reference.modules())
    want = Runner(quantize_int8(reference), tokenizer, template, Sampling(max_new_tokens=6)).answer(
        [[{"role": "user", "content": "hi"}]])[0]
    code, out, _ = run_main(monkeypatch, capsys, argv + ["--prompt", "hi"])
    assert want.strip() and code == 0 and want in out
