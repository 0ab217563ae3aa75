"""benchmarks/gpu_sweep.sh's real run, its shell logic checked without a GPU: every stage's command
line (a stub stands for python and nvidia-smi), the stages' time limits within 8 minutes, and the
list of files the dry run (``make sweep-dry-run``, in CI) must write."""
import os
import re
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_sweep.sh")


def _stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_the_real_run_calls_every_stage_on_cuda_in_bf16(tmp_path):
    log = tmp_path / "calls.log"
    # python: records its arguments; a --json FILE gets an empty list of rows, a summary some text
    py = _stub(tmp_path / "python", f"""echo "$*" >> {log}
prev=""; for a in "$@"; do [ "$prev" = --json ] && echo '[]' > "$a"; prev="$a"; done
[ "$3" = summary ] && echo summary
exit 0
""")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stub(bindir / "nvidia-smi", "echo GPU 0: stub\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=py, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("WHEELS", None)
    proc = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    calls = log.read_text().splitlines()
    benches = [c for c in calls if c.startswith("-m fastcon.bench --device")]
    assert len(benches) == 6, calls
    for c in benches:
        assert "--device cuda --dtype bfloat16" in c and "--repeat" not in c, c
        name = re.search(r"--json \S+/(\S+)\.json --markdown \S+/(\S+)\.md", c)
        assert name and name.group(1) == name.group(2), c
    assert any(c.startswith("-m pytest -q -m cuda or not (interpreter or slow) -k not cpp") for c in calls), calls
    assert any(c.startswith("-m fastcon.bench peak --device cuda --dtype bfloat16 --json") for c in calls), calls
    assert any(c.startswith("-m fastcon.bench summary") for c in calls), calls
    # the stub wrote no Markdown and no log of tests: the run says which files are missing, and fails
    assert proc.returncode == 1
    assert "gpu-bf16.md is missing" in proc.stderr and "env.txt" not in proc.stderr


def test_the_stage_limits_add_up_to_eight_minutes_at_most():
    text = open(SCRIPT).read()
    limits = dict(re.findall(r"\$\{([A-Z]+_TIMEOUT):-(\d+)\}", text))
    limits.pop("DRY_TIMEOUT")  # the dry run's own
    assert set(limits) == {"TEST_TIMEOUT", "PEAK_TIMEOUT", "SWEEP_TIMEOUT", "DIMS_TIMEOUT", "TARGET_TIMEOUT",
                           "FUSED_TIMEOUT", "SOFT_TIMEOUT", "TOKEN_TIMEOUT"}, limits
    assert sum(int(v) for v in limits.values()) <= 480, limits


def test_the_dry_run_is_held_to_every_file_of_the_real_run():
    text = open(SCRIPT).read()
    listed = set(re.search(r'SWEEP_FILES="([^"]+)"', text).group(1).split())
    header = set(re.findall(r"[\w.-]+\.(?:json|md|txt|log)", text.split("set -uo pipefail")[0].split("Output")[1]))
    assert listed == header and len(listed) == 17, (listed ^ header)
