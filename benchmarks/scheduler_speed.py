"""Stock diffusers schedulers against diffkern's drop-in fused ones, per step.

For every scheduler class, whole sampling loops (``set_timesteps``, then ``scale_model_input``
where the class has one and ``step`` for every timestep, on a fixed random model output:
no model, only the scheduler) are timed for the stock class and its ``Fused*`` twin from the
same config, on the same inputs:

- ms / step: wall time of the loop over its number of calls (CUDA: synchronised at the end);
- host us / step: time for the calls to return. On CUDA, per call, at each size (kernels
  run asynchronously). On the CPU every op runs inside the call, so the host cost is
  measured at a size where the arithmetic is negligible (1x4x8x8) and shown on every row;
- syncs / step: ``aten._local_scalar_dense`` calls (a device-to-host read when the tensor
  is on the GPU; ``.item()``, ``bool(tensor)``, ``nonzero``), counted over one loop.

    python benchmarks/scheduler_speed.py                 # 1x4x64x64 and 16x4x128x128, CPU (+CUDA)
    python benchmarks/scheduler_speed.py --quick         # fewer repetitions
    python benchmarks/scheduler_speed.py --tag cpu-2threads   # also writes results/<tag>/scheduler_speed.json

Stochastic classes (DDPM, Euler ancestral, LCM, DPM-Solver SDE) draw their noise from a generator. Stock
draws with ``randn_tensor``; the fused class by ``--noise``: ``stock`` (default: stock's
``randn_tensor`` call, same image as stock), ``kernel`` (in the fused step) or ``keyed``
(per-sample seeds). Heun runs 10 steps (19 calls), LCM 8, the others 20.

    python benchmarks/scheduler_speed.py --noise kernel --classes DDPM,EulerAncestral,LCM
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

dk = C.import_diffkern()

SCHEMA = "diffkern.benchmarks.scheduler_speed/1"
HOST_SHAPE = (1, 4, 8, 8)

# name: (stock class name, config, steps, step kwargs)
CASES = {
    "DDIM": ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1), 20, {}),
    "DDPM": ("DDPMScheduler", dict(), 20, {"generator": True}),
    "Euler": ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
              20, {}),
    "EulerAncestral": ("EulerAncestralDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                               beta_end=0.012), 20, {"generator": True}),
    "Heun": ("HeunDiscreteScheduler", dict(beta_schedule="scaled_linear"), 10, {}),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                               beta_end=0.012, use_karras_sigmas=True), 20, {}),
    "DPMSolverMultistep3": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                beta_end=0.012, solver_order=3), 20, {}),
    "DPMSolverMultistepSDE": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                  beta_end=0.012, use_karras_sigmas=True,
                                                                  algorithm_type="sde-dpmsolver++"), 20,
                              {"generator": True}),
    "DPMSolverMultistepSana": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0,
                                                                   prediction_type="flow_prediction"), 20, {}),
    "DPMSolverMultistepInverse": ("DPMSolverMultistepInverseScheduler", dict(beta_schedule="scaled_linear",
                                                                             beta_start=0.00085, beta_end=0.012),
                                  20, {}),
    "EDMDPMSolverMultistep": ("EDMDPMSolverMultistepScheduler", dict(), 20, {}),
    "FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 20, {}),
    "LCM": ("LCMScheduler", dict(), 8, {"generator": True}),
    # Wan 2.1 / 2.2
    "UniPCMultistep": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=3.0, solver_order=2, solver_type="bh2",
                                                       final_sigmas_type="zero"), 20, {}),
    # Stable Diffusion 1.x
    "PNDM": ("PNDMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   skip_prk_steps=True, steps_offset=1), 20, {}),
    # CogVideoX
    "CogVideoXDDIM": ("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                     timestep_spacing="trailing"), 20, {}),
    # the rest of KarrasDiffusionSchedulers (issue 23)
    "EDMEuler": ("EDMEulerScheduler", dict(), 20, {}),
    "DDIMInverse": ("DDIMInverseScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                    20, {}),
    "TCD": ("TCDScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 8,
            {"generator": True}),
    "IPNDM": ("IPNDMScheduler", dict(), 20, {}),
    "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), 10, {}),
    "DPMSolverSinglestep": ("DPMSolverSinglestepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                 beta_end=0.012), 20, {}),
    "LMS": ("LMSDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20, {}),
    "KDPM2": ("KDPM2DiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10,
              {}),
    "KDPM2Ancestral": ("KDPM2AncestralDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                               beta_end=0.012), 10, {"generator": True}),
    "DEIS": ("DEISMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20,
             {}),
    "SASolver": ("SASolverScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20,
                 {"generator": True}),
}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


NOISE_MODES = ("stock", "kernel", "keyed")


def make_pair(diffusers_mod, name, noise="stock"):
    from diffkern.integrations import diffusers as fused_mod

    stock_name, cfg, steps, kw = CASES[name]
    stock = getattr(diffusers_mod, stock_name)(**cfg)
    extra = {"dk_noise": noise} if noise != "stock" else {}
    if noise == "keyed":
        extra["dk_seeds"] = 0  # one seed for every sample: the cost of keying, not its layout
    fused = getattr(fused_mod, "Fused" + stock_name).from_config(stock.config, **extra)
    return stock, fused, steps, kw


class Loop:
    """One scheduler's sampling loop on fixed inputs (the model output is fixed: the
    scheduler is what is timed)."""

    def __init__(self, sched, steps, kw, shape, device, dtype, seed=0):
        self.sched, self.steps, self.device = sched, steps, device
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(shape, generator=g).to(device, dtype)
        self.m = (0.1 * torch.randn(shape, generator=g)).to(device, dtype)
        self.gen = torch.Generator(device=device).manual_seed(seed) if kw.get("generator") else None
        self.has_scale = hasattr(sched, "scale_model_input")

    def reset(self):
        self.sched.set_timesteps(self.steps, device=self.device)
        return list(self.sched.timesteps)  # views, as `for t in scheduler.timesteps` yields

    def calls(self) -> int:
        return len(self.reset())

    def run(self, ts, host: list | None = None):
        s, x, m = self.sched, self.x, self.m
        kw = {"generator": self.gen} if self.gen is not None else {}
        for t in ts:
            t0 = time.perf_counter()
            if self.has_scale:
                s.scale_model_input(x, t)
            s.step(m, t, x, **kw)
            if host is not None:
                host.append(time.perf_counter() - t0)


def time_loops(loops: dict, reps: int) -> dict:
    """Each loop timed ``reps`` times, the loops in turns (stock, fused, stock, ...), so a
    change of machine load during the row hits both alike."""
    n = {k: lp.calls() for k, lp in loops.items()}
    for lp in loops.values():
        lp.run(lp.reset())  # warm-up (allocator, caches, first-call paths)
    walls = {k: [] for k in loops}
    host = {k: [] for k in loops}
    for _ in range(reps):
        for k, lp in loops.items():
            ts = lp.reset()
            C.sync(lp.device)
            t0 = time.perf_counter()
            lp.run(ts, host[k])
            C.sync(lp.device)
            walls[k].append((time.perf_counter() - t0) * 1e3 / n[k])
    out = {}
    for k, lp in loops.items():
        ts = lp.reset()  # set_timesteps may read the host; the steps after it may not
        with CountSyncs() as c:
            lp.run(ts)
        h = sorted(host[k])
        out[k] = {"ms_per_step": C.summarize(walls[k]), "host_us_per_step": h[len(h) // 2] * 1e6,
                  "syncs_per_step": c.n / n[k], "calls": n[k]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when available), cpu, cuda, or a list")
    ap.add_argument("--sizes", default="1x4x64x64,16x4x128x128")
    ap.add_argument("--classes", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--noise", default="stock", choices=NOISE_MODES,
                    help="the fused classes' noise: stock's randn_tensor (default), in-kernel, or keyed")
    ap.add_argument("--reps", type=int, default=None, help="timed loops per row (default 5, --quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 timed loops per row")
    ap.add_argument("--tag", default=None, help="write results/<tag>/scheduler_speed.json")
    ap.add_argument("--out", default=str(C.DEFAULT_OUT), help="results folder (with --tag)")
    a = ap.parse_args(argv)

    diffusers_mod, why = C.import_diffusers()
    if diffusers_mod is None:
        raise SystemExit(f"scheduler_speed needs diffusers: {why}")
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = C.resolve_devices(a.device)
    dtype = C.parse_dtypes(a.dtype)[0]
    shapes = [C.parse_shape(s) for s in C.split_list(a.sizes)]
    names = C.split_list(a.classes)
    for n in names:
        if n not in CASES:
            raise SystemExit(f"unknown class {n!r}; choose from {', '.join(CASES)}")
    reps = a.reps or (2 if a.quick else 5)
    C.warn_if_busy()
    started = time.perf_counter()

    rows = []
    for dev in devices:
        for name in names:
            host_cpu = {}
            if dev.type == "cpu":  # host cost: at a size where the arithmetic is negligible
                stock, fused, steps, kw = make_pair(diffusers_mod, name, a.noise)
                r = time_loops({k: Loop(sc, steps, kw, HOST_SHAPE, dev, dtype)
                                for k, sc in (("stock", stock), ("fused", fused))}, max(3 * reps, 10))
                host_cpu = {k: v["ms_per_step"]["median_ms"] * 1e3 for k, v in r.items()}
            for shape in shapes:
                stock, fused, steps, kw = make_pair(diffusers_mod, name, a.noise)
                row = {"device": str(dev), "class": name, "shape": C.shape_str(shape), "dtype": C.dtype_name(dtype),
                       "steps": steps, "noise": a.noise}
                r = time_loops({k: Loop(sc, steps, kw, shape, dev, dtype)
                                for k, sc in (("stock", stock), ("fused", fused))}, reps)
                for impl in ("stock", "fused"):
                    if dev.type == "cpu":
                        r[impl]["host_us_per_step"] = host_cpu[impl]
                        r[impl]["host_shape"] = C.shape_str(HOST_SHAPE)
                    row[impl] = r[impl]
                sm, fm = r["stock"]["ms_per_step"]["median_ms"], r["fused"]["ms_per_step"]["median_ms"]
                print(f"  {dev} {name:19s} {row['shape']:>14s}: stock {C.fmt_ms(sm)}, fused {C.fmt_ms(fm)} ms/step",
                      file=sys.stderr)
                rows.append(row)

    header = ("| device | scheduler | shape | stock ms/step | fused ms/step | speedup | stock host us/step | "
              "fused host us/step | host ratio | stock syncs/step | fused syncs/step |")
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        s, f = r["stock"], r["fused"]
        sm, fm = s["ms_per_step"]["median_ms"], f["ms_per_step"]["median_ms"]
        print(f"| {r['device']} | {r['class']} | {r['shape']} | {C.fmt_ms(sm)} | {C.fmt_ms(fm)} | "
              f"{C.fmt_ratio(sm / fm)} | {s['host_us_per_step']:.0f} | {f['host_us_per_step']:.0f} | "
              f"{C.fmt_ratio(s['host_us_per_step'] / f['host_us_per_step'])} | {s['syncs_per_step']:.2f} | "
              f"{f['syncs_per_step']:.2f} |")
    if any(d.type == "cpu" for d in devices):
        print(f"\nms/step: median of {reps} loops. CPU host us/step: measured at {C.shape_str(HOST_SHAPE)} "
              f"(the ops run inside the call on the CPU); {torch.get_num_threads()} threads; "
              f"load average {C.loadavg()}.")

    doc = {"schema": SCHEMA, "created": C.now_iso(), "argv": sys.argv[1:], "machine": C.machine_info(devices),
           "versions": C.versions(diffusers_mod), "native": C.native_info(devices),
           "threads": torch.get_num_threads(), "reps": reps, "loadavg": C.loadavg(), "rows": rows,
           "elapsed_s": time.perf_counter() - started}
    if a.tag:
        path = Path(a.out) / a.tag / "scheduler_speed.json"
        C.write_json(path, doc)
        print(f"wrote {path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
