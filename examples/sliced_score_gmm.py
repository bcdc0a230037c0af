"""Sliced vs denoising score matching on the classic 2-D Gaussian mixture.

The same ScoreNet (as in ``score_gmm.py``: the geometric sigma set 20 -> 1, sigma^2
weighting) is trained by denoising score matching (:func:`diffkern.training.dsm_loss`), by
sliced score matching in its variance-reduced form (SSM-VR: ``v^T J v`` by double backprop
plus the exact ``0.5 ||s||^2``) with Rademacher and with Gaussian projections, and by plain
SSM, on perturbed samples of each level (:func:`diffkern.training.sliced_score_matching_loss`).
The learned score fields are compared with the exact one (:func:`diffkern.gmm_score`) at
sigma = 1, 3, 7 (relative L2 on a grid and density-weighted), with the time per training step.

    python examples/sliced_score_gmm.py --quick --out runs/score_gmm
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_diffkern_importable  # noqa: E402

ensure_diffkern_importable()
from _common import env_summary, log, make_parser, save_figure, setup, write_table  # noqa: E402
from score_gmm import FIXED_SIGMAS, LIM, grid  # noqa: E402

from diffkern.data import classic_mixture  # noqa: E402
from diffkern.models import ScoreNet  # noqa: E402
from diffkern.training import geometric_sigmas, train_score, train_sliced_score  # noqa: E402

# name -> None (DSM) or (n_projections, projection, variance_reduced)
METHODS = {"DSM": None, "SSM-VR rademacher": (1, "rademacher", True), "SSM-VR gaussian": (1, "gaussian", True),
           "SSM gaussian": (1, "gaussian", False)}


def settings(quick: bool) -> dict:
    if quick:
        return dict(n_train=5000, train_steps=80, batch_size=256, num_sigmas=10, timing_rounds=5)
    return dict(n_train=20000, train_steps=4000, batch_size=512, num_sigmas=10, timing_rounds=50)


def errors(mix, model, sigma, device) -> tuple[float, float]:
    _, _, pts = grid(41, 10.0, device)
    with torch.no_grad():
        est, true = model(pts, sigma), mix.score(pts, sigma)
    w = mix.density(pts, sigma=sigma)
    err2 = ((est - true) ** 2).sum(1)
    return float((est - true).norm() / true.norm()), float(((err2 * w).sum() / ((true**2).sum(1) * w).sum()).sqrt())


@torch.no_grad()
def plot_fields(mix, models: dict, device, path):
    import matplotlib.pyplot as plt

    gx, gy, coarse = grid(17, 10.0, device)
    dgx, dgy, dpts = grid(120, LIM, "cpu")
    cols = [("exact score", mix.score)] + list(models.items())
    fig, axes = plt.subplots(len(FIXED_SIGMAS), len(cols), figsize=(3.6 * len(cols), 3.7 * len(FIXED_SIGMAS)))
    for i, sigma in enumerate(FIXED_SIGMAS):
        logd = mix.log_prob(dpts, sigma=sigma).reshape(dgx.shape)
        for j, (title, fn) in enumerate(cols):
            ax = axes[i, j]
            ax.contourf(dgx.numpy(), dgy.numpy(), logd.clamp_min(-40).numpy(), levels=20, cmap="Greys", alpha=0.5)
            s = fn(coarse, sigma).cpu()
            ax.quiver(gx.cpu().numpy(), gy.cpu().numpy(), s[:, 0].reshape(gx.shape).numpy(),
                      s[:, 1].reshape(gx.shape).numpy(), color="C0", angles="xy")
            sub = "" if j == 0 else f" (rel. L2 w. {errors(mix, fn, sigma, device)[1]:.3f})"
            ax.set_title(f"{title}, sigma={sigma:g}{sub}", fontsize=8)
            ax.set_aspect("equal")
            ax.set_xlim(-10.5, 10.5)
            ax.set_ylim(-10.5, 10.5)
    fig.suptitle("score fields of p_sigma: exact vs denoising / sliced score matching")
    save_figure(fig, path)


def main(argv=None):
    args = make_parser(__doc__.splitlines()[0], "runs/score_gmm").parse_args(argv)
    device = setup(args)
    cfg = settings(args.quick)
    progress = not args.no_progress
    out = args.out
    mix = classic_mixture(device=device)
    train = mix.sample(cfg["n_train"], generator=torch.Generator().manual_seed(args.seed))
    sigma_set = geometric_sigmas(20.0, 1.0, cfg["num_sigmas"])
    data_std = float(train.std(0).mean())
    rows, models, trainers = [], {}, {}
    for name, spec in METHODS.items():
        torch.manual_seed(args.seed)
        net = ScoreNet(2, data_std=data_std)
        kw = dict(n_steps=cfg["train_steps"], batch_size=cfg["batch_size"], lr=2e-3, seed=args.seed, device=device,
                  progress=progress, resume=False)
        log(f"training ScoreNet ({name})")
        t0 = time.perf_counter()
        if spec is None:
            tr = train_score(net, train, sigma_set, **kw)
        else:
            m, proj, vr = spec
            tr = train_sliced_score(net, train, sigma_set, n_projections=m, projection=proj, variance_reduced=vr,
                                    **kw)
        seconds = time.perf_counter() - t0
        models[name] = tr.ema.model
        trainers[name] = tr
        row = {"method": name, "steps": tr.step, "train_seconds": seconds}
        for sigma in FIXED_SIGMAS:
            g, w = errors(mix, tr.ema.model, sigma, device)
            row[f"relL2 s={sigma:g}"] = g
            row[f"relL2w s={sigma:g}"] = w
        rows.append(row)
    plot_fields(mix, models, device, out / "gmm_ssm_score_fields.png")
    # Time per step measured apart, the methods in turns (median of rounds), so that a
    # change of machine load during the runs above does not favour one method.
    times = {name: [] for name in trainers}
    # (These extra steps move the weights on: the errors above are those of the trained models.)
    for _ in range(cfg["timing_rounds"]):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
    for row in rows:
        row["ms_per_step"] = 1e3 * float(torch.tensor(times[row["method"]]).median())
    write_table(rows, out / "gmm_ssm_vs_dsm", title="ScoreNet by denoising vs sliced score matching: error against "
                "the exact score (41x41 grid on [-10, 10]^2; w = density-weighted)", meta={
                    "sigmas": f"geometric 20 -> 1, L={len(sigma_set)}, sigma^2 weighting",
                    "training": f"{cfg['train_steps']} steps of batch {cfg['batch_size']}, Adam 2e-3, EMA 0.995",
                    "projections": "1 per sample",
                    "ms_per_step": "median over rounds of one step per method in turn (after training)",
                    **env_summary()})
    return rows


if __name__ == "__main__":
    main()
