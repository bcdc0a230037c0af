"""Integrations with other libraries. Each lives in its own submodule and imports its
library only when that submodule is imported, so ``import diffkern`` never needs them:

- :mod:`diffkern.integrations.diffusers`: drop-in fused versions of the diffusers
  schedulers (``pip install diffkern[diffusers]``).
"""
