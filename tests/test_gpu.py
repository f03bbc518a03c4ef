"""What only a CUDA GPU can check; scripts/gpu_check.sh runs this file there (elsewhere every test
skips, saying why).

tests/test_kernels.py and tests/test_attention.py hold every Triton kernel against its reference,
forward and gradients, in fp32 and bf16, on whatever device there is; on a GPU they run the
compiled kernels. This file adds:
  1. the kernels really are compiled there, not interpreted (conftest sets TRITON_INTERPRET=1
     only where there is no CUDA; a stray one would make every kernel test on the GPU vacuous);
  2. a whole model on the compiled kernels against the same model on the torch references;
  3. the bf16 FSDP2 training step: one rank, MixedPrecisionPolicy(bf16 params, fp32 reduction),
     fp32 masters, gradients and AdamW state (train/parallelize.py), against the same steps in
     plain fp32.

Tolerances (relative max error as in tests/test_kernels.py, max|got - want| / max|want|):
  - model, fp32, compiled kernels vs references: 1e-4 on loss and every gradient. Each kernel
    alone is held to 1e-5; two blocks, the fused head + loss and their backward compound a few of
    those roundings.
  - bf16 FSDP2 vs fp32, 6 AdamW steps of full fine-tuning on the toy task: every loss within 1%
    and every gradient norm within 5% of the fp32 run's. bf16 rounds each matmul input to 8
    significant bits (2^-9 relative). Measured with this test's body on CPU (gloo, FSDP2 forced
    for bf16, torch reference kernels): at most 0.07% on the losses, 0.7% on the norms (the loss
    falls 6.95 -> 6.35 in both runs); the GPU adds the Triton kernels' own bf16 rounding.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import kernels
from model.config import preset
from model.llama import Llama
from train import distributed
from train.config import TrainConfig
from train.trainer import Trainer
from trainer_worker import ToyLoader  # tests/: the toy language of the trainer tests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")

DEVICE = "cuda"
CONFIG = preset("tiny", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=1000, max_seq_len=256)
KERNEL_MODULES = ("rmsnorm", "rope", "swiglu", "cross_entropy", "flash_attention")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


@pytest.fixture
def backend():
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


@pytest.fixture
def group():
    """A one-rank process group on the GPU (nccl), ended afterwards."""
    info = distributed.init("cuda")
    yield info
    if dist.is_initialized():
        dist.destroy_process_group()


def test_triton_kernels_are_compiled_not_interpreted():
    from triton.runtime import JITFunction
    from triton.runtime.interpreter import InterpretedFunction
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET=1 on a GPU: kernels would be interpreted"
    for name in KERNEL_MODULES:
        found = vars(importlib.import_module(f"kernels.{name}")).values()
        assert any(isinstance(f, JITFunction) for f in found), f"kernels.{name}: no compiled @triton.jit kernel"
        assert not any(isinstance(f, InterpretedFunction) for f in found), f"kernels.{name}: interpreted kernels"
    x = torch.randn(8, 256, device="cuda", requires_grad=True)
    y = kernels.rms_norm(x, torch.ones(256, device="cuda"), 1e-5)  # auto: the Triton kernel for a CUDA tensor
    assert y.is_cuda and type(y.grad_fn).__name__ == "RMSNormFunctionBackward"


def _loss_and_grads(backend_name: str, batch: dict):
    kernels.set_backend(backend_name)
    model = Llama(CONFIG).init_weights(seed=0).to(DEVICE).train()
    b = {k: v.to(DEVICE) for k, v in batch.items()}
    loss = model(b["tokens"], b["labels"], positions=b["positions"], segments=b["segments"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_on_compiled_kernels_equals_torch_references(backend):
    """Packed documents (segments): Triton flash attention vs FlexAttention, and every other kernel."""
    batch = ToyLoader(CONFIG.vocab_size, 128, 2).batch_at(0, 0)
    loss, grads = _loss_and_grads("triton", batch)
    want_loss, want_grads = _loss_and_grads("torch", batch)
    assert rel_err(loss, want_loss) < 1e-4
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert want.abs().max() > 0, f"reference gradient of {name} is zero: the comparison would prove nothing"
        assert rel_err(grads[name], want) < 1e-4, f"{name}: rel err {rel_err(grads[name], want):.2e}"


def train_run(precision: str, out_dir, info, steps: int = 6):
    """`steps` Trainer steps of full fine-tuning on the toy language -> (trainer, metrics per step)."""
    cfg = TrainConfig(out_dir=str(out_dir), max_steps=steps, lr=3e-3, warmup_steps=0, mixed_precision=precision,
                      progress=False, export=False)
    model = Llama(CONFIG).init_weights(seed=0)
    trainer = Trainer(model, cfg, ToyLoader(CONFIG.vocab_size, 128, 4), dist_info=info)
    return trainer, [trainer.train_step() for _ in range(steps)]


def test_bf16_fsdp2_steps_follow_fp32(tmp_path, group):
    fp32_trainer, fp32 = train_run("fp32", tmp_path / "fp32", group)
    trainer, bf16 = train_run("bf16", tmp_path / "bf16", group)
    assert not fp32_trainer.plan.fsdp and fp32_trainer.plan.dtype == torch.float32
    assert trainer.plan.fsdp and trainer.plan.dtype == torch.bfloat16, trainer.plan.describe()
    # masters and AdamW moments stay fp32 (the policy casts only the all-gathered compute copy)
    params = list(trainer.model.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)
    moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert fp32[-1]["loss"] < fp32[0]["loss"] - 0.3 and bf16[-1]["loss"] < bf16[0]["loss"] - 0.3  # both learn
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (step, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2), (step, a, b)
    print("\n".join(f"step {i}: loss {a['loss']:.4f} / {b['loss']:.4f}, grad norm {a['grad_norm']:.4f} / "
                    f"{b['grad_norm']:.4f} (fp32 / bf16 FSDP2)" for i, (a, b) in enumerate(zip(fp32, bf16))))
