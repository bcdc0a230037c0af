"""Backward of one step (what training through a sampler pays): diffkern's fused
backward kernel against autograd through the pure-PyTorch reference, side by side.

    python benchmarks/backward_speed.py [--device cpu] [--size 64x4x128x128] [--dtype float32]

Rows are timed in turns (median of --reps rounds); each call is
``torch.autograd.grad(step(x, eps), (x, eps), g)`` on a DDIM step with eta = 0.5, per-sample
t, clip_sample = 1 and given noise.
"""

from __future__ import annotations

import argparse
import statistics

import common as C
import torch

dk = C.import_diffkern()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="64x4x128x128")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, shape, dtype = torch.device(args.device), C.parse_shape(args.size), C.parse_dtypes(args.dtype)[0]
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, dtype=dtype, generator=gen).requires_grad_()
    eps = torch.randn(shape, device=dev, dtype=dtype, generator=gen).requires_grad_()
    z, g = torch.randn_like(x), torch.randn_like(x)
    t = torch.randint(1, 1000, (shape[0],), device=dev, generator=gen)
    rows = {"native": dk.ddim_step, "reference": dk.reference.ddim_step}

    def call(step):
        y = step(x, eps, t, 0.5, clip_sample=1.0, noise=z)
        return torch.autograd.grad(y, (x, eps), g)

    want = call(rows["reference"])
    for name, step in rows.items():
        got = call(step)
        err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want, strict=True))
        print(f"{name:<10} max|grad - reference grad| {err:.1e}")
    ms = {name: [] for name in rows}
    for _ in range(args.reps):
        for name, step in rows.items():
            ms[name].append(1e3 * C.time_once(lambda s=step: call(s), dev))
    native = statistics.median(ms["native"])
    print(f"\nbackward of ddim_step, {C.shape_str(shape)} {args.dtype} on {dev} "
          f"({torch.get_num_threads()} threads), median of {args.reps} in turns:")
    for name, v in ms.items():
        med = statistics.median(v)
        print(f"  {name:<10} {med:8.2f} ms  {med / native:6.2f}x native")


if __name__ == "__main__":
    main()
