"""KL divergence estimators and the adaptive KL controller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ppo_jax.masking import check_same_shape, check_value, concrete, float_dtype

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp_BxT: ArrayLike, ref_logp_BxT: ArrayLike, *, kind: str = "k1") -> jax.Array:
  """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

  For y drawn from π itself (not from a top-k/top-p filtered π), with ``d = log π(y) −
  log π_ref(y)`` (Schulman 2020, "Approximating KL divergence",
  http://joschu.net/blog/kl-approx.html):

  - ``"k1"``: ``d``, unbiased, high variance, can be negative;
  - ``"k2"``: ``d²/2``, biased, low variance, ≥ 0;
  - ``"k3"``: ``e^{−d} − 1 + d``, unbiased, low variance, ≥ 0.

  Args:
    logp_BxT: log-probabilities of the sampled tokens under the policy, ``[B, T]``.
    ref_logp_BxT: the same tokens under the reference policy, ``[B, T]``.
    kind: ``"k1"``, ``"k2"`` or ``"k3"``.

  This function takes no mask: an ``inf`` log-probability gives an ``inf`` or NaN estimate (k3 of
  a policy log-probability of −inf is ``inf − inf``), which a masked reduction (``masked_mean``)
  keeps out of the value but, for k2 and k3, not out of the gradient; select the inputs with
  ``jnp.where`` first when masked positions may hold one.

  Returns:
    ``[B, T]`` per-token estimates (mask them before reducing).

  >>> [round(float(kl_estimate(jnp.log(0.5), jnp.log(0.25), kind=k)), 4) for k in KL_KINDS]
  [0.6931, 0.2402, 0.1931]
  """
  if kind not in KL_KINDS:
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
  check_same_shape(logp=logp_BxT, ref_logp=ref_logp_BxT)
  dtype = float_dtype(logp_BxT, ref_logp_BxT)
  d = jnp.asarray(logp_BxT, dtype) - jnp.asarray(ref_logp_BxT, dtype)
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  return jnp.expm1(-d) + d


def adaptive_kl_update(
  kl_coef: ArrayLike, observed_kl: ArrayLike, n_steps: ArrayLike, *, target: float, horizon: float
) -> jax.Array:
  """One step of the adaptive KL controller of Ziegler et al. 2019.

  ``e = clip(KL / KL_target − 1, −0.2, 0.2)``, ``β ← β · (1 + e · n_steps / horizon)``
  ("Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593, §2.2).
  The coefficient rises while the observed KL is above the target and falls while it is below.

  Args:
    kl_coef: current coefficient β (scalar).
    observed_kl: the KL measured on the last rollout batch, per sequence (scalar).
    n_steps: number of samples (episodes) since the last update.
    target: the KL the controller aims for, > 0.
    horizon: how many samples a full ±20 % correction takes; > 0.2 · n_steps, or a KL below the
      target would make β zero or negative (refused when both have values now, not traced).

  Returns:
    The new coefficient, a scalar float32 array.

  >>> round(float(adaptive_kl_update(0.1, 12.0, 256, target=6.0, horizon=10000)), 6)
  0.100512
  """
  check_value("target KL", target, lambda t: t > 0, "> 0", required=True)
  check_value("horizon", horizon, lambda h: h > 0, "> 0", required=True)
  for name, value in (("kl_coef", kl_coef), ("observed_kl", observed_kl)):
    if jnp.ndim(value):  # per-sequence KLs gave a β per sequence (vmap over a sweep instead)
      raise ValueError(
        f"{name} must be a scalar (observed_kl: the batch's mean KL per sequence), got shape "
        f"{list(jnp.shape(value))}"
      )
  n, h = concrete(n_steps), concrete(horizon)
  if n is not None and h is not None and np.any(0.2 * n >= h):
    # the factor 1 + e·n/H must stay > 0 for e down to −0.2
    n, h = n.max().item(), h.min().item()
    raise ValueError(
      f"horizon {h:g} must exceed 0.2 × n_steps ({0.2 * n:g}): below the target "
      f"KL the coefficient would be multiplied by 1 − 0.2·{n:g}/{h:g} ≤ 0"
    )
  dtype = float_dtype(kl_coef, observed_kl)
  error = jnp.clip(jnp.asarray(observed_kl, dtype) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(kl_coef, dtype) * (1.0 + error * jnp.asarray(n_steps, dtype) / horizon)
