#!/usr/bin/env python
"""Plants realistic bugs one at a time in a temporary copy of the checkout and runs the
tests that should catch each; reports caught / survived (issue 26).

    python scripts/mutation_check.py            # every mutant
    python scripts/mutation_check.py -k dpm     # the mutants whose name contains "dpm"
    python scripts/mutation_check.py --list

Most mutants are in the Python layer (validation, the reference, the RNG mirror, the
samplers, the diffusers drop-ins): no rebuild. The C++ ones (the CUDA kernels and the CPU
driver's loops) are checked by the CUDA emulation test, which compiles both from the copy
(`CTEST` selection: a CMake build in the copy, ~1 minute a mutant; needs CMake and the
CUDA headers). The copy imports its own diffkern
(`python -m pytest` from the copy's root) and finds the native build as the checkout
does: the JIT cache is keyed by the sources' content, which the copy leaves unchanged,
and ahead-of-time .so files are copied along. Each mutant is checked to apply exactly
where written (the text must occur the stated number of times), so a refactor that moves
a line makes this script fail loudly instead of reporting a vacuous "caught".

A mutant counts as caught when its tests fail (exit status 1). Exit status 0 with the
mutant in place is "survived"; any other status (collection error, crash) is reported as
"error", which is not a catch. The script exits non-zero unless every mutant is caught,
and first runs each distinct test selection unmutated (a selection that fails or selects
nothing unmutated proves nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    layer: str
    path: str
    old: str
    new: str
    tests: list[str]
    count: int = 1  # occurrences of `old` that are replaced (all of them)


CTEST = ["ctest"]  # the CUDA emulation test (with the CPU driver comparison), built in the copy
T_BAD = "tests/test_bad_inputs.py"
T_CPU = "tests/test_native_cpu.py"
T_FUSED = "tests/test_fused_schedulers.py"

MUTANTS = [
    Mutant("t-upper-bound-inclusive", "validation", "diffkern/_validate.py",
           "    if tv >= T or (tv < 0 and not allow_negative):", "    if tv > T or (tv < 0 and not allow_negative):",
           [T_BAD, "-k", "fallback and (t-too-big or t-small-schedule)"]),
    Mutant("t_prev-equal-t-accepted", "validation", "diffkern/_validate.py",
           "    if ints and tp_int >= t_int:", "    if ints and tp_int > t_int:",
           [T_BAD, "-k", "fallback and t_prev-not-below-t"]),
    Mutant("negative-eta-accepted", "validation", "diffkern/_validate.py",
           "    if not (v >= 0 and math.isfinite(v)):", "    if not (v >= -1 and math.isfinite(v)):",
           [T_BAD, "-k", "fallback and (eta-negative or step_size-negative)"]),
    Mutant("broadcast-refused", "validation", "diffkern/_validate.py",
           "    return all(s == 1 or s == t for s, t in zip(", "    return all(s == t for s, t in zip(",
           ["tests/test_front_door.py", "-k", "broadcast"]),
    Mutant("coefficients-in-float32", "reference", "diffkern/_reference_common.py",
           "    ab = table.to(torch.float64)[t.clamp(0, T - 1)]", "    ab = table.to(torch.float32)[t.clamp(0, T - 1)]",
           [T_CPU, "-k", "bitwise and fp32"]),
    # (moving the c2 term first is an equivalent mutant: c2 = 0 for DDIM, c1 = 0 for DDPM)
    Mutant("update-distributed", "reference", "diffkern/reference.py",
           "    out = c0 * x0 + c1 * (a1 * xc + b1 * mc) + c2 * xc",
           "    out = c0 * x0 + (c1 * a1 * xc + c1 * b1 * mc) + c2 * xc",
           [T_CPU, "-k", "bitwise"]),
    Mutant("ddpm-noise-at-t0", "reference", "diffkern/reference.py",
           "        std = torch.where(t > 0, var.sqrt(), torch.zeros_like(var))",
           "        std = torch.where(t >= 0, var.sqrt(), torch.zeros_like(var))",
           [T_CPU, "-k", "ddpm"]),
    Mutant("ddim-dir-eta-not-squared", "reference", "diffkern/reference.py",
           "eta * eta * ab * (1 - ab_prev) / ab_prev", "eta * ab * (1 - ab_prev) / ab_prev",
           [T_CPU, "-k", "ddim and vs_ref64"]),
    Mutant("gmm-sigma-not-squared", "reference", "diffkern/reference.py",
           "    var = mix.stds.to(cd) ** 2 + sigma * sigma", "    var = mix.stds.to(cd) ** 2 + sigma",
           ["tests/test_langevin_gmm.py"]),
    Mutant("keyed-group-bit", "rng mirror", "diffkern/_rng.py",
           "    c3 = ((g >> 32) & MASK32) | 0x80000000", "    c3 = ((g >> 32) & MASK32) | 0x40000000",
           ["tests/test_keyed_noise.py", "-k", "native_keyed_normal_matches_reference or every_op_native"]),
    Mutant("k-heun-second-eval-at-sigma-i", "k-samplers", "diffkern/k_samplers.py",
           "            m_2, _ = _denoise(model, x_2, levels.model(i + 1), extra_args, fuse)",
           "            m_2, _ = _denoise(model, x_2, levels.model(i), extra_args, fuse)",
           ["tests/test_k_samplers.py", "-k", "k_diffusion_loop_in_float64"]),
    Mutant("dpm-lower-order-final-at-15", "drop-ins", "diffkern/integrations/diffusers/dpm.py",
           "(c.lower_order_final and n < 15)", "(c.lower_order_final and n <= 15)",
           [T_FUSED, "-k", "lower_order_final_threshold"]),
    Mutant("euler-churn-window-exclusive", "drop-ins", "diffkern/integrations/diffusers/euler.py",
           "if s_tmin <= sigma <= s_tmax else 0.0", "if s_tmin < sigma <= s_tmax else 0.0",
           [T_FUSED, "-k", "churn_window"]),
    Mutant("euler-churn-over-n-plus-1", "drop-ins", "diffkern/integrations/diffusers/euler.py",
           "min(s_churn / (len(st.sig_host) - 1), 2**0.5 - 1)", "min(s_churn / len(st.sig_host), 2**0.5 - 1)",
           [T_FUSED, "-k", "euler_options or churn_window"]),
    # (shifting the second stage's sigma pair is equivalent: that stage reads only sigma_next,
    # and the interleaved table repeats it)
    Mutant("heun-second-stage-x0-at-sigma", "drop-ins", "diffkern/integrations/diffusers/heun.py",
           "B.denoised(x, m, sigma if first else sigma_next, pred)", "B.denoised(x, m, sigma, pred)",
           [T_FUSED, "-k", "heun_loop"]),
    Mutant("ddim-final-alpha-always-one", "drop-ins", "diffkern/integrations/diffusers/ddim.py",
           "        final = torch.ones(1) if c.set_alpha_to_one else ac[:1]", "        final = torch.ones(1)",
           [T_FUSED, "-k", "ddim_options"]),
    # (skipping the warm-up flag is equivalent: the first step's history is None, first order)
    Mutant("dpm-history-oldest", "drop-ins", "diffkern/integrations/diffusers/dpm.py",
           "        hist = [self.model_outputs[-k] for k in range(1, o)]",
           "        hist = [self.model_outputs[k - 1] for k in range(1, o)]",
           [T_FUSED, "-k", "fewest_steps and DPM"]),
    Mutant("cosine-offset", "schedules", "diffkern/schedules.py",
           "s: float = 0.008,", "s: float = 0.009,",
           ["tests/test_diffusers_equivalence.py", "-k", "schedules_bitwise"]),
    Mutant("cuda-step-coeffs-in-float", "CUDA kernel", "csrc/kernels/step_backward.cu",
           "  return cast_coeffs<C>(op.template coeffs<double>(b));", "  return op.template coeffs<C>(b);", CTEST),
    Mutant("cuda-fp16-halfword-order", "CUDA kernel", "csrc/kernels/elementwise.cuh",
           "      v[2 * i] = C(Bits16<T>::to_float(w[i] & 0xFFFFu));",
           "      v[2 * i] = C(Bits16<T>::to_float(w[i] >> 16));", CTEST),
    Mutant("cuda-mixed-fp16-read-as-bf16", "CUDA kernel", "csrc/kernels/elementwise.cuh",
           "    case DType::kFloat16: Unit<C, __half>::load(o.data, e0, v); break;",
           "    case DType::kFloat16: Unit<C, __nv_bfloat16>::load(o.data, e0, v); break;", CTEST),
    Mutant("cuda-last-unit-short", "CUDA kernel", "csrc/kernels/elementwise.cuh",
           "    const int64_t n = p.numel - e0 < kUnit ? p.numel - e0 : kUnit;",
           "    const int64_t n = p.numel - e0 < kUnit ? p.numel - e0 - 1 : kUnit;", CTEST),
    Mutant("cpu-driver-bf16-truncates", "CPU driver", "csrc/torch/cpu/driver.h",
           "uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)", "uint16_t(b >> 16)", CTEST),
    Mutant("cpu-driver-keeps-first-level-coeffs", "CPU driver", "csrc/torch/cpu/driver.h",
           "          if (li != cached) {", "          if (li < cached) {", CTEST),
    Mutant("levels-always-the-same", "CPU driver", "csrc/kernels/op_base.h",
           "  DK_HD bool same(int64_t a, int64_t b) const { return !per_sample() || at(a) == at(b); }",
           "  DK_HD bool same(int64_t a, int64_t b) const { return true; }", CTEST),
    Mutant("cuda-keyed-group-crosses-samples", "CUDA kernel", "csrc/kernels/elementwise.cuh",
           "if ((j & 3) == 0 && j + 4 <= k.inner) {", "if ((j & 3) == 0 && j + 4 <= k.inner + 4) {", CTEST),
    Mutant("cpu-driver-keyed-counter-off-by-one", "CPU driver", "csrc/torch/cpu/driver.h",
           "io.keyed.inner, e0, n, zbuf);", "io.keyed.inner, e0 + 1, n, zbuf);", CTEST),
]


def _ctest(copy: Path, timeout: int) -> tuple[int, float, str]:
    """Builds the CUDA emulation test in the copy (incrementally) and runs it: rc 1 when it
    fails, 0 when it passes, anything else (a build error) is not a catch."""
    t0 = time.time()
    build = copy / "build" / "emu"
    try:
        cfg = subprocess.run(["cmake", "-S", str(copy), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                              "-DDIFFKERN_CUDA_EMU_SANITIZE=OFF"], capture_output=True, text=True, timeout=timeout)
        if cfg.returncode != 0:
            return 2, time.time() - t0, "cmake configure failed"
        targets = ["cuda_emu_tests", "diffkern_cuda_emu_host", "diffkern_cuda_emu_device"]
        b = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *targets],
                           capture_output=True, text=True, timeout=timeout)
        if b.returncode != 0:
            return 2, time.time() - t0, "build failed"
        p = subprocess.run(["ctest", "--test-dir", str(build), "-R", "^cuda_emu_tests$"], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.time() - t0, "timeout"
    passed = "100% tests passed" in p.stdout
    failed = "tests failed out of 1" in p.stdout and not passed
    rc = 0 if passed else (1 if failed else 2)
    tail = [ln for ln in p.stdout.splitlines() if "tests passed" in ln or "tests failed" in ln]
    return rc, time.time() - t0, ("1 passed (ctest cuda_emu_tests)" if passed else (tail[0] if tail else "no result"))


def _copy_tree(dst: Path) -> None:
    """The tracked and untracked-but-not-ignored files, plus native build outputs."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "diffkern").glob("*.so")]
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "diffkern").glob("_build_info.json")]
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _pytest(copy: Path, args: list[str], timeout: int) -> tuple[int, float, str]:
    if args == CTEST:
        return _ctest(copy, timeout)
    env = dict(os.environ, DIFFKERN_REQUIRE_NATIVE="1", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, ["timeout"]
    return rc, time.time() - t0, tail[0] if tail else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the mutants whose name contains one of these (comma-separated)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs of the selections")
    a = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if any(k in m.name for k in a.k.split(","))]
    if a.list:
        for m in mutants:
            print(f"{m.name:34s} {m.layer:12s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="diffkern-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        for m in mutants:  # every mutant applies where written, before anything runs
            n = (copy / m.path).read_text().count(m.old)
            if n != m.count:
                print(f"{m.name}: expected {m.count} occurrence(s) of its text in {m.path}, found {n}")
                return 2
        if not a.no_baseline:
            for sel in {tuple(m.tests) for m in mutants}:
                rc, secs, tail = _pytest(copy, list(sel), a.timeout)
                print(f"baseline {' '.join(sel)}: rc {rc} ({secs:.0f} s) {tail}", flush=True)
                if rc != 0 or " passed" not in tail:
                    print("an unmutated selection must pass and run tests")
                    return 2
        rows = []
        for m in mutants:
            f = copy / m.path
            orig = f.read_text()
            f.write_text(orig.replace(m.old, m.new))
            try:
                rc, secs, tail = _pytest(copy, m.tests, a.timeout)
            finally:
                f.write_text(orig)
            verdict = "caught" if rc == 1 else ("survived" if rc == 0 else "error")
            rows.append((m, verdict, tail))
            print(f"{verdict:8s} {m.name:34s} {m.layer:12s} ({secs:.0f} s) {tail}", flush=True)
    print("\n| mutant | layer | file | tests | verdict |\n|---|---|---|---|---|")
    for m, verdict, _ in rows:
        print(f"| {m.name} | {m.layer} | {m.path} | `{' '.join(m.tests)}` | {verdict} |")
    caught = sum(v == "caught" for _, v, _ in rows)
    print(f"\n{caught} of {len(rows)} caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
