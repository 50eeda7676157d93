"""Triton kernels of fastvae, installed as ``fastvae.kernels``. Only ``@triton.jit`` code lives here; the
launches, autograd and dispatch are in ``fastvae._triton``."""
