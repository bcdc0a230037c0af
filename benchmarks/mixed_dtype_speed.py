"""A model output in another dtype than the latents: read in its own dtype by the kernel
vs cast first (issue 20: no cast pass).

    python benchmarks/mixed_dtype_speed.py                       # 16x4x64x64 and 64x4x128x128
    python benchmarks/mixed_dtype_speed.py --shapes 16x4x64x64 --threads 2

Rows, interleaved (common.interleaved_medians), float32 latents x:
- ``same``: ``dk.euler_step(x, m32, 2.0, 1.0)``, every operand float32 (the floor);
- ``mixed``: ``dk.euler_step(x, m_bf16, 2.0, 1.0)``, the bfloat16 model output read as is;
- ``cast``: ``dk.euler_step(x, m_bf16.float(), 2.0, 1.0)``, what a cast pass costs.
The same for ``dk.dpmpp_2m_step`` with a bfloat16 model output and history, and for
``dk.ddim_step`` (eta=0) with a bfloat16 eps.
Results: benchmarks/results/mixed_dtype-cpu-<shape>-<threads>thread.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

dk = C.import_diffkern()


def runs_for(shape) -> dict:
    g = torch.Generator().manual_seed(0)
    x, m, h = (torch.randn(shape, generator=g) for _ in range(3))
    mb, hb = m.bfloat16(), h.bfloat16()
    t = torch.full((shape[0],), 500)
    return {
        "ddim same": lambda: dk.ddim_step(x, m, t),
        "ddim mixed": lambda: dk.ddim_step(x, mb, t),
        "ddim cast": lambda: dk.ddim_step(x, mb.float(), t),
        "euler same": lambda: dk.euler_step(x, m, 2.0, 1.0),
        "euler mixed": lambda: dk.euler_step(x, mb, 2.0, 1.0),
        "euler cast": lambda: dk.euler_step(x, mb.float(), 2.0, 1.0),
        "dpmpp_2m same": lambda: dk.dpmpp_2m_step(x, m, h, 2.0, 1.0, 3.0),
        "dpmpp_2m mixed": lambda: dk.dpmpp_2m_step(x, mb, hb, 2.0, 1.0, 3.0),
        "dpmpp_2m cast": lambda: dk.dpmpp_2m_step(x, mb.float(), hb.float(), 2.0, 1.0, 3.0),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16x4x64x64,64x4x128x128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--out", default=str(C.DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    C.warn_if_busy()
    for spec in C.split_list(args.shapes):
        shape = C.parse_shape(spec)
        ms = C.interleaved_medians(runs_for(shape), args.reps)
        print(f"\n{C.shape_str(shape)}, {args.threads} thread(s), medians of {args.reps} interleaved calls")
        ratios = {}
        for op in ("ddim", "euler", "dpmpp_2m"):
            same, mixed, cast = ms[f"{op} same"], ms[f"{op} mixed"], ms[f"{op} cast"]
            ratios[op] = {"mixed_over_same": mixed / same, "cast_over_mixed": cast / mixed}
            print(f"  {op:9s} same {same:8.3f} ms | mixed {mixed:8.3f} ms ({mixed / same:.2f}x same) | "
                  f"cast first {cast:8.3f} ms ({cast / mixed:.2f}x mixed)")
        out = C.record("bfloat16 model outputs beside float32 latents: read as is vs cast first (issue 20)",
                       "mixed_dtype_speed.py", argv, shape=list(shape), threads=args.threads, median_ms=ms,
                       ratios=ratios)
        path = Path(args.out) / f"mixed_dtype-cpu-{C.shape_str(shape)}-{args.threads}thread.json"
        C.write_json(path, out)
        print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
