"""Benchmark: one LoRA training step, our Trainer vs transformers + peft, same model, batch, sequence.

    python scripts/bench_train.py                          # SmolLM2-135M-Instruct, batch 4 x 256, CPU fp32
    python scripts/bench_train.py --batch 8 --seq-len 1024 --device cuda

Both sides: LoRA r=16, alpha=32, dropout 0.05 on every linear layer of the blocks, AdamW, gradient
clipping at 1.0, the same random token batch. Ours is the real training path (train.Trainer on
a one-rank group: FSDP2 with bf16 on a GPU, unwrapped in fp32 on CPU; LoRAUpdate; the chunked head
+ cross-entropy); theirs is PeftModel(LlamaForCausalLM) with `labels=` (full logits). Each side runs in its own child process so its peak memory is its own,
measured over the training steps after loading (CUDA: max_memory_allocated; CPU: peak resident
set size, weights and runtime included).
A benchmark, not a test: it prints numbers and asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

import torch  # noqa: E402

from scripts.benchmarking import best_time, hf_copy, peak_memory_mib, reset_peak_memory, run_side  # noqa: E402

LORA = dict(r=16, alpha=32.0, dropout=0.05)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batch(args, vocab: int) -> torch.Tensor:
    """[batch, seq_len] random ids; both sides predict tokens 1..T-1 from their prefixes."""
    return torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))


def timed_steps(step, steps: int, device: str) -> tuple[float, float]:
    """-> (best seconds per step, last loss); memory measured from here (after loading)."""
    reset_peak_memory(device)
    return best_time(step, steps, device)


def ours(args) -> tuple[float, float]:
    from data.loader import BatchLoader, PackedDataset
    from model.checkpoint import load
    from model.lora import apply_lora
    from train import distributed
    from train.config import TrainConfig
    from train.trainer import Trainer
    model, _ = load(args.folder, dtype=torch.float32)
    rows = batch(args, model.config.vocab_size)
    samples = [(row.tolist(), [True] * len(row)) for row in rows]
    loader = BatchLoader(PackedDataset.from_samples(samples, args.seq_len, pack="whole"), args.batch)
    torch.manual_seed(0)
    apply_lora(model, TARGETS, LORA["r"], LORA["alpha"], LORA["dropout"])
    with tempfile.TemporaryDirectory() as out, distributed.session(args.device) as info:
        cfg = TrainConfig(out_dir=out, max_steps=args.steps + 1, progress=False, export=False)
        trainer = Trainer(model, cfg, loader, dist_info=info)
        return timed_steps(lambda: trainer.train_step()["loss"], args.steps, args.device)


def theirs(args) -> tuple[float, float]:
    import peft
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).to(args.device)
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    rows = batch(args, model.config.vocab_size).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # HF shifts labels inside: input_ids == labels over the same T tokens.
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss)
    return timed_steps(step, args.steps, args.device)


def main(argv=None):
    args = parse_args(argv)
    if args.side:
        seconds, loss = (ours if args.side == "ours" else theirs)(args)
        print(json.dumps({"seconds": seconds, "loss": loss, "peak_mib": peak_memory_mib(args.device)}))
        return
    from model import assets
    source = args.model or assets.smollm2_gguf()
    flags = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
             "--device", args.device]
    with hf_copy(source) as folder:
        results = {side: run_side(__file__, side, folder, flags) for side in ("ours", "transformers")}
    tokens = args.batch * args.seq_len
    print(f"model {source}\ndevice {args.device}, fp32 weights, batch {args.batch} x {args.seq_len} tokens, "
          f"LoRA r={LORA['r']} on all linear layers, best of {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'side':<14}{'tokens/s':>10}{'s/step':>9}{'peak MiB':>10}{'loss':>9}")
    for side, r in results.items():
        print(f"{side:<14}{tokens / r['seconds']:>10.1f}{r['seconds']:>9.2f}{r['peak_mib']:>10.0f}{r['loss']:>9.4f}")
    a, b = results["ours"], results["transformers"]
    print(f"speed ratio ours/transformers+peft: {b['seconds'] / a['seconds']:.2f}x; "
          f"memory ratio: {a['peak_mib'] / b['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
