"""Mixup applied on device, identically to every model's view of the batch.

Function matching needs teacher and student to see *the same* mixed image, so one
coefficient draw and one partner (`roll(x, 1)` along the batch) serve all views.
"""
from typing import Mapping

import jax
import jax.numpy as jnp


def mixup_coefficients(rng: jax.Array, batch_size: int, p: float,
                       per_example: bool) -> jax.Array:
  """Mixing weights `a` for each example, shape [B].

  per_example=False (big_vision parity): one `a ~ Beta(p, p)` for the whole
  global batch, folded to `max(a, 1 - a)` so the original image dominates.
  per_example=True: `a ~ Uniform[0, 1]` drawn independently per example.
  """
  if per_example:
    return jax.random.uniform(rng, (batch_size,))
  a = jax.random.beta(rng, p, p)
  a = jnp.maximum(a, 1.0 - a)
  return jnp.full((batch_size,), a)


def mix(x: jax.Array, a: jax.Array) -> jax.Array:
  """`a * x + (1 - a) * roll(x, 1)` along the batch axis, `a` of shape [B]."""
  a = a.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return a * x + (1 - a) * jnp.roll(x, 1, axis=0)


def mixup_views(rng: jax.Array, views: Mapping[str, jax.Array], p: float,
                per_example: bool) -> tuple[dict[str, jax.Array], jax.Array]:
  """Mixes every view with the same coefficients and partners.

  Returns the mixed views and the coefficients (to mix labels the same way).
  """
  batch_size = next(iter(views.values())).shape[0]
  a = mixup_coefficients(rng, batch_size, p, per_example)
  return {name: mix(x, a) for name, x in views.items()}, a
