#!/usr/bin/env bash
# Used by: bash bench/fetch_gpu_wheels.sh   (here, before a GPU run: fills .whl/ and .gpu/, both git-ignored)
# The lent GPU machine (Python 3.12, x86-64, no network) has torch, transformers, accelerate, peft, triton,
# pyarrow, pandas, fsspec, huggingface-hub and tokenizers; these wheels bring the rest that
# bench/gpu_checks.sh imports, at the versions the tests run here. It also saves the SmolLM2 tokenizer as
# plain files (the machine has no `gguf` package to read it from the GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl .gpu
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  liger-kernel==0.8.5
# Source-only on PyPI: omegaconf's parser runtime, and DeepSpeed (its CUDA ops compile just in time on the GPU).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
"$PY" - <<'PY'
from noesis_accel.config import compose
from noesis_accel.training.modeling import load_tokenizer

load_tokenizer(compose(["model=smollm2_135m"]).model).save_pretrained(".gpu/smollm2_tokenizer")
PY
du -sh .whl .gpu
ls .whl
