#!/usr/bin/env bash
# The GPU check in one command, for a short lease of a GPU machine: the CUDA tests, the device's bf16
# matmul peak, and the benchmark sweep (fastcon vs the reference vs the installed peers), all written
# to one folder.
#
#   bash benchmarks/gpu_sweep.sh OUT_DIR             # the real run, on a CUDA GPU
#   bash benchmarks/gpu_sweep.sh --dry-run OUT_DIR   # every stage on the CPU, in a few minutes
#
# Runs from the source tree (PYTHONPATH, no build: the GPU paths need no C++ extension) with the
# machine's python3, torch and triton. Peers that are not installed are reported as skipped; to add
# them on a machine without network, download their wheels beforehand
# (`make gpu-wheels WHEELS=wheels`: pip download --no-deps of open-clip-torch, inf-cl, siglip-kernel,
# pylate, flash-maxsim, late-interaction-kernels) and pass WHEELS=that/folder.
# A case whose N x N buffers cannot fit the GPU's memory (the materialising reference and open_clip at
# N = 262,144) is a `skipped` row computed from its size, before it runs.
#
# The dry run (`--dry-run`, what CI runs) takes every stage of the real run on the CPU: the Triton
# kernels under the interpreter (fp32, tiny shapes, `fastcon-triton` rows beside `fastcon`), the peers
# that are installed, the tests' selection collected but not run, and writes every file the real run
# writes (their rows say device cpu). It exits non-zero where a stage failed, as the real run does.
#
# Environment: PYTHON (default python3), WHEELS, SWEEP_BATCH (default 8192,65536,262144), SWEEP_DIM
# (768), DIM_BATCH (65536) and DIM_SWEEP (512,1152): the feature-size sweep of fastcon and the O(N)
# peers, TARGET_BATCH (8192,32768), FUSED_BATCH (32768), TOKEN_BATCH (512).
# Time limits, in seconds, of the stages (each a `timeout`; the benchmark writes its JSON rows after
# every case, so a stage stopped by its limit keeps what it measured, and its Markdown table is then
# written from those rows): TEST_TIMEOUT 140 (the tests of `make test-gpu`), PEAK_TIMEOUT 15,
# SWEEP_TIMEOUT 140, DIMS_TIMEOUT 50, TARGET_TIMEOUT 50, FUSED_TIMEOUT 25, SOFT_TIMEOUT 20,
# TOKEN_TIMEOUT 40: 480 s, 8 minutes in all at the most (the dry run's limits are its own).
#
# Output (seventeen files, `SWEEP_FILES` below): env.txt, stages.txt (each stage's seconds against its
# limit), cuda-tests.log, gpu-peak.json, gpu-bf16.json,
# gpu-bf16.md, gpu-dims-bf16.json, gpu-dims-bf16.md, gpu-targets-bf16.json, gpu-targets-bf16.md,
# gpu-fused-targets-bf16.json, gpu-fused-targets-bf16.md, gpu-distill-producers-bf16.json,
# gpu-distill-producers-bf16.md, gpu-tokens-bf16.json, gpu-tokens-bf16.md, gpu-summary.md.
# `fastcon-bench decide OUT_DIR` then says which of `auto`'s open choices the rows support.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: bash benchmarks/gpu_sweep.sh [--dry-run] OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# No C++ compile on the GPU's time: where the tree has no extension built against this torch, the CPU
# rows run on the torch path (fastcon/kernels/_extension.py would otherwise compile it at first use).
export FASTCON_BUILD_EXT=0
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastcon-peers "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/fastcon-peers"
fi

if [ "$dry" = 1 ]; then
  # The interpreter on the CPU: fp32, shapes that take seconds, the Triton rows beside the C++ ones.
  export TRITON_INTERPRET=1
  device=(--device cpu --dtype float32 --repeat 1 --min-time 0 --check-rows 64)
  ours=fastcon,fastcon-triton
  : "${SWEEP_BATCH:=96}" "${SWEEP_DIM:=32}" "${DIM_BATCH:=64}" "${DIM_SWEEP:=16,48}" "${TARGET_BATCH:=48}"
  : "${FUSED_BATCH:=48}" "${TOKEN_BATCH:=4}" "${FUSED_DIM:=16}" "${TOKEN_DIM:=16}"
  peak=(--batch 256 --dim 256 --repeat 1)
  limit=${DRY_TIMEOUT:-240}
  : "${TEST_TIMEOUT:=$limit}" "${PEAK_TIMEOUT:=$limit}" "${SWEEP_TIMEOUT:=$limit}" "${DIMS_TIMEOUT:=$limit}"
  : "${TARGET_TIMEOUT:=$limit}" "${FUSED_TIMEOUT:=$limit}" "${SOFT_TIMEOUT:=$limit}" "${TOKEN_TIMEOUT:=$limit}"
else
  export TRITON_INTERPRET=0
  device=(--device cuda --dtype bfloat16)
  ours=fastcon
  peak=(--dtype bfloat16)
fi
status=0
# failed STAGE RC: the run's exit status becomes 1 (a marker file too: the dry run's stages run in two
# background groups, whose variables do not reach this shell)
failed() { echo "gpu_sweep: stage '$1' failed (exit $2)" >&2; status=1; touch "$out/.failed"; }
rm -f "$out/.failed"
# took STAGE START LIMIT: a line of stages.txt, the seconds a stage took against its limit
: >"$out/stages.txt"
took() { echo "$1 $((SECONDS - $2)) s (limit $3 s)" >>"$out/stages.txt"; }

{
  if [ "$dry" = 1 ]; then echo "dry run on the CPU: $(uname -m), $(nproc) cores"; else nvidia-smi; fi
  "$py" -c "import json, torch, triton, fastcon; print('torch', torch.__version__, 'triton', triton.__version__);
print(json.dumps(fastcon.backend_info(), indent=1, default=str))"
} >"$out/env.txt" 2>&1 || failed env $?

# The selection of `make test-gpu` (GPU_TEST_ARGS in the Makefile; keep the two in step): the CUDA
# tests and the CPU tests that need neither the interpreter nor the C++ extension (not built here).
# The dry run collects the same selection without running it.
tests=(-m "cuda or not (interpreter or slow)" -k "not cpp" -p no:cacheprovider tests)
t0=$SECONDS
if [ "$dry" = 1 ]; then
  TRITON_INTERPRET=0 timeout "$TEST_TIMEOUT" "$py" -m pytest -q --collect-only "${tests[@]}" \
    >"$out/cuda-tests.log" 2>&1 || failed tests $?
elif "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  timeout "${TEST_TIMEOUT:-140}" "$py" -m pytest -q "${tests[@]}" >"$out/cuda-tests.log" 2>&1 || failed tests $?
else
  echo "torch.cuda.is_available() is False: no CUDA tests" >"$out/cuda-tests.log"; failed tests 1
fi
took tests $t0 "${TEST_TIMEOUT:-140}"
tail -n 3 "$out/cuda-tests.log"

t0=$SECONDS
timeout "${PEAK_TIMEOUT:-15}" "$py" -m fastcon.bench peak "${device[0]}" "${device[1]}" "${peak[@]}" \
  --json "$out/gpu-peak.json" || failed peak $?
took peak $t0 "${PEAK_TIMEOUT:-15}"

# bench STAGE LIMIT NAME ARGS...: one benchmark command writing NAME.json and NAME.md; a command
# stopped by its limit (or failing) still gets its table, from the rows it wrote.
bench() {
  local stage=$1 limit=$2 name=$3 t0=$SECONDS; shift 3
  timeout "$limit" "$py" -m fastcon.bench "${device[@]}" "$@" --json "$out/$name.json" --markdown "$out/$name.md"
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed "$stage" $rc
    [ -s "$out/$name.json" ] && "$py" -m fastcon.bench --from-json "$out/$name.json" --markdown "$out/$name.md" \
      >/dev/null
  fi
  took "$stage" "$t0" "$limit"
}
# The benchmark stages in two groups: one after the other on the GPU (no two timings overlap); at
# once in the dry run, where each takes one of the CPU's cores.
group_a() {
  bench sweep "${SWEEP_TIMEOUT:-140}" gpu-bf16 --loss clip,siglip \
    --providers "$ours,reference,open_clip,inf_cl,siglip_kernel" --batch "${SWEEP_BATCH:-8192,65536,262144}" \
    --dim "${SWEEP_DIM:-768}"
  # D from 512 to 1152 at one N, fastcon against the O(N)-memory peers
  bench dims "${DIMS_TIMEOUT:-50}" gpu-dims-bf16 --loss clip,siglip --providers "$ours,inf_cl,siglip_kernel" \
    --batch "${DIM_BATCH:-65536}" --dim "${DIM_SWEEP:-512,1152}"
  # The general-target losses (class ids, NT-Xent, MNRL, DistillClipLoss, alignment/uniformity, MoCHi,
  # m²-mix; last, so that a stage cut by its limit keeps the others: the debiased loss, Matryoshka MNRL,
  # GISTEmbed) against their references and installed peers.
  bench targets "${TARGET_TIMEOUT:-50}" gpu-targets-bf16 \
    --loss clip_labels,ntxent,mnrl,distill,align_uniform,mochi,m2mix,clip_debias,matryoshka_mnrl,gist \
    --providers "$ours,reference,open_clip,lightly,sentence_transformers" --batch "${TARGET_BATCH:-8192,32768}" \
    --dim "${SWEEP_DIM:-768}"
}
group_b() {
  # The general target at D = 256 on the fused tile kernels (G in registers) against the chunked path:
  # where the explicit choice wins (auto takes the chunked path until this says otherwise).
  bench fused "${FUSED_TIMEOUT:-25}" gpu-fused-targets-bf16 --loss clip_labels,ntxent,distill \
    --providers fastcon-triton,fastcon-triton_fused --batch "${FUSED_BATCH:-32768}" --dim "${FUSED_DIM:-256}"
  # Distillation with the student's tiles formed in the epilogue kernels (FASTCON_TRITON_PRODUCER=matmul)
  # against the default, from cuBLAS chunks (its fastcon row in gpu-targets-bf16.json, same N and D).
  FASTCON_TRITON_PRODUCER=matmul bench producers "${SOFT_TIMEOUT:-20}" gpu-distill-producers-bf16 --loss distill \
    --providers fastcon-triton --batch "${FUSED_BATCH:-32768}" --dim "${SWEEP_DIM:-768}"
  # The token-level losses: FILIP (196 patches x 77 tokens) and MaxSim (32 x 180) at B=512, D=256, against
  # the materialising reference and PyLate's scores (its torch path, flash-maxsim, late-interaction-kernels).
  bench tokens "${TOKEN_TIMEOUT:-40}" gpu-tokens-bf16 --loss filip,maxsim \
    --providers "$ours,reference,pylate,flash_maxsim,late_interaction_kernels" --batch "${TOKEN_BATCH:-512}" \
    --dim "${TOKEN_DIM:-256}"
}
if [ "$dry" = 1 ]; then
  group_a & group_b & wait
else
  group_a
  group_b
fi
[ -e "$out/.failed" ] && status=1
rm -f "$out/.failed"
"$py" -m fastcon.bench summary "$out/gpu-peak.json" "$out/gpu-bf16.json" "$out/gpu-dims-bf16.json" \
  >"$out/gpu-summary.md" || failed summary $?
cat "$out/gpu-summary.md"

# Every file of the run, present and not empty (a missing one fails the run).
SWEEP_FILES="env.txt stages.txt cuda-tests.log gpu-peak.json gpu-bf16.json gpu-bf16.md gpu-dims-bf16.json gpu-dims-bf16.md
gpu-targets-bf16.json gpu-targets-bf16.md gpu-fused-targets-bf16.json gpu-fused-targets-bf16.md
gpu-distill-producers-bf16.json gpu-distill-producers-bf16.md gpu-tokens-bf16.json gpu-tokens-bf16.md gpu-summary.md"
for f in $SWEEP_FILES; do
  [ -s "$out/$f" ] || { echo "gpu_sweep: $out/$f is missing or empty" >&2; status=1; }
done
exit $status
