"""Drop-in diffusers schedulers that run diffkern's fused kernels.

Swap one line in a pipeline::

    from diffkern.integrations.diffusers import FusedDDIMScheduler
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

Each ``Fused*`` class subclasses the stock diffusers scheduler with the same config and
constructor, so ``from_config`` / ``from_pretrained`` / ``save_config`` / ``compatibles``
/ ``set_timesteps`` / ``scale_model_input`` behave as the stock class, and ``step`` /
``add_noise`` return the stock results (same output classes) computed by one fused pass:

- float32: within 1e-5 relative of stock over whole loops (at small t, where stock's own
  float32 rounding is larger, no further from a float64 run of stock than stock is);
- float16 / bfloat16 storage is computed in float32 (stock rounds each ``scalar *
  model_output`` product to the model dtype first), so compare with a float32 run;
- ``timestep`` may be a (B,) tensor (one timestep per sample); the result equals B
  separate calls (stock refuses);
- no host synchronisation per step once ``set_timesteps`` has run: the step index and
  every coefficient table are device tensors prepared there;
- same seed, same image: whenever stock draws noise (from a generator, a list of them,
  or torch's global RNG), the fused step draws the same numbers with stock's own
  ``randn_tensor`` call (same shape, dtype, device, generator, order) and takes them as
  an operand. Every stochastic ``step`` also takes ``variance_noise=`` (the exact noise).
  Opt-in, and left out of the saved config: ``dk_noise="kernel"`` draws in the fused
  step (Philox, see :mod:`diffkern._rng`; other numbers than stock's, no separate
  ``randn`` pass) and ``dk_noise="keyed", dk_seeds=...`` keys each sample's noise by its
  seed (batch-invariant), as constructor or ``from_config`` arguments or through
  ``set_noise_mode``;
- a config option whose stock result a fused step cannot reproduce raises
  ``NotImplementedError`` naming it when the scheduler is created (or at
  ``set_timesteps`` / ``step`` when it depends on their arguments), never a silently
  different result.

``save_config`` writes the stock class name, so a saved scheduler loads without diffkern.
"""

try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by monkeypatching sys.modules
    raise ImportError(
        "diffkern.integrations.diffusers needs the diffusers package: pip install diffkern[diffusers] "
        f"(or pip install diffusers) ({e})") from e

from .cogvideox import FusedCogVideoXDDIMScheduler
from .ddim import FusedDDIMScheduler
from .ddpm import FusedDDPMScheduler
from .deis import FusedDEISMultistepScheduler
from .dpm import FusedDPMSolverMultistepScheduler
from .dpm_more import (
    FusedCogVideoXDPMScheduler,
    FusedDPMSolverMultistepInverseScheduler,
    FusedEDMDPMSolverMultistepScheduler,
)
from .dpm_single import FusedDPMSolverSinglestepScheduler
from .edm import FusedEDMEulerScheduler
from .euler import FusedEulerAncestralDiscreteScheduler, FusedEulerDiscreteScheduler
from .flow import FusedFlowMatchEulerDiscreteScheduler
from .flow_heun import FusedFlowMatchHeunDiscreteScheduler
from .heun import FusedHeunDiscreteScheduler
from .inverse import FusedDDIMInverseScheduler
from .ipndm import FusedIPNDMScheduler
from .kdpm2 import FusedKDPM2AncestralDiscreteScheduler, FusedKDPM2DiscreteScheduler
from .lcm import FusedLCMScheduler
from .lms import FusedLMSDiscreteScheduler
from .pndm import FusedPNDMScheduler
from .sasolver import FusedSASolverScheduler
from .tcd import FusedTCDScheduler
from .unipc import FusedUniPCMultistepScheduler

__all__ = ["FusedDDIMScheduler", "FusedDDPMScheduler", "FusedEulerDiscreteScheduler",
           "FusedEulerAncestralDiscreteScheduler", "FusedHeunDiscreteScheduler", "FusedDPMSolverMultistepScheduler",
           "FusedFlowMatchEulerDiscreteScheduler", "FusedLCMScheduler",
           "FusedUniPCMultistepScheduler", "FusedPNDMScheduler",
           "FusedCogVideoXDDIMScheduler", "FusedCogVideoXDPMScheduler",
           "FusedDPMSolverMultistepInverseScheduler", "FusedEDMDPMSolverMultistepScheduler",
           "FusedEDMEulerScheduler", "FusedDDIMInverseScheduler",
           "FusedTCDScheduler", "FusedIPNDMScheduler",
           "FusedFlowMatchHeunDiscreteScheduler", "FusedDPMSolverSinglestepScheduler",
           "FusedLMSDiscreteScheduler", "FusedKDPM2DiscreteScheduler", "FusedKDPM2AncestralDiscreteScheduler",
           "FusedDEISMultistepScheduler", "FusedSASolverScheduler"]
