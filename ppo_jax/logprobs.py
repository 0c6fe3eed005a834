"""Per-token log-probabilities and entropies from logits.

The sampler and the trainer both compute log-probabilities with ``token_logprobs`` at the same
temperature. With ``ppo.recompute_logprobs`` the old log-probs come from a training-style forward
pass, so the PPO ratio ``exp(logp − old_logp)`` is 1 on the first minibatch to float rounding
(the update's program fuses differently: ``policy/approxkl_first_minibatch`` below 1e-13 in fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ppo_jax.masking import check_ids, check_value, float_dtype


def _scaled_logits(logits: ArrayLike, temperature: float) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim < 1:
    raise ValueError(f"expected logits [..., V], got shape {list(logits.shape)}")
  check_value("temperature", temperature, lambda t: t > 0, "> 0", required=True)
  return logits.astype(float_dtype(logits)) / temperature


def token_logprobs(
  logits_BxTxV: ArrayLike, tokens_BxT: ArrayLike, *, temperature: float = 1.0
) -> jax.Array:
  """Log-probability of each token under ``softmax(logits / temperature)``.

  ``log π(yₜ) = zₜ[yₜ] − logsumexp(zₜ)`` with ``zₜ = logitsₜ / τ``, computed in float32 (or
  float64) whatever the logits' dtype. The logits at position ``t`` must already be the ones that
  predict ``tokens[t]`` (for a causal LM: the logits of position ``t − 1`` of the full sequence).
  It takes no mask: NaN or inf logits at masked positions give NaN there, which ``masked_mean``
  keeps out of the value but not out of the gradient; ``jnp.where`` them away first.

  Args:
    logits_BxTxV: unnormalised logits ``[B, T, V]`` (any leading shape ``[..., V]``).
    tokens_BxT: token ids ``[B, T]`` in ``[0, V)``, matching the leading shape of the logits.
    temperature: τ > 0, the sampling temperature.

  Returns:
    ``[B, T]`` log-probabilities.

  >>> logits = jnp.log(jnp.array([[[0.25, 0.75]]]))
  >>> round(float(token_logprobs(logits, jnp.array([[1]]))[0, 0]), 4)
  -0.2877
  """
  z = _scaled_logits(logits_BxTxV, temperature)
  tokens = jnp.asarray(tokens_BxT)
  if tokens.shape != z.shape[:-1]:
    raise ValueError(
      f"tokens shape {list(tokens.shape)} does not match logits shape {list(z.shape)} "
      "(expected tokens [B, T] for logits [B, T, V])"
    )
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
  check_ids(tokens_BxT, z.shape[-1], what="tokens hold ids outside")
  # Under jit (ids unchecked) a negative id gives nan, as one past the vocabulary does, rather than
  # wrapping round to the vocabulary's end.
  ids = jnp.where(tokens < 0, z.shape[-1], tokens).astype(jnp.int32)
  picked = jnp.take_along_axis(z, ids[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits_BxTxV: ArrayLike, *, temperature: float = 1.0) -> jax.Array:
  """Entropy of ``softmax(logits / temperature)`` at each position.

  ``H = −Σᵥ pᵥ log pᵥ = logsumexp(z) − Σᵥ pᵥ zᵥ`` with ``z = logits / τ``, in float32 or wider.
  It takes no mask: NaN logits at masked positions reach the gradient through a masked mean;
  ``jnp.where`` them away first (−inf logits, a filter's, are fine).

  Args:
    logits_BxTxV: unnormalised logits ``[B, T, V]`` (any leading shape).
    temperature: τ > 0.

  Returns:
    ``[B, T]`` entropies in nats.

  >>> round(float(entropy_from_logits(jnp.zeros((1, 1, 4)))[0, 0]), 4)  # log 4
  1.3863
  """
  z = _scaled_logits(logits_BxTxV, temperature)
  # Shifted by the row's largest logit (H does not change): Σ pz then sums numbers near 0, not
  # near the logits, whose ulp (1e-2 at 1e5) would show in the difference.
  top = jnp.max(z, axis=-1, keepdims=True)
  z = z - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  p = jax.nn.softmax(z, axis=-1)
  # Where p = 0 (a logit of −inf, e.g. a filtered vocabulary) the term pᵥzᵥ is 0, not nan; z is
  # replaced there before the product, or its gradient would hold 0 · (−inf).
  kept = p > 0
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(
    jnp.where(kept, p * jnp.where(kept, z, 0.0), 0.0), axis=-1
  )
