"""data/flags.py, the one flag dialect: flags made from dataclass fields (hyphens, the underscore
spelling accepted), bools --x / --no-x, lists, dotted flags of nested dataclasses (TransLLM's
--stage3.lr), help and checks written once per field, subclass defaults without redeclaring, one
line per problem; and the entry points that use it."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from data.flags import Flags, at_least, build_parser, flag, parse, positive


@dataclass
class Inner:
    size: int | None = flag(None, "block size (not given: the outer one)", rule=at_least(2))
    lr: float = flag(1e-3, "inner learning rate", rule=positive)


@dataclass
class Toy(Flags):
    """A toy command line."""
    max_new_tokens: int = flag(16, "the answer budget", rule=at_least(1))
    sample: bool = flag(False, "draw instead of taking the argmax")
    keep_going: bool = flag(True, "continue after an error")
    data: list[str] = flag([], "input files")
    mode: str = flag("fast", "how to run", choices=("fast", "exact"))
    lr: float = flag(0.5, "the step size", rule=positive)
    inner: Inner = flag(Inner(lr=1e-4), "the inner stage")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.sample and self.mode == "exact":
            out.append("--sample: an exact run does not sample")
        return out


@dataclass
class ToyChild(Toy):
    defaults = {"max_new_tokens": 64, "data": ["a.txt"]}


def one_error(capsys, argv, cls=Toy, prog=None) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(cls, argv, prog=prog)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_hyphen_and_underscore_spellings_are_the_same_flag():
    assert parse(Toy, ["--max-new-tokens", "5"]).max_new_tokens == 5
    assert parse(Toy, ["--max_new_tokens", "5"]).max_new_tokens == 5
    assert parse(Toy, ["--max_new_tokens=7"]).max_new_tokens == 7
    assert parse(Toy, []) == Toy()  # nothing given: the dataclass defaults


def test_bools_lists_choices_and_negative_numbers(capsys):
    cfg = parse(Toy, ["--sample", "--no-keep-going", "--data", "a.txt", "b.txt", "--data", "c.txt"])
    assert (cfg.sample, cfg.keep_going, cfg.data) == (True, False, ["a.txt", "b.txt", "c.txt"])
    assert parse(Toy, ["--no-keep_going"]).keep_going is False  # the old dialect's spelling of a bool
    assert parse(Toy, ["--data"]).data == []
    assert parse(Toy, ["--lr", "1e-3"]).lr == 1e-3
    assert one_error(capsys, ["--lr", "-1e-3"]) == "error: --lr -0.001: must be a finite number > 0"  # parses, refused
    assert one_error(capsys, ["--mode", "slow"]) == "error: --mode 'slow': choose one of fast, exact"
    assert one_error(capsys, ["--max-new-tokens", "x"]) == \
        "error: argument --max-new-tokens: invalid int value: 'x'"
    assert one_error(capsys, ["--max-new", "3"]).startswith("error: unrecognized arguments: --max-new")  # no abbreviations
    assert one_error(capsys, ["--sample", "--mode", "exact"], prog="toy") == \
        "toy: error: --sample: an exact run does not sample"


def test_every_problem_is_its_own_line(capsys):
    with pytest.raises(SystemExit):
        parse(Toy, ["--lr", "0", "--max-new-tokens", "0"])
    assert capsys.readouterr().err.splitlines() == ["error: --max-new-tokens 0: must be >= 1",
                                                    "error: --lr 0.0: must be a finite number > 0"]


def test_nested_dataclass_gives_dotted_flags_merged_into_its_default(capsys):
    cfg = parse(Toy, ["--inner.size", "8"])
    assert cfg.inner == Inner(size=8, lr=1e-4)  # the field's own default lr is kept
    assert parse(Toy, ["--inner.lr", "0.25", "--inner.size", "4"]).inner == Inner(size=4, lr=0.25)
    assert one_error(capsys, ["--inner.size", "1"]) == "error: --inner.size 1: must be >= 2"
    assert Toy().inner is not Toy().inner  # a dataclass default is copied per instance


def test_help_says_each_field_once_with_its_default_and_hides_the_aliases(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: each help text on one line
    text = build_parser(Toy).format_help()
    for f in dataclasses.fields(Toy):
        assert text.count(f.metadata["help"]) == 1, f.name
    assert re.search(r"--max-new-tokens MAX_NEW_TOKENS\s+the answer budget \(default: 16\)", text)
    assert "--max_new_tokens" not in text and "--no-keep-going" in text
    assert "how to run (fast | exact; default: fast)" in text
    assert "--inner.lr LR" in text and "inner learning rate (default: 0.0001)" in text  # the nested default's value


def test_a_subclass_changes_defaults_without_redeclaring_fields():
    child, parent = {f.name: f for f in dataclasses.fields(ToyChild)}, {f.name: f for f in dataclasses.fields(Toy)}
    assert list(child) == list(parent)  # same fields, same order
    assert child["max_new_tokens"].metadata == parent["max_new_tokens"].metadata  # help and rule kept
    assert (ToyChild().max_new_tokens, ToyChild().data, Toy().max_new_tokens, Toy().data) == (64, ["a.txt"], 16, [])
    assert ToyChild().data is not ToyChild().data
    assert parse(ToyChild, ["--max-new-tokens", "3"]).max_new_tokens == 3
    with pytest.raises(ValueError, match="--max-new-tokens 0: must be >= 1"):  # the inherited rule
        ToyChild(max_new_tokens=0)
    with pytest.raises(TypeError, match="'max_tokens' is not a field"):
        @dataclass
        class Typo(Toy):
            defaults = {"max_tokens": 3}


def test_a_required_flag_is_named(capsys):
    @dataclass
    class Needs(Flags):
        model: str = flag(help="the model")
        out: list[str] = flag(help="where")
    assert parse(Needs, ["--model", "m", "--out", "o"]) == Needs("m", ["o"])
    with pytest.raises(SystemExit):
        parse(Needs, [], prog="needs")
    assert capsys.readouterr().err.splitlines() == ["needs: error: --model is required", "needs: error: --out is required"]


# ---- the project's command lines ----------------------------------------------------------------------
def test_transllm_stage_flags_and_the_paper_preset(capsys):
    from train.config import parse_args
    from train.transllm import TransLLMConfig, stages
    cfg = parse_args(TransLLMConfig, ["--stage1.steps", "30", "--stage3.lr", "5e-5", "--stage3.seq-len", "1024",
                                      "--lr", "3e-4", "--stage2.seq_len", "128"])
    assert [(s.name, s.steps, s.lr, s.seq_len) for s in stages(cfg)] == [
        ("stage1", 30, 3e-4, 256), ("stage2", 4, 3e-4, 128), ("stage3", 4, 5e-5, 1024)]
    demo = stages(parse_args(TransLLMConfig, []))
    assert [(s.steps, s.lr, s.seq_len) for s in demo] == [(4, 2e-4, 256), (4, 2e-4, 256), (4, 1e-4, 256)]
    paper = parse_args(TransLLMConfig, ["--preset", "paper", "--stage3.seq-len", "4096"])  # the command line wins
    assert [(s.lr, s.seq_len) for s in stages(paper)] == [(2e-4, 512), (2e-4, 512), (1e-4, 4096)]
    assert (paper.lora_r, paper.lora_alpha, paper.qa_limit, paper.mono_lines) == (64, 128.0, 0, 0)
    names = {f.name for f in dataclasses.fields(TransLLMConfig)}
    assert not names & {"steps1", "steps2", "steps3", "lr1", "lr2", "lr3", "seq_len3"}  # one form: --stageK.x
    with pytest.raises(SystemExit):
        parse_args(TransLLMConfig, ["--preset", "huge"])
    assert capsys.readouterr().err.strip() == "error: --preset 'huge': choose one of paper"


def test_the_scripts_and_eval_speak_the_same_dialect(tmp_path):
    from data.prepare import PrepareConfig, read_flags
    from eval import run
    from scripts import chat, extend_vocab, generate_kd
    assert chat.parse_args(["--max_new_tokens", "5", "--top-k", "3"]).max_new_tokens == 5
    assert run.EvalArgs.__dataclass_fields__["max_new_tokens"].metadata["help"].startswith("answer budget")
    args = run.parse_args(["--model", "a", "--model", "b", "--name", "x", "y", "--max_new_tokens", "3"])
    assert (args.model, args.name, args.max_new_tokens, args.limit) == (["a", "b"], ["x", "y"], 3, 50)
    assert extend_vocab.parse_args(["--model", "m", "--texts", "t.txt", "--out", "o", "--tokenizer_only"]).tokenizer_only
    assert generate_kd.parse_args(["--out", "kd.jsonl", "--no-progress"]).progress is False
    assert read_flags(PrepareConfig, ["--inputs", "a.txt", "--ppl_threshold", "9"]) == {
        "inputs": ["a.txt"], "ppl_threshold": 9.0}
