"""PPO's clipped policy surrogate and clipped value loss, over masked token batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ppo_jax.kl import kl_estimate
from ppo_jax.masking import (
  aggregate,
  as_bool_mask,
  check_BxT,
  check_value,
  counts,
  float_dtype,
  masked_mean,
)

Metrics = dict[str, jax.Array]


# |log π − log π_old| beyond which policy_loss holds the log-ratio (exp(20) ≈ 4.9e8).
LOG_RATIO_MAX = 20.0


def policy_loss(
  logp_BxT: ArrayLike,
  old_logp_BxT: ArrayLike,
  advantages_BxT: ArrayLike,
  mask_BxT: ArrayLike,
  *,
  clip_eps: float = 0.2,
  clip_eps_high: float | None = None,
  dual_clip: float | None = None,
  agg: str = "token-mean",
) -> tuple[jax.Array, Metrics]:
  """PPO's clipped surrogate policy loss (to minimise).

  Per token, with ``r = exp(log π − log π_old)`` and ``Â`` treated as a constant:

  ``ℓ = max(−Â·r, −Â·clip(r, 1 − ε, 1 + ε_high))``  (Schulman et al. 2017,
  https://arxiv.org/abs/1707.06347; the asymmetric ``ε_high`` is DAPO's clip-higher,
  Yu et al. 2025, https://arxiv.org/abs/2503.14476). With ``dual_clip = c > 1``, tokens with
  ``Â < 0`` take ``min(ℓ, −Â·c)`` so a huge ratio cannot blow up the loss (Ye et al. 2020,
  https://arxiv.org/abs/1912.09729). Tokens are reduced by ``aggregate(ℓ, m, agg=agg)``. The
  log-ratio is held to ``±LOG_RATIO_MAX`` (20: r within [2e-9, 4.9e8]) before the exponential, so
  a token whose ratio leaves that range adds a finite loss and no gradient, never inf or nan.

  Args:
    logp_BxT: log-probabilities of the taken tokens under the current policy ``[B, T]``.
    old_logp_BxT: the same under the policy that sampled them ``[B, T]`` (no gradient).
    advantages_BxT: ``Â`` ``[B, T]`` (no gradient).
    mask_BxT: 1.0 on real response tokens ``[B, T]``.
    clip_eps: ε, the lower clip range.
    clip_eps_high: the upper clip range; ``None`` means ``clip_eps``.
    dual_clip: c > 1 for dual-clip PPO; ``None`` disables it.
    agg: ``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum"``.

  Returns:
    ``(loss, metrics)``. Metrics (token means unless noted): ``clipfrac`` (fraction of tokens
    where the clipped term is the larger), ``approx_kl`` (k3 estimate of KL(π_old ‖ π)),
    ``ratio`` (mean r), ``ratio_max``, ``dual_clipfrac``, ``ratio_clamped`` (fraction of tokens
    whose log-ratio was held to ±``LOG_RATIO_MAX``), and the counts ``num_tokens`` and
    ``num_seqs`` (see ``masking.agg_weight``).

  >>> loss, m = policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([[1.0, -3.0]]),
  ...                       jnp.ones((1, 2)))
  >>> float(loss), float(m["clipfrac"]), float(m["approx_kl"])
  (1.0, 0.0, 0.0)
  """
  check_BxT(logp=logp_BxT, old_logp=old_logp_BxT, advantages=advantages_BxT, mask=mask_BxT)
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  # Checked when given as values; traced ones (a vmapped sweep) go unchecked.
  check_value("clip_eps", eps_low, lambda e: e >= 0, "≥ 0", required=True)
  check_value("clip_eps_high", eps_high, lambda e: e >= 0, "≥ 0")
  check_value("dual_clip", dual_clip, lambda c: c > 1.0, "> 1")
  dtype = float_dtype(logp_BxT, old_logp_BxT, advantages_BxT)
  m = as_bool_mask(mask_BxT)
  old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp_BxT, dtype))
  adv = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(advantages_BxT, dtype)), 0.0)
  # Masked positions get log-ratio 0 before exp, so garbage there cannot overflow into a nan
  # gradient through the where below; real ones are held to ±LOG_RATIO_MAX, so a ratio past it
  # (an old log-prob of −inf, say) passes no gradient rather than inf·0 = nan through the branch
  # the max does not take.
  log_ratio = jnp.where(m, jnp.asarray(logp_BxT, dtype) - old_logp, 0.0)
  clamped = jnp.abs(log_ratio) > LOG_RATIO_MAX  # nan: not clamped, and not hidden either
  log_ratio = jnp.clip(log_ratio, -LOG_RATIO_MAX, LOG_RATIO_MAX)
  ratio = jnp.exp(log_ratio)

  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss_BxT = jnp.maximum(unclipped, clipped)
  clipped_binds = clipped > unclipped
  dual_binds = jnp.zeros_like(m)
  if dual_clip is not None:
    cap = -adv * dual_clip
    dual_binds = (adv < 0) & (cap < loss_BxT)
    loss_BxT = jnp.where(adv < 0, jnp.minimum(loss_BxT, cap), loss_BxT)

  loss = aggregate(loss_BxT, m, agg=agg)
  metrics = {
    "clipfrac": masked_mean(clipped_binds, m),
    "dual_clipfrac": masked_mean(dual_binds, m),
    "ratio_clamped": masked_mean(clamped, m),
    # KL(π_old ‖ π) from samples of π_old: d = log π_old − log π = −log r.
    "approx_kl": masked_mean(kl_estimate(jnp.zeros_like(log_ratio), log_ratio, kind="k3"), m),
    "ratio": masked_mean(ratio, m),
    "ratio_max": jnp.max(jnp.where(m, ratio, 0.0), initial=0.0),  # initial: T = 0 too
    **counts(m),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def value_loss(
  values_BxT: ArrayLike,
  old_values_BxT: ArrayLike,
  returns_BxT: ArrayLike,
  mask_BxT: ArrayLike,
  *,
  clip_eps: float | None = 0.2,
  agg: str = "token-mean",
) -> tuple[jax.Array, Metrics]:
  """PPO's clipped value loss (to minimise).

  Per token, with returns ``R`` and rollout values ``V_old`` treated as constants:

  ``ℓ = ½ · max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)``

  (the value clipping of OpenAI's ``baselines`` PPO2 and ``lm-human-preferences``; see Huang et
  al. 2022, "The 37 implementation details of PPO", detail 9). ``clip_eps=None`` gives the plain
  ``½ (V − R)²``. Tokens are reduced by ``aggregate(ℓ, m, agg=agg)``.

  Args:
    values_BxT: current critic values ``[B, T]``.
    old_values_BxT: values at rollout time ``[B, T]``.
    returns_BxT: GAE returns ``[B, T]``.
    mask_BxT: 1.0 on real response tokens ``[B, T]``.
    clip_eps: ε for the value clip, or ``None``.
    agg: see ``masking.aggregate``.

  Returns:
    ``(loss, metrics)`` with ``clipfrac`` (tokens where the clipped term is the larger),
    ``error`` (mean squared error V − R, unclipped), ``num_tokens`` and ``num_seqs``.

  >>> loss, m = value_loss(jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[3.0]]),
  ...                      jnp.ones((1, 1)))
  >>> round(float(loss), 4), float(m["clipfrac"])  # ½·max(1², (0.2 − 3)²)
  (3.92, 1.0)
  """
  check_BxT(values=values_BxT, old_values=old_values_BxT, returns=returns_BxT, mask=mask_BxT)
  dtype = float_dtype(values_BxT, old_values_BxT, returns_BxT)
  m = as_bool_mask(mask_BxT)
  # Garbage at masked positions is replaced before any arithmetic that could overflow.
  v = jnp.where(m, jnp.asarray(values_BxT, dtype), 0.0)
  v_old = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(old_values_BxT, dtype)), 0.0)
  ret = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(returns_BxT, dtype)), 0.0)

  unclipped = jnp.square(v - ret)
  check_value("clip_eps", clip_eps, lambda e: e >= 0, "≥ 0 (None: no clip)")
  if clip_eps is None:
    sq_BxT = unclipped
    clipped_binds = jnp.zeros_like(m)
  else:
    clipped = jnp.square(jnp.clip(v, v_old - clip_eps, v_old + clip_eps) - ret)
    sq_BxT = jnp.maximum(unclipped, clipped)
    clipped_binds = clipped > unclipped
  loss = aggregate(0.5 * sq_BxT, m, agg=agg)
  metrics = {
    "clipfrac": masked_mean(clipped_binds, m),
    "error": masked_mean(unclipped, m),
    **counts(m),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
