"""Train a small UNet with DDPM on scikit-learn's digits (16x16), then compare samplers.

Training uses L_simple with :func:`diffkern.q_sample` (per-sample t); sample grids and the
Fréchet distance (on the features of a small digits classifier, trained once and cached)
are recorded during training; at the end the EMA model is sampled with DDPM (1000 steps,
:func:`diffkern.ddpm_step`) and DDIM (50..1000 steps, eta 0 / 0.5 / 1,
:func:`diffkern.ddim_step`) from the same starting noise, and a table of sampling time and
quality is written.

    python examples/ddpm_digits.py --quick --out runs/ddpm_digits

On several processes (DDP; gloo on CPUs, nccl on GPUs) the global batch is split across
the ranks and every example's q_sample noise is keyed by (its position in the global
batch, the training step), so N ranks train the same model as one process on the same
global batch (up to the all-reduce's rounding); sampling is sharded over the ranks with
per-sample seeds, so the samples are the same, bitwise, for any number of processes:

    torchrun --nproc_per_node 2 examples/ddpm_digits.py --quick --out runs/ddpm_digits_ddp
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_diffkern_importable  # noqa: E402

ensure_diffkern_importable()
from _common import Timer, env_summary, log, make_parser, save_figure, setup, write_table  # noqa: E402

import diffkern as dk  # noqa: E402
import diffkern.distributed as dkd  # noqa: E402
from diffkern import samplers  # noqa: E402
from diffkern.data import load_digits  # noqa: E402
from diffkern.metrics import digits_quality  # noqa: E402
from diffkern.models import UNet, count_parameters  # noqa: E402
from diffkern.training import train_ddpm  # noqa: E402

# (name, kind, n_steps, eta)
QUICK_SAMPLERS = [("DDPM", "ddpm", 1000, None), ("DDIM", "ddim", 50, 0.0), ("DDIM", "ddim", 50, 0.5),
                  ("DDIM", "ddim", 50, 1.0), ("DDIM", "ddim", 100, 0.0)]
FULL_SAMPLERS = QUICK_SAMPLERS + [("DDIM", "ddim", 100, 0.5), ("DDIM", "ddim", 100, 1.0), ("DDIM", "ddim", 250, 0.0),
                                  ("DDIM", "ddim", 250, 0.5), ("DDIM", "ddim", 250, 1.0), ("DDIM", "ddim", 1000, 0.0),
                                  ("DDIM", "ddim", 1000, 0.5), ("DDIM", "ddim", 1000, 1.0)]


def settings(quick: bool) -> dict:
    if quick:
        return dict(model=dict(base_channels=16, num_res_blocks=1), batch_size=64, epochs=6, lr=2e-3, ema_decay=0.99,
                    eval_every=3, eval_samples=48, eval_steps=20, n_samples=32, samplers=QUICK_SAMPLERS)
    return dict(model=dict(base_channels=32, num_res_blocks=2), batch_size=128, epochs=300, lr=5e-4,
                ema_decay=0.999, eval_every=30, eval_samples=500, eval_steps=50, n_samples=1000,
                samplers=FULL_SAMPLERS)


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> one (rows*(H+1), nrow*(W+1)) image in [0, 1]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, 0]
    n, H, W = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(rows * (H + 1) - 1, nrow * (W + 1) - 1)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = x[i]
    return grid


def plot_grids(panels: list[tuple[str, torch.Tensor]], path: Path, *, nrow: int = 8, ncols: int | None = None):
    import matplotlib.pyplot as plt

    ncols = ncols or len(panels)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, imgs) in zip(axes.flat, panels, strict=False):
        ax.imshow(image_grid(imgs, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def sample(model, kind, n_steps, eta, n, *, device, seed, progress, clip_sample=None, batch=500):
    """``n`` samples; sample ``k`` is keyed by ``(seed << 32) + k`` (its starting noise and
    every step's noise), so the result does not depend on the batching or on how many
    ranks share the work: each rank samples its shard (diffkern.distributed) and every
    rank gets all ``n``, in order."""
    idx = dkd.shard_indices(n)
    out = []
    for i in range(0, len(idx), batch):
        seeds = idx[i:i + batch] + (seed << 32)
        shape = (len(seeds), 1, 16, 16)
        if kind == "ddpm":
            x = samplers.ddpm_sample(model, shape, n_steps=n_steps, clip_sample=clip_sample, seeds=seeds,
                                     device=device, progress=progress)
        else:
            x = samplers.ddim_sample(model, shape, n_steps=n_steps, eta=eta, clip_sample=clip_sample, seeds=seeds,
                                     device=device, progress=progress)
        out.append(x)
    local = torch.cat(out) if out else torch.empty(0, 1, 16, 16, device=device)
    return dkd.gather_shards(local, n).cpu()


# ---- many processes ------------------------------------------------------------------
def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on the CPU, nccl on
    GPUs, one GPU per local rank) and return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _step_generator(seed: int, step: int) -> torch.Generator:
    # the same on every rank: the global batch and its timesteps of step k depend on (seed, k)
    return torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF))


class DDPTrainer:
    """Data-parallel DDPM training (L_simple), one process per rank (or one process alone).

    Step k draws one global batch of ``global_batch`` rows and their timesteps from (seed,
    k), identically on every rank; rank r trains on its contiguous shard of it; the q_sample
    noise of the example at position p of the global batch is keyed by ``(p, k)``
    (``seeds=``, ``step=``), so no rank's noise depends on the world size. The local loss is
    the shard's summed per-example loss over the global batch size, times the world size:
    DDP's gradient averaging then gives the global batch's mean exactly, whatever the shard
    sizes. Adam with linear warm-up, gradient clipping and EMA, as diffkern.training."""

    def __init__(self, model, images, *, global_batch, lr, warmup_steps=0, grad_clip=1.0, ema_decay=0.999, seed=0,
                 device="cpu", optimizer="adam"):
        from diffkern.training.ema import EMA

        self.device = torch.device(device)
        self.model = model.to(self.device)
        rank, world = dkd.rank_and_world()
        self.world = world
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=None if self.device.type == "cpu"
                                                              else [self.device]) if world > 1 else self.model)
        self.data = images.to(self.device)
        self.global_batch, self.lr, self.warmup = int(global_batch), float(lr), int(warmup_steps)
        self.grad_clip, self.seed = grad_clip, int(seed)
        self.start, self.stop = dkd.shard_bounds(self.global_batch, rank, world)
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        self.optimizer = opt(self.model.parameters(), lr=lr)
        self.ema = EMA(self.model, ema_decay)
        self.schedule = dk.NoiseSchedule.linear()
        self.step = 0
        self.loss_history: list[float] = []

    def train_step(self) -> float:
        g = _step_generator(self.seed, self.step)
        idx = torch.randint(0, self.data.shape[0], (self.global_batch,), generator=g)
        t = torch.randint(0, self.schedule.num_timesteps, (self.global_batch,), generator=g)
        mine = slice(self.start, self.stop)
        x0, tt = self.data[idx[mine].to(self.device)], t[mine].to(self.device)
        positions = torch.arange(self.start, self.stop, dtype=torch.int64)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup) if self.warmup else self.lr
        self.model.train()
        x_t, noise = dk.q_sample(x0, tt, schedule=self.schedule, seeds=positions, step=self.step)
        per_example = (self.ddp(x_t, tt).float() - noise.float()).pow(2).flatten(1).mean(1)
        loss = per_example.sum() * (self.world / self.global_batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        total = loss.detach() / self.world
        if self.world > 1:
            dist.all_reduce(total)
        self.loss_history.append(float(total))
        return self.loss_history[-1]

    def fit(self, n_steps: int, *, callback=None, callback_every=None) -> DDPTrainer:
        while self.step < n_steps:
            self.train_step()
            if callback is not None and callback_every and self.step % callback_every == 0:
                callback(self)
        return self


def plot_training(loss_history, evals, out):
    import matplotlib.pyplot as plt

    h = torch.tensor(loss_history)
    k = max(5, len(h) // 100)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(h, alpha=0.3, lw=0.6, label="per step")
    smooth = h[: len(h) // k * k].reshape(-1, k).mean(1)
    ax.plot((torch.arange(len(smooth)) + 0.5) * k, smooth, lw=2, label=f"mean over {k} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L_simple (MSE of eps)")
    ax.legend()
    save_figure(fig, out / "digits_loss.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ep = [e["epoch"] for e in evals]
    ax.plot(ep, [e["fd"] for e in evals], "o-", label="Fréchet distance (EMA model)")
    ax.axhline(evals[0]["fd_floor"], color="gray", ls="--", label="real held-out digits (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"FD, {evals[0]['sampler']}, {evals[0]['n']} samples")
    ax2 = ax.twinx()
    ax2.plot(ep, [e["label_entropy"] for e in evals], "s:", color="C2", label="label entropy H(y|x)")
    ax2.set_ylabel("H(y|x) [nats]", color="C2")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    save_figure(fig, out / "digits_fd_vs_epoch.png")


def main(argv=None):
    p = make_parser(__doc__.splitlines()[0], "runs/ddpm_digits")
    p.add_argument("--epochs", type=int, default=None, help="override the number of training epochs")
    p.add_argument("--n-samples", type=int, default=None, help="samples per sampler in the final table")
    p.add_argument("--samplers", choices=("quick", "full"), default=None,
                   help="sampler list for the table: quick = DDPM-1000, DDIM-50 (eta 0/0.5/1), DDIM-100; full adds "
                        "DDIM-100/250/1000 with eta 0/0.5/1 (default: quick with --quick, else full)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the metric classifier is cached (default $DIFFKERN_CACHE or ~/.cache/diffkern)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/unet.pt if it exists")
    p.add_argument("--clip-sample", type=float, default=1.0,
                   help="clamp the predicted x0 to [-c, c] in every step; 0 turns it off (default 1, as diffusers: "
                        "it keeps an undertrained model's samples bounded, but with eta = 0 and hundreds of steps "
                        "clipping x0 and not eps drifts the deterministic DDIM path, also in diffusers)")
    args = p.parse_args(argv)
    args.clip_sample = args.clip_sample if args.clip_sample > 0 else None
    device = init_distributed(setup(args))
    rank, world = dkd.rank_and_world()
    if rank != 0:  # one rank writes the figures, tables and logs
        import _common

        _common.log = lambda msg: None
        globals()["log"] = _common.log
    cfg = settings(args.quick)
    if args.epochs:
        cfg["epochs"] = args.epochs
    if args.n_samples:
        cfg["n_samples"] = args.n_samples
    if args.samplers:
        cfg["samplers"] = QUICK_SAMPLERS if args.samplers == "quick" else FULL_SAMPLERS
    progress = not args.no_progress and rank == 0
    out = args.out
    if rank != 0:  # the other ranks compute the same figures and tables; they go to scratch
        import tempfile

        out = Path(tempfile.mkdtemp(prefix=f"ddpm_digits_rank{rank}_"))
    t_start = time.perf_counter()

    images, _ = load_digits(16)
    log(f"digits: {tuple(images.shape)} in [{images.min():.0f}, {images.max():.0f}]")
    plot_grids([("training data (sklearn digits, 16x16)", images[:64])], out / "digits_data.png")
    with Timer(device) as t:
        if rank == 0:  # trains and caches the metric classifier once; the others then load it
            quality = digits_quality(cache_dir=args.cache_dir, device=device, progress=progress)
        if world > 1:
            dist.barrier()
        if rank != 0:
            quality = digits_quality(cache_dir=args.cache_dir, device=device, progress=False)
    log(f"metric classifier ready in {t.seconds:.1f} s")
    held_out, _ = load_digits(16, split="test")
    fd_floor = quality.frechet_distance(held_out[: cfg["eval_samples"]])

    torch.manual_seed(args.seed)
    model = UNet(1, **cfg["model"])
    log(f"UNet {cfg['model']}: {count_parameters(model) / 1e6:.2f}M parameters")
    steps_per_epoch = math.ceil(images.shape[0] / cfg["batch_size"])
    n_steps = cfg["epochs"] * steps_per_epoch
    eval_epochs = sorted({*range(cfg["eval_every"], cfg["epochs"] + 1, cfg["eval_every"]), 1, cfg["epochs"]})
    grid_epochs = {eval_epochs[0], eval_epochs[len(eval_epochs) // 2], eval_epochs[-1]}
    history_path = out / "digits_eval_history.json"
    evals = json.loads(history_path.read_text()) if args.resume and history_path.exists() else []
    grids = []
    # The training monitor clips x0 to [-1, 1]: an early, untrained model's x0 prediction
    # (divided by sqrt(alphas_cumprod) ~ 0.006 at t ~ 1000) would otherwise blow the metric up.
    eval_sampler = f"DDIM-{cfg['eval_steps']} eta=0.5 clip=1"

    def evaluate(trainer):
        epoch = trainer.step // steps_per_epoch
        if epoch not in eval_epochs or any(e["epoch"] == epoch for e in evals):
            return
        x = sample(trainer.ema.model, "ddim", cfg["eval_steps"], 0.5, cfg["eval_samples"], device=device,
                   seed=args.seed + 1, progress=False, clip_sample=1.0)
        m = quality.evaluate(x)
        evals.append({"epoch": epoch, "step": trainer.step, "sampler": eval_sampler, "n": cfg["eval_samples"],
                      "fd": m["fd"], "label_entropy": m["label_entropy"], "class_entropy": m["class_entropy"],
                      "fd_floor": fd_floor})
        history_path.write_text(json.dumps(evals, indent=1))
        if epoch in grid_epochs:
            grids.append((f"epoch {epoch} ({eval_sampler})\nFD {m['fd']:.1f}", x[:64]))
        log(f"  epoch {epoch}: FD {m['fd']:.2f}, H(y|x) {m['label_entropy']:.3f}, H(y) {m['class_entropy']:.3f}")

    log(f"training {cfg['epochs']} epochs x {steps_per_epoch} steps (batch {cfg['batch_size']})"
        + (f" on {world} ranks, {cfg['batch_size'] // world}+ examples each" if world > 1 else ""))
    with Timer(device) as t_train:
        if world > 1:  # data-parallel; no checkpoints/resume on this path
            trainer = DDPTrainer(model, images, global_batch=cfg["batch_size"], lr=cfg["lr"],
                                 ema_decay=cfg["ema_decay"], warmup_steps=min(100, n_steps // 10), seed=args.seed,
                                 device=device).fit(n_steps, callback=evaluate, callback_every=steps_per_epoch)
        else:
            trainer = train_ddpm(model, images, n_steps=n_steps, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 ema_decay=cfg["ema_decay"], warmup_steps=min(100, n_steps // 10), seed=args.seed,
                                 device=device, checkpoint_path=out / "checkpoints" / "unet.pt",
                                 checkpoint_every=steps_per_epoch * cfg["eval_every"], resume=args.resume,
                                 progress=progress, callback=evaluate, callback_every=steps_per_epoch)
    log(f"trained in {t_train.seconds:.1f} s")
    if grids:
        plot_grids(grids, out / "digits_samples_by_epoch.png")
    plot_training(trainer.loss_history, evals, out)

    # ---- sampler comparison from the same starting noise ---------------------------
    ema = trainer.ema.model
    n = cfg["n_samples"]
    rows = [{"sampler": "real held-out digits", "n_steps": 0, "eta": "", "n": min(n, len(held_out)), "seconds": 0.0,
             "ms_per_sample": 0.0, "fd": quality.frechet_distance(held_out[:n]),
             "label_entropy": quality.label_entropy(held_out[:n])["conditional"],
             "class_entropy": quality.label_entropy(held_out[:n])["marginal"]}]
    final_grids = []
    for name, kind, steps, eta in cfg["samplers"]:
        label = f"{name}-{steps}" + (f" eta={eta:g}" if eta is not None else "")
        log(f"sampling {n} with {label}")
        with Timer(device) as t:
            x = sample(ema, kind, steps, eta, n, device=device, seed=args.seed + 2, progress=progress,
                       clip_sample=args.clip_sample)
        m = quality.evaluate(x)
        rows.append({"sampler": name, "n_steps": steps, "eta": "" if eta is None else eta, "n": n,
                     "seconds": t.seconds, "ms_per_sample": 1e3 * t.seconds / n, "fd": m["fd"],
                     "label_entropy": m["label_entropy"], "class_entropy": m["class_entropy"]})
        final_grids.append((f"{label}: FD {m['fd']:.1f}", x[:36]))
    write_table(rows, out / "digits_samplers", title="digits: sampling time and quality per sampler (EMA model)",
                meta={"model": f"UNet {cfg['model']} ({count_parameters(model) / 1e6:.2f}M params)",
                      "training": f"{cfg['epochs']} epochs, {trainer.step} steps, batch {cfg['batch_size']}, "
                                  f"{t_train.seconds:.0f} s", "device": str(device),
                      "fd": "Fréchet distance on the digits classifier's 64-d features vs all 1797 digits",
                      "label_entropy": "mean H(y|x) [nats]; class_entropy: H(mean p(y)), max ln 10 = 2.303",
                      "clip_sample": args.clip_sample, **env_summary()})
    plot_grids(final_grids, out / "digits_samplers.png", nrow=6, ncols=min(6, len(final_grids)))
    log(f"total {time.perf_counter() - t_start:.1f} s; outputs in {out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
