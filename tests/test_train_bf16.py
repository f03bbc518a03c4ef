"""bf16 training on one CPU process: autocast around forward + loss, fp32 master weights, LoRA
and optimizer state (train/parallelize.py). The pieces against fp32 references, then a small
real run (TinyStories-656K weights, English Wikipedia text) whose loss curve must follow the fp32
run's within a stated tolerance, and whose export keeps the fp32 base weights.

bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); matmuls accumulate in fp32. The
tolerances below are a few times what was measured (see each test)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import assets
from model.config import preset
from model.llama import Llama
from model.lora import LoRALinear, apply_lora, dropout_drops, keep_mask, lora_update_reference
from tests.conftest import need
from train.inscp import main

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_lora_linear_under_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.1).train()
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1, generator=g)
    x = torch.randn(4, 16, 64, generator=g)
    torch.manual_seed(1)
    with torch.autocast(**BF16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()  # backward runs outside autocast: mixed dtypes must not meet
    got = {"A": layer.lora_A.grad, "B": layer.lora_B.grad}
    assert all(t.dtype == torch.float32 for t in got.values())

    # reference: the fp32 definition with the same dropout mask
    torch.manual_seed(1)
    keep = keep_mask(dropout_drops(x, 0.1), x.shape)
    A, B = (layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_())
    ref = x @ layer.weight.t() + lora_update_reference(x, A, B, keep, 2.0, 0.1)
    ref.square().sum().backward()
    # measured: 0.3% (output) and 0.5% (gradients) of the largest entry
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    for name, want in (("A", A.grad), ("B", B.grad)):
        assert (got[name] - want).abs().max() <= 2e-2 * want.abs().max(), name


def test_frozen_weight_is_cast_once_under_autocast_and_recast_when_it_changes():
    layer = LoRALinear(torch.nn.Linear(12, 7, bias=False), r=3, alpha=6, dropout=0.0).train()
    layer.weight.requires_grad_(False)  # frozen, as apply_lora leaves it
    x = torch.randn(4, 12)
    with torch.autocast(**BF16):
        first = layer.frozen_weight(torch.bfloat16)
        assert first.dtype == torch.bfloat16 and torch.equal(first, layer.weight.to(torch.bfloat16))
        assert layer.frozen_weight(torch.bfloat16) is first  # kept, not cast again
        y = layer(x)
        # B = 0, so only the base path: the same numbers as autocast's own cast of W and x
        assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x, layer.weight))
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place change (merge, a load) bumps the version: cast again
    again = layer.frozen_weight(torch.bfloat16)
    assert again is not first and torch.equal(again, layer.weight.to(torch.bfloat16))
    assert layer.frozen_weight(torch.float32) is layer.weight  # already in the compute dtype
    layer.eval()  # evaluation: no copy kept, the one of training dropped
    assert layer._cast is None and layer.frozen_weight(torch.bfloat16) is layer.weight
    layer.train()
    layer.weight.requires_grad_(True)
    assert layer.frozen_weight(torch.bfloat16) is layer.weight  # trainable: autocast casts it, with grad


def test_loss_sum_under_autocast_follows_fp32_cross_entropy():
    model = Llama(preset("tiny")).init_weights(seed=0).train()
    torch.manual_seed(0)
    apply_lora(model, r=4, alpha=8, dropout=0.0, trainable_modules=["lm_head"])
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 32), generator=g)
    labels = torch.randint(0, 256, (2, 32), generator=g)
    labels[:, :5] = -100
    with torch.autocast(**BF16):
        loss = model(tokens, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    head = model.lm_head.weight.grad
    assert head.dtype == torch.float32  # the head trains: an fp32 gradient for its fp32 master weight
    model.zero_grad()
    want = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")  # fp32, plain
    want.backward()
    # measured: 0.02% (loss), 0.8% of the largest head-gradient entry
    assert loss.item() == pytest.approx(want.item(), rel=2e-3)
    assert (head - model.lm_head.weight.grad).abs().max() <= 3e-2 * model.lm_head.weight.grad.abs().max()


@pytest.mark.slow
def test_bf16_run_follows_the_fp32_run_on_real_weights_and_text(tmp_path):
    base = need(assets.tinystories_dir)
    articles = need(assets.shared_file, "data", "mono", "en_wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    # The opening of the first article (247 tokens: 4 blocks of 64), so each step sees (nearly)
    # the same blocks and the curve falls clearly, instead of following the batches' difficulty.
    text = tmp_path / "en.txt"
    text.write_text(articles[0][:560] + "\n", encoding="utf-8")

    def run(precision: str) -> list[float]:
        out = tmp_path / precision
        main(["--model", str(base), "--out_dir", str(out), "--template", "llama2", "--format", "orgcp",
              "--data", str(text), "--seq_len", "64", "--micro_batch_size", "4", "--max_steps", "8", "--lr", "1e-2",
              "--eval_split", "0", "--save_every", "0", "--no-report", "--no-progress",
              "--mixed_precision", precision])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], out

    fp32, fp32_dir = run("fp32")
    bf16, bf16_dir = run("bf16")
    assert len(fp32) == len(bf16) == 8
    assert fp32[-1] < fp32[0] - 1 and bf16[-1] < bf16[0] - 1  # both learn (measured: 6.86 -> 3.97)
    # The stated tolerance: every step's loss within 1% of the fp32 run's (measured: at most 0.29%).
    worst = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    assert worst < 1e-2, (fp32, bf16)
    # The export of the bf16 run keeps fp32 weights: untouched tensors equal the base model's bits.
    exported = load_file(bf16_dir / "final" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in exported.values())
    norm = "model.layers.0.input_layernorm.weight"
    if norm in original:
        assert torch.equal(exported[norm], original[norm])
    print(f"\nfp32 {[round(x, 4) for x in fp32]}\nbf16 {[round(x, 4) for x in bf16]}\nworst relative {worst:.2e}")
