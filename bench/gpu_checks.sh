#!/usr/bin/env bash
# Used by: bash bench/gpu_checks.sh   (on a GPU machine; every GPU claim in one run, results under $OUT)
# 1. DeepSpeed ZeRO-2 + AdamW8bit in bf16 on the GPU: kill -9 mid-run, restart, compare bit for bit.
# 2. bf16 throughput, ours against Hugging Face's Trainer (length-grouped), with peak memory.
# Offline machines: wheels in .whl/ are installed first; a tokenizer dir stands in for the hub.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
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
python3 -c "import torch, transformers, accelerate, peft, deepspeed, bitsandbytes, hydra, datasets; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'peft', peft.__version__, 'deepspeed', deepspeed.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"

echo "== 1. ZeRO-2 + AdamW8bit, bf16: kill -9 at step 7 of 12, restart, compare"
timeout 300 python3 bench/resume_exactness.py --kill-step 7 --json "$OUT/zero2_exactness.json" \
  +experiment=tiny $MODEL train.device=auto train.max_steps=12 ckpt.every=0.25 train.eval_every=0 \
  distributed=zero2 distributed.num_processes=1 optim=adamw8bit train.mixed_precision=bf16 \
  train.global_batch_size=16 train.micro_batch_size=4 peft.r=16 peft.alpha=32 data.max_length=256 \
  2>&1 | tail -25 | tee "$OUT/zero2_exactness.log"

echo "== 2. bf16 throughput: ours vs HF Trainer (group_by_length), SmolLM2-135M shape + LoRA"
timeout 240 python3 bench/throughput.py --steps 60 --warmup 10 --micro-batch 16 --records 2000 \
  --json "$OUT/throughput.json" $MODEL train.mixed_precision=bf16 model.dtype=bfloat16 \
  2>&1 | tail -12 | tee "$OUT/throughput.log"

echo "== 3. QLoRA (4-bit base) + gradient checkpointing + AdamW8bit, bf16, 10 steps"
timeout 150 python3 -m noesis_accel.train +experiment=tiny $MODEL train.device=auto model.load_in_4bit=true \
  model.dtype=bfloat16 train.mixed_precision=bf16 model.gradient_checkpointing=true optim=adamw8bit \
  train.max_steps=10 train.eval_every=0.5 run.root=/tmp/qlora 2>&1 | grep -E "run /|held-out|error|Error" | tee "$OUT/qlora.log"
python3 -c "import json; m=[json.loads(l) for l in open('/tmp/qlora/tiny/metrics.jsonl')]; print('qlora losses', [round(x['loss'],3) for x in m if 'loss' in x])" 2>&1 | tee -a "$OUT/qlora.log"
