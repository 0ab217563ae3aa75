#!/usr/bin/env bash
# The wheel and the sdist, checked the way a user installs them: build both with the development
# environment (BUILD_PY, which has torch), install the wheel (--no-deps) into a folder of its own, and
# run a loss on the C++ backend from there, with that folder first on the path and the working
# directory outside the source tree, so that every module comes from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build_py=${BUILD_PY:-.venv/bin/python}
build_py=$(cd "$(dirname "$build_py")" && pwd)/$(basename "$build_py")  # absolute, the venv's own link
work=$root/build/wheel-check
rm -rf "$work"
mkdir -p "$work/dist"

"$build_py" -m pip wheel . --no-build-isolation --no-deps -q -w "$work/dist"
"$build_py" -m build --sdist --no-isolation --outdir "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/fastcon-*.whl)
sdist=$(ls "$work"/dist/fastcon-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"

# The wheel carries the compiled extension and the Triton kernels; the sdist carries csrc/.
"$build_py" - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
# The record of the torch the extension was compiled against, and the sources fastcon compiles against
# another torch at first use (fastcon/kernels/_extension.py).
for want in ("fastcon/_C.cpython", "fastcon/_C.torch", "fastcon/_csrc/cpu/engine.cpp", "fastcon/_csrc/cpu/kernels.h",
             "fastcon/kernels/triton/chunked.py", "fastcon/kernels/triton/fused.py", "fastcon/bench/__init__.py"):
    if not any(n.startswith(want) for n in names):
        sys.exit(f"the wheel lacks {want}: {names}")
members = tarfile.open(sys.argv[2]).getnames()
for want in ("csrc/cpu/engine.cpp", "csrc/cpu/kernels.h", "setup.py", "pyproject.toml"):
    if not any(m.endswith(want) for m in members):
        sys.exit(f"the sdist lacks {want}")
print("wheel and sdist contents ok")
EOF

"$build_py" -m pip install -q --no-deps --target "$work/site" "$wheel"
cd "$work"  # away from the source tree: the import must come from the installed wheel
PYTHONPATH=$work/site "$build_py" - <<'EOF'
import json, os
import torch
import fastcon
import fastcon.functional as FC
from fastcon import reference as R

here = os.path.dirname(fastcon.__file__)
assert here == os.path.join(os.getcwd(), "site", "fastcon"), f"fastcon imported from {here}, not from the wheel"
info = fastcon.backend_info()
print(json.dumps(info, indent=1, default=str))
assert info["backends"]["cpp"]["available"], info["backends"]["cpp"]["reason"]
assert info["backends"]["cpp"]["origin"] == "installed", info["backends"]["cpp"]  # the wheel's own library
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=-1).requires_grad_()
b = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=-1).requires_grad_()
loss = FC.clip_loss(a, b, 14.3, backend="cpp")
loss.backward()
ref = R.clip_loss_reference(a.detach().double(), b.detach().double(), 14.3)
assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
print(f"fastcon {fastcon.__version__} from the wheel: clip_loss on the C++ backend = {loss.item():.6f} "
      f"(reference {ref.item():.6f})")
EOF
