"""Score matching and Langevin sampling on the classic 2-D Gaussian mixture.

The mixture: weights 0.8 / 0.2, means (5, 5) / (-5, -5), unit covariance. A ScoreNet is
trained by denoising score matching at sigma = 1, 3 and 7, and one over a geometric set
of sigmas (20 -> 1); the learned score fields are compared with the exact ones
(:func:`diffkern.gmm_score`); deterministic and Langevin trajectories are drawn from
(10, 20) and (10, -20); and samples from plain Langevin at one sigma, annealed Langevin
and the fused :func:`diffkern.gmm_annealed_langevin` are scored by their mode weights.
Plain Langevin keeps the 50/50 split of the uniform start points between the basins;
annealed Langevin recovers 0.8 / 0.2.

    python examples/score_gmm.py --quick --out runs/score_gmm
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_diffkern_importable  # noqa: E402

ensure_diffkern_importable()
from _common import Timer, env_summary, log, make_parser, save_figure, setup, write_table  # noqa: E402

from diffkern import samplers  # noqa: E402
from diffkern.data import classic_mixture, uniform_box  # noqa: E402
from diffkern.metrics import calibrate, mmd_rbf, mode_weights, sliced_wasserstein  # noqa: E402
from diffkern.models import ScoreNet  # noqa: E402
from diffkern.training import geometric_sigmas, train_score  # noqa: E402

FIXED_SIGMAS = (1.0, 3.0, 7.0)
STARTS = ((10.0, 20.0), (10.0, -20.0))
LIM = 12.0


def settings(quick: bool) -> dict:
    if quick:
        return dict(n_train=10000, n_test=2000, train_steps=600, batch_size=256, n_samples=1000, n_steps_each=100,
                    num_sigmas=10, calib_repeats=10, trajectory_steps=400)
    return dict(n_train=20000, n_test=5000, train_steps=4000, batch_size=512, n_samples=5000, n_steps_each=100,
                num_sigmas=10, calib_repeats=20, trajectory_steps=1000)


def grid(n: int, lim: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs = torch.linspace(-lim, lim, n, device=device)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    return gx, gy, torch.stack([gx, gy], -1).reshape(-1, 2)


def plot_data(mix, train, test, out):
    import matplotlib.pyplot as plt

    gx, gy, pts = grid(200, LIM, "cpu")
    dens = mix.density(pts).reshape(gx.shape)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    im = axes[0].imshow(dens, extent=(-LIM, LIM, -LIM, LIM), origin="lower", cmap="viridis")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    axes[0].set_title("exact density p(x)")
    axes[1].scatter(*train[:3000].T, s=2, alpha=0.4, label=f"train ({len(train)})")
    axes[1].scatter(*test[:1000].T, s=2, alpha=0.6, c="C3", label=f"test ({len(test)})")
    axes[1].set_xlim(-LIM, LIM)
    axes[1].set_ylim(-LIM, LIM)
    axes[1].set_aspect("equal")
    axes[1].legend(loc="upper left", markerscale=4)
    axes[1].set_title("samples")
    save_figure(fig, out / "gmm_density.png")


def plot_losses(trainers: dict, out):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, tr in trainers.items():
        h = torch.tensor(tr.loss_history)
        k = max(1, len(h) // 50)
        smooth = h[: len(h) // k * k].reshape(-1, k).mean(1)
        ax.plot(torch.arange(len(smooth)) * k, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("DSM loss (sigma^2-weighted)")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, out / "gmm_loss.png")


@torch.no_grad()
def score_fields(mix, models: dict, device, out) -> list[dict]:
    """Quiver plots of the exact and learned scores; relative L2 errors on a grid."""
    import matplotlib.pyplot as plt

    _, _, fine = grid(41, 10.0, device)
    rows = []
    gx, gy, coarse = grid(17, 10.0, device)
    dgx, dgy, dpts = grid(120, LIM, "cpu")
    fig, axes = plt.subplots(len(FIXED_SIGMAS), 3, figsize=(13, 4.2 * len(FIXED_SIGMAS)))
    for i, sigma in enumerate(FIXED_SIGMAS):
        true = mix.score(fine, sigma)
        weight = mix.density(fine, sigma=sigma)
        for name in (f"sigma={sigma:g}", "sigma set"):
            est = models[name](fine, sigma)
            rel = float((est - true).norm() / true.norm())
            err2 = ((est - true) ** 2).sum(1)
            rel_w = float(((err2 * weight).sum() / ((true**2).sum(1) * weight).sum()).sqrt())
            rows.append({"sigma": sigma, "model": "fixed sigma" if name != "sigma set" else "sigma set",
                         "rel_L2_grid": rel, "rel_L2_density_weighted": rel_w})
        logd = mix.log_prob(dpts, sigma=sigma).reshape(dgx.shape)
        fields = [("exact score", mix.score(coarse, sigma)),
                  (f"ScoreNet trained at sigma={sigma:g}", models[f"sigma={sigma:g}"](coarse, sigma)),
                  ("ScoreNet trained on the sigma set", models["sigma set"](coarse, sigma))]
        for j, (title, s) in enumerate(fields):
            ax = axes[i, j]
            ax.contourf(dgx, dgy, logd.clamp_min(-40), levels=20, cmap="Greys", alpha=0.5)
            s = s.cpu()
            ax.quiver(gx.cpu(), gy.cpu(), s[:, 0].reshape(gx.shape), s[:, 1].reshape(gx.shape), color="C0",
                      angles="xy")
            ax.set_title(f"{title} (sigma={sigma:g})" if j == 0 else title, fontsize=10)
            ax.set_aspect("equal")
            ax.set_xlim(-10.5, 10.5)
            ax.set_ylim(-10.5, 10.5)
    fig.suptitle("score fields of p_sigma: exact vs learned")
    save_figure(fig, out / "gmm_score_fields.png")
    return rows


@torch.no_grad()
def trajectories(mix, models: dict, device, n_steps: int, seed: int, out):
    import matplotlib.pyplot as plt

    sigma = 1.0
    step = 0.05
    x0 = torch.tensor(STARTS, device=device)
    scores = [("exact score", mix.score), ("ScoreNet sigma=1", models["sigma=1"]),
              ("ScoreNet sigma set", models["sigma set"])]
    dgx, dgy, dpts = grid(150, 22.0, "cpu")
    logd = mix.log_prob(dpts, sigma=sigma).reshape(dgx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (title, fn) in zip(axes, scores, strict=True):
        _, det = samplers.score_ascent(fn, x0, sigma, n_steps=n_steps, step_size=step, return_trajectory=True)
        g = torch.Generator().manual_seed(seed)
        _, lan = samplers.langevin(fn, x0, sigma, n_steps=n_steps, step_size=step, generator=g,
                                   return_trajectory=True)
        ax.contourf(dgx, dgy, logd.clamp_min(-60), levels=25, cmap="Greys", alpha=0.5)
        for k in range(len(STARTS)):
            ax.plot(*det[:, k].cpu().T, "-", color=f"C{k}", lw=2, label=f"ascent from {STARTS[k]}")
            ax.plot(*lan[:, k].cpu().T, "-", color=f"C{k + 2}", lw=0.7, alpha=0.8, label=f"Langevin from {STARTS[k]}")
            ax.plot(*x0[k].cpu(), "k*", ms=10)
        ax.plot(*mix.means.cpu().T, "rx", ms=10, mew=2)
        ax.set_title(f"{title}, sigma={sigma:g}, step {step:g}, {n_steps} steps", fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlim(-22, 22)
        ax.set_ylim(-22, 22)
    axes[0].legend(fontsize=7, loc="lower left")
    save_figure(fig, out / "gmm_trajectories.png")


def main(argv=None):
    args = make_parser(__doc__.splitlines()[0], "runs/score_gmm").parse_args(argv)
    device = setup(args)
    cfg = settings(args.quick)
    progress = not args.no_progress
    t_start = time.perf_counter()
    out = args.out

    mix = classic_mixture(device=device)
    g = torch.Generator().manual_seed(args.seed)
    train = mix.sample(cfg["n_train"], generator=g)
    test = mix.sample(cfg["n_test"], generator=g)
    plot_data(mix.to("cpu"), train.cpu(), test.cpu(), out)

    # ---- training: three fixed sigmas and a geometric set ------------------------
    sigma_set = geometric_sigmas(20.0, 1.0, cfg["num_sigmas"])
    data_std = float(train.std(0).mean())
    models, trainers, train_rows = {}, {}, []
    for name, sig in [(f"sigma={s:g}", s) for s in FIXED_SIGMAS] + [("sigma set", sigma_set)]:
        torch.manual_seed(args.seed)
        net = ScoreNet(2, data_std=data_std)
        log(f"training ScoreNet ({name})")
        t0 = time.perf_counter()
        tr = train_score(net, train, sig, n_steps=cfg["train_steps"], batch_size=cfg["batch_size"], lr=2e-3,
                         seed=args.seed, device=device, progress=progress,
                         checkpoint_path=out / "checkpoints" / f"scorenet_{name.replace(' ', '_')}.pt", resume=False)
        trainers[name] = tr
        models[name] = tr.ema.model
        train_rows.append({"model": name, "steps": tr.step, "final_loss": sum(tr.loss_history[-50:]) / 50,
                           "seconds": time.perf_counter() - t0})
    write_table(train_rows, out / "gmm_training", title="ScoreNet training")
    plot_losses(trainers, out)

    # ---- learned vs exact score ----------------------------------------------------
    rel_rows = score_fields(mix, models, device, out)
    write_table(rel_rows, out / "gmm_score_error", title="relative L2 error of the learned score (41x41 grid on "
                "[-10, 10]^2)")
    trajectories(mix, models, device, cfg["trajectory_steps"], args.seed, out)

    # ---- samplers and mode weights -----------------------------------------------
    n = cfg["n_samples"]
    x0 = uniform_box(n, generator=torch.Generator().manual_seed(args.seed + 1), device=device)
    step_lr = 0.1  # alpha at the last level (sigma = 1); stable below 2 sigma_L^2 = 2
    n_each = cfg["n_steps_each"]
    total_steps = len(sigma_set) * n_each
    net = models["sigma set"]

    def gen():
        return torch.Generator().manual_seed(args.seed + 2)

    runs = [
        ("Langevin sigma=1", "ScoreNet", lambda: samplers.langevin(net, x0, 1.0, n_steps=total_steps,
                                                                 step_size=step_lr, generator=gen(),
                                                                 progress=progress)),
        ("Langevin sigma=1", "exact", lambda: samplers.langevin(mix.score, x0, 1.0, n_steps=total_steps,
                                                              step_size=step_lr, generator=gen(), progress=progress)),
        ("annealed Langevin", "ScoreNet", lambda: samplers.annealed_langevin(net, x0, sigma_set, n_steps_each=n_each,
                                                                           step_lr=step_lr, generator=gen(),
                                                                           progress=progress)),
        ("annealed Langevin", "exact", lambda: samplers.annealed_langevin(mix.score, x0, sigma_set,
                                                                        n_steps_each=n_each, step_lr=step_lr,
                                                                        generator=gen(), progress=progress)),
        ("dk.gmm_annealed_langevin (fused)", "exact", lambda: mix.annealed_langevin(x0, sigma_set,
                                                                                   n_steps_each=n_each,
                                                                                   step_lr=step_lr, generator=gen())),
    ]
    mmd_n = min(n, 1500)

    def sw(a, b):
        return sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(123))

    def mmd(a, b):
        return mmd_rbf(a[:mmd_n], b[:mmd_n])

    # Without a final denoising step the chains target p at the last level, the mixture
    # convolved with N(0, sigma_L^2 I): that is the distribution the samples are compared with.
    sigma_last = float(sigma_set[-1])

    def true_sample(k, generator):
        return mix.sample(k, sigma=sigma_last, generator=generator)

    cal_g = torch.Generator().manual_seed(args.seed + 3)
    sw_cal = calibrate(sw, true_sample, n, repeats=cfg["calib_repeats"], generator=cal_g)
    mmd_cal = calibrate(mmd, true_sample, n, repeats=cfg["calib_repeats"], generator=cal_g)
    reference = true_sample(n, torch.Generator().manual_seed(args.seed + 4))
    rows, samples = [], {}
    for name, score, fn in runs:
        with Timer(device) as t:
            x = fn()
        w, se = mode_weights(x, mix.means)
        s_val, m_val = sw(x, reference), mmd(x, reference)
        rows.append({"sampler": name, "score": score, "w(5,5)": float(w[0]), "se": float(se[0]),
                     "w(-5,-5)": float(w[1]), "sliced_W2": s_val, "SW_pass": sw_cal.passes(s_val),
                     "MMD2": m_val, "MMD_pass": mmd_cal.passes(m_val), "seconds": t.seconds})
        samples[f"{name} ({score})"] = x.cpu()
    write_table(rows, out / "gmm_mode_weights", title="samples from uniform starts on [-8, 8]^2: mode weights "
                "(true 0.8 / 0.2)", meta={
                    "n": n, "sigmas": f"geometric 20 -> 1, L={len(sigma_set)}", "n_steps_each": n_each,
                    "step_lr": step_lr, "SW / MMD reference": "exact samples of p_sigma at sigma_L = 1",
                    "plain Langevin": f"{total_steps} steps of size {step_lr} at sigma=1",
                    "SW threshold (calibrated)": f"{sw_cal.threshold:.4g}",
                    "MMD threshold (calibrated)": f"{mmd_cal.threshold:.4g}", **env_summary()})

    import matplotlib.pyplot as plt

    panels = [("exact samples of p_sigma, sigma=1", reference.cpu()),
              ("Langevin sigma=1 (ScoreNet)", samples["Langevin sigma=1 (ScoreNet)"]),
              ("annealed Langevin (ScoreNet)", samples["annealed Langevin (ScoreNet)"]),
              ("dk.gmm_annealed_langevin (exact)", samples["dk.gmm_annealed_langevin (fused) (exact)"])]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    for ax, (title, x) in zip(axes, panels, strict=True):
        w, _ = mode_weights(x, mix.means)
        ax.scatter(*x.T, s=2, alpha=0.4)
        ax.set_title(f"{title}\nweights {w[0]:.3f} / {w[1]:.3f}", fontsize=10)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(-LIM, LIM)
        ax.set_aspect("equal")
    save_figure(fig, out / "gmm_samples.png")
    log(f"total {time.perf_counter() - t_start:.1f} s; outputs in {out}")


if __name__ == "__main__":
    main()
