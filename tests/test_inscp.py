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
    return ["--model", str(base), "--out_dir", str(out), "--template", "llama2", "--seq_len", "64", "--micro_batch_size", "2",
            "--max_steps", "3", "--save_every", "0", "--eval_every", "0", "--no-progress", "--lr", "1e-3", *extra]


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
    summary = main(argv(base, tmp_path / "run", "--format", "orgcp", "--finetune", "full", "--max_steps", "1",
                        "--warmup_steps", "0"))
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
    msg = one_line_error(capsys, argv(base, tmp_path / "r", "--seq_len", "4096"))
    assert "--seq_len 4096" in msg and "512" in msg


def test_out_dir_of_another_run(base, tmp_path, capsys):
    data = write(tmp_path / "en.txt", "\n".join([EN] * 20))
    main(argv(base, tmp_path / "run", "--data", str(data), "--max_steps", "1", "--warmup_steps", "0"))
    msg = one_line_error(capsys, argv(base, tmp_path / "run", "--data", str(data), "--lr", "5e-4"))
    assert "--resume" in msg


def test_bad_flag_value(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv(base, tmp_path / "r", "--format", "sft"))
    assert exit_.value.code == 2 and "--format 'sft': choose one of inscp, orgcp" in capsys.readouterr().err
