"""Early-stopped diffusion chains on digits (ES-DDPM / SDEdit): a crude prior, then only the
last t_start steps of the reverse chain.

The crude priors: a per-pixel Gaussian fitted to the digits
(:class:`diffkern.models.PixelGaussian`) and a small VAE (:class:`diffkern.models.VAE`,
trained here). Their samples are noised to ``t_start`` with :func:`diffkern.q_sample` and
denoised by the epsilon UNet with DDPM (all timesteps below t_start) or DDIM (eta 0, the
50-step schedule's timesteps below t_start), through ``ddpm_sample`` / ``ddim_sample``'s
``x_start`` and ``t_start``; t_start in {100, 250, 500}. The full chains (DDPM-1000,
DDIM-50) are the reference. Fréchet distance and wall time per sample (prior included).

The epsilon UNet is the one ``samplers_digits.py`` and ``ddpm_digits.py`` use
(``OUT/checkpoints/unet.pt``: reused, continued or trained). When ``OUT/digits_fd_vs_nfe.json``
from ``samplers_digits.py`` holds a DDPM-1000 row for the same checkpoint, seed and sample
count, that row is reused instead of sampling the 1000-step chain again (and
``samplers_digits.py`` reuses this script's row the same way).

    python examples/truncated_digits.py --quick --out runs/samplers_digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_diffkern_importable  # noqa: E402

ensure_diffkern_importable()
from _common import Timer, env_summary, log, make_parser, save_figure, setup, write_table  # noqa: E402
from samplers_digits import IMAGE_SHAPE, add_model_options, reused_ddpm_row, train_or_load  # noqa: E402
from samplers_digits import settings as sampler_settings  # noqa: E402

from diffkern import samplers  # noqa: E402
from diffkern.data import load_digits  # noqa: E402
from diffkern.metrics import digits_quality  # noqa: E402
from diffkern.models import VAE, PixelGaussian, count_parameters  # noqa: E402
from diffkern.training import train_vae  # noqa: E402


def settings(quick: bool) -> dict:
    cfg = sampler_settings(quick)
    if quick:
        cfg.update(vae=dict(latent_dim=8, base_channels=8), vae_steps=40, t_starts=(10, 25), ddim_steps=20,
                   full_ddpm_steps=50)
    else:
        cfg.update(vae=dict(latent_dim=16, base_channels=32), vae_steps=1500, t_starts=(100, 250, 500),
                   ddim_steps=50, full_ddpm_steps=1000)
    return cfg


def plot(rows, floor, t_starts, path):
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    full = [r for r in rows if r["prior"] == "none"]
    for i, prior in enumerate(("pixel Gaussian", "VAE")):
        alone = next(r for r in rows if r["prior"] == prior and r["chain"] == "none")
        for chain, ls in (("DDPM", "-"), ("DDIM eta=0", "--")):
            pts = [(0, alone["fd"])] + [(r["t_start"], r["fd"]) for r in rows
                                        if r["prior"] == prior and r["chain"] == chain]
            ax.plot(*zip(*pts, strict=True), ls, marker="o", color=f"C{i}", label=f"{prior} + {chain}")
    for j, r in enumerate(full):
        ax.axhline(r["fd"], color=f"C{j + 2}", ls=":", label=f"full {r['chain']} ({r['nfe']} NFE)")
    ax.axhline(floor, color="gray", ls="-.", lw=0.8, label="real held-out digits")
    ax.set_xticks([0, *t_starts])
    ax.set_xlabel("t_start (0: the prior alone)")
    ax.set_ylabel("Fréchet distance")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    for r in rows:
        if r["seconds_per_sample"] <= 0:
            continue
        marker = {"pixel Gaussian": "o", "VAE": "s", "none": "*"}[r["prior"]]
        ax2.plot(r["seconds_per_sample"], r["fd"], marker, ms=10 if marker == "*" else 7,
                 color="C0" if r["chain"] == "DDPM" else ("C1" if r["chain"] != "none" else "C2"))
        ax2.annotate(r["label"], (r["seconds_per_sample"], r["fd"]), fontsize=6, xytext=(3, 3),
                     textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("seconds per sample")
    ax2.set_ylabel("Fréchet distance")
    ax2.set_title("quality vs cost (blue DDPM, orange DDIM, green prior alone)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def main(argv=None):
    p = make_parser(__doc__.splitlines()[0], "runs/samplers_digits")
    add_model_options(p)
    p.add_argument("--vae-steps", type=int, default=None, help="VAE training steps")
    p.add_argument("--t-starts", type=int, nargs="+", default=None, help="truncation timesteps")
    args = p.parse_args(argv)
    args.clip_denoised = args.clip_denoised if args.clip_denoised > 0 else None
    clip = args.clip_denoised
    device = setup(args)
    cfg = settings(args.quick)
    for key in ("eps_steps", "n_samples", "vae_steps", "t_starts"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    progress = not args.no_progress
    out = args.out
    images, _ = load_digits(16)
    quality = digits_quality(cache_dir=args.cache_dir, device=device, epochs=cfg["classifier_epochs"])
    held_out, _ = load_digits(16, split="test")
    n = cfg["n_samples"]
    floor = quality.frechet_distance(held_out[:n])

    eps_path = args.eps_checkpoint or out / "checkpoints" / "unet.pt"
    eps_model, eps_tr = train_or_load("eps", images, cfg, path=eps_path, n_steps=cfg["eps_steps"], device=device,
                                      seed=args.seed, progress=progress)
    pixel = PixelGaussian.fit(images).to(device)
    torch.manual_seed(args.seed)
    vae = VAE(1, 16, **cfg["vae"])
    with Timer(device) as t_vae:
        vae_tr = train_vae(vae, images, n_steps=cfg["vae_steps"], batch_size=128, lr=2e-3, seed=args.seed,
                           device=device, checkpoint_path=out / "checkpoints" / "vae.pt", progress=progress)
    vae_loss = sum(vae_tr.loss_history[-50:]) / len(vae_tr.loss_history[-50:])
    log(f"VAE ({count_parameters(vae) / 1e6:.2f}M params): {vae_tr.step} steps, {t_vae.seconds:.0f} s, "
        f"-ELBO {vae_loss:.3f} nats/pixel")
    priors = {"pixel Gaussian": pixel, "VAE": vae_tr.ema.model.eval()}

    rows, grids = [], [("real digits", held_out[:36])]

    def record(label, prior, chain, t_start, nfe, x, seconds):
        fd = quality.frechet_distance(x)
        rows.append({"label": label, "prior": prior, "chain": chain, "t_start": t_start, "nfe": nfe, "fd": fd,
                     "seconds_per_sample": seconds / n, "n": n})
        log(f"  {label:34s} NFE {nfe:5d}: FD {fd:9.3f}, {1e3 * seconds / n:8.2f} ms/sample")
        return fd

    T = 1000
    for name, prior in priors.items():
        with Timer(device) as t:
            x0 = prior.sample(n, generator=torch.Generator().manual_seed(args.seed + 1), device=device)
        prior_seconds = t.seconds
        fd = record(f"{name}", name, "none", 0, 0, x0, prior_seconds)
        grids.append((f"{name} alone: FD {fd:.1f}", x0[:36]))
        for t_start in cfg["t_starts"]:
            for chain in ("DDPM", "DDIM eta=0"):
                g = torch.Generator().manual_seed(args.seed + 2)
                counter = []

                def model(x, t, _m=eps_model, _c=counter):
                    _c.append(1)
                    return _m(x, t)

                with Timer(device) as t:
                    if chain == "DDPM":
                        x = samplers.ddpm_sample(model, None, x_start=x0, t_start=t_start, clip_sample=clip,
                                                 generator=g, device=device)
                    else:
                        x = samplers.ddim_sample(model, None, n_steps=cfg["ddim_steps"], x_start=x0, t_start=t_start,
                                                 clip_sample=clip, generator=g, device=device)
                fd = record(f"{name} + {chain} t_start={t_start}", name, chain, t_start, len(counter), x,
                            prior_seconds + t.seconds)
                if t_start == cfg["t_starts"][-1] or (chain == "DDPM" and t_start == cfg["t_starts"][0]):
                    grids.append((f"{name} + {chain} from t={t_start}: FD {fd:.1f}", x[:36]))

    z = torch.randn((n,) + IMAGE_SHAPE, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    reused = (reused_ddpm_row(out, "digits_fd_vs_nfe", eps_steps=eps_tr.step, n=n, seed=args.seed, clip=clip)
              if cfg["full_ddpm_steps"] == T else None)
    if reused is not None:
        log("  full DDPM-1000: reusing the row of digits_fd_vs_nfe.json (same checkpoint, seed and n)")
        rows.append({"label": "full DDPM-1000 (from digits_fd_vs_nfe)", "prior": "none", "chain": "DDPM",
                     "t_start": "full", "nfe": reused["nfe"], "fd": reused["fd"],
                     "seconds_per_sample": reused["seconds_per_sample"], "n": n})
    else:
        with Timer(device) as t:
            x = samplers.ddpm_sample(eps_model, None, n_steps=cfg["full_ddpm_steps"], x_T=z, clip_sample=clip,
                                     generator=torch.Generator().manual_seed(args.seed + 2), device=device)
        fd = record(f"full DDPM-{cfg['full_ddpm_steps']}", "none", "DDPM", "full", cfg["full_ddpm_steps"], x,
                    t.seconds)
        grids.append((f"full DDPM-{cfg['full_ddpm_steps']}: FD {fd:.1f}", x[:36]))
    with Timer(device) as t:
        x = samplers.ddim_sample(eps_model, None, n_steps=cfg["ddim_steps"], x_T=z, clip_sample=clip, device=device)
    fd = record(f"full DDIM-{cfg['ddim_steps']} eta=0", "none", "DDIM eta=0", "full", cfg["ddim_steps"], x, t.seconds)
    grids.append((f"full DDIM-{cfg['ddim_steps']}: FD {fd:.1f}", x[:36]))

    write_table(rows, out / "digits_truncated", title="digits: crude prior + truncated reverse chain vs the full "
                "chain", meta={
                    "epsilon model": f"UNet {eps_model.config} ({count_parameters(eps_model) / 1e6:.2f}M params), "
                                     f"{eps_tr.step} steps, EMA ({eps_path.name})",
                    "VAE": f"{vae.config}, {vae_tr.step} steps of batch 128, {t_vae.seconds:.0f} s, -ELBO "
                           f"{vae_loss:.3f} nats/pixel",
                    "DDPM": "all timesteps t_start .. 0; DDIM: eta 0, the leading 50-step schedule below t_start",
                    "seconds_per_sample": "prior sample + chain (VAE / classifier training excluded)",
                    "n": n, "seed": args.seed, "eps_steps": eps_tr.step, "clip_denoised": clip,
                    "fd_floor (real held-out digits, same n)": f"{floor:.3f}", "device": str(device),
                    **env_summary()})
    plot(rows, floor, cfg["t_starts"], out / "digits_truncated.png")
    from ddpm_digits import plot_grids

    plot_grids(grids, out / "digits_truncated_samples.png", nrow=6, ncols=4)
    return rows


if __name__ == "__main__":
    main()
