"""``fastcon.backend_info()`` and ``python -m fastcon info``: what ``auto`` picks per device (Triton on
CUDA wherever Triton can serve, whether or not this machine has a GPU), the SIMD build of the C++
kernels this CPU runs, a malformed ``FASTCON_TRITON_PRODUCER`` reported, a short table; and
``FASTCON_LOG``'s line per engine call."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon.kernels import cpp
from fastcon.ops import engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_names_triton_for_cuda_wherever_triton_can_serve():
    info = fastcon.backend_info()
    ok, reason = engine.triton_available(torch.device("cuda"))
    assert info["auto"]["cuda"] == ("triton" if ok else "torch")
    assert ok or info["auto"]["cuda_reason"] == reason
    assert info["auto"]["cpu"] == ("cpp" if cpp.AVAILABLE else "torch")


@pytest.mark.skipif(not cpp.AVAILABLE, reason=f"C++ extension unavailable: {cpp.REASON}")
def test_the_simd_build_this_cpu_runs():
    simd = fastcon.backend_info()["backends"]["cpp"]["simd"]
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    if "built without" in simd:  # the AVX2 clone's build (make test-avx2)
        assert simd.startswith("avx2")
    elif {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        assert simd.startswith("avx512")
    elif {"avx2", "fma", "bmi2"} <= flags:
        assert simd.startswith("avx2")
    else:
        assert simd.startswith("baseline")


def test_a_malformed_producer_setting_is_reported(monkeypatch):
    from fastcon.kernels._common import producer_setting

    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "foo")
    with pytest.raises(ValueError, match="FASTCON_TRITON_PRODUCER must be one of auto, matmul, cublas, got 'foo'"):
        producer_setting()
    info = fastcon.backend_info()
    assert "got 'foo'" in info["gemm"]["triton_producer"]["error"]
    assert "FASTCON_TRITON_PRODUCER: " in fastcon.backend_info(pretty=True)
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    assert producer_setting() == "matmul" and "=matmul" in fastcon.backend_info()["gemm"]["triton_producer"]


def test_pretty_info_is_a_short_table():
    out = subprocess.run([sys.executable, "-m", "fastcon", "info"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text == fastcon.backend_info(pretty=True) + "\n"
    lines = text.splitlines()
    assert len(lines) < 20 and lines[2].split()[:4] == ["backend", "usable", "runs", "on"]
    for name in ("cpp", "torch", "triton", "triton_fused", "reference"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "backend='auto': CPU tensors -> " in text and "small CPU calls" in text


def test_the_log_names_the_backend_and_path_of_each_call(caplog):
    caplog.set_level(logging.DEBUG, logger="fastcon")
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    FC.clip_loss(a, b, 10.0, backend="torch").backward()
    FC.siglip_loss(a, b, 10.0, -1.0, backend="cpp")
    with torch.no_grad():
        FC.clip_loss(a, b, 10.0, backend="torch")
    messages = [r.getMessage() for r in caplog.records if r.name == "fastcon"]
    assert len(messages) == 3, messages
    assert messages[0].startswith("softmax_loss on backend torch (cpu, torch.float32, (8, 4) and (8, 4))")
    assert "autograd function" in messages[0] and "no gradient" in messages[2]
    assert messages[1].startswith("direct_loss[sigmoid] on backend cpp") or "sigmoid" in messages[1]


def test_fastcon_log_turns_the_log_on():
    code = "import torch, fastcon.functional as FC; FC.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 5.0)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, FASTCON_LOG="1"))
    assert out.returncode == 0 and out.stderr.startswith("fastcon: ") and "on backend" in out.stderr
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "FASTCON_LOG"})
    assert quiet.returncode == 0 and "fastcon:" not in quiet.stderr
