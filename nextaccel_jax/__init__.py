"""nextaccel_jax: next-acceleration-scale prediction for autoregressive MRI reconstruction."""

__version__ = "0.1.0"
