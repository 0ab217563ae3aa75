"""fastcon-bench: a real (tiny) sweep end to end, its outputs, failure rows, compare, and the README
summary that must be generated from the committed results."""
import csv
import glob
import json
import os

import pytest
import torch

from fastcon import bench
from fastcon.bench import classify_failure, compare as C
from fastcon.bench.report import CSV_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = ("device_name", "fastcon_version", "torch", "python", "git_sha", "timestamp", "memory_method")


def _rows(path):
    with open(path) as f:
        return json.load(f)


def test_sweep_writes_checked_rows_and_every_output(tmp_path):
    out = tmp_path / "rows.json"
    rc = bench.main(["--loss", "clip,siglip", "--providers", "fastcon-cpp,reference,inf_cl", "--batch", "33",
                     "--dim", "8", "--device", "cpu", "--repeat", "2", "--min-time", "0", "--json", str(out),
                     "--csv", str(tmp_path / "rows.csv"), "--markdown", str(tmp_path / "rows.md"),
                     "--plot", str(tmp_path / "plots")])
    assert rc == 0
    rows = _rows(out)
    assert [(r["loss"], r["provider"]) for r in rows] == [
        ("clip", "fastcon-cpp"), ("clip", "reference"), ("clip", "inf_cl"),
        ("siglip", "fastcon-cpp"), ("siglip", "reference"), ("siglip", "inf_cl")]
    for r in rows:
        if r["provider"] == "inf_cl":  # not installed, or no CUDA, or (SigLIP) no such loss
            assert r["status"] == "skipped" and r["error"]
            continue
        assert r["status"] == "ok", r
        assert r["max_rel_err"] <= 1e-5 and r["check_rows"] == 33
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["samples"] == 2
        assert r["peak_mib"] >= 0 and r["tflops"] > 0
        for key in META:
            assert r.get(key), f"{key} missing from {r}"
    with open(tmp_path / "rows.csv") as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == CSV_COLUMNS and len(lines) == 2 * len(rows)
    speed = [x for x in lines if x["metric_name"] == "speed" and x["status"] == "ok"]
    assert len(speed) == 4 and all(float(x["y_value_20"]) <= float(x["y_value_80"]) for x in speed)
    md = (tmp_path / "rows.md").read_text()
    assert "| loss | provider |" in md and md.count("| skipped:") == 2
    plots = sorted(os.listdir(tmp_path / "plots"))
    assert plots == ["clip-D-8-float32-full-memory.png", "clip-D-8-float32-full-time.png",
                     "siglip-D-8-float32-full-memory.png", "siglip-D-8-float32-full-time.png"]


def test_general_target_losses_against_their_references_and_peers(tmp_path):
    """clip_labels, ntxent and mnrl: fastcon and the reference checked against the float64 reference;
    the peers run where installed (sentence-transformers is, in make test's environment) and are
    skipped with a reason where they are not or have no such loss."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "clip_labels,ntxent,mnrl", "--providers",
                       "fastcon-cpp,fastcon-torch,reference,sentence_transformers,lightly",
                       "--batch", "24", "--dim", "8", "--device", "cpu", "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    rows = {(r["loss"], r["provider"]): r for r in _rows(out)}
    for loss in ("clip_labels", "ntxent", "mnrl"):
        for provider in ("fastcon-cpp", "fastcon-torch", "reference"):
            r = rows[(loss, provider)]
            assert r["status"] == "ok" and r["max_rel_err"] <= 1e-4, r
    assert rows[("mnrl", "sentence_transformers")]["status"] == "ok"
    assert rows[("mnrl", "sentence_transformers")]["max_rel_err"] <= 1e-4
    assert rows[("ntxent", "sentence_transformers")]["status"] == "skipped"
    assert rows[("clip_labels", "lightly")]["status"] == "skipped"


def test_embedding_objectives_against_their_references_and_sentence_transformers(tmp_path):
    """matryoshka_mnrl, gist and clip_debias: fastcon and the reference against the float64 reference;
    sentence-transformers' MatryoshkaLoss and GIST losses (uncached and cached, from embeddings) where
    installed, each within fp32 error of the same float64 reference."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "matryoshka_mnrl,gist,clip_debias", "--providers",
                       "fastcon-cpp,fastcon-torch,reference,sentence_transformers,sentence_transformers_cached",
                       "--batch", "40", "--dim", "24", "--device", "cpu", "--repeat", "1", "--min-time", "0",
                       "--json", str(out)]) == 0
    rows = {(r["loss"], r["provider"]): r for r in _rows(out)}
    for loss in ("matryoshka_mnrl", "gist", "clip_debias"):
        providers = ("fastcon-cpp", "fastcon-torch", "reference")
        if loss != "clip_debias":
            providers += ("sentence_transformers", "sentence_transformers_cached")
        for provider in providers:
            r = rows[(loss, provider)]
            assert r["status"] == "ok" and r["max_rel_err"] <= 1e-4, r
    assert rows[("clip_debias", "sentence_transformers")]["status"] == "skipped"


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_forward_and_backward_modes(tmp_path, mode):
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "clip", "--providers", "fastcon-torch", "--batch", "20", "--dim", "4",
                       "--device", "cpu", "--mode", mode, "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["mode"] == mode and row["max_rel_err"] <= 1e-5


def test_compiled_fastcon_provider(tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "siglip", "--providers", "fastcon_compile", "--batch", "24", "--dim", "8",
                       "--device", "cpu", "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["max_rel_err"] <= 1e-5


def test_failures_become_rows_not_crashes():
    case = dict(loss="clip", provider="fastcon-cpp", batch=0, dim=4, dtype="float32", mode="full", device="cpu")
    row = bench._run_in_subprocess(case, timeout=120)
    assert row["status"] == "error" and "empty batch" in row["error"]
    assert bench._run_in_subprocess(dict(case, batch=8), timeout=0.01)["status"] == "timeout"
    assert classify_failure(1, "Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried")[0] == "oom"
    assert classify_failure(-9, "")[0] == "oom"
    assert classify_failure(1, "x\nfastcon.bench.providers.ProviderUnavailable: no bias") == ("skipped", "no bias")


def test_peak(tmp_path):
    out = tmp_path / "peak.json"
    assert bench.main(["peak", "--device", "cpu", "--batch", "64", "--dim", "32", "--json", str(out)]) == 0
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["loss"] == "matmul" and row["tflops"] > 0


@pytest.mark.parametrize("argv", [
    ["--batch", "12x"], ["--batch", "0"], ["--providers", "fastcon,nope"], ["--loss", "nope"],
    ["--world-size", "2", "--mode", "fwd", "--device", "cpu"], ["--dtype", "int8"],
    ["compare", "a.json"], ["summary"],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2


def _row(provider="fastcon", median=10.0, peak=100.0, tflops=1.0, status="ok", **kw):
    return dict(dict(loss="clip", provider=provider, batch=1024, dim=64, dtype="float32", mode="full", device="cpu",
                     median_ms=median, min_ms=median, max_ms=median, peak_mib=peak, tflops=tflops, max_rel_err=1e-6,
                     status=status), **kw)


def test_compare_flags_regressions_beyond_the_limit(tmp_path):
    limits = [C.parse_limit("median:5%"), C.parse_limit("peak:10"), C.parse_limit("tflops:5%")]
    _, failures = C.compare([_row()], [_row(median=10.4, peak=109.0, tflops=0.96)], limits)
    assert failures == []
    _, failures = C.compare([_row()], [_row(median=10.6)], limits)
    assert len(failures) == 1 and "median" in failures[0]
    _, failures = C.compare([_row()], [_row(peak=111.0, tflops=0.9)], limits)
    assert len(failures) == 2
    _, failures = C.compare([_row(), _row("reference")], [_row(status="oom"), _row("open_clip")], limits)
    assert len(failures) == 2 and "oom" in failures[0] and "missing from NEW" in failures[1]
    _, failures = C.compare([_row(), _row("reference", status="skipped")], [_row()], limits)
    assert failures == []  # a case that did not run in OLD is no regression when it is missing
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps([_row()]))
    new.write_text(json.dumps([_row(median=20.0)]))
    assert bench.main(["compare", str(old), str(old), "--fail-if", "median:5%"]) == 0
    assert bench.main(["compare", str(old), str(new), "--fail-if", "median:5%"]) == 1
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps([]))
    assert bench.main(["compare", str(old), str(fewer), "--fail-if", "median:5%"]) == 1
    with pytest.raises(ValueError):
        C.parse_limit("median")
    with pytest.raises(ValueError):
        C.parse_limit("wall:5%")


def test_summary_ratios_of_tiny_or_missing_peaks():
    """A peak below the measurement's resolution (0 MiB at small N) gives no memory ratio rather than a
    division by zero or a ratio of noise; a zero time gives none either."""
    from fastcon.bench.report import summary_markdown

    rows = [_row(peak=0.0), _row("open_clip", peak=40.0), _row(batch=256, peak=0.4),
            _row("open_clip", batch=256, peak=0.0)]
    table = summary_markdown(rows)
    assert table.count("n/a (< 1 MiB)") == 2 and "×" in table
    assert "n/a" in summary_markdown([_row(median=0.0), _row("open_clip")]).splitlines()[-1]


def test_readme_summary_is_generated_from_the_committed_results(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(glob.glob("benchmarks/results/*.json"))
    assert files, "benchmarks/results/ holds no JSON results"
    assert bench.main(["summary", *files, "--check", "README.md"]) == 0, (
        "README.md's benchmark summary is out of date: run "
        f"fastcon-bench summary {' '.join(files)} --update README.md")


def test_distill_align_uniform_m2mix_and_mochi_cases(tmp_path):
    """distill (DistillClipLoss's two outputs summed), align_uniform, m2mix and mochi: fastcon's backends, the
    reference and open_clip's DistillClipLoss against the float64 reference."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (make test installs it with --no-deps)")
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "distill,align_uniform,m2mix,mochi", "--providers",
                       "fastcon-cpp,fastcon-torch,reference,open_clip",
                       "--batch", "24", "--dim", "8", "--device", "cpu", "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    rows = {(r["loss"], r["provider"]): r for r in _rows(out)}
    for loss in ("distill", "align_uniform", "m2mix", "mochi"):
        for provider in ("fastcon-cpp", "fastcon-torch", "reference"):
            r = rows[(loss, provider)]
            assert r["status"] == "ok" and r["max_rel_err"] <= 1e-4, r
    assert rows[("distill", "open_clip")]["status"] == "ok" and rows[("distill", "open_clip")]["max_rel_err"] <= 1e-4
    assert rows[("align_uniform", "open_clip")]["status"] == "skipped"


def test_token_level_cases(tmp_path):
    """filip and maxsim on (B, n, D) token sets: fastcon's backends and the reference against the float64
    reference, PyLate's MaxSim scores as the maxsim peer (skipped for filip), the GPU-only MaxSim kernels
    skipped on the CPU."""
    import importlib.util

    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "filip,maxsim", "--providers",
                       "fastcon-cpp,fastcon-torch,reference,pylate,flash_maxsim",
                       "--batch", "6", "--dim", "8", "--device", "cpu", "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    rows = {(r["loss"], r["provider"]): r for r in _rows(out)}
    for loss in ("filip", "maxsim"):
        for provider in ("fastcon-cpp", "fastcon-torch", "reference"):
            r = rows[(loss, provider)]
            assert r["status"] == "ok" and r["max_rel_err"] <= 1e-4 and r["tflops"] > 0, r
        assert rows[(loss, "flash_maxsim")]["status"] == "skipped"
    assert rows[("filip", "pylate")]["status"] == "skipped"
    if importlib.util.find_spec("pylate") is not None:
        r = rows[("maxsim", "pylate")]
        assert r["status"] == "ok" and r["max_rel_err"] <= 1e-4, r


def test_profile_splits_a_call_into_gemms_and_the_rest(tmp_path, capsys):
    """--profile: the C++ engine's GEMMs (called from C++) and the reference's are counted; the two parts
    are positive and sum to the profiled call; the table grows two columns."""
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "clip", "--providers", "fastcon-cpp,reference", "--batch", "256", "--dim", "64",
                       "--device", "cpu", "--repeat", "1", "--min-time", "0", "--profile", "--json", str(out)]) == 0
    assert "GEMM ms" in capsys.readouterr().out
    for row in _rows(out):
        assert row["status"] == "ok", row
        assert row["gemm_ms"] > 0 and row["epilogue_ms"] >= 0
        assert abs(row["gemm_ms"] + row["epilogue_ms"] - row["profile_wall_ms"]) < 1e-6 * row["profile_wall_ms"] + 1e-9


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_plan_traces_the_engine(capsys, loss):
    """fastcon-bench plan: the chunked Triton backend's own calls on meta tensors. CLIP's products add
    up to the 8·N²·D that the benchmark counts (pass 1, its recomputation in pass 2, the two gradient
    products), SigLIP's to 6·N²·D; the chunks are the engine's."""
    from fastcon.bench import plan
    from fastcon.kernels._common import gpu_chunk_bytes
    from fastcon.kernels.triton import chunked

    n, d = 4096, 256
    p = plan.plan(loss, n, d, "bfloat16", "h200")
    budget = gpu_chunk_bytes(141 << 30)
    mm = chunked.matmul_plan(n, n, torch.bfloat16, n, budget)
    assert p["chunks"]["producer"] == "matmul" and p["chunks"]["budget_bytes"] == budget
    assert (p["chunks"]["stats_rows"], p["chunks"]["grad_rows"], p["chunks"]["grad_cols"]) == tuple(mm)
    # the epilogue kernels form their own tiles: pass 1 (CLIP) and pass 2 are 2·N²·D each
    assert p["kernels"]["triton:_chunk_grad_kernel[sigmoid][matmul]" if loss == "siglip"
                        else "triton:_chunk_grad_kernel[matmul]"]["flops"] == pytest.approx(2 * n * n * d)
    assert p["total_flops"] == pytest.approx((8 if loss == "clip" else 6) * n * n * d)
    assert p["total_ms"] > 0 and 0 < p["peak_fraction"] <= 1
    assert bench.main(["plan", "--loss", loss, "--batch", "4096", "--dim", "256", "--device", "a100"]) == 0
    assert "ESTIMATE" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["plan", "--device", "tpu"])


def test_cases_beyond_the_device_memory_are_skipped_by_size(tmp_path):
    """A materialising provider at an N whose N×N buffers alone exceed the machine's memory becomes a
    ``skipped`` row computed from its size, before anything runs; the O(N) providers are not
    predicted (they run, or fail into a row)."""
    from fastcon.bench import providers

    n = 1 << 20
    assert providers.predicted_bytes("reference", "clip", n, 8) == 3 * 4 * n * n
    assert providers.predicted_bytes("fastcon", "clip", n, 8) is None
    out = tmp_path / "rows.json"
    assert bench.main(["--loss", "clip,siglip", "--providers", "reference,open_clip", "--batch", str(n), "--dim", "8",
                       "--device", "cpu", "--repeat", "1", "--min-time", "0", "--json", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "skipped" for r in rows)
    assert all("N x N buffers" in r["error"] and "GiB" in r["error"] for r in rows)


def test_siglip_kernel_is_a_gpu_siglip_peer():
    from fastcon.bench import providers

    assert "siglip_kernel" in providers.PEER_OF["siglip"]
    ok, why = providers.availability("siglip_kernel", "clip", "cuda")
    assert not ok and "no clip loss" in why
    ok, why = providers.availability("siglip_kernel", "siglip", "cpu")
    assert not ok and ("GPU" in why or "not installed" in why)


# ---------------------------------------------------------------------------------------------------
# fastcon-bench decide: the verdicts on auto's open choices from rows of known times

def _decide_row(provider, loss, ms, mib, dim=256, producer="auto", **kw):
    return dict(dict(provider=provider, loss=loss, batch=32768, dim=dim, dtype="bfloat16", mode="full",
                     device="cuda", device_name="GPU", status="ok", median_ms=ms, peak_mib=mib,
                     triton_producer=producer), **kw)


def _decide(tmp_path, rows, *extra):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    from fastcon.bench.decide import main

    return main([str(tmp_path), *extra])


def test_decide_takes_the_fused_kernels_only_where_they_win_every_case(tmp_path, capsys):
    rows = [_decide_row("fastcon-triton", "ntxent", 10.0, 100),
            _decide_row("fastcon-triton_fused", "ntxent", 8.0, 105),
            _decide_row("fastcon-triton", "clip_labels", 10.0, 100),
            _decide_row("fastcon-triton_fused", "clip_labels", 9.0, 90),
            # D = 768: fused slower once: no verdict there
            _decide_row("fastcon-triton", "ntxent", 10.0, 100, dim=768),
            _decide_row("fastcon-triton_fused", "ntxent", 12.0, 90, dim=768),
            _decide_row("fastcon-triton", "mnrl", 10.0, 100, dim=768),
            _decide_row("fastcon-triton_fused", "mnrl", 5.0, 90, dim=768),
            # a failed alternative is no measurement
            _decide_row("fastcon-triton", "distill", 10.0, 100, dim=64),
            _decide_row("fastcon-triton_fused", "distill", 1.0, 1, dim=64, status="oom")]
    assert _decide(tmp_path, rows) == 0
    out = capsys.readouterr().out
    fused = out.split("## Soft targets")[0]
    assert "GPU, bfloat16, D 129-256 (2 cases): fused wins every case: make it auto's choice" in fused
    assert "GPU, bfloat16, D 513-1024 (2 cases): mixed: no verdict" in fused
    assert "D 1-64" not in fused
    assert "No case measured both (cuBLAS and matmul)" in out


def test_decide_weighs_memory_and_the_margin(tmp_path, capsys):
    # matmul 3% faster: below the 5% margin; with --margin 0.01 it wins, unless it takes 20% more memory
    rows = [_decide_row("fastcon", "distill", 10.0, 100, dim=768),
            _decide_row("fastcon-triton", "distill", 9.7, 100, dim=768, producer="matmul")]
    _decide(tmp_path, rows)
    assert "mixed: no verdict" in capsys.readouterr().out
    _decide(tmp_path, rows, "--margin", "0.01")
    assert "matmul wins every case: make it auto's choice" in capsys.readouterr().out
    rows[1]["peak_mib"] = 120
    _decide(tmp_path, rows, "--margin", "0.01")
    assert "mixed: no verdict" in capsys.readouterr().out
    rows[1]["median_ms"] = 11.0
    _decide(tmp_path, rows)
    assert "cuBLAS wins every case: keep auto's choice" in capsys.readouterr().out


def test_decide_rejects_what_it_cannot_read(tmp_path):
    from fastcon.bench.decide import main

    for args in ([str(tmp_path)], [str(tmp_path / "missing.json")], [str(tmp_path), "--margin", "1.5"]):
        with pytest.raises(SystemExit):  # an empty folder, a missing file, a margin out of range
            main(args)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        main([str(tmp_path / "bad.json")])


def test_bad_output_paths_stop_the_sweep_before_it_runs(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(bench, "_run_in_subprocess", lambda case, timeout: ran.append(case) or dict(case, status="ok"))
    for flag, path in (("--json", tmp_path / "missing" / "x.json"), ("--csv", tmp_path),
                       ("--markdown", tmp_path / "no" / "t.md")):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--loss", "clip", "--providers", "fastcon", "--batch", "8", "--dim", "4", "--device", "cpu",
                        flag, str(path)])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert ran == []


def test_default_providers_are_each_losss_own_peers(monkeypatch):
    """Without --providers each loss runs fastcon, the reference and its own peers (MaxSim: PyLate's
    scorers), so no row is a peer skipped for having no such loss."""
    from fastcon.bench.providers import PEER_OF

    seen = []
    monkeypatch.setattr(bench, "_run_in_subprocess", lambda case, timeout: seen.append(case) or dict(case, status="x"))
    monkeypatch.setattr(bench, "availability", lambda *a, **k: (True, None))
    monkeypatch.setattr(bench, "_write_outputs", lambda args, rows: None)
    assert bench.main(["--loss", "clip,maxsim,ntxent,filip", "--batch", "8", "--dim", "4", "--device", "cpu"]) == 0
    by_loss = {}
    for case in seen:
        by_loss.setdefault(case["loss"], []).append(case["provider"])
    assert by_loss["maxsim"] == ["fastcon", "reference", "pylate", "flash_maxsim", "late_interaction_kernels"]
    assert by_loss["ntxent"] == ["fastcon", "reference", "lightly"] and by_loss["filip"] == ["fastcon", "reference"]
    assert all(by_loss[loss][2:] == list(PEER_OF[loss]) for loss in by_loss)


def test_help_shows_the_defaults_and_plan_takes_any_case(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: full)", "(default: 5)", "(default: 1.0)", "(default: 2048)", "(default: 900.0)", "(default: 1)",
                  "each loss's own peers"):
        assert shown in text, shown
    assert bench.main(["plan", "--loss", "clip", "--batch", "4096", "--dim", "256", "--device", "H100"]) == 0


def test_peak_rows_show_no_memory_or_error_cells():
    from fastcon.bench.report import cells

    row = _row(loss="matmul", provider="torch.mm", max_rel_err=None)
    assert cells(row)[8:] == ["", f"{row['tflops']:.3f}", ""]


def test_cpu_timing_repeats_by_time_and_warms_up_through_the_measured_path(monkeypatch):
    from fastcon.bench import measure
    from fastcon.ops import engine

    import time

    calls = []
    times = measure.wall_times(lambda: calls.append(time.sleep(0.002)), repeat=3, min_time_s=0.05)
    assert len(times) == len(calls) and len(times) > 3 and sum(times) >= 0.05
    assert len(measure.wall_times(lambda: None, repeat=3, min_time_s=1.0)) == measure.MAX_SAMPLES
    assert len(measure.wall_times(lambda: None, repeat=4)) == 4
    # the warm-up call takes the path of the measured one: the direct C++ call or the operator
    taken = []
    direct = engine.direct_call
    monkeypatch.setattr(engine, "direct_call", lambda *a: taken.append(direct(*a)) or taken[-1])
    for n in (1000, 1100):
        taken.clear()
        row = measure.run_case(dict(loss="clip", provider="fastcon-cpp", batch=n, dim=8, dtype="float32",
                                    mode="full", device="cpu", repeat=1, min_time=0, check_rows=8))
        assert row["samples"] >= 1 and len(set(taken[:2])) == 1 and taken[0] == (n <= 1024), (n, taken)


def test_distributed_rows_check_every_rank_against_float64(tmp_path):
    """--world-size: max rel err means what it means on one device, the loss and every gradient
    against float64 (each rank's against the per-rank reference; the worst rank's), for fastcon
    and the fp32 reference alike."""
    out = tmp_path / "dist.json"
    assert bench.main(["--world-size", "2", "--loss", "clip,siglip", "--providers", "fastcon,reference",
                       "--batch", "16", "--dim", "8", "--device", "cpu", "--repeat", "1", "--min-time", "0",
                       "--json", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:  # fp32 against float64: never exactly 0, and small (CLIP's scale gradient, a sum that
        assert 0 < r["max_rel_err"] < 1e-4, r  # nearly cancels at 16 rows, reads 4e-5 here; the rest 4e-7)
