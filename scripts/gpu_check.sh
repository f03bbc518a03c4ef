#!/usr/bin/env bash
# The one GPU check of issue 15 (point 4): on one H100/H200, in under 8 minutes, every number into
# one folder.
#
#   bash scripts/gpu_check.sh                          # writes ${OUT:-gpu_results}/
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh          # print each part's limit and command, run nothing
#   GPU_CHECK_PARTS="tests train_lora" bash scripts/gpu_check.sh     # a subset, in this order
#   GPU_CHECK_LIMIT_kernels=200 bash scripts/gpu_check.sh            # one part's time limit (seconds)
#
# Parts (each under `timeout`, logging to OUT/<part>.log; a failing part does not stop the next):
#   env              versions, the device, nvidia-smi; no CUDA device = nothing else is run
#   tests            tests/test_gpu.py (compiled not interpreted, model on the kernels vs the torch
#                    references, bf16 FSDP2 step vs fp32) + tests/test_kernels.py and
#                    tests/test_attention.py (every Triton kernel vs its reference, fp32 and bf16,
#                    compiled for real on CUDA); OUT/tests.xml (JUnit) holds every test's result
#   train_lora       scripts/bench_step.py: Llama-3-8B shape, 32 layers, LoRA r=16, bf16, activation
#                    checkpointing: tokens/s and MFU (4N tokens)
#   train_full       the same, full fine-tuning of 16 of the 32 layers (fp32 masters + AdamW state of
#                    all 32 would not fit): MFU (6N tokens)
#   kernels          scripts/bench_kernels.py: each kernel vs torch eager and torch.compile, GB/s
#                    against the measured copy bandwidth, attention vs SDPA's flash backend
#   decode           scripts/bench_step.py decode: 8B shape, bf16, batch 1 and 8, ours vs transformers
#   decode_compiled  ours eager vs ours with the compiled one-token step, batch 1 (compile time shown)
#   train_full_compiled  (not in the default list: GPU_CHECK_PARTS=train_full_compiled) train_full with
#                    every block compiled (--compile); its warm-up step holds the compile time
#
# Only the device's Python is used (${PYTHON:-python}, with torch, triton, transformers, peft, pytest,
# numpy, safetensors, sentencepiece); nothing is installed, nothing is downloaded. The parts share
# one budget (GPU_CHECK_BUDGET, default 460 s): a part gets min(its limit, what is left), and one
# with under 20 s left is not run (and counts as failed). OUT/summary.md lists every part (status,
# seconds) and every GOAL line; bench_step's results are also in OUT/numbers.jsonl. Exit status: 1
# if any part failed, else 0.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_results}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-460}
PARTS=${GPU_CHECK_PARTS:-env tests train_lora train_full kernels decode decode_compiled}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # logs survive a timeout; no hub

STEP="$PYTHON scripts/bench_step.py"
NUMBERS="--json $OUT/numbers.jsonl"
ENV_PY='import importlib, importlib.util, sys, torch
def version(name):  # a missing package is reported here; the part that needs it fails on its own
    return importlib.import_module(name).__version__ if importlib.util.find_spec(name) else "MISSING"
names = ("triton", "transformers", "peft", "pytest", "numpy", "safetensors", "sentencepiece")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      *(f"{n} {version(n)}" for n in names))
assert torch.cuda.is_available(), "no CUDA device: the GPU check cannot run"
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")'

# part -> default time limit (seconds) and command
limit_of() {
  case "$1" in
    env) echo 30 ;; tests) echo 120 ;; train_lora) echo 60 ;; train_full) echo 60 ;;
    kernels) echo 120 ;; decode) echo 60 ;; decode_compiled) echo 90 ;; train_full_compiled) echo 180 ;;
    *) echo 0 ;;
  esac
}
command_of() {
  case "$1" in
    env) echo "$PYTHON -c '$ENV_PY' && { nvidia-smi || true; }" ;;
    tests) echo "$PYTHON -m pytest -rs --durations=15 --junitxml=$OUT/tests.xml tests/test_gpu.py" \
                "tests/test_kernels.py tests/test_attention.py" ;;
    train_lora) echo "$STEP train --mode lora --batch 2 --seq-len 4096 --docs 4 --steps 3 $NUMBERS" ;;
    train_full) echo "$STEP train --mode full --layers 16 --batch 2 --seq-len 4096 --docs 4 --steps 3 $NUMBERS" ;;
    train_full_compiled) echo "$STEP train --mode full --layers 16 --batch 2 --seq-len 4096 --docs 4 --steps 3" \
                              "--compile $NUMBERS" ;;
    kernels) echo "$PYTHON scripts/bench_kernels.py" ;;
    decode) echo "$STEP decode --batch 1 8 --new-tokens 128 --repeats 1 --sides ours,transformers $NUMBERS" ;;
    decode_compiled) echo "$STEP decode --batch 1 --new-tokens 128 --repeats 1 --sides ours,ours-compiled $NUMBERS" ;;
  esac
}

for part in $PARTS; do
  if [ "$(limit_of "$part")" = 0 ]; then
    echo "gpu_check: unknown part '$part' in GPU_CHECK_PARTS (parts: env tests train_lora train_full kernels" \
         "decode decode_compiled train_full_compiled)" >&2
    exit 2
  fi
done

if [ "$DRY" = 1 ]; then
  echo "# gpu_check dry run: OUT=$OUT, budget ${BUDGET}s"
  for part in $PARTS; do
    var=GPU_CHECK_LIMIT_$part
    echo "[$part, limit ${!var:-$(limit_of "$part")}s] $(command_of "$part")"
  done
  exit 0
fi

mkdir -p "$OUT"
rm -f "$OUT/numbers.jsonl"
start=$(date +%s)
rows=()
failed=0
no_gpu=0
for part in $PARTS; do
  var=GPU_CHECK_LIMIT_$part
  limit=${!var:-$(limit_of "$part")}
  left=$((BUDGET - ($(date +%s) - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$no_gpu" = 1 ]; then
    rows+=("| $part | not run (no usable GPU, see env.log) | 0 | - |"); failed=1; continue
  fi
  if [ "$limit" -lt 20 ]; then
    rows+=("| $part | not run (budget spent) | 0 | $limit |"); failed=1; continue
  fi
  cmd=$(command_of "$part")
  echo "== $part (limit ${limit}s; command in $OUT/$part.log)"
  t0=$(date +%s)
  { echo "\$ $cmd"; timeout -k 10 "$limit" bash -c "$cmd"; } > "$OUT/$part.log" 2>&1
  rc=$?
  seconds=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT"; failed=1 ;;
    *) status="FAILED (rc $rc)"; failed=1 ;;
  esac
  [ "$part" = env ] && [ "$rc" != 0 ] && no_gpu=1
  rows+=("| $part | $status | $seconds | $limit |")
  echo "   $status in ${seconds}s"
  if [ "$rc" != 0 ]; then tail -n 25 "$OUT/$part.log" | sed 's/^/   | /'; fi
done

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - start)) s of a ${BUDGET} s budget"
  grep -h -m1 '^device ' "$OUT/env.log" 2>/dev/null
  grep -h -m1 '^python ' "$OUT/env.log" 2>/dev/null
  echo
  echo "| part | status | seconds | limit s |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "## Goals"
  echo
  grep -h '^GOAL' "$OUT"/*.log 2>/dev/null || echo "(no GOAL line: the benchmark parts did not get that far)"
  echo
  echo "Logs: one per part in this folder; bench_step results: numbers.jsonl; every test: tests.xml."
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $failed
