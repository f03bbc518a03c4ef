"""train/parallelize.py: activation checkpointing and compiled blocks from outside the model give
the numbers of the plain model; names stay HF's; --mixed-precision auto follows the CPU's bf16
features. Tiny models, CPU."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from model.config import preset
from model.llama import Llama
from model.lora import apply_lora
from train import distributed
from train.config import TrainConfig
from train.parallelize import (Plan, apply_activation_checkpointing, cpu_bf16_flags, parallelize,
                               resolve_dtype)
from train.trainer import Trainer
from trainer_worker import ToyLoader

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 avx512f avx512bw {extra}
"""


@pytest.fixture(autouse=True)
def _no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def lora_llama(dropout: float, seed: int = 0) -> Llama:
    model = Llama(preset("tiny")).init_weights(seed=seed)
    torch.manual_seed(seed)
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():  # B = 0 would hide the LoRA path from the comparison
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def loss_and_grads(model: Llama, batch: dict, seed: int = 5):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    loss = model(batch["tokens"], batch["labels"], positions=batch["positions"], segments=batch["segments"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_bf16_flags_read_from_cpuinfo(tmp_path):
    (tmp_path / "amx").write_text(CPUINFO.format(extra="amx_bf16 amx_tile amx_int8 avx512_bf16"))
    (tmp_path / "avx2").write_text(CPUINFO.format(extra="").replace(" avx512f avx512bw", ""))
    assert cpu_bf16_flags(tmp_path / "amx") == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(tmp_path / "avx2") == []
    # This machine: our reading of /proc/cpuinfo agrees with torch's own probes (cpuinfo library).
    torch_says = [torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()]
    assert bool(cpu_bf16_flags()) == any(torch_says)


def test_auto_precision_is_bf16_on_gpu_and_bf16_cpus_only(monkeypatch):
    import train.parallelize as par
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(par, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(par, "cpu_bf16_flags", lambda: [])
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("fp32", cuda) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    # autocast only where no FSDP policy casts the weights
    assert torch.is_autocast_enabled("cpu") is False
    with Plan(torch.bfloat16, fsdp=False, device=cpu).autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    for plan in (Plan(torch.bfloat16, fsdp=True, device=cpu), Plan(torch.float32, fsdp=False, device=cpu)):
        with plan.autocast():
            assert not torch.is_autocast_enabled("cpu")


def test_activation_checkpointing_keeps_names_losses_and_gradients():
    """Dropout 0.1 on every LoRA layer: the recomputation must redraw the very same masks."""
    batch = ToyLoader(256, 32, 2).batch_at(0, 0)
    plain = lora_llama(0.1)
    wrapped = lora_llama(0.1)
    apply_activation_checkpointing(wrapped)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    loss, grads = loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = loss_and_grads(wrapped, batch)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks
    for name in grads:  # the same ops in the same order: bit-identical
        assert torch.equal(grads[name], grads_ckpt[name]), name
    with torch.no_grad():  # eval: no recomputation, the same output
        assert torch.equal(wrapped.eval()(batch["tokens"]), plain.eval()(batch["tokens"]))


@pytest.mark.slow
def test_compiled_training_steps_equal_eager(tmp_path, capsys):
    """Three Trainer steps (LoRA with dropout, packed documents, AdamW, clipping) with compiled
    blocks give the eager run's losses and gradient norms. Inductor draws its own random numbers
    unless told to use eager's (fallback_random), which makes the dropout masks comparable.
    fp32 tolerance: 1e-5 relative (fused elementwise kernels round in another order)."""
    import torch._inductor.config as inductor_config
    # The config module's own patch(), not monkeypatch: monkeypatch's undo deleted the option,
    # and later compiles in the same pytest process failed ("fallback_random does not exist").
    with inductor_config.patch(fallback_random=True):
        _compiled_steps_equal_eager(tmp_path, capsys)


def _compiled_steps_equal_eager(tmp_path, capsys):
    info = distributed.init("cpu")

    def run(compile_: bool, name: str):
        cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=3, lr=1e-2, compile=compile_, progress=False,
                          export=False, mixed_precision="fp32")  # auto would be bf16 on an AMX CPU
        model = Llama(preset("tiny")).init_weights(seed=0)
        torch.manual_seed(0)
        lora = apply_lora(model, r=4, alpha=8, dropout=0.1)
        trainer = Trainer(model, cfg, ToyLoader(256, 32, 2), dist_info=info, lora=lora)
        steps, times = [], []
        for _ in range(3):
            t = time.perf_counter()
            steps.append(trainer.train_step())
            times.append(time.perf_counter() - t)
        return steps, times, trainer

    eager, eager_times, _ = run(False, "eager")
    compiled, compiled_times, trainer = run(True, "compiled")
    assert trainer.plan.compiled and "compiled blocks" in trainer.plan.describe()
    assert all(type(b.forward).__name__ != "method" for b in trainer.model.model.layers)  # compiled forwards
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert compiled[-1]["loss"] < compiled[0]["loss"]
    with capsys.disabled():
        print(f"\ncompile time (first compiled step - eager step): {compiled_times[0] - eager_times[0]:.1f} s; "
              f"later steps {min(compiled_times[1:]):.3f} s compiled vs {min(eager_times[1:]):.3f} s eager")


def test_parallelize_one_cpu_rank_is_not_wrapped_and_plain_fp32():
    distributed.init("cpu")
    model = lora_llama(0.0)
    names = [n for n, _ in model.named_parameters()]
    plan = parallelize(model, torch.device("cpu"), "fp32", activation_checkpointing=True)
    assert plan == Plan(torch.float32, False, torch.device("cpu"), True, False)
    assert plan.describe() == "fp32, activation checkpointing"
    assert [n for n, _ in model.named_parameters()] == names and all(
        type(p) is torch.nn.Parameter for p in model.parameters())  # no DTensor: not sharded
