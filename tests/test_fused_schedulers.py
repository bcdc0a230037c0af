"""diffkern.integrations.diffusers: each Fused* scheduler against its stock diffusers class.

Loops of 20 steps on random model outputs with the same noise (the fused step gets
``variance_noise=``, stock's ``randn_tensor`` is made to return the same tensor). Per step,
``prev_sample`` and ``pred_original_sample`` must be within 1e-5 relative (max|a-b|/max|b|)
of stock float32, or -- where stock's own float32 rounding is larger (small t) -- no further
from a float64 run of stock (its tables upcast) than stock float32 is.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys

import pytest
import torch
from conftest import NATIVE, PREDICTION_TYPES, gen, max_rel_err
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from diffkern.integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402

TOL = 1e-5
SHAPE = (2, 3, 8, 8)
SPACINGS = ("leading", "linspace", "trailing")


# ---- harness ----------------------------------------------------------------------------
def upcast(sched):
    """The same scheduler computing in float64: every float32 tensor it holds, upcast."""
    s = copy.deepcopy(sched)
    for k, v in list(vars(s).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(s, k, v.double())
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod, dtype=torch.float64)
    return s


class NoiseBox:
    """Stock's randn_tensor replaced by "the tensor the test drew", cast as stock asks."""

    def __init__(self, monkeypatch, stock_cls):
        self.z = None
        self.calls = 0
        monkeypatch.setattr(sys.modules[stock_cls.__module__], "randn_tensor", self._randn, raising=False)

    def _randn(self, shape, generator=None, device=None, dtype=None, **kw):
        assert tuple(shape) == tuple(self.z.shape)
        self.calls += 1
        return self.z.to(dtype=dtype)


def rand(g, shape=SHAPE, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def check_close(got, stock32, stock64, what):
    """1e-5 of stock float32, or no further from stock float64 than stock float32 is."""
    e32 = max_rel_err(got, stock32)
    if e32 <= TOL:
        return e32
    e_f, e_s = max_rel_err(got, stock64), max_rel_err(stock32, stock64)
    assert e_f <= e_s, f"{what}: {e32:.3g} from stock f32, {e_f:.3g} from stock f64 (stock f32: {e_s:.3g})"
    return e32


def run_loops(monkeypatch, stock_cls, fused_cls, config, n_steps=20, *, set_kw=None, step_kw=None,
              seed=0, m_scale=1.0, shape=SHAPE, check_x0=True):
    """Stock and fused loops side by side on the same model outputs and noise.

    Two fused schedulers run: one on its own chain (whose ``prev_sample`` is compared with
    stock's chain), one fed stock's chain (every output compared with stock's step from
    the same input: a predicted x0 at large t amplifies the chains' rounding
    differences by 1/sqrt(alphas_cumprod), which says nothing about the step). The float64
    oracle runs both ways too. Returns the number of noise draws stock made."""
    set_kw, step_kw = set_kw or {}, step_kw or {}
    stock = stock_cls(**config)
    stock.set_timesteps(n_steps, **set_kw)
    s64, s64_tf = upcast(stock), upcast(stock)
    fused, fused_tf = fused_cls.from_config(stock.config), fused_cls.from_config(stock.config)
    for f in (fused, fused_tf):
        f.set_timesteps(n_steps, **set_kw)
        assert torch.equal(stock.timesteps, f.timesteps)
    box = NoiseBox(monkeypatch, stock_cls)
    g = gen(seed)
    x64 = rand(g, shape) * float(stock.init_noise_sigma)
    xs, xf = x64.float(), x64.float()
    takes_noise = "variance_noise" in inspect.signature(stock_cls.step).parameters

    def kw_for(z):
        return dict(step_kw, variance_noise=z) if takes_noise else step_kw

    for i, (t, tf, tf2) in enumerate(zip(stock.timesteps, fused.timesteps, fused_tf.timesteps, strict=True)):
        m64, z64 = rand(g, shape, m_scale), rand(g, shape)
        m, z = m64.float(), z64.float()
        box.z = z64
        ms = stock.scale_model_input(xs, t)
        check_close(fused_tf.scale_model_input(xs, tf2), ms, s64_tf.scale_model_input(xs.double(), t), f"scale {i}")
        fused.scale_model_input(xf, tf)
        s64.scale_model_input(x64, t)
        out_s = stock.step(m, t, xs, **kw_for(z))
        out_64 = s64.step(m64, t, x64, **kw_for(z64))
        out_64tf = s64_tf.step(m.double(), t, xs.double(), **kw_for(z.double()))
        out_tf = fused_tf.step(m, tf2, xs, variance_noise=z, **step_kw)
        out_f = fused.step(m, tf, xf, variance_noise=z, **step_kw)
        assert type(out_f) is type(out_s)
        assert out_64.prev_sample.dtype == torch.float64
        for name in ("prev_sample", "pred_original_sample", "denoised"):
            a = getattr(out_s, name, None)
            if a is None or (name == "pred_original_sample" and not check_x0):
                continue
            b = getattr(out_tf, name)
            assert b.dtype == a.dtype and b.shape == a.shape, name
            check_close(b, a, getattr(out_64tf, name), f"{name} step {i} (t={t})")
        check_close(out_f.prev_sample, out_s.prev_sample, out_64.prev_sample, f"chain after step {i} (t={t})")
        xs, xf, x64 = out_s.prev_sample, out_f.prev_sample, out_64.prev_sample
    return box.calls // 3


# ---- DDIM -----------------------------------------------------------------------------
DDIM_OPTIONS = [
    dict(clip_sample=False),
    dict(set_alpha_to_one=False),
    dict(steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample_range=1.5),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_matches_stock(monkeypatch, prediction_type, spacing, eta):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing)
    m_scale = 1.5 if prediction_type == "sample" else 1.0
    draws = run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=eta), m_scale=m_scale)
    assert draws == 0  # stock DDIM took the variance_noise given


@pytest.mark.parametrize("options", DDIM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_options_match_stock(monkeypatch, prediction_type, options):
    cfg = dict(options, prediction_type=prediction_type, timestep_spacing="linspace")
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=0.7),
              m_scale=1.5 if prediction_type == "sample" else 1.0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_zero_terminal_snr_trailing(monkeypatch, prediction_type):
    cfg = dict(prediction_type=prediction_type, timestep_spacing="trailing", rescale_betas_zero_snr=True,
               beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, n_steps=25, step_kw=dict(eta=0.0))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_use_clipped_model_output(monkeypatch, prediction_type):
    cfg = dict(prediction_type=prediction_type, clip_sample=True, clip_sample_range=0.8)
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=0.5, use_clipped_model_output=True),
              m_scale=2.0, check_x0=prediction_type != "epsilon")  # see test_clipped_x0_at_large_t


# ---- DDPM -----------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_loop_matches_stock(monkeypatch, prediction_type, spacing, variance_type):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, variance_type=variance_type)
    draws = run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, cfg,
                      m_scale=1.5 if prediction_type == "sample" else 1.0)
    assert draws == 20 - (spacing != "trailing")  # no draw at t = 0 (trailing never reaches it)


@pytest.mark.parametrize("options", [dict(clip_sample=False), dict(steps_offset=1), dict(clip_sample_range=0.7),
                                     dict(beta_schedule="sigmoid"), dict(thresholding=True, sample_max_value=1.5),
                                     dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ddpm_options_match_stock(monkeypatch, options):
    clipped_small = options.get("clip_sample_range", 1) < 1 or options.get("thresholding")
    run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, options, m_scale=2.0,
              check_x0=not clipped_small)  # see test_clipped_x0_at_large_t


@pytest.mark.xfail(strict=True, reason=(
    "known: the kernels form an epsilon-prediction x0 as x/sqrt(ab) - (sqrt(1-ab)/sqrt(ab)) m, rounding at "
    "the size of x/sqrt(ab) (~30x |x| at t=850); stock subtracts first. Where most of x0 is clipped to a "
    "small range, max|x0| is small and the fused pred_original_sample is then ~1.2e-5 from stock and up to "
    "2x further from float64 than stock (prev_sample is not affected)"))
def test_clipped_x0_at_large_t(monkeypatch):
    run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, dict(clip_sample_range=0.7), m_scale=2.0)


def test_ddpm_custom_timesteps_and_full_chain(monkeypatch):
    cfg = dict(num_train_timesteps=50)
    stock = DDPMScheduler(**cfg)
    fused = FusedDDPMScheduler(**cfg)
    custom = [45, 30, 29, 12, 3, 0]
    stock.set_timesteps(timesteps=custom)
    fused.set_timesteps(timesteps=custom)
    box = NoiseBox(monkeypatch, DDPMScheduler)
    g = gen(3)
    x = rand(g).float()
    xs, xf = x, x.clone()
    for t in custom:  # Python ints
        m, z = rand(g).float(), rand(g).float()
        box.z = z
        xs = stock.step(m, t, xs).prev_sample
        xf = fused.step(m, t, xf, variance_noise=z).prev_sample
        assert max_rel_err(xf, xs) <= TOL
    # before set_timesteps: t -> t - 1
    stock, fused = DDPMScheduler(**cfg), FusedDDPMScheduler(**cfg)
    m, z = rand(g).float(), rand(g).float()
    box.z = z
    assert max_rel_err(fused.step(m, 17, x, variance_noise=z).prev_sample, stock.step(m, 17, x).prev_sample) <= TOL


# ---- add_noise ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [(DDIMScheduler, FusedDDIMScheduler), (DDPMScheduler, FusedDDPMScheduler)],
                         ids=["ddim", "ddpm"])
def test_add_noise_matches_stock(cls):
    stock_cls, fused_cls = cls
    stock = stock_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    fused = fused_cls.from_config(stock.config)
    g = gen(5)
    x0, z = rand(g, (4, 3, 5, 7)).float(), rand(g, (4, 3, 5, 7)).float()
    for t in (torch.tensor([999, 500, 10, 0]), torch.tensor(321), torch.tensor([7])):
        got = fused.add_noise(x0, z, t)
        assert got.dtype == torch.float32
        assert max_rel_err(got, stock.add_noise(x0, z, t)) <= TOL
    # fp16 samples: coefficients in float32, held to stock float32
    t = torch.tensor([999, 500, 10, 0])
    got = fused.add_noise(x0.half(), z.half(), t)
    assert got.dtype == torch.float16
    assert max_rel_err(got, stock.add_noise(x0.half().float(), z.half().float(), t)) <= 1e-3


# ---- per-sample timesteps, dtypes ---------------------------------------------------------------
FUSED_STEP_CASES = {
    "ddim": (FusedDDIMScheduler, dict(prediction_type="v_prediction"), dict(eta=1.0)),
    "ddpm": (FusedDDPMScheduler, dict(), dict()),
}


@pytest.mark.parametrize("name", list(FUSED_STEP_CASES))
def test_per_sample_timesteps_equal_separate_calls(name):
    cls, cfg, kw = FUSED_STEP_CASES[name]
    sched = cls(**cfg)
    sched.set_timesteps(20)
    g = gen(11)
    x, m, z = (rand(g, (3, 3, 8, 8)).float() for _ in range(3))
    t = sched.timesteps[[0, 9, 19]]
    out = sched.step(m, t, x, variance_noise=z, **kw)
    for b in range(3):
        one = sched.step(m[b:b + 1], t[b], x[b:b + 1], variance_noise=z[b:b + 1], **kw)
        for f in ("prev_sample", "pred_original_sample"):
            assert max_rel_err(getattr(out, f)[b:b + 1], getattr(one, f)) <= 1e-6, (b, f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(FUSED_STEP_CASES))
def test_half_precision_computed_in_float32(monkeypatch, name, dtype):
    cls, cfg, kw = FUSED_STEP_CASES[name]
    stock_cls = cls._dk_stock
    stock, fused = stock_cls(**cfg), cls(**cfg)
    stock.set_timesteps(20)
    fused.set_timesteps(20)
    box = NoiseBox(monkeypatch, stock_cls)
    g = gen(12)
    x, m, z = (rand(g).to(dtype) for _ in range(3))
    box.z = z.float()
    t = fused.timesteps[5]
    ref = stock.step(m.float(), t, x.float(), **(dict(kw, variance_noise=z.float()) if name == "ddim" else kw))
    out = fused.step(m, t, x, variance_noise=z, **kw)
    assert out.prev_sample.dtype == dtype
    tol = 2 * torch.finfo(dtype).eps
    assert max_rel_err(out.prev_sample, ref.prev_sample) <= tol
    # fp16 model output with fp32 latents: fp32 result, as stock
    mixed = fused.step(m, t, x.float(), variance_noise=z.float(), **kw)
    assert mixed.prev_sample.dtype == torch.float32
    assert max_rel_err(mixed.prev_sample, ref.prev_sample) <= TOL


def test_generator_draws_in_kernel():
    """With a generator the noise is diffkern's (same distribution, reproducible by seed)."""
    sched = FusedDDPMScheduler()
    sched.set_timesteps(10)
    x, m = torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32)
    t = sched.timesteps[2]
    a = sched.step(m, t, x, generator=gen(1)).prev_sample
    b = sched.step(m, t, x, generator=gen(1)).prev_sample
    c = sched.step(m, t, x, generator=gen(2)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    ab, abp = sched.alphas_cumprod[int(t)], sched.alphas_cumprod[int(sched.timesteps[3])]
    std = ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    z = a / std
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="variance_noise"):
        sched.step(m, t, x, generator=gen(1), variance_noise=m)
    # a list of generators: stock's randn_tensor, one generator per sample
    gl = [gen(i) for i in range(4)]
    d = sched.step(m, t, x, generator=gl).prev_sample
    expect = torch.cat([torch.randn((1, 3, 32, 32), generator=gen(i)) for i in range(4)]) * std
    assert max_rel_err(d, expect) <= 1e-6


# ---- no host syncs ------------------------------------------------------------------
class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(FUSED_STEP_CASES))
def test_no_host_sync_per_step(name):
    cls, cfg, kw = FUSED_STEP_CASES[name]
    sched = cls(**cfg)
    sched.set_timesteps(10)
    stock = cls._dk_stock(**cfg)
    stock.set_timesteps(10)
    x = torch.randn(SHAPE)
    with CountSyncs() as c:
        for t in sched.timesteps:
            m = torch.randn(SHAPE)
            x = sched.step(m, t, x, generator=gen(0), **kw).prev_sample
        x = sched.step(torch.randn(SHAPE), sched.timesteps[[1, 2]], x, variance_noise=torch.randn(SHAPE),
                       **kw).prev_sample  # (B,) timesteps
        x = sched.add_noise(x, torch.randn(SHAPE), sched.timesteps[[1, 2]])
    assert c.n == 0
    with CountSyncs() as c:  # the counter counts: stock reads its timesteps on the host
        stock.step(torch.randn(SHAPE), stock.timesteps[1], x, **kw)
    assert c.n > 0


# ---- config round trips, errors --------------------------------------------------------
@pytest.mark.parametrize("cls", [FusedDDIMScheduler, FusedDDPMScheduler], ids=lambda c: c.__name__)
def test_config_round_trips(tmp_path, cls):
    stock_cls = cls._dk_stock
    stock = stock_cls(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing")
    fused = cls.from_config(stock.config)
    assert isinstance(fused, stock_cls) and dict(fused.config) | {"_class_name": None} == dict(stock.config) | {
        "_class_name": None}
    back = stock_cls.from_config(fused.config)
    assert type(back) is stock_cls and back.config.prediction_type == "v_prediction"
    assert sorted(c.__name__ for c in fused.compatibles) == sorted(c.__name__ for c in stock.compatibles)
    fused.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == stock_cls.__name__
    loaded = stock_cls.from_pretrained(tmp_path)
    assert type(loaded) is stock_cls and loaded.config.timestep_spacing == "trailing"
    again = cls.from_pretrained(tmp_path)
    assert type(again) is cls and again.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("cls,option,value", [
    (FusedDDIMScheduler, "thresholding", True),
    (FusedDDPMScheduler, "variance_type", "learned_range"),
    (FusedDDPMScheduler, "variance_type", "learned"),
    (FusedDDPMScheduler, "variance_type", "fixed_large_log"),
])
def test_unsupported_options_raise_at_construction(cls, option, value):
    with pytest.raises(NotImplementedError, match=option):
        cls(**{option: value})
    with pytest.raises(NotImplementedError, match=option):
        cls.from_config(cls._dk_stock(**{option: value}).config)


# ---- loops you can compile ---------------------------------------------------------
@pytest.mark.skipif(not NATIVE, reason="compiles the native op")
def test_compiled_loop_body_has_no_graph_breaks():
    sched = FusedDDIMScheduler(prediction_type="v_prediction")
    sched.set_timesteps(10)
    w = torch.randn(3, 3)

    def body(x, t):
        m = torch.einsum("bchw,cd->bdhw", x, w) * 0.1 + t.float() * 1e-3
        return sched.step(m, t, x, return_dict=False)[0]

    compiled = torch.compile(body, fullgraph=True, backend="eager")
    x = torch.randn(SHAPE)
    xe = x.clone()
    for t in sched.timesteps[:3]:
        x = compiled(x, t)
        xe = body(xe, t)
    assert max_rel_err(x, xe) <= 1e-6


# ---- pipelines ----------------------------------------------------------------------
def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()


def test_ddim_pipeline_same_images(monkeypatch, one_thread):
    """Stock f32, stock f64 (unet and scheduler tables upcast) and fused f32 pipelines from
    the same initial noise: the tiny random UNet amplifies rounding (~1e-4 over 20 steps),
    so the fused images must be no further from the f64 ones than stock f32's are."""
    import diffusers.pipelines.ddim.pipeline_ddim as pipe_mod

    unet = tiny_unet()
    z0 = rand(gen(7), (2, 3, 8, 8))
    monkeypatch.setattr(pipe_mod, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: z0.to(dtype))
    stock = DDIMScheduler(prediction_type="epsilon")
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=stock)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return torch.from_numpy(pipe(batch_size=2, num_inference_steps=20, output_type="np").images)

    ref = images()
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    got = images()
    unet.double()
    pipe.scheduler = upcast(stock)
    ref64 = images()
    check_close(got, ref, ref64, "DDIMPipeline images")


def test_ddpm_pipeline_same_images(monkeypatch, one_thread):
    unet = tiny_unet()
    g = gen(1)
    noises = [rand(g, (2, 3, 8, 8)).float() for _ in range(20)]
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    box = NoiseBox(monkeypatch, DDPMScheduler)
    it = iter(noises)

    def draw(shape, generator=None, device=None, dtype=None, **kw):
        return next(it).to(dtype)

    box._randn = draw
    monkeypatch.setattr(sys.modules[DDPMScheduler.__module__], "randn_tensor", draw)
    ref = pipe(batch_size=2, generator=gen(0), num_inference_steps=20, output_type="np").images
    fused = FusedDDPMScheduler.from_config(pipe.scheduler.config)
    it2 = iter(noises)
    step = fused.step
    fused.step = lambda m, t, x, generator=None, **kw: step(m, t, x, variance_noise=next(it2), **kw)
    pipe.scheduler = fused
    got = pipe(batch_size=2, generator=gen(0), num_inference_steps=20, output_type="np").images
    assert max_rel_err(torch.from_numpy(got), torch.from_numpy(ref)) <= TOL


# ---- without diffusers --------------------------------------------------------------
def test_import_without_diffusers(monkeypatch):
    for mod in [m for m in sys.modules if m.startswith("diffkern.integrations.diffusers")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    import diffkern  # noqa: F401
    import diffkern.integrations  # noqa: F401

    with pytest.raises(ImportError, match=r"pip install diffkern\[diffusers\]"):
        import diffkern.integrations.diffusers  # noqa: F401


def test_import_diffkern_does_not_import_diffusers():
    import subprocess

    code = "import sys, diffkern, diffkern.integrations; assert 'diffusers' not in sys.modules"
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
