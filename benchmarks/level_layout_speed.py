"""What a level layout costs: each op with per-sample levels (B,), per-frame levels
(B,1,F,1,1) and per-token levels (B,N,1) (x viewed as (B, F*H*W tokens, C) there), on the
same x, calls interleaved and medians taken, one CPU thread by default. The ratios are
against per-sample time (README "Noise levels per sample, per frame, per token").

    PYTHONPATH=. DIFFKERN_JIT=0 python benchmarks/level_layout_speed.py --shape 64x4x16x64x64 \
        --json benchmarks/results/level_layout-cpu-64x4x16x64x64-1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import interleaved_medians, machine_info, now_iso, parse_shape, versions, write_json

import diffkern as dk


def levels(shape, layout):
    """(sigma, sigma_next, t, t_prev) of one layout for a (B, C, F, H, W) x. "per token":
    the per-frame values given per token of x seen as a DiT sequence (B, F*H*W, C), as a
    diffusion-forcing model gives them (a frame's tokens share its level); "per token,
    all distinct": every token its own level (the worst case: new coefficients every C
    elements)."""
    B, C, F, H, W = shape
    g = torch.Generator().manual_seed(0)
    lshape = {"per sample": (B,), "per frame": (B, 1, F, 1, 1), "per token": (B, F, 1, 1, 1),
              "per token, all distinct": (B, F * H * W, 1)}[layout]
    s = 1.0 + torch.rand(lshape, generator=g, dtype=torch.float64)
    t = torch.randint(500, 900, lshape, generator=g)
    if layout == "per token":
        s, t = (v.expand(B, F, H, W, 1).reshape(B, F * H * W, 1).contiguous() for v in (s, t))
    return s, s / 3, t, t - 250


def cases():
    def g():
        return torch.Generator().manual_seed(0)

    return {
        "euler_step": lambda x, m, s, sn, t, tp: dk.euler_step(x, m, s, sn),
        "euler_step eta=1 (draws)": lambda x, m, s, sn, t, tp: dk.euler_step(x, m, s, sn, eta=1.0, generator=g()),
        "dpmpp_2m_step": lambda x, m, s, sn, t, tp: dk.dpmpp_2m_step(x, m, m, s, sn, s * 2),
        "flow_step": lambda x, m, s, sn, t, tp: dk.flow_step(x, m, s / 2, sn / 2),
        "ddim_step eta=0": lambda x, m, s, sn, t, tp: dk.ddim_step(x, m, t, 0.0, t_prev=tp),
        "q_sample (noise given)": lambda x, m, s, sn, t, tp: dk.q_sample(x, t, m),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="64x4x16x64x64", help="B x C x F x H x W")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = parse_shape(args.shape)
    if len(shape) != 5:
        raise SystemExit("--shape must be B x C x F x H x W")
    B, C, F, H, W = shape
    x, m = torch.randn(*shape), torch.randn(*shape)
    # per-token: the same numbers seen as a DiT sequence (B, F*H*W, C)
    xt, mt = x.permute(0, 2, 3, 4, 1).reshape(B, F * H * W, C), m.permute(0, 2, 3, 4, 1).reshape(B, F * H * W, C)
    layouts = {"per sample": (x, m), "per frame": (x, m), "per token": (xt, mt), "per token, all distinct": (xt, mt)}
    lv = {k: levels(shape, k) for k in layouts}
    rows = []
    for name, call in cases().items():
        runs = {k: (lambda c=call, k=k: c(*layouts[k], *lv[k])) for k in layouts}
        runs["copy floor"] = lambda: x.clone()
        med = interleaved_medians(runs, args.reps)
        row = {"case": name, **{f"{k.replace(' ', '_').replace(',', '')}_ms": v for k, v in med.items()},
               "frame_over_sample": med["per frame"] / med["per sample"],
               "token_over_sample": med["per token"] / med["per sample"],
               "distinct_tokens_over_sample": med["per token, all distinct"] / med["per sample"]}
        rows.append(row)
        print(f"{name:26s} per sample {med['per sample']:7.2f} ms | per frame {row['frame_over_sample']:.3f}x | "
              f"per token {row['token_over_sample']:.3f}x | "
              f"every token its own {row['distinct_tokens_over_sample']:.2f}x | copy floor {med['copy floor']:.2f} ms")
    if args.json:
        write_json(args.json, {"when": now_iso(), "shape": list(shape), "threads": args.threads, "reps": args.reps,
                               "machine": machine_info([torch.device("cpu")]), "versions": versions(),
                               "native": dk.native_available(), "rows": rows})


if __name__ == "__main__":
    main()
