"""Models, training (losses, EMA, checkpoints/resume), samplers, metrics and data sets."""

from __future__ import annotations

import math

import pytest
import torch

import diffkern as dk
from diffkern import samplers
from diffkern.data import GaussianMixture, classic_mixture, load_digits, uniform_box
from diffkern.metrics import (
    ImageQuality,
    calibrate,
    frechet_distance,
    gaussian_statistics,
    load_or_train_classifier,
    mmd_rbf,
    mode_weights,
    sliced_wasserstein,
)
from diffkern.models import ScoreNet, UNet, build_model, count_parameters
from diffkern.training import (
    EMA,
    Trainer,
    ddpm_loss,
    dsm_loss,
    geometric_sigmas,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train_ddpm,
    train_score,
)
from diffkern.training.losses import DDPMLoss, DSMLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_zero_inits(model, seed=0):
    """Zero-initialised output layers make every upstream gradient zero at step 0;
    randomise them so gradient-flow checks see the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == 0).all()):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ---- models ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 16, 32])
def test_unet_shapes_and_gradients(size):
    model = UNet(1, base_channels=8, num_res_blocks=1)
    _randomize_zero_inits(model)
    x = torch.randn(3, 1, size, size)
    t = torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, f"no gradient reaches {name}"


def test_unet_depends_on_time_and_int_t():
    model = UNet(1, base_channels=8, num_res_blocks=1)
    _randomize_zero_inits(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900]))
        torch.testing.assert_close(model(x, 10), a)
    assert float((a - b).abs().max()) > 1e-4


def test_unet_parameter_counts_and_config():
    default = UNet(1)
    assert 0.5e6 <= count_parameters(default) <= 2e6
    assert count_parameters(UNet(1, base_channels=16)) < count_parameters(default)
    rebuilt = build_model("UNet", default.config)
    assert count_parameters(rebuilt) == count_parameters(default)
    with pytest.raises(ValueError, match="divisible"):
        default(torch.randn(1, 1, 10, 10), 3)


def test_unet_class_conditioning():
    model = UNet(1, base_channels=8, num_res_blocks=1, num_classes=10)
    _randomize_zero_inits(model)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        y3, y7 = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))
        torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
    assert float((y3 - y7).abs().max()) > 1e-5


def test_scorenet_shapes_sigma_forms_and_gradients():
    net = ScoreNet(3, hidden=32, depth=2, data_std=2.0)
    x = torch.randn(5, 3)
    out = net(x, 2.5)
    assert out.shape == x.shape
    torch.testing.assert_close(net(x, torch.full((5,), 2.5)), out)
    torch.testing.assert_close(net(x, torch.tensor(2.5)), out)
    per = net(x, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]))
    assert float((per - out).detach().abs().max()) > 1e-6
    net(x, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])).square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="positive"):
        net(x, -1.0)


# ---- losses ------------------------------------------------------------------------
def test_ddpm_loss_is_zero_for_the_oracle_and_positive_otherwise():
    """A model that knows x0 recovers eps exactly from (x_t, t): checks that x_t, the noise
    target and the per-sample t fed to the model all agree with q_sample's schedule."""
    sched = dk.NoiseSchedule.linear(200)
    x0 = torch.randn(16, 1, 4, 4)
    ab = sched.alphas_cumprod.double()

    def oracle(x_t, t):
        a = ab[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    g = torch.Generator().manual_seed(0)
    assert float(ddpm_loss(oracle, x0, schedule=sched, generator=g)) < 1e-6
    wrong = float(ddpm_loss(lambda x_t, t: torch.randn_like(x_t), x0, schedule=sched, generator=g))
    assert wrong > 1.5


def test_dsm_loss_matches_its_closed_form_for_gaussian_data():
    """For data N(0, v I) the exact perturbed score is -x/(v + sigma^2) and the minimum of
    0.5 E|sigma s + z|^2 is 0.5 D v/(v + sigma^2) per sample."""
    v, D, sigma = 2.0, 3, 1.5
    x = math.sqrt(v) * torch.randn(200000, D, dtype=torch.float64)

    def exact(x_, s):
        return -x_ / (v + torch.as_tensor(s, dtype=x_.dtype).reshape(-1, 1) ** 2)

    g = torch.Generator().manual_seed(1)
    loss = float(dsm_loss(exact, x, sigma, generator=g))
    assert loss == pytest.approx(0.5 * D * v / (v + sigma**2), rel=0.02)
    worse = float(dsm_loss(lambda x_, s: 1.3 * exact(x_, s), x, sigma, generator=g))
    assert worse > loss * 1.02


def test_geometric_sigmas():
    s = geometric_sigmas(20.0, 1.0, 10)
    assert s[0] == pytest.approx(20.0) and s[-1] == pytest.approx(1.0)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))


# ---- EMA -----------------------------------------------------------------------------
def test_ema_update_rule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    p0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for e, a, b in zip(ema.model.parameters(), p0, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * a + 0.1 * b)
    assert not any(p.requires_grad for p in ema.model.parameters())
    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)
    warm.update(model)
    assert warm.current_decay() == pytest.approx(2 / 11)


# ---- checkpoints and resume ----------------------------------------------------------
def _score_trainer(points, seed=0):
    torch.manual_seed(seed)
    return Trainer(ScoreNet(2, hidden=32, depth=2), DSMLoss(geometric_sigmas(5.0, 0.5, 4)), points, batch_size=64,
                   lr=1e-3, warmup_steps=5, ema_decay=0.9, seed=3)


def _assert_same_state(a: Trainer, b: Trainer):
    assert a.step == b.step
    assert a.loss_history == b.loss_history
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.ema.model.parameters(), b.ema.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoint_resume_is_bitwise_identical(tmp_path):
    points = classic_mixture().sample(512, generator=torch.Generator().manual_seed(0))
    straight = _score_trainer(points)
    straight.fit(20, progress=False)

    first = _score_trainer(points)
    first.fit(10, progress=False, checkpoint_path=tmp_path / "ckpt.pt")
    resumed = _score_trainer(points, seed=99)  # different init: everything must come from the file
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.step == 10 and len(resumed.loss_history) == 10
    resumed.fit(20, progress=False)
    _assert_same_state(straight, resumed)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == straight.optimizer.state_dict()["state"][0]["step"]
    assert not list(tmp_path.glob("*.tmp"))


def test_train_ddpm_resume_and_load_model(tmp_path):
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    kw = dict(batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, seed=1, progress=False)
    torch.manual_seed(0)
    straight = train_ddpm(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=6, **kw)
    torch.manual_seed(0)
    path = tmp_path / "unet.pt"
    train_ddpm(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=3, checkpoint_path=path, **kw)
    torch.manual_seed(0)
    resumed = train_ddpm(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=6, checkpoint_path=path, **kw)
    _assert_same_state(straight, resumed)
    assert len(resumed.loss_history) == 6

    rebuilt = load_model(path)
    for pa, pb in zip(rebuilt.parameters(), resumed.ema.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # The file loads with weights_only=True, i.e. without unpickling arbitrary objects.
    state = torch.load(path, weights_only=True)
    assert state["step"] == 6 and state["model_class"] == "UNet"


def test_class_conditional_training_runs():
    images = torch.rand(30, 1, 8, 8) * 2 - 1
    labels = torch.arange(30) % 3
    torch.manual_seed(0)
    tr = train_ddpm(UNet(1, base_channels=8, num_res_blocks=1, num_classes=3), images, labels=labels, n_steps=3,
                    batch_size=8, progress=False)
    assert len(tr.loss_history) == 3 and all(math.isfinite(v) for v in tr.loss_history)
    assert isinstance(tr.loss_fn, DDPMLoss) and tr.loss_fn.class_dropout == pytest.approx(0.1)


def test_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.randn(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a diffkern checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "mine.pt", {"x": torch.arange(3), "history": [1.5, 2.5], "cfg": {"a": (1, 2)}})
    st = load_checkpoint(tmp_path / "mine.pt")
    assert st["history"] == [1.5, 2.5] and st["cfg"] == {"a": (1, 2)}


def test_training_reduces_the_loss():
    points = classic_mixture().sample(2000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tr = train_score(ScoreNet(2, hidden=64, data_std=4.0), points, 3.0, n_steps=150, batch_size=256, lr=3e-3,
                     progress=False)
    h = torch.tensor(tr.loss_history)
    assert float(h[-20:].mean()) < 0.7 * float(h[:5].mean())


# ---- samplers ------------------------------------------------------------------------
def test_timesteps_match_diffusers_spacings():
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("leading", "trailing", "linspace"):
        sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        for n in (10, 50, 1000):
            sched.set_timesteps(n)
            assert samplers.timesteps(n, 1000, spacing) == sched.timesteps.tolist(), (spacing, n)
    with pytest.raises(ValueError):
        samplers.timesteps(0)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    model = UNet(1, base_channels=8, num_res_blocks=1).eval()
    _randomize_zero_inits(model, seed=3)
    return model


def test_ddim_and_ddpm_samplers_reproducible(tiny_unet):
    sched = dk.NoiseSchedule.linear(40)
    kw = dict(schedule=sched, device="cpu")
    a = samplers.ddim_sample(tiny_unet, (3, 1, 8, 8), n_steps=10, eta=0.5, generator=torch.Generator().manual_seed(1),
                             **kw)
    b = samplers.ddim_sample(tiny_unet, (3, 1, 8, 8), n_steps=10, eta=0.5, generator=torch.Generator().manual_seed(1),
                             **kw)
    c = samplers.ddim_sample(tiny_unet, (3, 1, 8, 8), n_steps=10, eta=0.5, generator=torch.Generator().manual_seed(2),
                             **kw)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    x_T = torch.randn(3, 1, 8, 8)
    d1 = samplers.ddim_sample(tiny_unet, None, n_steps=7, x_T=x_T, spacing="trailing", **kw)
    d2 = samplers.ddim_sample(tiny_unet, None, n_steps=7, x_T=x_T, spacing="trailing", **kw)
    assert torch.equal(d1, d2)  # eta = 0: deterministic given x_T
    p, inter = samplers.ddpm_sample(tiny_unet, (2, 1, 8, 8), generator=torch.Generator().manual_seed(4),
                                    return_intermediates=True, **kw)
    assert len(inter) == 40 and torch.equal(inter[-1], p)


def test_ddim_eta1_all_steps_equals_ddpm(tiny_unet):
    """DDIM with eta = 1 over every timestep (t_prev = t - 1) is DDPM with the posterior
    variance; both loops draw one normal tensor per step, so with the same generator they
    produce the same chain."""
    sched = dk.NoiseSchedule.linear(30)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ddpm = samplers.ddpm_sample(tiny_unet, (4, 1, 8, 8), schedule=sched, generator=g1, device="cpu")
    ddim = samplers.ddim_sample(tiny_unet, (4, 1, 8, 8), n_steps=30, eta=1.0, schedule=sched, generator=g2,
                                device="cpu")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)
    other = samplers.ddim_sample(tiny_unet, (4, 1, 8, 8), n_steps=30, eta=0.0, schedule=sched,
                                 generator=torch.Generator().manual_seed(7), device="cpu")
    assert float((other - ddpm).abs().max()) > 1e-2


def test_score_ascent_and_langevin_on_a_gaussian():
    """Target N(m, v I): ascent converges to m; Langevin's stationary variance is
    v / (1 - alpha / (2 v)) (REFERENCE_SEMANTICS.md)."""
    m, v, alpha = torch.tensor([2.0, -1.0]), 1.5, 0.3

    def score(x, sigma):
        return (m - x) / v

    x0 = torch.randn(20000, 2) * 3
    out, traj = samplers.score_ascent(score, x0[:5], 1.0, n_steps=200, step_size=0.2, return_trajectory=True)
    assert traj.shape == (201, 5, 2)
    torch.testing.assert_close(out, m.expand(5, 2), atol=1e-6, rtol=0)
    x = samplers.langevin(score, x0, 1.0, n_steps=300, step_size=alpha, generator=torch.Generator().manual_seed(0))
    expected = v / (1 - alpha / (2 * v))
    assert float(x.var(0).mean()) == pytest.approx(expected, rel=0.03)
    assert float((x.mean(0) - m).abs().max()) < 0.05


def test_annealed_langevin_wrapper_matches_the_op():
    mix = classic_mixture()
    x0 = uniform_box(200, generator=torch.Generator().manual_seed(0))
    sig = geometric_sigmas(10.0, 1.0, 3)
    ours, traj = samplers.annealed_langevin(mix.score, x0, sig, n_steps_each=5, step_lr=0.1,
                                            generator=torch.Generator().manual_seed(1), return_trajectory=True)
    ref = dk.annealed_langevin(mix.score, x0, sig, n_steps_each=5, step_lr=0.1,
                               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref)
    assert traj.shape == (16, 200, 2) and torch.equal(traj[-1], ours)


# ---- data ----------------------------------------------------------------------------
def test_digits_dataset():
    x, y = load_digits(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and float(x.min()) == -1
    assert set(y.tolist()) == set(range(10))
    tr, _ = load_digits(16, split="train")
    te, _ = load_digits(16, split="test")
    assert tr.shape[0] + te.shape[0] == 1797
    x8, _ = load_digits(8)
    assert x8.shape == (1797, 1, 8, 8)


def test_gaussian_mixture_density_sampling_and_score():
    mix = GaussianMixture([0.3, 0.7], [[1.0, -2.0], [-3.0, 0.5]], [[0.5, 1.0], [1.5, 0.7]], dtype=torch.float64)
    xs = torch.linspace(-12, 10, 441, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    cell = float(xs[1] - xs[0]) ** 2
    assert float(mix.density(grid).sum() * cell) == pytest.approx(1.0, abs=1e-3)
    for sigma in (0.0, 2.0):
        x = torch.randn(50, 2, dtype=torch.float64).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_prob(x, sigma=sigma).sum(), x)
        torch.testing.assert_close(mix.score(x.detach(), sigma), grad)
    s, labels = mix.sample(40000, generator=torch.Generator().manual_seed(0), return_labels=True)
    assert float(labels.double().mean()) == pytest.approx(0.7, abs=0.01)
    expected_mean = (mix.weights[:, None] * mix.means).sum(0)
    torch.testing.assert_close(s.mean(0), expected_mean, atol=0.05, rtol=0)
    with pytest.raises(ValueError):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]])


# ---- metrics -------------------------------------------------------------------------
def test_mode_weights_and_standard_error():
    means = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
    x = torch.cat([means[0] + 0.3 * torch.randn(30, 2), means[1] + 0.3 * torch.randn(10, 2)])
    w, se = mode_weights(x, means)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(se, torch.tensor([math.sqrt(0.75 * 0.25 / 40)] * 2, dtype=torch.float64))


def test_frechet_distance_closed_form():
    mu1, mu2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 2.0, 1.0])
    c1, c2 = torch.diag(torch.tensor([1.0, 4.0, 0.25])), torch.diag(torch.tensor([2.25, 1.0, 1.0]))
    expected = float(((mu1 - mu2) ** 2).sum() + ((c1.diagonal().sqrt() - c2.diagonal().sqrt()) ** 2).sum())
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    a = torch.randn(5, 5, dtype=torch.float64)
    c = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64)
    assert frechet_distance(mu1.new_ones(5), c, mu1.new_ones(5), c) == pytest.approx(0.0, abs=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = torch.randn(5, 5, dtype=torch.float64)
    d = b @ b.T + 0.1 * torch.eye(5, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm((c @ d).numpy()).real
    ref = float(torch.trace(c) + torch.trace(d) - 2 * float(covmean.trace()))
    assert frechet_distance(torch.zeros(5) + 1, c, torch.zeros(5) + 1, d) == pytest.approx(ref, rel=1e-6)


def test_sliced_wasserstein_of_a_shift():
    """SW2 between a sample and its copy shifted by d is |d| / sqrt(D) (2-D: |d|/sqrt 2)."""
    x = torch.randn(3000, 2)
    d = torch.tensor([3.0, 4.0])
    sw = sliced_wasserstein(x, x + d, n_projections=4000, generator=torch.Generator().manual_seed(0))
    assert sw == pytest.approx(5.0 / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein(x, x[:1500], generator=torch.Generator().manual_seed(0)) < 0.2


@pytest.mark.parametrize("metric", ["sliced_wasserstein", "mmd"])
def test_point_metric_calibration(metric):
    mix = classic_mixture()

    def true_sample(n, generator):
        return mix.sample(n, generator=generator)

    if metric == "mmd":
        def fn(a, b):
            return mmd_rbf(a, b)
    else:
        def fn(a, b):
            return sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(0)
    cal = calibrate(fn, true_sample, 800, repeats=10, generator=g)
    assert cal.null_values.shape == (10,) and cal.threshold > 0
    fresh = torch.Generator().manual_seed(123)
    assert cal.passes(fn(true_sample(800, fresh), true_sample(800, fresh)))
    # A sample with the wrong weights (0.5 / 0.5) fails, and so does a shifted one. (Two true
    # samples of 800 differ by ~1 in SW2 already: the split between the far-apart modes fluctuates.)
    wrong = GaussianMixture([0.5, 0.5], mix.means, 1.0).sample(800, generator=fresh)
    assert not cal.passes(fn(wrong, true_sample(800, fresh)))
    assert not cal.passes(fn(true_sample(800, fresh) + torch.tensor([2.5, 2.5]), true_sample(800, fresh)))


def test_image_quality_and_classifier_cache(tmp_path, monkeypatch):
    x, y = load_digits(8)
    train_x, train_y, test_x = x[:1200], y[:1200], x[1200:]
    clf = load_or_train_classifier(train_x, train_y, cache_dir=tmp_path, epochs=3)
    files = list(tmp_path.glob("classifier-*.pt"))
    assert len(files) == 1

    import diffkern.metrics.classifier as C

    def fail(*a, **k):
        raise AssertionError("should have loaded the cached classifier")

    monkeypatch.setattr(C, "train_classifier", fail)
    again = load_or_train_classifier(train_x, train_y, cache_dir=tmp_path, epochs=3)
    for pa, pb in zip(clf.parameters(), again.parameters(), strict=True):
        assert torch.equal(pa, pb)

    q = ImageQuality(again, train_x)
    fd_real = q.frechet_distance(test_x)
    fd_noise = q.frechet_distance(torch.rand_like(test_x) * 2 - 1)
    fd_blur = q.frechet_distance(torch.nn.functional.avg_pool2d(test_x, 3, 1, 1, count_include_pad=False))
    assert fd_real < fd_blur < fd_noise and fd_noise > 10 * fd_real
    ent_real, ent_noise = q.label_entropy(test_x), q.label_entropy(torch.rand_like(test_x) * 2 - 1)
    assert ent_real["marginal"] > 2.0  # all ten classes present (max ln 10 = 2.30)
    assert ent_noise["marginal"] < ent_real["marginal"]
    mu, cov = gaussian_statistics(q.features(test_x))
    assert mu.shape == (64,) and cov.shape == (64, 64)

    # Calibrated on pairs of disjoint real subsets: a fresh real pair passes, shifted digits fail.
    def real(n, generator):
        return x[torch.randperm(x.shape[0], generator=generator)[:n]]

    def fd(a, b):
        return frechet_distance(*gaussian_statistics(q.features(a)), *gaussian_statistics(q.features(b)))

    cal = calibrate(fd, real, 300, repeats=8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(9)
    assert cal.passes(fd(real(300, g), real(300, g)))
    assert not cal.passes(fd(torch.roll(real(300, g), shifts=2, dims=-1), real(300, g)))
