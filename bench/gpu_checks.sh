#!/usr/bin/env bash
# Used by: bash bench/gpu_checks.sh   (on a GPU machine; every GPU claim in one run of about 9.5 minutes (allow 10); results under $OUT)
# Prepare on a machine with network first: bash bench/fetch_gpu_wheels.sh   (fills .whl/ and .gpu/; bring both along)
# 1. The 8B bench: Llama-3-8B shape + LoRA, ours vs HF Trainer, gradient checkpointing / Liger / packing /
#    compile on and off, MFU, the 2 x 2048 memory probe (bench/llama8b.py).
# 2. The noesis recipe itself, 20 steps on the 8B shape in +debug=gpu: tokens/s, memory, LoRA checkpoint
#    size and save time (bench/recipe_report.py).
# 3. The speed options' GPU tests: packed sdpa = padded; Liger keeps the loss definition and gradients.
# 4. DeepSpeed ZeRO-2 + AdamW8bit in bf16: kill -9 mid-run, restart, compare bit for bit.
# 5. bf16 throughput on the SmolLM2-135M shape, ours against the length-grouped Trainer.
# 6. QLoRA (4-bit base) + gradient checkpointing + AdamW8bit, 10 steps.
# 7. noesis plan's memory against one real optimizer step of the recipe on the 8B shape (bench/plan_vs_measured.py).
# 8. FSDP2 on the GPU (NCCL, bf16 mixed precision, AdamW8bit over the shards): kill -9 mid-run, restart,
#    compare bit for bit (LoRA); then a full fine-tune (peft=none), 10 steps.
# Each part has a time cap inside a total budget (GPU_CHECKS_BUDGET_S, default 560 s); PARTS picks parts
# (default "bench8b recipe gputests zero2 throughput qlora fsdp2 plan"; part 7 comes last, so a tight budget
# skips it first: PARTS=plan runs it alone, PARTS=fsdp2 the FSDP2 checks alone). Nine files under $OUT: gpu.txt
# (versions, per-part exit codes and seconds, the plan's verdict), gpu_checks.log (all output), llama8b.json,
# recipe.json, zero2_exactness.json, fsdp2_exactness.json, throughput.json, plan_vs_measured.txt,
# throughput_table.json (the plans' table with this GPU's rows added).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
DEADLINE=$((SECONDS + ${GPU_CHECKS_BUDGET_S:-560}))
PARTS=${PARTS:-"bench8b recipe gputests zero2 throughput qlora fsdp2 plan"}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=${PYTHONPATH:-}:$PWD
fi
TOKENIZER=${TOKENIZER_DIR:-$PWD/.gpu/smollm2_tokenizer}
MODEL="model=smollm2_135m_arch model.name_or_path=$TOKENIZER model.gguf_file=null"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | grep -v -i warn | tee -a "$OUT/gpu.txt"
import importlib
found = []
for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "hydra", "datasets",
             "liger_kernel", "triton"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as err:  # report every missing piece at once, then let the parts say what it costs
        found.append(f"{name} MISSING ({err.__class__.__name__}: {err})")
print(", ".join(found))
PY

# part NAME CAP_SECONDS COMMAND...: run unless not selected or out of budget; record exit code and seconds.
part() {
  local name=$1 cap=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 30 ]; then
    echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/gpu.txt"
    return 0
  fi
  echo "== $name (at most ${limit} s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
}

# 1. ~4.5 min: one 8B model built on the GPU and shared; ~17 s per configuration (two epochs of 10 steps,
#    LoRA on and off, a final checkpoint), compile last. The bench starts no configuration after 200 s and
#    rewrites its JSON around each one, so a stop at the cap keeps every finished row.
#    Its "ours (gc on)" row, and part 5's, are added to a copy of the throughput table the plans read
#    ($OUT/throughput_table.json): copy it over noesis_accel/assets/throughput.json to have plans use them.
cp noesis_accel/assets/throughput.json "$OUT/throughput_table.json"
part bench8b 300 python3 bench/llama8b.py --tokenizer "$TOKENIZER" --json "$OUT/llama8b.json" --budget-s 200 \
  --record "$OUT/throughput_table.json"
[ -f "$OUT/llama8b.json" ] && python3 bench/llama8b.py --table-from "$OUT/llama8b.json" 2>&1 | tee -a "$LOG"

# 2. ~1.5 min: process start, 8B model on the GPU, 20 steps with checkpoints at 10 and 20, held-out loss 3 times.
part recipe 160 bash -c "python3 bench/llama8b.py --write-data /tmp/recipe_data.jsonl --records 400 && \
  python3 -m noesis_accel.processes.train +experiment=noesis +debug=gpu model=llama3_8b_arch model.name_or_path='$TOKENIZER' \
  model.gguf_file=null data.path=/tmp/recipe_data.jsonl run.root=/tmp/recipe train.progress_bar=false"
[ -d /tmp/recipe/noesis ] && python3 bench/recipe_report.py /tmp/recipe/noesis --json "$OUT/recipe.json" 2>&1 | tee -a "$LOG"

# 3. ~40 s: packing through sdpa on the GPU, and Liger keeping our loss and gradients (tests/test_gpu_speed.py).
part gputests 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_speed.py

# 4. ~1.5 min: four short runs of the 135M shape (two references, a killed one, its restart).
part zero2 110 python3 bench/resume_exactness.py --kill-step 7 --json "$OUT/zero2_exactness.json" \
  +experiment=tiny $MODEL train.device=auto train.max_steps=12 ckpt.every=0.25 train.eval_every=0 \
  distributed=zero2 distributed.num_processes=1 optim=adamw8bit train.mixed_precision=bf16 \
  train.global_batch_size=16 train.micro_batch_size=4 peft.r=16 peft.alpha=32 data.max_length=256

# 5. ~1 min.
part throughput 90 python3 bench/throughput.py --repeats 1 --steps 60 --warmup 10 --micro-batch 16 --records 2000 \
  --json "$OUT/throughput.json" --record "$OUT/throughput_table.json" $MODEL train.mixed_precision=bf16 model.dtype=bfloat16

# 6. ~40 s.
part qlora 60 python3 -m noesis_accel.processes.train +experiment=tiny $MODEL train.device=auto model.load_in_4bit=true \
  model.dtype=bfloat16 train.mixed_precision=bf16 model.gradient_checkpointing=true optim=adamw8bit \
  train.max_steps=10 train.eval_every=0.5 run.root=/tmp/qlora
[ -f /tmp/qlora/tiny/metrics.jsonl ] && python3 -c "import json; m=[json.loads(l) for l in open('/tmp/qlora/tiny/metrics.jsonl')]; \
print('qlora losses', [round(x['loss'],3) for x in m if 'loss' in x])" 2>&1 | tee -a "$LOG"

# 8. ~2 min: the zero2 part's runs under FSDP2 (one process: every unit still sharded, gathered and reduced
#    through NCCL, checkpoints through DCP), then a full fine-tune of the same shape.
part fsdp2 150 bash -c "python3 bench/resume_exactness.py --kill-step 7 --json '$OUT/fsdp2_exactness.json' \
  +experiment=tiny $MODEL train.device=auto train.max_steps=12 ckpt.every=0.25 train.eval_every=0 \
  distributed=fsdp2 distributed.num_processes=1 optim=adamw8bit train.mixed_precision=bf16 \
  train.global_batch_size=16 train.micro_batch_size=4 peft.r=16 peft.alpha=32 data.max_length=256 && \
  python3 -m noesis_accel.processes.train +experiment=tiny $MODEL train.device=auto distributed=fsdp2 \
  distributed.num_processes=1 peft=none optim=adamw8bit train.mixed_precision=bf16 train.max_steps=10 \
  train.eval_every=0.5 run.root=/tmp/fsdp2_full"

# 7. ~1 min: the 8B shape built on the GPU, its plan made from the data it loaded, one optimizer step (the
#    largest micro-batch, trained first). Compares torch.cuda.max_memory_allocated with the plan's total per
#    GPU: PASS within ±15% (exit 1 on FAIL); the table also sets each plan term beside its measured bytes.
#    Uses part 2's data (400 synthetic records), writing it first when part 2 did not run.
part plan 120 bash -c "set -o pipefail; [ -f /tmp/recipe_data.jsonl ] || \
  python3 bench/llama8b.py --write-data /tmp/recipe_data.jsonl --records 400 || exit 1; \
  python3 bench/plan_vs_measured.py --experiment noesis model=llama3_8b_arch +debug=gpu \
  model.name_or_path='$TOKENIZER' model.gguf_file=null data.path=/tmp/recipe_data.jsonl \
  | tee '$OUT/plan_vs_measured.txt'"
[ -f "$OUT/plan_vs_measured.txt" ] && grep "^total per GPU" "$OUT/plan_vs_measured.txt" | sed 's/^/plan: /' | tee -a "$OUT/gpu.txt"

echo "total ${SECONDS} s" | tee -a "$OUT/gpu.txt"
