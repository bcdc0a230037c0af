"""The benchmark scripts run end to end and write complete results.

Each script runs in a subprocess on a tiny problem, to a temporary --out folder; the tests
check the JSON schema and that every implementation produced a time (or says why it does
not apply). No benchmark number is asserted: timings depend on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkern as dk

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
NATIVE_CPU = dk.native_available("cpu")


def _run(script: str, *args: str, timeout: int = 300) -> None:
    cmd = [sys.executable, str(BENCH / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _common_header(doc: dict) -> None:
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["cpu_model"]
    assert isinstance(doc["machine"]["gpus"], list)
    for key in ("python", "torch", "cuda", "diffusers", "diffkern"):
        assert key in doc["versions"]
    assert doc["versions"]["torch"]
    assert (doc["versions"]["diffusers"] is not None) == HAS_DIFFUSERS
    assert "cpu" in doc["native"] and "error" in doc["native"]
    assert doc["elapsed_s"] > 0


def _is_time(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_step_speed_quick_ddim(tmp_path):
    _run("step_speed.py", "--quick", "--ops", "ddim_step", "--sizes", "1x4x16x16", "--device", "cpu",
         "--threads", "1", "--budget", "0.05", "--reps", "5", "--out", str(tmp_path), "--tag", "test")
    doc = json.loads((tmp_path / "step_speed-test.json").read_text())
    assert doc["schema"] == "diffkern.benchmarks.step_speed/1"
    _common_header(doc)
    assert (tmp_path / "step_speed-test.png").stat().st_size > 0
    assert doc["files"]["plot"].endswith("step_speed-test.png")

    bw = doc["copy_bandwidth"]["cpu"]
    assert bw["bytes"] > 0 and _is_time(bw["clone_ms"]) and bw["gbps"] > 0

    impls = set(doc["implementations"])
    assert impls == {"native", "copy", "eager", "diffusers", "compile", "compile+randn", "compile+gen", "reference"}
    assert [(r["op"], r["params"]["eta"]) for r in doc["results"]] == [("ddim_step", 0.0), ("ddim_step", 1.0)]
    for r in doc["results"]:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["shape"] == [1, 4, 16, 16]
        assert r["numel"] == 1024 and r["bytes"] == 12 * 1024 and r["floor_ms"] > 0 and r["n_buffers"] >= 1
        assert set(r["impls"]) == impls
        expect_na = {"diffusers"} if not HAS_DIFFUSERS else set()
        if not NATIVE_CPU:
            expect_na.add("native")
        if r["params"]["eta"] == 0:
            expect_na |= {"compile+randn", "compile+gen"}  # nothing to draw at eta=0
        for name, e in r["impls"].items():
            if name in expect_na:
                assert e["status"] == "n/a" and e["reason"], (name, e)
                continue
            assert e["status"] == "ok", (r["label"], name, e)
            assert all(_is_time(e[k]) for k in ("median_ms", "min_ms", "q3_ms")), (name, e)
            assert e["q1_ms"] <= e["median_ms"] <= e["q3_ms"] and e["iqr_ms"] >= 0
            assert e["reps"] >= 3 and e["gbps"] > 0 and e["frac_copy_bw"] > 0
            if name.startswith("compile"):
                assert e["compile_s"] >= 0 and e["graph_breaks"] >= 0
            if r["params"]["eta"] == 0 and name != "copy":  # deterministic: every row computes the same step
                assert e["max_abs_diff_vs_eager"] < 1e-3, (name, e)
            if NATIVE_CPU:
                assert e["vs_native"] > 0
    assert doc["host_overhead"] == []  # measured on CUDA only


def test_loop_speed_quick(tmp_path):
    _run("loop_speed.py", "--quick", "--device", "cpu", "--threads", "1", "--reps", "1", "--ddpm-steps", "20",
         "--langevin", "2x5", "--out", str(tmp_path), "--tag", "test")
    doc = json.loads((tmp_path / "loop_speed-test.json").read_text())
    assert doc["schema"] == "diffkern.benchmarks.loop_speed/1"
    _common_header(doc)
    assert [lp["loop"] for lp in doc["loops"]] == ["ddim50", "ddpm20", "langevin"]
    for lp in doc["loops"]:
        assert lp["device"] == "cpu" and lp["steps"] == {"ddim50": 50, "ddpm20": 20, "langevin": 10}[lp["loop"]]
        assert _is_time(lp["model_only"]["eager"]["median_s"])
        assert set(lp["rows"]) == {"diffusers", "torch", "diffkern", "torch+graph", "diffkern+graph"}
        for name, e in lp["rows"].items():
            if name.endswith("+graph"):
                assert e["status"] == "n/a"  # CUDA graphs need CUDA
                continue
            if (name == "diffusers" and (lp["loop"] == "langevin" or not HAS_DIFFUSERS)) or (
                    name == "diffkern" and not NATIVE_CPU):
                assert e["status"] == "n/a" and e["reason"]
                continue
            assert e["status"] == "ok", (lp["loop"], name, e)
            assert _is_time(e["median_s"]) and _is_time(e["per_step_ms"]), e
            assert 0.0 <= e["outside_model_share"] <= 1.0
            if lp["loop"] == "ddim50":  # deterministic: every row samples the same thing
                assert e["max_abs_diff_vs_torch"] < 1e-2, (name, e)


@pytest.mark.skipif(not NATIVE_CPU, reason="native ops not built (the script measures diffkern's kernels)")
def test_sampler_loop_speed_quick(tmp_path):
    _run("sampler_loop_speed.py", "--quick", "--budget", "0.01", "--min-reps", "2",
         "--out", str(tmp_path), "--tag", "test")
    doc = json.loads((tmp_path / "sampler_loop_speed-test.json").read_text())
    assert doc["schema"] == "diffkern.benchmarks.sampler_loop_speed/1"
    _common_header(doc)
    assert [c["sampler"] for c in doc["cases"]] == ["dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"]
    for c in doc["cases"]:
        sde = c["sampler"] != "unipc"
        assert set(c["times"]) == {"eager", "diffkern", "model only"} | ({"diffkern+randn"} if sde else set())
        for t in c["times"].values():
            assert _is_time(t["median_ms"]) and _is_time(t["cpu_median_ms"]) and t["reps"] >= 2
        assert _is_time(c["ratio_eager_over_diffkern"])
        w = c["same_work"]
        # the two loops do the same work: both float32 runs near the float64 eager run, with
        # the noise_sampler called as often (once per step but the last). 20 steps: with few
        # steps stock UniPC's float32 coefficients (phi_k recursions, float32 linalg.solve)
        # drift to ~1e-4 (6 steps), diffkern's (float64, host) do not
        assert w["rel_err_eager_f32"] < 1e-5 and w["rel_err_diffkern_f32"] < 1e-5, w
        if sde:
            assert w["noise_calls"] == {"ref": 19, "eager": 19, "diffkern": 19}, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [6, 20])
def test_eager_loops_are_the_test_oracles(dtype, steps):
    """The benchmark's eager loops are bitwise the test suite's transcriptions of
    k-diffusion's / ComfyUI's loops (the benchmark may not import tests, so it has its own)."""
    sys.path.insert(0, str(BENCH))
    try:
        import _eager_samplers as E
    finally:
        sys.path.remove(str(BENCH))
    import test_comfy_samplers as TC
    import test_k_samplers_more as TK

    from diffkern import samplers as S

    def model(x, s):
        s = s.reshape(-1, 1, 1, 1)  # a nonlinear denoiser: the history terms matter
        return x * (0.25 / (0.25 + s * s)) + 0.1 * torch.tanh(x) * (s / (1 + s))

    sig = S.get_sigmas_karras(steps, 0.0292, 14.6146).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=dtype) * sig[0]
    draws = [torch.randn(2, 3, 5, 4, generator=g, dtype=dtype) for _ in range(steps)]

    def noise():
        it = iter(draws)
        return lambda a, b: next(it)

    assert torch.equal(E.sample_unipc(model, x, sig), TC.comfy_unipc(model, x, sig))
    assert torch.equal(E.sample_dpmpp_2m_sde(model, x, sig, noise_sampler=noise()),
                       TK.k_dpmpp_2m_sde(model, x, sig, noise_sampler=noise()))
    assert torch.equal(E.sample_dpmpp_2m_sde(model, x, sig, noise_sampler=noise(), solver_type="heun"),
                       TK.k_dpmpp_2m_sde(model, x, sig, noise_sampler=noise(), solver_type="heun"))
    assert torch.equal(E.sample_dpmpp_3m_sde(model, x, sig, noise_sampler=noise()),
                       TK.k_dpmpp_3m_sde(model, x, sig, noise_sampler=noise()))


def test_backward_speed_small():
    proc = subprocess.run([sys.executable, str(BENCH / "backward_speed.py"), "--size", "3x2x5x7", "--reps", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = [float(line.split()[-1]) for line in proc.stdout.splitlines() if "max|grad - reference grad|" in line]
    assert len(errs) == 2 and max(errs) <= 1e-5  # the fused backward equals autograd of the reference
    assert "x native" in proc.stdout


@pytest.mark.parametrize("spec, shape", [("64x4x128x128", (64, 4, 128, 128)), ("1e7x2", (10_000_000, 2))])
def test_size_parsing(spec, shape):
    loader = importlib.util.spec_from_file_location("diffkern_bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(common)
    assert common.parse_shape(spec) == shape


@pytest.mark.skipif(not NATIVE_CPU, reason="native ops not built")
def test_overhead_sweep_quick(tmp_path):
    _run("overhead_sweep.py", "--shapes", "1,1x4x8x8", "--no-compile", "--ops", "ddim_step_eta0,q_sample",
         "--threads", "1", "--budget", "0.002", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "overhead_sweep.json").read_text())
    assert doc["schema"] == "diffkern.benchmarks.overhead_sweep/1"
    assert (tmp_path / "overhead_sweep.png").stat().st_size > 0
    rows = doc["results"]
    assert {r["impl"] for r in rows} == {"diffkern", "eager"} and {r["op"] for r in rows} == {"ddim_step_eta0",
                                                                                              "q_sample"}
    assert all(_is_time(r["us_per_call"]) and _is_time(r["cpu_us_per_call"]) for r in rows)
    _run("overhead_sweep.py", "--calls", "--n-calls", "50", "--out", str(tmp_path))
    calls = json.loads((tmp_path / "per_call.json").read_text())
    assert all(_is_time(r["us"]) and _is_time(r["cpu_us"]) for r in calls["rows"])
