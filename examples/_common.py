"""Shared plumbing for the example scripts: command-line options, setup, result tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def ensure_diffkern_importable() -> None:
    """Run from a source checkout without installing: fall back to the repository root."""
    try:
        import diffkern  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small settings: finishes in under 2 minutes on a 2-core CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for training and sampling (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=Path(default_out), help="output folder for figures and tables")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation, training and sampling")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick on the CPU, where these small models gain "
                        "little from a second thread and lose a lot when the cores are shared; else torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def setup(args) -> torch.device:
    import matplotlib

    matplotlib.use("Agg")
    if args.threads is None and args.quick and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but CUDA is not available")
    import diffkern as dk

    log(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"diffkern native kernels: {dk.native_available()}")
    return device


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...; t.seconds`` (synchronises CUDA on both ends)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def write_table(rows: list[dict], path_stem: Path, *, title: str, meta: dict | None = None) -> str:
    """Print ``rows`` as a markdown table and write it to ``<stem>.md`` and ``<stem>.json``."""
    cols = list(rows[0].keys())
    lines = [f"| {' | '.join(cols)} |", f"|{'|'.join('---' for _ in cols)}|"]
    lines += [f"| {' | '.join(_fmt(r.get(c, '')) for c in cols)} |" for r in rows]
    table = "\n".join(lines)
    header = f"## {title}\n\n"
    if meta:
        header += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    path_stem = Path(path_stem)
    path_stem.with_suffix(".md").write_text(header + table + "\n")
    path_stem.with_suffix(".json").write_text(json.dumps({"title": title, "meta": meta or {}, "rows": rows},
                                                         indent=2, default=float) + "\n")
    log(f"\n{title}\n{table}\n")
    return table


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    log(f"wrote {path}")


def env_summary() -> dict:
    import diffkern as dk

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "native": dk.native_available(),
            "cpu_count": os.cpu_count()}
