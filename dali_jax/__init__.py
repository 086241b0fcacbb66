"""dali_jax: DALI (Dynamics-Aligned Latent Imagination) on a DreamerV3 core, in JAX/Flax."""

__version__ = "0.1.0"
