"""train/inscp.py end to end on the real TinyStories-656K weights (2 layers: seconds per run), and
its bad-input errors: one line, exit code 1, what to do."""
from __future__ import annotations

import json

import pytest
import torch

from model import assets
from model.checkpoint import load
from tests.conftest import need
from train.inscp import SAMPLES, main
from train.trainer import run_main

EN = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog."


@pytest.fixture
def base(tmp_path):
    return need(assets.tinystories_dir)


def argv(base, out, *extra):
    # TinyStories' tokenizer has no chat template of its own: name one (llama2 needs no special tokens)
    return ["--model", str(base), "--out-dir", str(out), "--template", "llama2", "--seq-len", "64", "--micro-batch-size", "2",
            "--max-steps", "3", "--save-every", "0", "--eval-every", "0", "--no-progress", "--no-report", "--lr", "1e-3",
            *extra]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_inscp_lora_run_exports_a_loadable_model(base, tmp_path):
    data = write(tmp_path / "en.txt", "\n".join([EN] * 20))
    summary = main(argv(base, tmp_path / "run", "--data", str(data)))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert lines[-1]["eval_loss"] == summary["eval_loss"] and summary["eval_loss"] > 0
    assert lines[2]["loss"] < lines[0]["loss"]  # 3 steps on one repeated sentence: it learns it
    trained, tokenizer = load(summary["final"])
    original, _ = load(base)
    ids = torch.tensor([tokenizer.encode(EN, bos=True)])
    with torch.no_grad():
        assert not torch.equal(trained(ids), original(ids))  # the merged adapter changed the model
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["format"] == "inscp" and config["lora"]["r"] == 16


def test_orgcp_full_finetune_on_bundled_sample(base, tmp_path):
    summary = main(argv(base, tmp_path / "run", "--format", "orgcp", "--finetune", "full", "--max-steps", "1",
                        "--warmup-steps", "0"))
    assert summary["step"] == 1 and summary.get("adapter") is None
    meta = json.loads(next((tmp_path / "run" / "tokens").glob("orgcp-*/train/meta.json")).read_text())
    assert meta["format"] == "orgcp" and str(SAMPLES / "zh_tw.txt") in meta["inputs"]


def one_line_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_main(main, args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_empty_data_file(base, tmp_path, capsys):
    empty = write(tmp_path / "empty.txt", "\n\n")
    assert "empty.txt has no documents" in one_line_error(capsys, argv(base, tmp_path / "r", "--data", str(empty)))


def test_malformed_jsonl_line(base, tmp_path, capsys):
    bad = write(tmp_path / "qa.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')
    assert "qa.jsonl:2" in one_line_error(capsys, argv(base, tmp_path / "r", "--data", str(bad)))


def test_sequence_longer_than_context(base, tmp_path, capsys):
    msg = one_line_error(capsys, argv(base, tmp_path / "r", "--seq-len", "4096"))
    assert "--seq-len 4096" in msg and "512" in msg


def test_out_dir_of_another_run(base, tmp_path, capsys):
    data = write(tmp_path / "en.txt", "\n".join([EN] * 20))
    main(argv(base, tmp_path / "run", "--data", str(data), "--max-steps", "1", "--warmup-steps", "0"))
    msg = one_line_error(capsys, argv(base, tmp_path / "run", "--data", str(data), "--lr", "5e-4"))
    assert "--resume" in msg


def test_bad_flag_value(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv(base, tmp_path / "r", "--format", "sft"))
    assert exit_.value.code == 2 and "--format 'sft': choose one of inscp, orgcp" in capsys.readouterr().err


TINY_REPORT = ["--report", "--report-sizes.nll-items", "1", "--report-sizes.prompts", "1",
               "--report-sizes.max-new-tokens", "4", "--report-sizes.batch-size", "4",
               "--report-sizes.nll-batch-size", "2"]


def test_report_compares_the_starting_model_with_the_result_and_a_resume_reuses_the_first(base, tmp_path, capsys):
    from eval import answer_nll, quick
    from model.chat import get_template
    need(quick.data_files)
    data = write(tmp_path / "en.txt", "\n".join([EN] * 20))
    run = tmp_path / "run"
    summary = main(argv(base, run, "--data", str(data), "--max-steps", "2", "--eval-split", "0", *TINY_REPORT))
    out = capsys.readouterr().out
    saved = json.loads((run / "report.json").read_text())
    before, after = saved["models"]["before"], saved["models"]["after"]
    # the before side is the starting model itself, the after side the merged final model (which
    # the run changed): the same answer NLL from a fresh load of each
    template = get_template(load(base)[1], "llama2")
    for side, path in ((before, base), (after, summary["final"])):
        fresh = answer_nll.evaluate(load(path)[0], template, limit=1, max_chars=400, batch_size=2)
        assert {k: side["answer_nll"][k]["answer_nll"] for k in fresh} == pytest.approx(
            {k: v["answer_nll"] for k, v in fresh.items()}, rel=1e-5)
    assert after["answer_nll"]["alpaca-en"]["answer_nll"] != before["answer_nll"]["alpaca-en"]["answer_nll"]
    md = (run / "report.md").read_text()
    assert "before vs after" in md and "What is the capital of France?" in md
    assert {p.name for p in run.glob("chart_*.svg")} >= {"chart_nll.svg", "chart_rate.svg"}
    # the printed table: answer NLL before -> after with the change in %, one row per prompt language
    a, b = before["answer_nll"]["alpaca-en"]["answer_nll"], after["answer_nll"]["alpaca-en"]["answer_nll"]
    assert f"| answer NLL alpaca-en | {a:.3f} -> {b:.3f} ({(b - a) / a:+.1%}) |" in out
    assert "| zh-Hant prompts answered in zh-Hant, no echo |" in out and "| end-of-turn rate |" in out
    first = (run / "report_before.json").read_text()
    main(argv(base, run, "--data", str(data), "--max-steps", "2", "--eval-split", "0", "--resume", *TINY_REPORT))
    assert "computed by an earlier start of this run" in capsys.readouterr().out
    assert (run / "report_before.json").read_text() == first


def test_report_needs_the_export(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv(base, tmp_path / "r", "--report", "--no-export"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --report: needs --export (the report reads the merged final "
                                               "model); or pass --no-report")


def test_done_message_names_the_exported_model_or_says_there_is_none():
    from train.inscp import done_message
    exported = done_message({"step": 3, "loss": 1.0, "eval_loss": None, "final": "r/final", "adapter": "r/adapter"}, "r")
    assert exported.splitlines()[1:] == ["metrics  r/metrics.jsonl", "model    r/final", "adapter  r/adapter",
                                         "chat:    python scripts/chat.py --model r/final"]
    none = done_message({"step": 3, "loss": 1.0, "eval_loss": 2.0, "final": None}, "r")
    assert none.splitlines()[-1] == "model    not exported (--no-export)" and "None" not in none
