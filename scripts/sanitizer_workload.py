"""A small run of every CUDA op for compute-sanitizer (scripts/gpu_check.sh): vector and
strided paths, misaligned views, noise drawn and given, per-sample scalars, backward, the
fused GMM loop, and the sampler-family ops of /work/wt/CONTRACT.md where this build has
them. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: torch's caching allocator carves
tensors out of larger blocks, so an out-of-bounds access would land inside a block and
memcheck could not see it. Prints one line per op family it ran, and which it skipped."""

import os
import sys

import torch

import diffkern as dk

# DIFFKERN_WORKLOAD_DEVICE=cpu: a dry run of the same calls on a machine without a GPU
# (the reference serves where the extension is not built), to catch API drift before
# spending GPU time.
dev = os.environ.get("DIFFKERN_WORKLOAD_DEVICE", "cuda")
# DIFFKERN_WORKLOAD_DTYPES=float32: fewer kernel instantiations (racecheck looks at shared
# memory, whose use does not change with the dtype; every distinct kernel costs the
# sanitizer a patching pass).
DTYPES = [getattr(torch, d) for d in os.environ.get("DIFFKERN_WORKLOAD_DTYPES",
                                                    "float32,bfloat16,float16,float64").split(",")]
if dev == "cuda" and not dk.native_available("cuda"):
    sys.exit(f"diffkern has no CUDA kernels here: {dk.native_error()}")
g = torch.Generator(device=dev).manual_seed(0)
ran, skipped = [], []


def views(dtype):
    """(x, m) pairs: contiguous (16-byte vector path), transposed (strided), sliced by one
    element (misaligned: scalar path), broadcast model output."""
    x = torch.randn(3, 5, 17, device=dev, dtype=dtype)
    m = torch.randn(3, 5, 17, device=dev, dtype=dtype)
    return ((x, m), (x.transpose(1, 2), m.transpose(1, 2)), (x[:, :, 1:], m[:, :, 1:]),
            (x, m[:1].expand_as(x)))


for dtype in DTYPES:
    t = torch.tensor([900, 300, 2], device=dev)
    for xx, mm in views(dtype):
        dk.ddim_step(xx, mm, t, 0.5, generator=g, clip_sample=1.0)
        dk.ddim_step(xx, mm, t, 0.0, prediction_type="v_prediction")
        dk.ddpm_step(xx, mm, t, generator=g)
        dk.ddpm_step(xx, mm, t, noise=torch.randn_like(xx))
        dk.q_sample(xx, t, generator=g)
        dk.langevin_step(xx, mm, 0.01, generator=g)
    x, m = views(dtype)[0]
    xr = x.clone().requires_grad_()
    dk.ddim_step(xr, m, t, 0.5, noise=torch.randn_like(x)).sum().backward()
ran.append("ddim/ddpm/q_sample/langevin (+backward)")

pts = torch.rand(1000, 2, device=dev) * 16 - 8
w = torch.tensor([0.8, 0.2], device=dev)
mu = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], device=dev)
dk.gmm_annealed_langevin(pts, w, mu, torch.ones(2, device=dev), [10.0, 3.0, 1.0], n_steps_each=3, step_lr=0.1,
                         denoise=True, generator=g)
dk.gmm_annealed_langevin(pts[:999].double(), w, mu, torch.ones(2, 2, device=dev), [5.0, 1.0], n_steps_each=2,
                         step_lr=0.1, generator=g)
ran.append("gmm_annealed_langevin")


# The sampler families (CONTRACT.md), called as the contract fixes them, when present.
def sigma_pair(x):
    b = x.shape[0]
    s = torch.tensor([14.6, 3.0, 0.7], device=dev)[:b]
    return s, s * 0.6


def family(name, calls):
    fn = getattr(dk, name, None)
    if fn is None:
        skipped.append(name)
        return
    for dtype in DTYPES:
        for xx, mm in views(dtype):
            s, sn = sigma_pair(xx)
            for call in calls:
                call(fn, xx, mm, s, sn)
    ran.append(name)


family("euler_step", [
    lambda f, x, m, s, sn: f(x, m, s, sn),
    lambda f, x, m, s, sn: f(x, m, 2.0, 1.5, eta=1.0, generator=g),
    lambda f, x, m, s, sn: f(x, m, s, sn, gamma=0.3, prediction_type="epsilon", generator=g),
    lambda f, x, m, s, sn: f(x, m, 1.0, 0.0, eta=1.0, generator=g),
])
family("heun_step", [
    lambda f, x, m, s, sn: f(x, m, x * 0.9, m * 1.1, s, sn),
    lambda f, x, m, s, sn: f(x, m, x * 0.9, m * 1.1, s, sn, prediction_type="v_prediction"),
])
family("dpmpp_2m_step", [
    lambda f, x, m, s, sn: f(x, m, None, s, sn),
    lambda f, x, m, s, sn: f(x, m, m * 0.9, s, sn, s * 1.5),
    lambda f, x, m, s, sn: f(x, m, m * 0.9, s, sn, s * 1.5, solver_type="heun", variance_preserving=True,
                             prediction_type="epsilon", return_denoised=True),
    lambda f, x, m, s, sn: f(x, m, m * 0.9, 1.0, 0.0, 2.0),
])
family("flow_step", [
    lambda f, x, m, s, sn: f(x, m, 0.8, 0.6),
    lambda f, x, m, s, sn: f(x, m, s / 15, sn / 15, stochastic=True, generator=g),
])
family("flow_q_sample", [
    lambda f, x, m, s, sn: f(x, s / 15, generator=g),
    lambda f, x, m, s, sn: f(x, 0.3, torch.randn_like(x)),
])
family("lcm_step", [
    lambda f, x, m, s, sn: f(x, m, torch.tensor([999, 500, 259], device=dev)[:x.shape[0]],
                             torch.tensor([759, 259, -1], device=dev)[:x.shape[0]], generator=g),
    lambda f, x, m, s, sn: f(x, m, 499, 259, prediction_type="v_prediction", clip_sample=1.0, generator=g,
                             return_denoised=True),
])

if dev == "cuda":
    torch.cuda.synchronize()
print("ran:", "; ".join(ran))
if skipped:
    print("not in this build (skipped):", ", ".join(skipped))
print("sanitizer workload finished")
