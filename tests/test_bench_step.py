"""scripts/bench_step.py at toy size on CPU (the GPU check runs it at the 8B shape): the packed
random batches, the FLOP counts by hand, a LoRA and a full training step through the real
Trainer, and decoding whose fp32 greedy tokens must equal transformers' on the same weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kernels import IGNORE_INDEX
from model.config import preset
from scripts import bench_step
from tests.conftest import need_module

# The tiny preset by hand: D=64, 4 heads of 16 (2 KV heads), F=128, V=256, 2 layers.
D, HD, H, K, F, V, L = 64, 16, 4, 2, 128, 256, 2
BLOCK = D * H * HD + 2 * D * K * HD + H * HD * D + 3 * D * F   # q, k, v, o; gate, up, down
MATMUL = L * BLOCK + V * D                                      # + the head (untied)
NORMS = (2 * L + 1) * D


def run(argv, tmp_path) -> list[dict]:
    out = tmp_path / "results.jsonl"
    bench_step.main([*argv, "--device", "cpu", "--preset", "tiny", "--json", str(out)])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_random_batches_pack_documents_like_the_loader():
    batch = bench_step.RandomBatches(vocab=50, batch=2, seq_len=8, docs=2, seed=0).next_batch()
    assert batch["segments"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    # labels are the next tokens, except at the end of the first document (no loss across documents)
    ignored = (batch["labels"] == IGNORE_INDEX).nonzero()[:, 1].tolist()
    assert ignored == [3, 3]
    kept = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][:, :-1][kept[:, :-1]], batch["tokens"][:, 1:][kept[:, :-1]])


def test_step_flops_by_hand():
    config = preset("tiny")
    model, attention = bench_step.step_flops(1000, config, tokens=64, doc_len=15, mode="full")
    assert model == 6 * 1000 * 64
    assert attention == 12 * L * H * HD * 8 * 64   # a causal query of a 15-token document sees 8 keys on average
    assert bench_step.step_flops(1000, config, 64, 15, "lora")[0] == 4 * 1000 * 64


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_step_at_toy_size(mode, tmp_path):
    (r,) = run(["train", "--mode", mode, "--precision", "fp32", "--steps", "1", "--batch", "2", "--seq-len", "32",
                "--docs", "2"], tmp_path)
    assert r["params_matmul"] == MATMUL == 90112
    lora = L * 16 * ((D + H * HD) + (D + K * HD) * 2 + (H * HD + D) + (D + F) * 2 + (F + D))  # r x (in + out) each
    assert r["params_trained"] == (lora if mode == "lora" else MATMUL + V * D + NORMS)
    assert r["plan"] == "fp32, activation checkpointing"
    k = 6 if mode == "full" else 4
    assert r["mfu"] == pytest.approx(k * MATMUL * 64 / r["seconds"] / (r["peak_tflops"] * 1e12))
    assert r["tokens_per_s"] == pytest.approx(64 / r["seconds"])
    assert r["mfu_with_attention"] > r["mfu"] > 0
    # random init (std 0.02): next-token logits are near uniform, so the loss starts near ln V
    assert r["first_loss"] == pytest.approx(math.log(V), abs=0.1)


def test_decode_at_toy_size_matches_transformers(tmp_path):
    need_module("transformers")
    results = run(["decode", "--precision", "fp32", "--batch", "1", "2", "--prompt-len", "5", "--new-tokens", "6",
                   "--repeats", "1", "--sides", "ours,transformers"], tmp_path)
    assert [(r["batch"], r["side"]) for r in results] == [(1, "ours"), (1, "transformers"), (2, "ours"),
                                                          (2, "transformers")]
    for r in results:
        assert r["weight_bytes"] == 4 * (MATMUL + NORMS)  # fp32; the embedding row is not a per-step read
        assert r["limit_tokens_per_s"] == pytest.approx(r["batch"] * r["bandwidth_gbs"] * 1e9 / r["weight_bytes"])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 6 / r["seconds"])
    # fp32, the same weights: greedy decoding gives transformers' tokens exactly
    assert all(r["agree_with_ours"] == 1.0 for r in results if r["side"] == "transformers")


def test_layers_beyond_the_preset_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--layers 3: the tiny preset has 1..2 layers"):
        run(["train", "--layers", "3"], tmp_path)
