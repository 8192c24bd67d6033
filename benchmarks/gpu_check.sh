#!/usr/bin/env bash
# The GPU check of the cost model, in one call on a lent GPU machine (DEVELOPERS.md says how to prepare it):
# both profilers on Llama-2-7B layers (their calibration runs included), then the accuracy benchmark's whole
# jobs priced with estimates and with the Megatron profile, and what attention really costs (attention_kernels.py).
# Everything lands in $OUT (default ./gpu-check).
#   UNIAP_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # the same steps on the CPU with a tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
if [ "${UNIAP_GPU_CHECK_SMOKE:-}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then  # the carried wheels (cp312)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ "${UNIAP_GPU_CHECK_SMOKE:-}" = 1 ]; then
  export DS_ACCELERATOR=cpu
  model=(--model "$PWD/benchmarks/data/tiny-llama.yaml" --seq-length 32 --micro-batch-sizes 1,2)
  bench=(--smoke)
else
  model=(--model llama2-7b --seq-length 4096 --micro-batch-sizes 1,2)
  bench=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> "$out/gpu.txt"
python3 -m uniap_megatron.profile "${model[@]}" --no-collectives -o "$out/megatron-profile.json" --force \
  2>&1 | tee "$out/megatron-profile.log"
python3 -m uniap_deepspeed.profile "${model[@]}" --no-collectives -o "$out/deepspeed-profile.json" --force \
  2>&1 | tee "$out/deepspeed-profile.log"
python3 benchmarks/cost_model_accuracy.py "${bench[@]}" --json "$out/accuracy.json" 2>&1 | grep -v Warning \
  | tee "$out/accuracy.txt"
python3 benchmarks/cost_model_accuracy.py "${bench[@]}" --skip-published --profile "$out/megatron-profile.json" \
  --json "$out/accuracy-profiled.json" 2>&1 | grep -v Warning | tee "$out/accuracy-profiled.txt"
python3 benchmarks/attention_kernels.py "${bench[@]}" --json "$out/attention.json" 2>&1 | tee "$out/attention.txt"
python3 benchmarks/fp8_gemm.py "${bench[@]}" --json "$out/fp8-gemm.json" 2>&1 | tee "$out/fp8-gemm.txt"
