"""Nothing lost, nothing silent: each way a run can go wrong ends in ONE line and a non-zero exit
code, or resumes exactly. Numbers refer to the items of issue 12:

 1 eval before every save, 2 ranks: tests/test_trainer.py::test_eval_before_every_save_two_ranks_lora_resumes_exactly
 2 damaged checkpoints (truncated / missing / flipped bytes): resume from the newest intact one
 3 a second run (or --resume) in a folder in use: refused; a dead owner's lock is taken over
 4 the token cache follows the data files' content, not their paths
 5 every flag checked before any work
 6 runaway training without a NaN stops
 7 full disk / read-only / permission / a file in the way; a killed export is cleaned up
 8 under torchrun: one error line (rank 0), and `python -m train.launch` without torchrun's report
 9 invalid UTF-8 names its line
10 tiny data: no eval split, with a note
11 data.prepare's perplexity-filter flags

Tiny random model (tests/trainer_worker.py) for the training loop, TinyStories-656K for the
recipe; the multi-process runs are marked slow (they still run under plain `python -m pytest`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train.checkpointing as checkpointing
import train.recipe as recipe
import trainer_worker as worker
from data import prepare as prepare_cli
from data.readers import DataError, read_texts
from data.tokenfile import TokenFile
from model import assets
from tests.conftest import need
from train import distributed
from train.checkpointing import verify_local
from train.config import parse_args
from train.errors import TrainingDiverged
from train.guard import DivergenceGuard
from train.inscp import InsCPConfig, main as inscp_main
from train.recipe import chat_template, load_model, token_files
from train.trainer import run_main

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trainer_worker.py"
TINY_RUN = ["--no-progress", "--eval-batches", "1", "--lr", "1e-2", "--warmup-steps", "0"]


def env(fault: str | None = None) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.pop("LANGSHIFT_FAULT", None)
    if fault:
        e["LANGSHIFT_FAULT"] = fault
    return e


def error_line(capsys, call, code: int = 1) -> str:
    """Run call() (an entry point), expect SystemExit(code) and exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def worker_run(out, *args) -> list[str]:
    return ["--out-dir", str(out), *TINY_RUN, *args]


def losses(out) -> dict[int, float]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture
def tiny():
    return need(assets.tinystories_dir)


def inscp_argv(base, out, *extra) -> list[str]:
    return ["--model", str(base), "--out-dir", str(out), "--template", "llama2", "--seq-len", "64",
            "--micro-batch-size", "2", "--max-steps", "2", "--save-every", "0", "--eval-every", "0",
            "--no-progress", "--no-report", "--lr", "1e-3", *extra]


def story_file(path: Path, n: int = 30) -> Path:
    path.write_text("\n".join(f"Once upon a time, cat number {i} sat on a mat in the sun." for i in range(n)),
                    encoding="utf-8")
    return path


# ---- 2: damaged checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 (1 rank, in process)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_main(worker.main, worker_run(out, "--max-steps", "4", "--save-every", "2", "--no-export"))
    return out


def _truncate(folder):
    path = folder / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(folder):
    path = folder / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: torch would load it without a word
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (_truncate, "__0_0.distcp has"),
    "missing rank state": (lambda f: (f / "rank00000.pt").unlink(), "rank00000.pt is missing"),
    "missing .metadata": (lambda f: (f / ".metadata").unlink(), ".metadata is missing"),
    "flipped bit": (_flip, "__0_0.distcp does not match its checksum"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, four_steps, capsys, kind):
    damage, says = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    damage(out / "checkpoints" / "step_00000004")
    capsys.readouterr()
    worker.main(worker_run(out, "--max-steps", "4", "--save-every", "2", "--no-export", "--resume"))
    (warning,) = capsys.readouterr().err.strip().splitlines()  # one line, saying what and what instead
    assert warning.startswith("warning: checkpoint step_00000004 is damaged (") and says in warning
    assert warning.endswith("moved to damaged-step_00000004; resuming from step_00000002")
    assert losses(out) == losses(four_steps)  # steps 3-4 recomputed exactly
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["damaged-step_00000004", "step_00000002", "step_00000004"]
    assert verify_local(out / "checkpoints" / "step_00000004") is None


def test_no_intact_checkpoint_is_one_line(tmp_path, four_steps, capsys):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    for step in ("step_00000002", "step_00000004"):
        _flip(out / "checkpoints" / step)
    line = error_line(capsys, lambda: run_main(worker.main, worker_run(out, "--max-steps", "4", "--save-every", "2",
                                                                          "--no-export", "--resume")))
    assert "no intact checkpoint to resume from" in line and "step_00000004: __0_0.distcp" in line
    assert (out / "checkpoints" / "step_00000004").is_dir()  # nothing moved when nothing can be used


def test_nan_guard_names_only_a_verified_checkpoint(tmp_path, monkeypatch):
    """The checkpoint of step 4 gets a flipped bit after it was written; the NaN at step 5 names
    step 2, the newest one that still verifies, as the one to go back to."""
    save = checkpointing.CheckpointManager.save

    def save_then_rot(self, step, *args, **kwargs):
        folder = save(self, step, *args, **kwargs)
        if step == 4:
            _flip(folder)
        return folder
    monkeypatch.setattr(checkpointing.CheckpointManager, "save", save_then_rot)
    monkeypatch.setenv("LANGSHIFT_FAULT", "nan_at_step@5")
    cfg = parse_args(worker.WorkerConfig, worker_run(tmp_path, "--max-steps", "6", "--save-every", "2", "--no-export"))
    with pytest.raises(TrainingDiverged) as err:
        worker.make_trainer(cfg, distributed.init("cpu")).fit()
    assert str(err.value) == f"step 5: loss is nan; stopping (the last verified checkpoint is " \
                             f"{tmp_path / 'checkpoints' / 'step_00000002'})"


# ---- 3: one run per folder ----------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_in_a_busy_folder_is_refused_and_a_dead_owners_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(WORKER), *worker_run(out, "--max-steps", "100000", "--no-export")],
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        config_before = (out / "config.json").read_text()
        line = error_line(capsys, lambda: run_main(worker.main, worker_run(out, "--max-steps", "3", "--resume")))
        assert f"is in use by pid {first.pid} on " in line and "wait for that run to end" in line
        assert (out / "config.json").read_text() == config_before  # the refused run wrote nothing
        assert first.poll() is None  # and the first run goes on
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL and (out / ".lock").exists()  # a dead owner's lock stays

    run_main(worker.main, worker_run(out, "--max-steps", "2", "--no-export"))
    notice = capsys.readouterr().out
    assert f"took over the lock of {out} from pid {first.pid}" in notice and "no longer running" in notice
    assert sorted(losses(out)) == [1, 2] and not (out / ".lock").exists()  # released on exit


# ---- 4: the token cache follows content ---------------------------------------------------------

def test_token_cache_is_keyed_on_content_not_path(tiny, tmp_path):
    data = story_file(tmp_path / "stories.txt", 5)
    cfg = InsCPConfig(model=str(tiny), data=[str(data)], out_dir=str(tmp_path / "run"), template="llama2",
                      eval_split=0)
    _, tokenizer = load_model(cfg)
    template, info = chat_template(tokenizer, "llama2"), distributed.init("cpu")

    def first_text(folder) -> str:
        return tokenizer.decode(TokenFile(folder).doc(0)[0])
    before, _ = token_files(cfg, "orgcp", tokenizer, template, info)
    assert "cat number 0" in first_text(before)
    stat = data.stat()
    data.write_text(data.read_text().replace("cat number 0", "dog number 0"), encoding="utf-8")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the bytes differ
    assert data.stat().st_size == stat.st_size
    after, _ = token_files(cfg, "orgcp", tokenizer, template, info)
    assert after != before and "dog number 0" in first_text(after)
    moved = tmp_path / "elsewhere.txt"
    shutil.copy(data, moved)
    same, _ = token_files(InsCPConfig(**{**vars(cfg), "data": [str(moved)]}), "orgcp", tokenizer, template, info)
    assert same == after  # a moved (or copied) file keeps its cache


def test_resume_with_edited_data_is_refused(tiny, tmp_path, capsys):
    data = story_file(tmp_path / "stories.txt")
    args = inscp_argv(tiny, tmp_path / "run", "--data", str(data), "--eval-split", "0", "--no-export")
    inscp_main(args)
    data.write_text(data.read_text().replace("cat", "dog"), encoding="utf-8")
    line = error_line(capsys, lambda: run_main(inscp_main, args + ["--resume"]))
    assert "the training data changed since this state was saved" in line


# ---- 5: flags -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,says", [
    (["--seq-len", "0"], "--seq-len 0: must be >= 2"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr", "-1e-3"], "--lr -0.001: must be a finite number > 0"),  # parses as written
    (["--lora-r", "0"], "--lora-r 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--lora-targets", "q_proj", "qkv"], "--lora-targets ['q_proj', 'qkv']: 'qkv' is not one of q_proj"),
    (["--eval-batches", "0"], "--eval-batches 0: must be >= 1"),
    (["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be in [0, 1)"),
    (["--save-every", "-1"], "--save-every -1: must be >= 0"),
    (["--device", "tpu"], "--device 'tpu': choose cpu or cuda"),
    (["--max-steps", "2", "--warmup-steps", "3"], "--warmup-steps 3: must be in [0, 2] (--max-steps)"),
    (["--eval-split", "1"], "--eval-split 1: must be 0 (no eval) or >= 2"),
    (["--guard-loss-factor", "0.5"], "--guard-loss-factor 0.5: must be 0 (off) or a finite number > 1"),
    (["--format", "sft"], "--format 'sft': choose one of inscp, orgcp"),
    (["--data", "no/such.txt"], "--data ['no/such.txt']: no/such.txt is not a file"),
    (["--seq-len", "many"], "argument --seq-len: invalid int value: 'many'"),
])
def test_bad_flag_is_one_line_before_any_work(tmp_path, capsys, flags, says):
    out = tmp_path / "run"
    line = error_line(capsys, lambda: parse_args(InsCPConfig, ["--out-dir", str(out), *flags]), code=2)
    assert line.startswith(f"error: {says}"), line
    assert not out.exists()


def test_out_dir_that_is_a_file_and_the_default_warmup(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = error_line(capsys, lambda: parse_args(InsCPConfig, ["--out-dir", str(tmp_path / "file")]), code=2)
    assert "is a file, not a folder" in line
    # the default warm-up (3 steps) never refuses a shorter run; an explicit one does (above)
    assert parse_args(InsCPConfig, ["--max-steps", "1"]).warmup_steps == 1
    assert parse_args(InsCPConfig, ["--max-steps", "8"]).warmup_steps == 3


@pytest.mark.parametrize("flags,says", [
    (["--template", "nosuch"], "error: --template 'nosuch': unknown chat template 'nosuch'"),
    (["--trainable-modules", "head"], "error: --trainable-modules 'head': no module of that name"),
])
def test_flags_checked_against_the_model_before_tokenising(tiny, tmp_path, capsys, flags, says):
    out = tmp_path / "run"
    line = error_line(capsys, lambda: run_main(inscp_main, inscp_argv(tiny, out, *flags)))
    assert line.startswith(says), line
    assert not out.exists()  # nothing tokenised, nothing written


def test_transllm_checks_its_template_before_stage0_works(tiny, tmp_path, capsys):
    from train import transllm
    out = tmp_path / "run"
    line = error_line(capsys, lambda: run_main(transllm.main, ["--model", str(tiny), "--out-dir", str(out), "--stage",
                                                               "0", "--template", "nosuch", "--no-progress"]))
    assert line.startswith("error: --template 'nosuch': unknown chat template")
    assert not out.exists()


# ---- 6: divergence without a NaN ----------------------------------------------------------------

def test_runaway_learning_rate_stops_naming_the_verified_checkpoint(tmp_path, capsys):
    """--lr 1e6: one step saturates the model, the gradient is exactly 0 from then on."""
    line = error_line(capsys, lambda: run_main(worker.main, worker_run(tmp_path, "--lr", "1e6", "--max-steps", "40",
                                                                          "--save-every", "5", "--no-export")))
    assert "gradient norm has been exactly 0 since step 2 (10 steps" in line
    assert line.endswith(f"(the last verified checkpoint is {tmp_path / 'checkpoints' / 'step_00000010'})")
    assert max(losses(tmp_path)) == 10  # nothing after the stall was reported as training


def test_guard_spikes_and_stalls():
    def first_alarm(guard, curve):
        for step, (loss, norm) in enumerate(curve, 1):
            if (reason := guard.check(step, loss, norm)) is not None:
                return step, reason
        return None
    steady = [(2.0 - 0.01 * i, 1.0 + 0.1 * (i % 3)) for i in range(10)]
    step, reason = first_alarm(DivergenceGuard(warmup_steps=2), steady + [(9.5, 1.0)])
    assert step == 11 and reason.startswith("loss 9.5 is 4.9x the median 1.955") and "--guard-loss-factor 4" in reason
    step, reason = first_alarm(DivergenceGuard(), steady + [(1.9, 2.0e4)])
    assert step == 11 and reason.startswith("gradient norm 2e+04 is")
    stalled = steady[:3] + [(3.25, 0.5)] * 12
    assert first_alarm(DivergenceGuard(stall_steps=10), stalled)[0] == 14  # the 11th equal loss
    assert first_alarm(DivergenceGuard(loss_factor=0, grad_factor=0, stall_steps=0), stalled + [(99.0, 1e9)]) is None
    # spikes are not judged during the warm-up
    assert first_alarm(DivergenceGuard(warmup_steps=20), steady + [(9.5, 1.0)]) is None


def test_guard_defaults_stay_quiet_on_the_projects_real_curves():
    """Train losses of the README's real runs (InsCP / orgCP 40 steps at steps 1,5,...,40; TransLLM
    stages 1-3 at steps 1,10,20,30): the defaults never fire on them."""
    curves = [[2.826, 2.804, 2.681, 2.539, 2.611, 2.797, 2.409, 2.530, 2.450],
              [3.246, 2.750, 2.817, 2.672, 2.556, 2.467, 2.560, 2.829, 2.455],
              [2.28, 1.68, 1.74, 1.49], [1.86, 3.34, 2.88, 2.60], [2.51, 1.53, 1.46, 1.56]]
    for curve in curves:
        guard = DivergenceGuard(warmup_steps=0)
        for step, loss in enumerate(curve * 3, 1):  # repeated: enough history for the spike checks
            assert guard.check(step, loss, 1.0 + step % 2) is None, (curve, step)


# ---- 7: the file system refuses ------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["__0_0.distcp", "rank00000.pt"])
def test_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, victim):
    """A real ENOSPC: the file the writer opens is /dev/full (DCP's shard, or our rank state)."""
    real = checkpointing.dcp.save

    def onto_full_disk(state, checkpoint_id):
        if checkpoint_id.endswith("step_00000004"):
            os.symlink("/dev/full", os.path.join(checkpoint_id, victim))
        return real(state, checkpoint_id=checkpoint_id)
    monkeypatch.setattr(checkpointing.dcp, "save", onto_full_disk)
    line = error_line(capsys, lambda: run_main(worker.main, worker_run(tmp_path, "--max-steps", "6",
                                                                          "--save-every", "2", "--no-export")))
    assert line == (f"error: cannot write the checkpoint to {tmp_path / 'checkpoints' / '.tmp-step_00000004'}"
                    f"{'/' + victim if victim.endswith('.pt') else ''}: No space left on device (ENOSPC); "
                    "the disk is full: free space there or choose another --out-dir")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]  # no temp left
    assert verify_local(tmp_path / "checkpoints" / "step_00000002") is None


@pytest.mark.parametrize("fault,says", [
    ("erofs_in_export@3", "cannot write the exported model to {out}/final: Read-only file system (EROFS)"),
    ("eacces_in_metrics@2", "cannot write the metrics to {out}/metrics.jsonl: Permission denied (EACCES)"),
    ("enospc_in_save@3", "cannot write the checkpoint to {out}/checkpoints/.tmp-step_00000003: No space left"),
])
def test_write_errors_are_one_line(tmp_path, capsys, monkeypatch, fault, says):
    """Read-only file systems and permissions cannot be made real here (tests run as root, where
    chmod stops nothing): the write raises the OSError the system would (train/faults.py)."""
    monkeypatch.setenv("LANGSHIFT_FAULT", fault)
    line = error_line(capsys, lambda: run_main(worker.main, worker_run(tmp_path, "--max-steps", "3", "--export")))
    assert line.startswith("error: " + says.format(out=tmp_path)), line


def test_a_file_in_the_way_and_a_failed_run_leaves_nothing(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = error_line(capsys, lambda: run_main(worker.main, worker_run(tmp_path / "file" / "run", "--max-steps", "1")))
    assert line.startswith(f"error: cannot write the run folder to {tmp_path / 'file' / 'run'}: Not a directory "
                           "(ENOTDIR)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    out = tmp_path / "run"
    line = error_line(capsys, lambda: run_main(inscp_main, inscp_argv(tiny, out, "--data", str(bad))))
    assert "bad.jsonl:2: malformed JSON" in line
    assert not out.exists()  # no empty tokens/ folders, no lock, no run folder


def test_full_disk_while_tokenising_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    def no_space(pcfg, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(pcfg.out) / "tokens.bin.tmp-1"))
    monkeypatch.setattr(recipe, "prepare", no_space)
    out, data = tmp_path / "run", story_file(tmp_path / "d.txt")
    line = error_line(capsys, lambda: run_main(inscp_main, inscp_argv(tiny, out, "--data", str(data))))
    assert line.startswith(f"error: cannot write the token files to {out / 'tokens'}/") and "(ENOSPC)" in line
    assert not out.exists()


@pytest.mark.slow
def test_killed_export_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    died = subprocess.run([sys.executable, str(WORKER), *worker_run(tmp_path, "--max-steps", "3", "--export")],
                          env=env("kill_in_export@3"), capture_output=True, text=True, timeout=240)
    assert died.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.glob(".final.tmp-*")
    assert not (tmp_path / "final").exists()
    run_main(worker.main, worker_run(tmp_path, "--max-steps", "3", "--export", "--resume"))
    out = capsys.readouterr().out
    assert f"removed {leftover}, left by an interrupted export" in out
    assert not list(tmp_path.glob(".final.*")) and (tmp_path / "final" / "model.safetensors").is_file()


# ---- 8: under torchrun ----------------------------------------------------------------------------

def torchrun(*args, launcher=("-m", "torch.distributed.run")):
    cmd = [sys.executable, *launcher, "--standalone", "--nproc_per_node=2", str(ROOT / "train" / "inscp.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def no_worker_traceback(stderr: str) -> bool:
    """No traceback line points into this project's code (torchrun's own report may follow)."""
    return not any(line.strip().startswith("File ") and str(ROOT) in line and ".venv" not in line
                   for line in stderr.splitlines())


@pytest.mark.slow
def test_torchrun_bad_flag_and_bad_data_print_one_error_line(tiny, tmp_path):
    out = tmp_path / "run"
    flag = torchrun("--out-dir", str(out), "--lr", "-1e-3")
    assert flag.returncode != 0 and no_worker_traceback(flag.stderr)
    assert [x for x in flag.stderr.splitlines() if x.startswith("error")] == \
        ["error: --lr -0.001: must be a finite number > 0"]  # rank 0 only
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    data = torchrun(*inscp_argv(tiny, out, "--data", str(bad)))
    errors = [x for x in data.stderr.splitlines() if x.startswith("error")]
    assert data.returncode != 0 and no_worker_traceback(data.stderr) and "[rank1]" not in data.stderr
    assert len(errors) == 1 and "bad.jsonl:2: malformed JSON" in errors[0], data.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_train_launch_passes_the_exit_code_without_torchruns_report(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    run = torchrun(*inscp_argv(tiny, tmp_path / "run", "--data", str(bad)), launcher=("-m", "train.launch"))
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()  # the whole of stderr
    assert line.startswith("error: ") and "bad.jsonl:2: malformed JSON" in line


# ---- 9: invalid UTF-8 ------------------------------------------------------------------------------

@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("bad_line", [1, 32, 4000])
def test_invalid_utf8_names_its_line(tmp_path, newline, bad_line):
    lines = [f"第 {i} 行 line {i}".encode() for i in range(1, 5001)]
    lines[bad_line - 1] = lines[bad_line - 1][:4] + b"\xff" + lines[bad_line - 1][4:]
    path = tmp_path / "bad.txt"
    path.write_bytes(newline.encode().join(lines))
    with pytest.raises(DataError) as err:
        list(read_texts(path))
    assert str(err.value).startswith(f"{path}:{bad_line}: not UTF-8 text (byte 0xff at byte 5 of the line")


# ---- 10: tiny data --------------------------------------------------------------------------------

def test_single_document_trains_without_an_eval_split(tiny, tmp_path, capsys):
    one = story_file(tmp_path / "one.txt", 1)
    summary = inscp_main(inscp_argv(tiny, tmp_path / "run", "--data", str(one), "--no-export"))
    assert summary["step"] == 2 and summary["eval_loss"] is None
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note: ") and "--eval-split" in x]
    assert notes == [f"note: {one} has fewer than --eval-split 20 records, so none is held out: no eval loss "
                     "(pass --eval-data FILE, or a smaller --eval-split)"]
    assert not list((tmp_path / "run" / "tokens").glob("*/eval"))


# ---- 11: data.prepare ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,says", [
    (["--ppl-threshold", "10"], "error: --ppl-threshold 10.0: needs --ppl-model"),
    (["--ppl-threshold", "0", "--ppl-model", "m.gguf"], "error: --ppl-threshold 0.0: must be a finite perplexity > 0"),
    (["--format", "poem"], "error: --format 'poem': choose one of"),
])
def test_prepare_perplexity_flags(tmp_path, capsys, flags, says):
    data = story_file(tmp_path / "d.txt", 3)
    line = error_line(capsys, lambda: prepare_cli.main(["--inputs", str(data), "--out", str(tmp_path / "t"), *flags]),
                      code=2)
    assert line.startswith(says), line
    assert not (tmp_path / "t").exists()

