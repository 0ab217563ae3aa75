#!/usr/bin/env bash
# The wheel and the sdist, checked the way a user installs them: build both with the development
# environment (BUILD_PY, which has torch), install the wheel into a fresh virtual environment that
# sees no source tree, and run a loss there on the C++ backend.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build_py=${BUILD_PY:-.venv/bin/python}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch}
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
for want in ("fastcon/_C", "fastcon/kernels/triton/chunked.py", "fastcon/kernels/triton/fused.py",
             "fastcon/bench/__init__.py"):
    if not any(n.startswith(want) for n in names):
        sys.exit(f"the wheel lacks {want}: {names}")
members = tarfile.open(sys.argv[2]).getnames()
for want in ("csrc/cpu/engine.cpp", "csrc/cpu/kernels.h", "setup.py", "pyproject.toml"):
    if not any(m.endswith(want) for m in members):
        sys.exit(f"the sdist lacks {want}")
print("wheel and sdist contents ok")
EOF

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$torch_spec"
"$work/venv/bin/python" -m pip install -q --no-deps "$wheel"
cd "$work"  # away from the source tree: the import must come from the installed wheel
"$work/venv/bin/python" - <<'EOF'
import json, os
import torch
import fastcon
import fastcon.functional as FC
from fastcon import reference as R

here = os.path.dirname(fastcon.__file__)
assert "site-packages" in here, f"fastcon imported from {here}, not from the installed wheel"
info = fastcon.backend_info()
print(json.dumps(info, indent=1, default=str))
assert info["backends"]["cpp"]["available"], info["backends"]["cpp"]["reason"]
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
