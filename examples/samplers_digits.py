"""The sampler zoo on digits: Fréchet distance and time per sample against model evaluations.

One epsilon-prediction UNet (DDPM's L_simple) is sampled with DDPM-1000, DDIM (eta 0,
trailing spacing), k-diffusion's Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral, LMS,
DPM++ 2S ancestral, DPM++ SDE, DPM++ 2M, DPM++ 2M SDE and DPM++ 3M SDE, and ComfyUI's
iPNDM, iPNDM-v, DEIS, res_multistep and UniPC (bh1), all on Karras sigmas (through
:class:`diffkern.samplers.EpsDenoiser`); the same UNet architecture trained by flow
matching (:func:`diffkern.training.train_flow`, velocity target, time input sigma * 1000)
is sampled with flow Euler. Each sampler runs at 5, 10, 20 and 50 model evaluations (NFE;
the two-stage samplers' n steps cost 2n - 1, so they get the largest n within the budget)
from the same starting noise; the stochastic ones draw their noise in-kernel from one
seeded generator. Quality is the Fréchet distance on the digits classifier's
features (:func:`diffkern.metrics.digits_quality`).

The models are trained once and kept as checkpoints (``OUT/checkpoints/unet.pt``, the file
``examples/ddpm_digits.py`` writes, and ``unet_flow.pt``): a later run, or a run of
``ddpm_digits.py`` with the same ``--out``, reuses and, if it has fewer steps, continues them.

    python examples/samplers_digits.py --quick --out runs/samplers_digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_diffkern_importable  # noqa: E402

ensure_diffkern_importable()
from _common import Timer, env_summary, log, make_parser, save_figure, setup, write_table  # noqa: E402

import diffkern as dk  # noqa: E402
from diffkern import samplers  # noqa: E402
from diffkern.data import load_digits  # noqa: E402
from diffkern.metrics import digits_quality  # noqa: E402
from diffkern.models import UNet, build_model, count_parameters  # noqa: E402
from diffkern.training import VelocityModel, load_checkpoint, train_ddpm, train_flow  # noqa: E402

# (name, diffkern.samplers function, takes generator=): k-diffusion's and ComfyUI's samplers
K_SAMPLERS = {
    "Euler": ("sample_euler", False),
    "Euler ancestral": ("sample_euler_ancestral", True),
    "Heun": ("sample_heun", False),
    "DPM++ 2M": ("sample_dpmpp_2m", False),
    "DPM2": ("sample_dpm_2", False),
    "DPM2 ancestral": ("sample_dpm_2_ancestral", True),
    "LMS": ("sample_lms", False),
    "DPM++ 2S ancestral": ("sample_dpmpp_2s_ancestral", True),
    "DPM++ SDE": ("sample_dpmpp_sde", True),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", True),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", True),
    "iPNDM": ("sample_ipndm", False),
    "iPNDM-v": ("sample_ipndm_v", False),
    "DEIS": ("sample_deis", False),
    "res_multistep": ("sample_res_multistep", False),
    "UniPC": ("sample_unipc", False),
}
# Two model calls a step except the last (an Euler step to sigma = 0): n steps cost 2n - 1.
TWO_STAGE = ("Heun", "DPM2", "DPM2 ancestral", "DPM++ 2S ancestral", "DPM++ SDE")
EPS_SAMPLERS = ("DDIM eta=0", *K_SAMPLERS)
# The first figure panel: the samplers the zoo had before issue 21 (the rest go to the second).
FIRST_PANEL = ("DDPM", "DDIM eta=0", "Euler", "Euler ancestral", "Heun", "DPM++ 2M", "flow Euler")
IMAGE_SHAPE = (1, 16, 16)


def settings(quick: bool) -> dict:
    if quick:
        return dict(model=dict(base_channels=8, num_res_blocks=1), batch_size=64, eps_steps=30, flow_steps=30,
                    lr=2e-3, ema_decay=0.9, n_samples=32, nfes=(5, 10), ddpm_steps=50, classifier_epochs=3)
    # About 10 minutes on 2 idle CPU cores: 40 epochs (29 steps of 64) per model; DDPM-1000 on
    # 128 samples is the largest item.
    return dict(model=dict(base_channels=16, num_res_blocks=1), batch_size=64, eps_steps=1160, flow_steps=1160,
                lr=2e-3, ema_decay=0.995, n_samples=128, nfes=(5, 10, 20, 50), ddpm_steps=1000, classifier_epochs=30)


def add_model_options(p) -> None:
    p.add_argument("--eps-checkpoint", type=Path, default=None,
                   help="epsilon UNet checkpoint to reuse / continue / create (default OUT/checkpoints/unet.pt, "
                        "the file ddpm_digits.py writes)")
    p.add_argument("--eps-steps", type=int, default=None, help="training steps of the epsilon UNet (total)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the metric classifier is cached (default $DIFFKERN_CACHE or ~/.cache/diffkern)")
    p.add_argument("--n-samples", type=int, default=None, help="samples per sampler")
    p.add_argument("--clip-denoised", type=float, default=1.0,
                   help="clip every sampler's predicted x0 (denoised sample) to [-c, c], the data range; 0 turns it "
                        "off (default 1: as ddpm_digits' --clip-sample; without it the probability-flow ODE of a "
                        "briefly trained model leaves the data range, see examples/results)")


def _model_for(path: Path, cfg: dict) -> torch.nn.Module:
    """The checkpoint's own architecture when the file exists (it may come from
    ddpm_digits.py with other settings), else a fresh UNet of ``cfg['model']``."""
    if path.exists():
        state = load_checkpoint(path)
        if state.get("model_config") is not None:
            return build_model(state["model_class"], state["model_config"])
    return UNet(1, **cfg["model"])


def train_or_load(kind: str, images, cfg: dict, *, path: Path, n_steps: int, device, seed: int, progress: bool,
                  sigma_sampling: str = "logit_normal"):
    """(EMA model, trainer) for ``kind`` "eps" (DDPM) or "flow" (flow matching), trained
    to ``n_steps`` total from the checkpoint at ``path`` (none trained when it has as many)."""
    torch.manual_seed(seed)
    model = _model_for(path, cfg)
    kw = dict(n_steps=n_steps, batch_size=cfg["batch_size"], lr=cfg["lr"], ema_decay=cfg["ema_decay"],
              warmup_steps=min(100, n_steps // 10), seed=seed, device=device, checkpoint_path=path,
              checkpoint_every=max(100, n_steps // 4), resume=True, progress=progress)
    if kind == "flow":
        kw["sigma_sampling"] = sigma_sampling
    before = load_checkpoint(path)["step"] if path.exists() else 0
    with Timer(device) as t:
        trainer = (train_ddpm if kind == "eps" else train_flow)(model, images, **kw)
    log(f"{kind} UNet ({count_parameters(model) / 1e6:.2f}M params): {trainer.step} steps "
        f"({trainer.step - before} trained now, {t.seconds:.0f} s) -> {path}")
    return trainer.ema.model.eval(), trainer


def reused_ddpm_row(out: Path, stem: str, *, eps_steps: int, n: int, seed: int, clip, sampler: str = "DDPM"):
    """The DDPM-1000 row of the other digits script's table ``OUT/<stem>.json`` when it was
    made from the same checkpoint (steps), seed, sample count and clipping: the same samples (same
    starting noise and generator), so its FD and time are reused instead of sampling again."""
    import json

    path = out / f"{stem}.json"
    if not path.exists():
        return None
    table = json.loads(path.read_text())
    meta = table.get("meta", {})
    if tuple(meta.get(k) for k in ("n", "seed", "eps_steps", "clip_denoised")) != (n, seed, eps_steps, clip):
        return None
    return next((r for r in table["rows"] if r.get("chain", r.get("sampler")) == sampler and r["nfe"] == 1000), None)


def heun_steps(nfe: int) -> int:
    """The most steps of a two-stage sampler (Heun, DPM2, ...) whose 2n - 1 evaluations fit in ``nfe``."""
    return max(1, (nfe + 1) // 2)


class ClampedDenoiser(torch.nn.Module):
    """``clamp(D(x, sigma), -c, c)``: diffusers' ``clip_sample`` (the predicted x0 clipped to
    the data range) for k-diffusion samplers, so that every sampler sees the same rule."""

    def __init__(self, denoiser, clip: float):
        super().__init__()
        self.denoiser, self.clip = denoiser, float(clip)

    def forward(self, x, sigma, **kwargs):
        return self.denoiser(x, sigma, **kwargs).clamp(-self.clip, self.clip)


class ClampedVelocity(torch.nn.Module):
    """The velocity whose implied x0 ``x - sigma v`` is clipped to [-c, c] (sigma > 0)."""

    def __init__(self, velocity, clip: float):
        super().__init__()
        self.velocity, self.clip = velocity, float(clip)

    def forward(self, x, sigma, **kwargs):
        v = self.velocity(x, sigma, **kwargs)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return (x - (x - s * v).clamp(-self.clip, self.clip)) / s


def run_eps_sampler(name: str, nfe: int, model, z, *, device, seed: int, schedule=None, clip: float | None = None):
    """Samples of the epsilon model from the unit noise ``z`` (the predicted x0 clipped to
    [-clip, clip] in every step when ``clip``); returns (x, actual NFE, steps)."""
    g = torch.Generator().manual_seed(seed)
    if name == "DDPM":
        x = samplers.ddpm_sample(model, None, n_steps=nfe, x_T=z, schedule=schedule, clip_sample=clip, generator=g,
                                 device=device)
        return x, nfe, nfe
    if name == "DDIM eta=0":
        x = samplers.ddim_sample(model, None, n_steps=nfe, eta=0.0, spacing="trailing", x_T=z, schedule=schedule,
                                 clip_sample=clip, device=device)
        return x, nfe, nfe
    denoiser = samplers.EpsDenoiser(model, schedule or dk.NoiseSchedule.linear())
    smin, smax = float(denoiser.sigmas.min()), float(denoiser.sigmas.max())
    if name not in K_SAMPLERS:
        raise ValueError(name)
    fn_name, noisy = K_SAMPLERS[name]
    two_stage = name in TWO_STAGE
    steps = heun_steps(nfe) if two_stage else nfe
    sigmas = samplers.get_sigmas_karras(steps, smin, smax, device=device)
    x = z * sigmas[0]
    if clip:
        denoiser = ClampedDenoiser(denoiser, clip)
    with torch.no_grad():
        # ComfyUI's UniPC ends at sigma 0.001 instead of 0 (it steps to 0.001 and returns that
        # state, VE-scaled): a residual noise of 0.001 on data in [-1, 1], below what FD sees.
        x = getattr(samplers, fn_name)(denoiser, x, sigmas, disable=True, **({"generator": g} if noisy else {}))
    return x, (2 * steps - 1 if two_stage else steps), steps


def run_flow_euler(nfe: int, velocity, z, *, device, clip: float | None = None):
    sigmas = torch.linspace(1.0, 0.0, nfe + 1, device=device)
    if clip:
        velocity = ClampedVelocity(velocity, clip)
    with torch.no_grad():
        return samplers.sample_flow_euler(velocity, z.clone(), sigmas, disable=True)


def plot_fd_vs_nfe(rows, floor, path):
    """Two panels on one y scale, so that 19 lines stay readable: the zoo's first samplers,
    then issue 21's samplers with DDIM and DPM++ 2M repeated (grey) as the yardstick."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["sampler"] for r in rows))
    second = [n for n in names if n not in FIRST_PANEL]
    panels = [("before issue 21", [n for n in names if n in FIRST_PANEL], ())]
    if second:
        panels.append(("issue 21's samplers", second, ("DDIM eta=0", "DPM++ 2M")))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), sharey=True, squeeze=False)
    nfes = sorted({r["nfe"] for r in rows if r["sampler"] not in TWO_STAGE})  # 2n - 1 sit beside them
    cmap = plt.get_cmap("tab20")
    for ax, (title, shown, refs) in zip(axes[0], panels, strict=True):
        for i, name in enumerate([*refs, *shown]):
            pts = sorted((r["nfe"], r["fd"]) for r in rows if r["sampler"] == name)
            if len(pts) == 1:
                style = dict(marker="*", ms=14, ls="none")
            else:
                style = dict(marker="osD^v<>ph"[i % 9], ms=4, ls="--" if "flow" in name or name in TWO_STAGE else "-")
            k = i - len(refs)  # tab20 comes in dark/light pairs: the ten dark hues first
            color = "0.6" if name in refs else cmap((2 * k) % 20 + (2 * k) // 20 % 2)
            ax.plot(*zip(*pts, strict=True), color=color, label=name + (" (ref.)" if name in refs else ""), **style)
        ax.axhline(floor, color="gray", ls=":", label="real held-out digits")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(v) for v in nfes], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("model evaluations (NFE; dashed: two model calls a step, 2n - 1)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("Fréchet distance (classifier features)")
    save_figure(fig, path)


def main(argv=None):
    p = make_parser(__doc__.splitlines()[0], "runs/samplers_digits")
    add_model_options(p)
    p.add_argument("--flow-checkpoint", type=Path, default=None,
                   help="flow-matching UNet checkpoint (default OUT/checkpoints/unet_flow.pt)")
    p.add_argument("--flow-steps", type=int, default=None, help="training steps of the flow UNet (total)")
    p.add_argument("--sigma-sampling", choices=("uniform", "logit_normal"), default="logit_normal",
                   help="flow-matching training sigmas (default logit_normal, SD3's)")
    p.add_argument("--nfes", type=int, nargs="+", default=None, help="model-evaluation budgets")
    args = p.parse_args(argv)
    args.clip_denoised = args.clip_denoised if args.clip_denoised > 0 else None
    device = setup(args)
    cfg = settings(args.quick)
    for key in ("eps_steps", "flow_steps", "n_samples", "nfes"):
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
    flow_path = args.flow_checkpoint or out / "checkpoints" / "unet_flow.pt"
    eps_model, eps_tr = train_or_load("eps", images, cfg, path=eps_path, n_steps=cfg["eps_steps"], device=device,
                                      seed=args.seed, progress=progress)
    flow_net, flow_tr = train_or_load("flow", images, cfg, path=flow_path, n_steps=cfg["flow_steps"], device=device,
                                      seed=args.seed, progress=progress, sigma_sampling=args.sigma_sampling)
    velocity = VelocityModel(flow_net, flow_tr.loss_fn.time_scale)

    z = torch.randn((n,) + IMAGE_SHAPE, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    rows, grids = [], []
    mid_nfe = 10 if 10 in cfg["nfes"] else cfg["nfes"][0]  # the budget shown as sample grids

    def record(name, nfe, steps, sigmas, x, seconds):
        fd = quality.frechet_distance(x)
        rows.append({"sampler": name, "nfe": nfe, "steps": steps, "sigmas": sigmas, "fd": fd,
                     "seconds_per_sample": seconds / n, "n": n})
        log(f"  {name:16s} NFE {nfe:4d}: FD {fd:8.3f}, {1e3 * seconds / n:.2f} ms/sample")
        return fd

    log(f"sampling {n} per sampler at NFE {list(cfg['nfes'])} (+ DDPM-{cfg['ddpm_steps']})")
    reused = reused_ddpm_row(out, "digits_truncated", eps_steps=eps_tr.step, n=n, seed=args.seed,
                             clip=args.clip_denoised)
    if reused is not None and cfg["ddpm_steps"] == 1000:
        log("  DDPM-1000: reusing the row of digits_truncated.json (same checkpoint, seed and n)")
        rows.append({"sampler": "DDPM", "nfe": 1000, "steps": 1000, "sigmas": "all timesteps", "fd": reused["fd"],
                     "seconds_per_sample": reused["seconds_per_sample"], "n": n})
    else:
        with Timer(device) as t:
            x, nfe, steps = run_eps_sampler("DDPM", cfg["ddpm_steps"], eps_model, z, device=device,
                                            seed=args.seed + 2, clip=args.clip_denoised)
        fd = record("DDPM", nfe, steps, "all timesteps" if nfe == 1000 else "leading", x, t.seconds)
        grids.append((f"DDPM-{nfe}: FD {fd:.1f}", x[:36]))
    for name in EPS_SAMPLERS:
        for budget in cfg["nfes"]:
            with Timer(device) as t:
                x, nfe, steps = run_eps_sampler(name, budget, eps_model, z, device=device, seed=args.seed + 2,
                                                clip=args.clip_denoised)
            fd = record(name, nfe, steps, "trailing" if name.startswith("DDIM") else "Karras rho=7", x, t.seconds)
            if budget == mid_nfe:
                grids.append((f"{name}, NFE {nfe}: FD {fd:.1f}", x[:36]))
    for budget in cfg["nfes"]:
        with Timer(device) as t:
            x = run_flow_euler(budget, velocity, z, device=device, clip=args.clip_denoised)
        fd = record("flow Euler", budget, budget, "linspace 1 -> 0", x, t.seconds)
        if budget == mid_nfe:
            grids.append((f"flow Euler, NFE {budget}: FD {fd:.1f}", x[:36]))

    write_table(rows, out / "digits_fd_vs_nfe", title="digits: Fréchet distance and time per sample vs model "
                "evaluations", meta={
                    "epsilon model": f"UNet {eps_model.config} ({count_parameters(eps_model) / 1e6:.2f}M params), "
                                     f"DDPM L_simple, {eps_tr.step} steps of batch {cfg['batch_size']}, EMA",
                    "flow model": f"same UNet, flow matching ({flow_tr.loss_fn.sigma_sampling} sigmas, "
                                  f"time input sigma*{flow_tr.loss_fn.time_scale:g}), {flow_tr.step} steps, EMA",
                    "n": n, "seed": args.seed, "eps_steps": eps_tr.step, "flow_steps": flow_tr.step,
                    "starting noise": "all samplers (k-diffusion ones scale it by sigma_max)",
                    "fd": "Fréchet distance on the digits classifier's 64-d features vs all 1797 digits",
                    "fd_floor (real held-out digits, same n)": f"{floor:.3f}",
                    "clip_denoised": args.clip_denoised, "device": str(device), **env_summary()})
    plot_fd_vs_nfe(rows, floor, out / "digits_fd_vs_nfe.png")
    from ddpm_digits import plot_grids

    plot_grids(grids, out / "digits_fd_vs_nfe_samples.png", nrow=6, ncols=min(4, len(grids)))
    summary = summarize(rows)
    for line in summary:
        log(line)
    return rows


def summarize(rows) -> list[str]:
    """The closing-note numbers: DPM++ 2M at 20 NFE vs DDPM, best sampler per NFE, flow vs eps."""
    lines = []
    ddpm = next(r for r in rows if r["sampler"] == "DDPM")
    for nfe in sorted({r["nfe"] for r in rows if r["sampler"] == "flow Euler"}):
        eps = [r for r in rows if r["sampler"] in EPS_SAMPLERS and r["nfe"] <= nfe and
               (r["nfe"] == nfe or r["sampler"] in TWO_STAGE and r["nfe"] == 2 * heun_steps(nfe) - 1)]
        best = min(eps, key=lambda r: r["fd"]) if eps else None
        flow = next(r for r in rows if r["sampler"] == "flow Euler" and r["nfe"] == nfe)
        if best:
            lines.append(f"NFE {nfe}: best epsilon sampler {best['sampler']} (FD {best['fd']:.3f}); "
                         f"flow Euler {flow['fd']:.3f}")
    for r in rows:
        if r["sampler"] == "DPM++ 2M":
            lines.append(f"DPM++ 2M NFE {r['nfe']}: FD {r['fd']:.3f} = {r['fd'] / ddpm['fd']:.3f} x "
                         f"DDPM-{ddpm['nfe']} ({ddpm['fd']:.3f})")
    return lines


if __name__ == "__main__":
    main()
