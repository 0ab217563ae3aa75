#!/usr/bin/env bash
# fastcon beside one (torch, triton) pair, as a user with that pair would meet it:
#
#   bash .ci/compat.sh NAME TORCH_SPEC TRITON_SPEC [NUMPY_SPEC]
#
# In a virtual environment of its own (.venv-compat-NAME, kept between runs) with that pair: a copy of
# the source tree with the C++ extension built against that torch (build/compat-NAME), then
#   1. the import, and the C++ backend loaded (backend_info);
#   2. one CPU loss per engine family on the C++ backend against the float64 reference: CLIP, SigLIP,
#      the general target (NT-Xent), soft targets (distillation) and late interaction (FILIP);
#   3. a fast selection of the Triton interpreter's tests, one per kernel family;
#   4. the compile gate (tests/test_triton_compile.py) for GATE_CAPS (default 90).
# Exits non-zero at the first failing step. `make test-compat` runs it for every tested pair.
set -euo pipefail
name=${1:?usage: bash .ci/compat.sh NAME TORCH_SPEC TRITON_SPEC [NUMPY_SPEC]}
torch_spec=${2:?torch spec}
triton_spec=${3:?triton spec}
numpy_spec=${4:-numpy}
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
venv=$root/.venv-compat-$name
src=$root/build/compat-$name
say() { echo "[compat $name] $*"; }

if [ ! -f "$venv/.deps-installed" ]; then
  test -x "$venv/bin/python" || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$torch_spec" "$triton_spec" "$numpy_spec" pytest pytest-xdist ninja \
    setuptools wheel
  touch "$venv/.deps-installed"
fi
py=$venv/bin/python
versions='import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'
say "$("$py" -c "$versions")"

rm -rf "$src" && mkdir -p "$src"
cp -r setup.py pyproject.toml csrc fastcon tests "$src"/
rm -f "$src"/fastcon/*.so "$src"/fastcon/_C.torch
(cd "$src" && "$py" setup.py -q build_ext --inplace >/dev/null 2>"$src/build.log") \
  || { tail -n 30 "$src/build.log"; say "the C++ extension does not build"; exit 1; }
say "C++ extension built"

cd "$src"
export PYTHONPATH=$src HF_HUB_OFFLINE=1
TRITON_INTERPRET=1 "$py" - <<'EOF'
import torch
import fastcon
import fastcon.functional as FC
from fastcon import reference as R

info = fastcon.backend_info()
assert info["backends"]["cpp"]["available"], f"the C++ backend did not load: {info['backends']['cpp']}"
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
b = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
s = torch.tensor(10.0)
cases = {
    "clip": (lambda x, y, bk: FC.clip_loss(x, y, s, backend=bk)),
    "siglip": (lambda x, y, bk: FC.siglip_loss(x, y, s, torch.tensor(-5.0), backend=bk)),
    "ntxent": (lambda x, y, bk: FC.ntxent_loss(x, y, temperature=0.5, backend=bk)),
    "distill": (lambda x, y, bk: FC.distill_loss(x, y, s, y.detach().flip(1), x.detach().flip(1), torch.tensor(5.0),
                                                  backend=bk)),
    "filip": (lambda x, y, bk: FC.filip_loss(x.reshape(8, 5, 16), y.reshape(8, 5, 16), s, backend=bk)),
}
for loss, fn in cases.items():
    out = []
    for bk, dt in (("cpp", torch.float32), ("reference", torch.float64)):
        x, y = a.to(dt).requires_grad_(), b.to(dt).requires_grad_()
        value = fn(x, y, bk)
        out.append([value, *torch.autograd.grad(value, (x, y))])
    for got, want in zip(*out):
        err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        assert err < 1e-4, f"{loss}: relative error {err:.2e} of the C++ backend against float64"
    print(f"  {loss}: C++ backend matches the float64 reference")
EOF
say "one CPU loss per family: ok"

# Interpreter tests of every kernel family: CLIP's statistics on the chunked, fused and matmul paths,
# SigLIP's fused pass, the general target (NT-Xent), soft targets, late interaction (FILIP).
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -n 2 \
  tests/test_triton_backend.py::test_lse_stats tests/test_triton_backend.py::test_sigmoid_fused \
  tests/test_triton_matmul_targets.py::test_ntxent \
  tests/test_soft_targets_triton.py::test_soft_target_grad_through_the_engine_matches_torch \
  tests/test_filip.py::test_filip_triton_against_reference 2>&1 | tail -n 3
say "interpreter selection: ok"

env -u TRITON_INTERPRET FASTCON_GATE_CAPS="${GATE_CAPS:-90}" "$py" -m pytest -q -p no:cacheprovider \
  tests/test_triton_compile.py 2>&1 | tail -n 3
say "compile gate: ok"
