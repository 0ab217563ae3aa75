#!/usr/bin/env bash
# The wheel beside another torch than the one it was built with, as a user who installs a published
# wheel meets it:
#
#   bash .ci/wheel_beside.sh NAME
#
# builds the wheel with the development environment (.venv: its torch), installs it (--no-deps) for
# the tested pair NAME's environment (.venv-compat-NAME, from .ci/compat.sh: another torch), and there,
# away from the source tree:
#   1. with FASTCON_BUILD_EXT=0: the installed library is not loaded beside the other torch, the reason
#      names both torches and the command that fixes it, and a loss runs on the torch backend;
#   2. by default: fastcon compiles its shipped sources against that torch at first use (into a fresh
#      FASTCON_EXT_DIR), the C++ backend loads, and CLIP, SigLIP and NT-Xent on it match float64;
#   3. a second process reuses that build without compiling.
set -euo pipefail
name=${1:?usage: bash .ci/wheel_beside.sh NAME (a pair of .ci/compat.sh)}
cd "$(dirname "$0")/.."
root=$PWD
build_py=${BUILD_PY:-.venv/bin/python}
py=$root/.venv-compat-$name/bin/python
test -x "$py" || { echo "no $py: run bash .ci/compat.sh $name ... first (make test-compat)"; exit 1; }
work=$root/build/wheel-beside-$name
rm -rf "$work" && mkdir -p "$work/dist"
say() { echo "[wheel beside $name] $*"; }

"$build_py" -m pip wheel . --no-build-isolation --no-deps -q -w "$work/dist"
wheel=$(ls "$work"/dist/fastcon-*.whl)
"$py" -m pip install -q --no-deps --target "$work/site" "$wheel"
say "$(basename "$wheel") built beside torch $("$build_py" -c 'import torch; print(torch.__version__)'), installed beside torch $("$py" -c 'import torch; print(torch.__version__)')"

cd "$work"  # away from the source tree
export PYTHONPATH=$work/site FASTCON_EXT_DIR=$work/ext HF_HUB_OFFLINE=1
FASTCON_BUILD_EXT=0 "$py" - <<'PY'
import torch
import fastcon
import fastcon.functional as FC

assert "/site/fastcon" in fastcon.__file__, fastcon.__file__
cpp = fastcon.backend_info()["backends"]["cpp"]
assert not cpp["available"], cpp
with open(fastcon.__file__.replace("__init__.py", "_C.torch")) as f:
    built = f.read().strip()
for want in (built, torch.__version__, "--no-build-isolation"):
    assert want in cpp["reason"], (want, cpp["reason"])
a = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
FC.clip_loss(a, a.flip(0), 10.0)  # the torch backend
print("  FASTCON_BUILD_EXT=0: not loaded;", cpp["reason"][:120], "...")
PY
say "step 1 ok"

check='
import time, warnings
import torch
import fastcon
import fastcon.functional as FC
from fastcon import reference as R

t0 = time.perf_counter()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    cpp = fastcon.backend_info()["backends"]["cpp"]
assert cpp["available"] and cpp["origin"] == "compiled here", cpp
compiled = any("compiling it against torch" in str(w.message) for w in seen)
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
b = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
s = torch.tensor(10.0)
cases = {
    "clip": (FC.clip_loss, R.clip_loss_reference, (s,)),
    "siglip": (FC.siglip_loss, R.siglip_loss_reference, (s, torch.tensor(-5.0))),
}
for loss, (fast, ref, extra) in cases.items():
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = fast(x, y, *extra, backend="cpp")
    gx, gy = torch.autograd.grad(got, (x, y))
    x64, y64 = a.double().requires_grad_(), b.double().requires_grad_()
    want = ref(x64, y64, *(e.double() for e in extra))
    wx, wy = torch.autograd.grad(want, (x64, y64))
    for u, v in ((got, want), (gx, wx), (gy, wy)):
        err = (u.double() - v).abs().max().item() / max(v.abs().max().item(), 1e-12)
        assert err < 1e-5, (loss, err)
x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
nt = FC.ntxent_loss(x, y, temperature=0.5, backend="cpp")
nt64 = FC.ntxent_loss(a.double(), b.double(), temperature=0.5, backend="reference")
assert abs(nt.item() - nt64.item()) < 1e-5 * abs(nt64.item()), (nt.item(), nt64.item())
print(f"  compiled: {compiled}; CLIP, SigLIP and NT-Xent on the C++ backend match float64; "
      f"{time.perf_counter() - t0:.1f} s")
print("COMPILED" if compiled else "REUSED")
'
out=$("$py" -c "$check")
echo "$out" | head -n 1
test "$(echo "$out" | tail -n 1)" = COMPILED || { say "the first process did not compile the extension"; exit 1; }
say "step 2 ok"
out=$("$py" -c "$check")
echo "$out" | head -n 1
test "$(echo "$out" | tail -n 1)" = REUSED || { say "the second process compiled the extension again"; exit 1; }
say "step 3 ok: the C++ backend, compiled against this torch at first use, reused by the next process"
