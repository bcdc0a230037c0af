"""``--quick`` runs of the sampler-zoo, truncated-chain and sliced-score examples (tiny
models, a few seconds of CPU each): every output is written and every table row is there.
Quality is not judged here (the quick models are barely trained); the examples' full
runs are recorded in examples/results/."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def _example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One output folder for the digits examples: truncated_digits reuses the UNet
    checkpoint samplers_digits writes (and both the cached metric classifier)."""
    return tmp_path_factory.mktemp("examples")


def _common_args(out: Path) -> list[str]:
    return ["--quick", "--no-progress", "--out", str(out), "--cache-dir", str(out / "cache"), "--device", "cpu"]


@pytest.fixture(scope="module")
def digits_rows(run_dir):
    """samplers_digits' quick run, once per module: its rows for the test of its own, its
    checkpoint for truncated_digits, whichever test runs first or alone."""
    return _example("samplers_digits").main(_common_args(run_dir))


def test_samplers_digits_quick(run_dir, digits_rows):
    rows = digits_rows
    names = {r["sampler"] for r in rows}
    assert names == {"DDPM", "DDIM eta=0", "Euler", "Euler ancestral", "Heun", "DPM++ 2M", "flow Euler",
                     "DPM2", "DPM2 ancestral", "LMS", "DPM++ 2S ancestral", "DPM++ SDE", "DPM++ 2M SDE",
                     "DPM++ 3M SDE", "iPNDM", "iPNDM-v", "DEIS", "res_multistep", "UniPC"}
    for two_stage in ("Heun", "DPM2", "DPM2 ancestral", "DPM++ 2S ancestral", "DPM++ SDE"):
        nfes = sorted(r["nfe"] for r in rows if r["sampler"] == two_stage)
        assert nfes == [5, 9], two_stage  # 3 and 5 steps: 2 n - 1 evaluations within the budgets 5 and 10
    assert sorted(r["nfe"] for r in rows if r["sampler"] == "UniPC") == [5, 10]  # one evaluation a step
    assert all(math.isfinite(r["fd"]) and r["seconds_per_sample"] > 0 for r in rows)
    table = json.loads((run_dir / "digits_fd_vs_nfe.json").read_text())
    assert {"sampler", "nfe", "fd", "seconds_per_sample"} <= set(table["rows"][0])
    for f in ("digits_fd_vs_nfe.png", "digits_fd_vs_nfe.md", "digits_fd_vs_nfe_samples.png",
              "checkpoints/unet.pt", "checkpoints/unet_flow.pt"):
        assert (run_dir / f).exists(), f


def test_truncated_digits_quick_reuses_the_checkpoint(run_dir, digits_rows, capsys):
    assert (run_dir / "checkpoints" / "unet.pt").exists()
    capsys.readouterr()  # the fixture's run may have printed here
    rows = _example("truncated_digits").main(_common_args(run_dir))
    assert "(0 trained now" in capsys.readouterr().out  # the epsilon UNet came from the checkpoint
    labels = [r["label"] for r in rows]
    assert len(labels) == 2 * (1 + 2 * 2) + 2
    assert all(math.isfinite(r["fd"]) for r in rows)
    trunc = [r for r in rows if r["chain"] == "DDPM" and r["prior"] != "none"]
    assert sorted({r["nfe"] for r in trunc}) == [11, 26]  # t_start + 1 steps
    for f in ("digits_truncated.png", "digits_truncated.json", "digits_truncated_samples.png", "checkpoints/vae.pt"):
        assert (run_dir / f).exists(), f


def test_sliced_score_gmm_quick(tmp_path):
    rows = _example("sliced_score_gmm").main(["--quick", "--no-progress", "--out", str(tmp_path), "--device", "cpu"])
    assert [r["method"] for r in rows] == ["DSM", "SSM-VR rademacher", "SSM-VR gaussian", "SSM gaussian"]
    assert all(0 < r["relL2w s=7"] < 1 and r["ms_per_step"] > 0 for r in rows)
    assert (tmp_path / "gmm_ssm_score_fields.png").exists() and (tmp_path / "gmm_ssm_vs_dsm.md").exists()
