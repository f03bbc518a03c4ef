"""train/study.py: records of measured runs, their aggregation over seeds, and the line chart."""
from __future__ import annotations

import statistics
import xml.etree.ElementTree as ET

import pytest

from eval.quick import QuickSizes
from eval.report import svg_line_chart
from model import assets
from tests.conftest import need
from train.study import METRICS, aggregate, append_jsonl, flatten, measured_run, read_jsonl, rewrite_jsonl


def report(zh: float, aligned_en: float, eot: float | None) -> dict:
    """A quick report as eval.quick.quick_report shapes it (the parts the study reads)."""
    return {"answer_nll": {"drcd-zh-Hant": {"answer_nll": zh}, "xquad-en": {"answer_nll": 2.0}},
            "alignment": {"en": {"aligned": aligned_en, "echo_degenerate": 0.0}},
            "overall": {"end_of_turn": eot}}


def test_flatten_reads_each_metric_and_leaves_missing_ones_none():
    flat = flatten(report(1.5, 0.75, 0.25))
    assert set(flat) == set(METRICS)
    assert (flat["nll_zh"], flat["nll_en_qa"], flat["aligned_en"], flat["end_of_turn"]) == (1.5, 2.0, 0.75, 0.25)
    assert flat["nll_en_chat"] is None and flat["aligned_zh"] is None  # not in this report


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    rows = [{"format": f, "seed": s, "split": "data", "tokens": 100, **flatten(report(z, 1.0, None))}
            for f, s, z in [("inscp", 0, 1.0), ("inscp", 1, 2.0), ("inscp", 2, 4.0), ("orgcp", 0, 3.0)]]
    summary = aggregate(rows, by=("format",))
    mean, spread, n = summary[("inscp", "data", 100)]["nll_zh"]
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert spread == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert summary[("orgcp", "data", 100)]["nll_zh"] == (3.0, 0.0, 1)
    assert "end_of_turn" not in summary[("inscp", "data", 100)]  # None is no number
    assert summary[("inscp", "data", 100)]["runs"] == [0, 1, 2]


def test_jsonl_records_append_and_rewrite(tmp_path):
    file = tmp_path / "runs.jsonl"
    append_jsonl([{"run": "a", "x": 1}], file)
    append_jsonl([{"run": "b", "x": 2}], file)
    assert [r["run"] for r in read_jsonl(file)] == ["a", "b"]
    rewrite_jsonl([{"run": "b", "x": 2}], file)
    assert read_jsonl(file) == [{"run": "b", "x": 2}]


def test_line_chart_is_valid_svg_with_one_point_per_value():
    svg = svg_line_chart("t", [0, 50, 100], {"inscp": [(1.0, 0.1), (0.8, 0.05), (0.7, 0.0)],
                                             "orgcp": [(1.0, 0.0), None, (0.9, 0.1)]}, "tokens", "nll")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}circle")) == 5 and len(root.findall(f"{ns}polyline")) == 2
    titles = [c.find(f"{ns}title").text for c in root.findall(f"{ns}circle")]
    assert "inscp at 50: 0.8 +- 0.05" in titles


def test_measured_run_reports_at_the_chosen_steps_and_on_the_final_split(tmp_path):
    """A real (tiny) InsCP run on TinyStories: a dev report after step 1, the holdout one after
    the last step (2), each with the step and tokens seen."""
    model = need(assets.tinystories_dir)
    data = tmp_path / "zh.txt"
    data.write_text("\n".join(f"Once upon a time there was a cat number {i}." for i in range(40)))
    sizes = QuickSizes(nll_items=1, nll_max_chars=700, prompts=1, max_new_tokens=3, batch_size=3, nll_batch_size=1)
    argv = ["--model", str(model), "--template", "llama2", "--data", str(data), "--max-steps", "2",
            "--seq-len", "64", "--micro-batch-size", "2", "--warmup-steps", "0", "--eval-split", "0",
            "--no-report", "--no-export", "--no-progress", "--out-dir", str(tmp_path / "run")]
    records = measured_run(argv, [1], sizes, final_split="holdout", labels={"run": "t"}, log=lambda s: None)
    assert [(r["step"], r["split"]) for r in records] == [(1, "data"), (2, "holdout")]
    assert records[0]["tokens"] == 2 * 64 and records[1]["tokens"] == 4 * 64
    assert all(r["run"] == "t" and isinstance(r["nll_zh"], float) for r in records)
    assert isinstance(records[0]["nll_en_chat"], float) and records[1]["nll_en_chat"] is None  # no alpaca holdout


def test_study_script_refuses_an_out_folder_measured_with_other_settings(tmp_path):
    # Its runs are skipped by name when finished: a folder of 40-step runs read by a 200-step
    # study would put both in one table. Seeds and formats may grow; what makes a run may not.
    from data.flags import parse
    from scripts.study_inscp import StudyArgs, check_settings

    def args(*extra):
        return parse(StudyArgs, ["--out", str(tmp_path), "--data", "a.txt", "--steps", "40", *extra])

    check_settings(args(), tmp_path)
    assert (tmp_path / "settings.json").is_file()
    check_settings(args("--seeds", "0", "1", "2", "3", "--formats", "inscp"), tmp_path)
    with pytest.raises(SystemExit, match=r"other settings \(--steps 40 -> 200\): pass another --out"):
        check_settings(args("--steps", "200"), tmp_path)
    with pytest.raises(SystemExit, match=r"--sizes .*'prompts': 16.*'prompts': 8"):
        check_settings(args("--sizes.prompts", "8"), tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "runs.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="has no settings.json beside it"):
        check_settings(args(), old)
