#!/usr/bin/env bash
# The GPU check in one command, for a short lease of a GPU machine: the CUDA tests, the device's bf16
# matmul peak, and the benchmark sweep (fastcon vs the reference vs the installed peers), all written
# to one folder.
#
#   bash benchmarks/gpu_sweep.sh OUT_DIR
#
# Runs from the source tree (PYTHONPATH, no build: the GPU paths need no C++ extension) with the
# machine's python3, torch and triton. Peers that are not installed are reported as skipped; to add
# them on a machine without network, download their wheels beforehand
# (`make gpu-wheels WHEELS=wheels`: pip download --no-deps of open-clip-torch, inf-cl, siglip-kernel,
# pylate, flash-maxsim, late-interaction-kernels) and pass WHEELS=that/folder.
# A case whose N x N buffers cannot fit the GPU's memory (the materialising reference and open_clip at
# N = 262,144) is a `skipped` row computed from its size, before it runs.
# Environment: PYTHON (default python3), WHEELS, SWEEP_BATCH (default 8192,65536,262144), SWEEP_DIM
# (768), DIM_BATCH (65536) and DIM_SWEEP (512,1152): the feature-size sweep of fastcon and the O(N)
# peers, TARGET_BATCH (8192,32768), TOKEN_BATCH (512), TEST_TIMEOUT (seconds for the tests of
# `make test-gpu`, 150), SWEEP_TIMEOUT, DIMS_TIMEOUT, TARGET_TIMEOUT, TOKEN_TIMEOUT (seconds for each
# benchmark command: 150, 60, 60, 45; the JSON rows are written after every case, so a command stopped
# by its limit keeps what it measured). About 8 minutes in all.
# FUSED_TIMEOUT and SOFT_TIMEOUT (25 and 20) bound the two cases on the general target's producers.
# Output (sixteen files): env.txt, cuda-tests.log, gpu-peak.json, gpu-bf16.json, gpu-bf16.md,
# gpu-dims-bf16.json, gpu-dims-bf16.md, gpu-targets-bf16.json, gpu-targets-bf16.md,
# gpu-fused-targets-bf16.json, gpu-fused-targets-bf16.md, gpu-distill-producers-bf16.json,
# gpu-distill-producers-bf16.md, gpu-tokens-bf16.json, gpu-tokens-bf16.md, gpu-summary.md.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_sweep.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastcon-peers "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/fastcon-peers"
fi
status=0

{ nvidia-smi; "$py" -c "import json, torch, triton, fastcon; print('torch', torch.__version__, 'triton', triton.__version__);
print(json.dumps(fastcon.backend_info(), indent=1, default=str))"; } >"$out/env.txt" 2>&1 || status=1

# The selection of `make test-gpu` (GPU_TEST_ARGS in the Makefile; keep the two in step): the CUDA
# tests and the CPU tests that need neither the interpreter nor the C++ extension (not built here).
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  timeout "${TEST_TIMEOUT:-150}" "$py" -m pytest -q -m "cuda or not (interpreter or slow)" -k "not cpp" \
    -p no:cacheprovider tests >"$out/cuda-tests.log" 2>&1 || status=1
else
  echo "torch.cuda.is_available() is False: no CUDA tests" >"$out/cuda-tests.log"; status=1
fi
tail -n 3 "$out/cuda-tests.log"

"$py" -m fastcon.bench peak --device cuda --dtype bfloat16 --json "$out/gpu-peak.json" || status=1
bench() { local limit=$1; shift; timeout "$limit" "$py" -m fastcon.bench --device cuda --dtype bfloat16 "$@"; }
bench "${SWEEP_TIMEOUT:-150}" --loss clip,siglip --providers fastcon,reference,open_clip,inf_cl,siglip_kernel \
  --batch "${SWEEP_BATCH:-8192,65536,262144}" --dim "${SWEEP_DIM:-768}" \
  --json "$out/gpu-bf16.json" --markdown "$out/gpu-bf16.md" || status=1
# D from 512 to 1152 at one N, fastcon against the O(N)-memory peers
bench "${DIMS_TIMEOUT:-50}" --loss clip,siglip --providers fastcon,inf_cl,siglip_kernel --batch "${DIM_BATCH:-65536}" \
  --dim "${DIM_SWEEP:-512,1152}" --json "$out/gpu-dims-bf16.json" --markdown "$out/gpu-dims-bf16.md" || status=1
# The general-target losses (class ids, NT-Xent, MNRL, DistillClipLoss, alignment/uniformity, MoCHi,
# m²-mix) against their references and installed peers.
bench "${TARGET_TIMEOUT:-50}" --loss clip_labels,ntxent,mnrl,distill,align_uniform,mochi,m2mix \
  --providers fastcon,reference,open_clip,lightly,sentence_transformers --batch "${TARGET_BATCH:-8192,32768}" \
  --dim "${SWEEP_DIM:-768}" --json "$out/gpu-targets-bf16.json" \
  --markdown "$out/gpu-targets-bf16.md" || status=1
# The general target at D = 256 on the fused tile kernels (G in registers) against the chunked path:
# where the explicit choice wins (auto takes the chunked path until this says otherwise).
bench "${FUSED_TIMEOUT:-25}" --loss clip_labels,ntxent,distill --providers fastcon-triton,fastcon-triton_fused \
  --batch "${FUSED_BATCH:-32768}" --dim 256 --json "$out/gpu-fused-targets-bf16.json" \
  --markdown "$out/gpu-fused-targets-bf16.md" || status=1
# Distillation with the student's tiles formed in the epilogue kernels (FASTCON_TRITON_PRODUCER=matmul)
# against the default, from cuBLAS chunks (its fastcon row in gpu-targets-bf16.json, same N and D).
FASTCON_TRITON_PRODUCER=matmul bench "${SOFT_TIMEOUT:-20}" --loss distill --providers fastcon-triton \
  --batch "${FUSED_BATCH:-32768}" --dim "${SWEEP_DIM:-768}" --json "$out/gpu-distill-producers-bf16.json" \
  --markdown "$out/gpu-distill-producers-bf16.md" || status=1
# The token-level losses: FILIP (196 patches x 77 tokens) and MaxSim (32 x 180) at B=512, D=256, against
# the materialising reference and PyLate's scores (its torch path, flash-maxsim, late-interaction-kernels).
bench "${TOKEN_TIMEOUT:-45}" --loss filip,maxsim \
  --providers fastcon,reference,pylate,flash_maxsim,late_interaction_kernels --batch "${TOKEN_BATCH:-512}" \
  --dim 256 --json "$out/gpu-tokens-bf16.json" --markdown "$out/gpu-tokens-bf16.md" || status=1
"$py" -m fastcon.bench summary "$out/gpu-peak.json" "$out/gpu-bf16.json" "$out/gpu-dims-bf16.json" \
  >"$out/gpu-summary.md" || status=1
cat "$out/gpu-summary.md"
exit $status
