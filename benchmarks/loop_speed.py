#!/usr/bin/env python
"""Whole sampling loops: how much of a loop's time is spent outside the model, and how
much of that diffkern gives back.

    python benchmarks/loop_speed.py --quick
    python benchmarks/loop_speed.py --device cuda --image 8x4x64x64

Loops (the model is defined here, small on purpose: the smaller the model, the larger the
share of the step):
  ddim50     50-step DDIM (eta=0) with TinyUNet, an eps-model of a few convolutions
  ddpm1000   1000-step ancestral DDPM with the same TinyUNet
  langevin   annealed Langevin (levels x steps each) with an MLP score on 2-D points

Rows:
  diffusers       a diffusers pipeline's loop: set_timesteps(device=...), scheduler.step
  torch           the same loop with hand-written formulas and torch.randn
  diffkern        dk.ddim_step / dk.ddpm_step / dk.langevin_step, timesteps on the device
  torch+graph     (CUDA) the torch loop captured whole in one torch.cuda.CUDAGraph
  diffkern+graph  (CUDA) the diffkern loop captured whole (its in-kernel noise is graph-safe)
  model only      the model calls alone, eager and (CUDA) graph-captured: the loop's floor

"outside model" = 1 - (model-only time in the same mode) / (loop time): the share of the
loop that the steps (and the Python around them) cost. Noise comes from the default
generator (seeded), which CUDA graphs support. Writes ``<out>/loop_speed-<tag>.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common as C
import torch
from torch import nn

dk = C.import_diffkern()

SCHEMA = "diffkern.benchmarks.loop_speed/1"
ROWS = {
    "diffusers": "a diffusers pipeline's loop: set_timesteps(device=...), scheduler.step(...)",
    "torch": "hand-written formulas with Python-float coefficients and torch.randn_like",
    "diffkern": "dk.ddim_step / dk.ddpm_step / dk.langevin_step with device timesteps",
    "torch+graph": "the torch loop captured whole in one CUDA graph (CUDA only)",
    "diffkern+graph": "the diffkern loop captured whole in one CUDA graph (CUDA only)",
}
LOOPS = ("ddim50", "ddpm1000", "langevin")


# ---- models --------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float().reshape(-1, 1) * freqs
    return torch.cat([a.sin(), a.cos()], dim=-1)


class TinyUNet(nn.Module):
    """conv -> down -> mid (+ time embedding) -> up -> concat skip -> conv: an eps-model
    with the structure (not the size) of a diffusion UNet."""

    def __init__(self, channels: int = 4, base: int = 32):
        super().__init__()
        self.base = base
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        self.down = nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(8 if base % 8 == 0 else 1, 2 * base)
        self.mid = nn.Conv2d(2 * base, 2 * base, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(base, 2 * base), nn.SiLU(), nn.Linear(2 * base, 2 * base))
        self.up = nn.ConvTranspose2d(2 * base, base, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * base, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h0 = nn.functional.silu(self.inp(x))
        h = nn.functional.silu(self.norm(self.down(h0)))
        h = h + self.temb(timestep_embedding(t, self.base)).to(h.dtype)[:, :, None, None]
        h = nn.functional.silu(self.mid(h))
        h = nn.functional.silu(self.up(h))
        return self.out(torch.cat([h, h0], dim=1))


class ScoreMLP(nn.Module):
    """s(x, sigma) = MLP([x, log sigma]) / sigma, the NCSN noise-conditional parametrisation."""

    def __init__(self, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ls = sigma.log().to(x.dtype).expand(x.shape[0], 1)
        return self.net(torch.cat([x, ls], dim=1)) / sigma.to(x.dtype)


# ---- loops ---------------------------------------------------------------------------------
class NotApplicable(Exception):
    pass


class Loop:
    """One sampling problem: the model, the start tensor, and a run function per row.
    ``run(x, n)`` performs the first ``n`` steps (all when n is None) and returns x."""

    name: str
    steps: int

    def model_only(self, x, n=None):
        raise NotImplementedError

    def rows(self) -> dict:
        raise NotImplementedError


class DiffusionLoop(Loop):
    def __init__(self, kind: str, device, dtype, shape, base: int, diffusers_mod, ddpm_steps: int):
        self.kind, self.device, self.dtype = kind, device, dtype
        self.diffusers = diffusers_mod
        self.model = TinyUNet(shape[1], base).to(device, dtype).eval()
        self.x_init = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        sched = dk.NoiseSchedule.linear()
        self.ac = sched.alphas_cumprod.tolist()
        self.steps = 50 if kind == "ddim" else ddpm_steps
        self.name = f"{kind}{self.steps}"
        # diffusers' default "leading" spacing (DDIM50: 980, 960, ..., 0), t_prev = t - 1000 // steps
        # (DDPM1000: t - 1); t_prev < 0 at the end means alpha_cumprod' = 1.
        ratio = 1000 // self.steps
        self.pairs = [(i * ratio, i * ratio - ratio) for i in range(self.steps - 1, -1, -1)]
        self.t_dev = torch.tensor([p[0] for p in self.pairs], device=device)
        self.tp_dev = torch.tensor([p[1] for p in self.pairs], device=device)
        self.coeffs = [self._coefficients(t, tp) for t, tp in self.pairs]

    def _coefficients(self, t, tp):
        ab, abp = self.ac[t], (self.ac[tp] if tp >= 0 else 1.0)
        if self.kind == "ddim":
            return (ab**0.5, (1 - ab) ** 0.5, abp**0.5, (1 - abp) ** 0.5, 0.0)
        a, b = ab / abp, 1 - ab / abp
        std = ((1 - abp) / (1 - ab) * b) ** 0.5 if t > 0 else 0.0
        return (ab**0.5, (1 - ab) ** 0.5, abp**0.5 * b / (1 - ab), a**0.5 * (1 - abp) / (1 - ab), std)

    def _n(self, n):
        return self.steps if n is None else min(n, self.steps)

    def model_only(self, x, n=None):
        for k in range(self._n(n)):
            self.model(x, self.t_dev[k])
        return x

    def run_torch(self, x, n=None):
        for k in range(self._n(n)):
            eps = self.model(x, self.t_dev[k])
            sa, s1a, c0, c1, std = self.coeffs[k]
            x0 = (x - s1a * eps) / sa
            if self.kind == "ddim":
                x = c0 * x0 + c1 * eps
            else:
                x = c0 * x0 + c1 * x
                if std > 0:
                    x = x + std * torch.randn_like(x)
        return x

    def run_diffkern(self, x, n=None):
        step = dk.ddim_step if self.kind == "ddim" else dk.ddpm_step
        for k in range(self._n(n)):
            eps = self.model(x, self.t_dev[k])
            x = step(x, eps, self.t_dev[k], t_prev=self.tp_dev[k])
        return x

    def rows(self) -> dict:
        rows = {"torch": self.run_torch, "diffkern": self.run_diffkern}
        if self.diffusers is None:
            rows["diffusers"] = NotApplicable("diffusers is not installed")
        else:
            cls = self.diffusers.DDIMScheduler if self.kind == "ddim" else self.diffusers.DDPMScheduler
            sched = cls(clip_sample=False)
            sched.set_timesteps(self.steps, device=self.device)

            def run_diffusers(x, n=None):
                for t in sched.timesteps[: self._n(n)]:
                    eps = self.model(x, t)
                    x = sched.step(eps, t, x, return_dict=False)[0]
                return x

            rows["diffusers"] = run_diffusers
        return rows


class LangevinLoop(Loop):
    def __init__(self, device, dtype, points: int, levels: int, steps_each: int, hidden: int):
        self.device, self.dtype = device, dtype
        self.name, self.steps = "langevin", levels * steps_each
        self.steps_each = steps_each
        self.model = ScoreMLP(2, hidden).to(device, dtype).eval()
        self.x_init = (torch.rand(points, 2, generator=torch.Generator().manual_seed(0)) * 16 - 8).to(device, dtype)
        sigmas = torch.exp(torch.linspace(math.log(20.0), 0.0, levels, dtype=torch.float64)).tolist()
        self.schedule = [(s, 2e-2 * (s / sigmas[-1]) ** 2) for s in sigmas for _ in range(steps_each)]
        self.sigma_dev = [torch.tensor(s, device=device, dtype=torch.float32) for s, _ in self.schedule]

    def model_only(self, x, n=None):
        for k in range(self.steps if n is None else n):
            self.model(x, self.sigma_dev[k])
        return x

    def run_torch(self, x, n=None):
        for k in range(self.steps if n is None else n):
            a = self.schedule[k][1]
            x = x + a * self.model(x, self.sigma_dev[k]) + (2 * a) ** 0.5 * torch.randn_like(x)
        return x

    def run_diffkern(self, x, n=None):
        for k in range(self.steps if n is None else n):
            x = dk.langevin_step(x, self.model(x, self.sigma_dev[k]), self.schedule[k][1])
        return x

    def rows(self) -> dict:
        return {"diffusers": NotApplicable("diffusers has no annealed Langevin sampler"),
                "torch": self.run_torch, "diffkern": self.run_diffkern}


# ---- timing --------------------------------------------------------------------------------
def _loop_stats(ms: list[float]) -> dict:
    s = C.summarize(ms)
    return {"median_s": s["median_ms"] / 1e3, "q1_s": s["q1_ms"] / 1e3, "q3_s": s["q3_ms"] / 1e3,
            "iqr_s": s["iqr_ms"] / 1e3, "min_s": s["min_ms"] / 1e3, "reps": len(ms)}


def time_loop(run, x_init, device, reps: int, warm_steps: int) -> dict:
    """Seconds per whole loop: median, quartiles, IQR, min over ``reps`` loops."""
    if warm_steps:
        run(x_init.clone(), warm_steps)
    return _loop_stats([1e3 * C.time_once(lambda: run(x_init.clone()), device) for _ in range(reps)])


def time_loops_in_turns(runs: dict, x_init, device, reps: int, warm_steps: int) -> tuple[dict, dict]:
    """Like time_loop for several rows, timed in turns (rep 1 of every row, then rep 2, ...)
    so that a slow spell of a shared machine falls on all rows alike. -> (stats, errors)."""
    ms, errors = {name: [] for name in runs}, {}
    for name, run in runs.items():
        try:
            if warm_steps:
                run(x_init.clone(), warm_steps)
        except Exception as e:  # one failing row must not lose the others
            errors[name] = e
    for _ in range(reps):
        for name, run in runs.items():
            if name in errors:
                continue
            try:
                ms[name].append(1e3 * C.time_once(lambda r=run: r(x_init.clone()), device))
            except Exception as e:
                errors[name] = e
    return {name: _loop_stats(v) for name, v in ms.items() if name not in errors}, errors


@dataclass
class Graphed:
    """A row that runs ``run`` captured whole in one CUDA graph."""

    run: Callable


def capture(run, x_init, device, warm_steps: int):
    """Capture the whole loop in one CUDA graph; -> (replay() -> output, capture seconds)."""
    static_x = x_init.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (cuDNN picks algorithms) outside the capture
        run(static_x.clone(), warm_steps)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(graph):
        out = run(static_x)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    def replay(*_):
        static_x.copy_(x_init)
        graph.replay()
        return out

    return replay, seconds


def run_loop(loop: Loop, args, bar) -> dict:
    dev = loop.device
    res = {"loop": loop.name, "device": str(dev), "dtype": C.dtype_name(loop.dtype),
           "shape": list(loop.x_init.shape), "steps": loop.steps, "rows": {}, "model_only": {}}
    warm = min(3, loop.steps)
    with torch.no_grad():
        if dev.type == "cuda":
            replay, cap = capture(loop.model_only, loop.x_init, dev, warm)
            res["model_only"]["graph"] = time_loop(replay, loop.x_init, dev, args.reps, 0) | {"capture_s": cap}
        rows = loop.rows()
        native = dk.native_available(dev)
        if not native:
            rows["diffkern"] = NotApplicable(dk.native_error() or f"diffkern was built without {dev.type} kernels")
        for graph_row, base in (("torch+graph", "torch"), ("diffkern+graph", "diffkern")):
            if dev.type != "cuda":
                rows[graph_row] = NotApplicable("CUDA graphs need a CUDA device")
            else:
                rows[graph_row] = rows[base] if isinstance(rows[base], NotApplicable) else Graphed(rows[base])
        # The model alone and every eager row, timed in turns.
        bar.set_postfix_str(f"{dev.type} {loop.name}: eager rows in turns")
        eager = {"model only": loop.model_only}
        eager.update({n: rows[n] for n in ROWS if not isinstance(rows[n], (NotApplicable, Graphed))})
        eager_stats, eager_errors = time_loops_in_turns(eager, loop.x_init, dev, args.reps, warm)
        if "model only" in eager_errors:
            raise eager_errors["model only"]
        res["model_only"]["eager"] = eager_stats["model only"]
        outputs = {}
        for name in ROWS:
            bar.set_postfix_str(f"{dev.type} {loop.name}: {name}")
            spec = rows[name]
            if isinstance(spec, NotApplicable):
                res["rows"][name] = {"status": "n/a", "reason": str(spec)}
                bar.update()
                continue
            try:
                if isinstance(spec, Graphed):
                    replay, cap = capture(spec.run, loop.x_init, dev, warm)
                    entry = time_loop(replay, loop.x_init, dev, args.reps, 0) | {"capture_s": cap}
                    outputs[name] = replay().clone()
                    model = res["model_only"]["graph"]["median_s"]
                else:
                    if name in eager_errors:
                        raise eager_errors[name]
                    entry = eager_stats[name]
                    outputs[name] = spec(loop.x_init.clone()) if loop.name == "ddim50" else None
                    model = res["model_only"]["eager"]["median_s"]
                entry = {"status": "ok", **entry, "per_step_ms": entry["median_s"] / loop.steps * 1e3,
                         "outside_model_share": max(0.0, 1 - model / entry["median_s"]),
                         "outside_model_us_per_step": (entry["median_s"] - model) / loop.steps * 1e6}
            except Exception as e:  # one failing row must not lose the others
                if args.debug:
                    traceback.print_exc()
                entry = {"status": "error", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            res["rows"][name] = entry
            bar.update()
        # DDIM at eta=0 is deterministic: every row must land on the same samples.
        ref = outputs.get("torch")
        if loop.name == "ddim50" and ref is not None:
            for name, out in outputs.items():
                if out is not None and name in res["rows"]:
                    res["rows"][name]["max_abs_diff_vs_torch"] = float((out.float() - ref.float()).abs().max())
    return res


# ---- output --------------------------------------------------------------------------------
def print_table(doc: dict, file=sys.stdout) -> None:
    print(f"\ndiffkern loop_speed  ({doc['machine']['cpu_model']}, {doc['machine']['cpu_count']} CPUs"
          + "".join(f"; {g['name']}" for g in doc["machine"]["gpus"]) + f"; torch {doc['versions']['torch']})",
          file=file)
    for r in doc["loops"]:
        mo = r["model_only"]
        floor = ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in mo.items())
        print(f"\n== {r['device']}  {r['loop']}  ({r['steps']} steps, x {C.shape_str(r['shape'])} {r['dtype']})"
              f"   model only: {floor}", file=file)
        print(f"  {'row':<16}{'loop ms':>10}{'IQR ms':>9}{'ms/step':>9}{'outside model':>15}{'us/step':>9}"
              f"{'vs torch':>10}  notes", file=file)
        base = r["rows"].get("torch", {}).get("median_s")
        for name, e in r["rows"].items():
            if e["status"] != "ok":
                print(f"  {name:<16}{e['status']:>10}  {e.get('reason', '')}", file=file)
                continue
            notes = []
            if "capture_s" in e:
                notes.append(f"capture {e['capture_s']:.2f}s")
            if "max_abs_diff_vs_torch" in e:
                notes.append(f"max|diff| vs torch {e['max_abs_diff_vs_torch']:.1e}")
            ratio = C.fmt_ratio(base / e["median_s"]) if base else "n/a"
            print(f"  {name:<16}{e['median_s'] * 1e3:>10.1f}{e['iqr_s'] * 1e3:>9.1f}{e['per_step_ms']:>9.3f}"
                  f"{100 * e['outside_model_share']:>14.0f}%{e['outside_model_us_per_step']:>9.0f}{ratio:>10}  "
                  + ", ".join(notes), file=file)
    print("\n'vs torch': the torch row's time / this row's (> 1: faster than the hand-written loop)", file=file)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and inputs, 100 DDPM steps, 2 reps")
    p.add_argument("--loops", default=",".join(LOOPS), help=f"comma list of {', '.join(LOOPS)}")
    p.add_argument("--device", default="auto", help="auto (cpu, plus cuda if available), cpu, cuda, or a list")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--image", default=None, help="image batch for DDIM/DDPM (default 8x4x64x64; quick 1x4x16x16)")
    p.add_argument("--base", type=int, default=None, help="TinyUNet width (default 32; quick 8)")
    p.add_argument("--ddpm-steps", type=int, default=None, help="DDPM loop length (default 1000; quick 100)")
    p.add_argument("--points", type=float, default=None, help="Langevin points (default 1e5; quick 1e3)")
    p.add_argument("--langevin", default=None, help="LEVELSxSTEPS (default 10x100; quick 5x10)")
    p.add_argument("--hidden", type=int, default=128, help="score MLP width (default 128)")
    p.add_argument("--reps", type=int, default=None, help="timed loops per row (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    p.add_argument("--tag", default=None, help="file name tag (default: devices, plus -quick)")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing rows")
    args = p.parse_args(argv)
    q = args.quick
    args.image = C.parse_shape(args.image or ("1x4x16x16" if q else "8x4x64x64"))
    args.base = args.base or (8 if q else 32)
    args.ddpm_steps = args.ddpm_steps or (100 if q else 1000)
    if not 1 <= args.ddpm_steps <= 1000:
        raise SystemExit("--ddpm-steps must be in [1, 1000]")
    args.points = int(args.points or (1e3 if q else 1e5))
    args.levels, args.steps_each = (int(v) for v in (args.langevin or ("5x10" if q else "10x100")).split("x"))
    args.reps = args.reps or (2 if q else 3)
    args.loop_list = C.split_list(args.loops)
    for name in args.loop_list:
        if name not in LOOPS:
            raise SystemExit(f"unknown loop {name!r}; choose from {', '.join(LOOPS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = C.resolve_devices(args.device)
    C.warn_if_busy()
    dtype = C.parse_dtypes(args.dtype)[0]
    diffusers_mod, why_not = C.import_diffusers()
    if why_not:
        print(f"note: {why_not}; the diffusers rows say n/a", file=sys.stderr)
    torch.manual_seed(0)
    started = time.perf_counter()
    doc = {"schema": SCHEMA, "created": C.now_iso(), "command": [sys.executable, *sys.argv],
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": C.machine_info(devices), "versions": C.versions(diffusers_mod),
           "native": C.native_info(devices), "rows": ROWS, "loops": []}
    bar = C.progress(len(devices) * len(args.loop_list) * len(ROWS), "loop_speed")
    for dev in devices:
        for name in args.loop_list:
            if name == "langevin":
                loop = LangevinLoop(dev, dtype, args.points, args.levels, args.steps_each, args.hidden)
            else:
                loop = DiffusionLoop(name[:4], dev, dtype, args.image, args.base, diffusers_mod, args.ddpm_steps)
            doc["loops"].append(run_loop(loop, args, bar))
    bar.close()
    doc["machine"]["loadavg_end"] = C.loadavg()
    doc["elapsed_s"] = time.perf_counter() - started
    tag = args.tag or "+".join(d.type for d in devices) + ("-quick" if args.quick else "")
    path = args.out / f"loop_speed-{tag}.json"
    doc["files"] = {"json": str(path)}
    C.write_json(path, doc)
    print_table(doc)
    print(f"\nwrote {path} in {doc['elapsed_s']:.0f} s", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
