"""The training loop: FSDP2 at 1 and 2 ranks, per-token gradient accumulation, crash-safe resume,
LoRA freezing, NaN guard. Tiny random model, fp32, CPU (gloo); multi-rank and crash runs go through
tests/trainer_worker.py in subprocesses (torchrun for 2 ranks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import preset
from model.llama import Llama
from model.lora import apply_lora
from train import distributed
from train.config import TrainConfig, config_hash, parse_args, save_config
from train.checkpointing import frozen_fingerprint
from train.errors import TrainError, TrainingDiverged
from train.optim import lr_at, param_groups
from train.trainer import Trainer
from trainer_worker import ToyLoader, WorkerConfig, build_model, make_trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "trainer_worker.py"
STEPS = 10
# One set of run flags for every subprocess run, so their curves are comparable.
# fp32 pinned: these runs compare numbers at fp32 tolerance, and `auto` is bf16 on an AMX CPU.
RUN = ["--max_steps", str(STEPS), "--lr", "1e-2", "--warmup_steps", "2", "--micro_batch_size", "4",
       "--eval_batches", "2", "--no-progress", "--no-export", "--mixed_precision", "fp32"]


@pytest.fixture(autouse=True)
def _no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def run_worker(out_dir, *args, nproc=1, fault=None, check=True):
    """Run tests/trainer_worker.py with 1 rank (plain python) or nproc ranks (torchrun)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LANGSHIFT_FAULT", None)
    if fault:
        env["LANGSHIFT_FAULT"] = fault
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [str(WORKER), "--out_dir", str(out_dir), *RUN, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def metrics(out_dir) -> dict[int, dict]:
    """step -> training record of metrics.jsonl."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def complete_checkpoints(out_dir) -> list[str]:
    return sorted(d.name for d in (Path(out_dir) / "checkpoints").iterdir())


def full_grads(trainer) -> dict[str, torch.Tensor]:
    return {n: distributed.full_tensor(p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    """An uninterrupted 2-rank run (1 micro-batch per rank per step)."""
    out = tmp_path_factory.mktemp("ref2")
    run_worker(out, "--grad_accum", "1", nproc=2)
    return metrics(out)


# ---- pieces ------------------------------------------------------------------------------------

def test_lr_schedule_warmup_cosine_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, 3, 10) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up, first step already moves
    assert lrs[3] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)  # cosine from peak to min_lr
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))


def test_param_groups_no_decay_on_1d_and_frozen_left_out():
    model = Llama(preset("tiny"))
    apply_lora(model, r=2, alpha=4, dropout=0.0, trainable_modules=["model.norm"])
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7 * 2  # lora A, B
    assert [p.ndim for p in no_decay["params"]] == [1]                                      # model.norm
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_config_flags_map_onto_fields_and_hash(tmp_path):
    cfg = parse_args(WorkerConfig, ["--max_steps", "7", "--lr", "0.5", "--activation_checkpointing",
                                    "--no-progress", "--seq_len", "32", "--out_dir", str(tmp_path)])
    assert (cfg.max_steps, cfg.lr, cfg.activation_checkpointing, cfg.progress, cfg.seq_len) == (7, 0.5, True, False, 32)
    # observation-only fields do not change the run's identity; numeric ones do
    assert config_hash(cfg) == config_hash(parse_args(WorkerConfig, ["--max_steps", "7", "--lr", "0.5",
                                                                     "--activation_checkpointing", "--seq_len", "32",
                                                                     "--save_every", "3"]))
    assert config_hash(cfg) != config_hash(TrainConfig(max_steps=7, lr=0.25))
    save_config(cfg, tmp_path / "config.json", extra={"world_size": 1})
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5
    with pytest.raises(ValueError, match="--mixed-precision"):
        TrainConfig(mixed_precision="fp16")


# ---- gradient accumulation ---------------------------------------------------------------------

class ListLoader:
    """Hands out the given batches in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_grad_accum_is_normalised_per_token_not_per_micro_batch(tmp_path):
    toy = ToyLoader(256, 16, 1)
    a, b = toy.batch_at(0, 0), toy.batch_at(0, 1)
    a["labels"][:, :3] = a["tokens"][:, 1:4]  # micro-batch a: 3 loss tokens, b: ~13: different weights
    a["labels"][:, 3:] = -100
    b["labels"][:, :-1] = b["tokens"][:, 1:]  # micro-batch b: (almost) every token counts
    n_a, n_b = int((a["labels"] != -100).sum()), int((b["labels"] != -100).sum())
    assert n_a == 3 and n_b >= 15
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    info = distributed.init("cpu")

    def one_step(batches, accum, name, **kw):
        cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=1, grad_accum=accum, max_grad_norm=0,
                          progress=False, export=False, mixed_precision="fp32", **kw)
        trainer = Trainer(Llama(preset("tiny")).init_weights(seed=0), cfg, ListLoader(batches), dist_info=info)
        trainer.train_step()
        return full_grads(trainer)

    accumulated = one_step([a, b], 2, "accum")
    single = one_step([both], 1, "single")
    checkpointed = one_step([a, b], 2, "ckpt", activation_checkpointing=True)

    # Reference: the plain model, mean cross-entropy over all loss tokens of both micro-batches.
    model = Llama(preset("tiny")).init_weights(seed=0)
    logits = model(both["tokens"], positions=both["positions"], segments=both["segments"])
    F.cross_entropy(logits.flatten(0, 1), both["labels"].flatten(), ignore_index=-100).backward()
    reference = {n: p.grad for n, p in model.named_parameters()}

    assert accumulated.keys() == single.keys() == reference.keys()
    # fp32 sums in another order (chunked CE, two micro-batches): differences of a few ulps of the
    # largest gradient entry (~0.3), i.e. ~1e-7 absolute; the trap below is > 100x that.
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(single[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(checkpointed[name], accumulated[name], rtol=1e-6, atol=1e-8, msg=name)

    # The trap this guards against: averaging the two micro-batch means gives another gradient.
    model.zero_grad()
    per_micro = sum(F.cross_entropy(model(m["tokens"], positions=m["positions"], segments=m["segments"])
                                    .flatten(0, 1), m["labels"].flatten(), ignore_index=-100) for m in (a, b)) / 2
    per_micro.backward()
    head = model.lm_head.weight.grad
    assert (head - reference["lm_head.weight"]).abs().max() > 100 * (accumulated["lm_head.weight"] -
                                                                     reference["lm_head.weight"]).abs().max()


# ---- 1 rank versus 2 ranks ---------------------------------------------------------------------

def test_two_ranks_give_the_same_curve_as_one(tmp_path, two_rank_reference):
    """1 rank x 2 micro-batches == 2 ranks x 1 micro-batch: same global batch, same loss AND gradient
    norm (a world-size factor in the gradient would hide from the loss under Adam, not from the norm)."""
    cfg = parse_args(WorkerConfig, ["--out_dir", str(tmp_path), "--grad_accum", "2", *RUN])
    trainer = make_trainer(cfg, distributed.init("cpu"))
    trainer.fit()
    one = metrics(tmp_path)
    two = two_rank_reference
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-4), (step, key)
        assert one[step]["loss_tokens"] == two[step]["loss_tokens"]  # token counts summed over ranks
    assert one[STEPS]["loss"] < one[1]["loss"]  # and it learns


# ---- crash safety ------------------------------------------------------------------------------

def test_sigkill_mid_training_then_resume_matches_exactly(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_worker(ref)
    died = run_worker(out, "--save_every", "2", fault="kill_at_step@5", check=False)
    assert died.returncode == -signal.SIGKILL
    assert complete_checkpoints(out) == ["step_00000002", "step_00000004"]  # keep_last=2
    assert max(metrics(out)) == 5  # step 5 ran, but was never checkpointed

    # The same folder without --resume is refused in one line (the CLI path: run_main).
    refused = run_worker(out, "--save_every", "2", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0 and "--resume" in refused.stderr, refused.stderr

    run_worker(out, "--save_every", "2", "--resume")
    expected, resumed = metrics(ref), metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the died run's step-5 line was dropped
    for step in range(5, STEPS + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], step  # exact: fp32 CPU
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


def test_sigkill_during_checkpoint_write_two_ranks(tmp_path, two_rank_reference):
    out = tmp_path / "run"
    died = run_worker(out, "--grad_accum", "1", "--save_every", "3", nproc=2, fault="kill_in_save@6", check=False)
    assert died.returncode != 0
    partial = out / "checkpoints" / ".tmp-step_00000006"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / "meta.json").exists()
    assert complete_checkpoints(out) == [".tmp-step_00000006", "step_00000003"]

    run_worker(out, "--grad_accum", "1", "--save_every", "3", "--resume", nproc=2)
    assert complete_checkpoints(out) == ["step_00000009", "step_00000010"]  # temp folder cleaned up
    resumed = metrics(out)
    for step in range(4, STEPS + 1):  # resumed from step 3, the half-written 6 was never read
        assert resumed[step]["loss"] == two_rank_reference[step]["loss"], step
        assert resumed[step]["grad_norm"] == two_rank_reference[step]["grad_norm"], step


@pytest.mark.slow
def test_eval_before_every_save_two_ranks_lora_resumes_exactly(tmp_path):
    """Every checkpoint is written right after an eval pass (which leaves FSDP2's root unsharded):
    each still resumes, with exactly the losses of an uninterrupted run, and its frozen-weight
    fingerprint is the one of the plain unsharded model in one process (layout-free)."""
    flags = ["--lora", "--grad_accum", "1", "--eval_every", "2", "--save_every", "2"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_worker(ref, *flags, nproc=2)
    died = run_worker(out, *flags, nproc=2, fault="kill_at_step@7", check=False)
    assert died.returncode != 0 and complete_checkpoints(out) == ["step_00000004", "step_00000006"]
    stored = {json.loads((out / "checkpoints" / name / "meta.json").read_text())["frozen_fingerprint"]
              for name in complete_checkpoints(out)}
    distributed.init("cpu")  # the fingerprint is a collective (of one rank here)
    plain = frozen_fingerprint(build_model(WorkerConfig(out_dir=str(tmp_path / "x"), lora=True))[0])
    assert stored == {plain}

    run_worker(out, *flags, "--resume", nproc=2)
    expected, resumed = metrics(ref), metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):  # resumed from step 6, written right after the eval of step 6
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


def test_resume_refuses_a_different_run(tmp_path):
    info = distributed.init("cpu")
    cfg = WorkerConfig(out_dir=str(tmp_path), max_steps=1, progress=False, export=False, eval_batches=1)
    make_trainer(cfg, info).fit()
    with pytest.raises(TrainError, match="--resume"):
        make_trainer(cfg, info)
    other = WorkerConfig(out_dir=str(tmp_path), max_steps=1, lr=1e-3, resume=True, progress=False, export=False)
    with pytest.raises(TrainError, match=r"different run .*lr: 0\.0002 -> 0\.001"):
        make_trainer(other, info)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    info = distributed.init("cpu")
    cfg = WorkerConfig(out_dir=str(tmp_path), max_steps=5, save_every=2, progress=False, export=False, eval_batches=1)
    monkeypatch.setenv("LANGSHIFT_FAULT", "nan_at_step@3")
    trainer = make_trainer(cfg, info)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message and "step 3" in message and "nan" in message and "step_00000002" in message
    assert complete_checkpoints(tmp_path) == ["step_00000002"]
    assert max(metrics(tmp_path)) == 2

    # The checkpoint is intact: the run resumes from it and finishes.
    monkeypatch.delenv("LANGSHIFT_FAULT")
    cfg.resume = True
    resumed = make_trainer(cfg, info)
    assert resumed.step == 2
    assert resumed.fit()["step"] == 5


# ---- LoRA --------------------------------------------------------------------------------------

def test_lora_trains_only_adapter_and_chosen_modules(tmp_path):
    info = distributed.init("cpu")
    torch.manual_seed(0)
    model = Llama(preset("tiny")).init_weights(seed=0)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, trainable_modules=["lm_head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = WorkerConfig(out_dir=str(tmp_path), max_steps=3, lr=1e-2, progress=False, eval_batches=1)
    trainer = Trainer(model, cfg, ToyLoader(256, 16, 2), dist_info=info, lora=lora)
    trainer.train_step()
    grads = {n: p.grad is not None for n, p in trainer.model.named_parameters()}
    assert grads == {n: (".lora_" in n or n == "lm_head.weight") for n in before}

    summary = trainer.fit()
    after = trainer.full_state_dict()
    for name, value in before.items():
        if ".lora_" in name or name == "lm_head.weight":
            assert not torch.equal(after[name], value), f"trainable {name} did not change"
        else:
            assert torch.equal(after[name], value), f"frozen {name} changed"

    # Export: the adapter holds exactly the trained tensors, the merged model is W + scale * B A.
    from safetensors.torch import load_file
    adapter = load_file(Path(summary["adapter"]) / "adapter_model.safetensors")
    trained = sorted(n for n in before if ".lora_" in n or n == "lm_head.weight")
    assert sorted(k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A")
                  .replace(".lora_B.weight", ".lora_B") for k in adapter) == trained
    for key, value in adapter.items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight") if ".lora_" in key else \
            key.removeprefix("base_model.model.")
        assert torch.equal(value, after[name]), key
    merged = load_file(Path(summary["final"]) / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    expected = after[q + ".weight"] + (after[q + ".lora_B"] @ after[q + ".lora_A"]) * (8 / 4)
    torch.testing.assert_close(merged[q + ".weight"], expected)
    assert torch.equal(merged["lm_head.weight"], after["lm_head.weight"])
    # exporting did not touch the live (sharded) weights: merging works on a copy
    assert torch.equal(trainer.full_state_dict()[q + ".weight"], before[q + ".weight"])

    # Checkpoints leave the frozen base out; resume takes it from the model it is given.
    import torch.distributed.checkpoint as dcp
    saved = dcp.FileSystemReader(summary["checkpoint"]).read_metadata().state_dict_metadata
    assert "model.model.layers.0.self_attn.q_proj.lora_B" in saved
    assert "model.model.layers.0.self_attn.q_proj.weight" not in saved

    def lora_model(seed):
        torch.manual_seed(123)  # a different LoRA init: the checkpoint must overwrite it
        model = Llama(preset("tiny")).init_weights(seed=seed)
        apply_lora(model, r=4, alpha=8, dropout=0.0, trainable_modules=["lm_head"])
        return model

    cfg.resume = True
    resumed = Trainer(lora_model(seed=0), cfg, ToyLoader(256, 16, 2), dist_info=info, lora=lora)
    assert resumed.step == 3
    assert all(torch.equal(v, after[k]) for k, v in resumed.full_state_dict().items())
    with pytest.raises(TrainError, match="frozen"):
        Trainer(lora_model(seed=1), cfg, ToyLoader(256, 16, 2), dist_info=info, lora=lora)


def test_runs_on_the_real_data_loader(tmp_path):
    """The trainer against data.loader's PackedDataset + BatchLoader (the data contract)."""
    loader_module = pytest.importorskip("data.loader", reason="data.loader not available")
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(40):
        ids = torch.randint(256, (int(torch.randint(5, 30, (1,), generator=gen)),), generator=gen).tolist()
        samples.append((ids, [i > 2 for i in range(len(ids))]))  # no loss on a 3-token "prompt"
    ds = loader_module.PackedDataset.from_samples(samples, seq_len=16)
    info = distributed.init("cpu")

    def trainer(resume=False):
        cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, grad_accum=2, resume=resume, save_every=2,
                          progress=False, export=False)
        loader = loader_module.BatchLoader(ds, 2, info.rank, info.world_size, seed=0)
        return Trainer(Llama(preset("tiny")).init_weights(seed=0), cfg, loader, dist_info=info)

    first = trainer()
    first.train_step(), first.train_step(), first.save_checkpoint()  # a run stopped after step 2
    assert first.train_loader.state_dict()["step"] == 4  # 2 steps x 2 micro-batches
    second = trainer(resume=True)
    assert second.train_loader.state_dict()["step"] == 4  # the cursor came back: no replay
    assert second.fit()["step"] == 3 and list(metrics(tmp_path)) == [3]
