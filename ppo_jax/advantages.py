"""Advantage estimators: GAE for PPO, group baselines for GRPO and RLOO."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ppo_jax.masking import as_bool_mask, check_same_shape, check_value, float_dtype


def gae(
  rewards_BxT: ArrayLike,
  values_BxT: ArrayLike,
  mask_BxT: ArrayLike,
  *,
  gamma: float,
  lam: float,
) -> tuple[jax.Array, jax.Array]:
  """Generalized Advantage Estimation over masked token sequences.

  For ``t = T−1, …, 0`` (one reverse ``lax.scan`` over time):

  ``δₜ = rₜ + γ mₜ₊₁ Vₜ₊₁ − Vₜ``,  ``Âₜ = δₜ + γλ mₜ₊₁ Âₜ₊₁``,  ``Âₜ = 0`` where ``mₜ = 0``,

  with ``m_T = 0``: there is no bootstrap past the last real token, so a response's episode ends
  there (a response cut at ``max_new_tokens`` too: it is scored as it stands). Beware: every
  masked position ends an episode, not only the last, so no credit crosses a hole in a row's
  mask; to mask tokens out of the loss (tool output inside a response, say) but carry credit
  across them, compute GAE on the whole response and mask the loss instead. Returns
  ``Rₜ = (Âₜ + Vₜ)·mₜ``. Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", https://arxiv.org/abs/1506.02438.

  Args:
    rewards_BxT: per-token rewards ``rₜ`` ``[B, T]`` (e.g. −β·KL per token plus the score on the
      last real token), or one sequence's ``[T]`` (then values, mask and results are ``[T]``).
    values_BxT: critic values ``Vₜ`` ``[B, T]``.
    mask_BxT: 1.0 on real response tokens ``[B, T]``; rewards and values elsewhere are ignored.
    gamma: discount γ.
    lam: GAE λ.

  Returns:
    ``(advantages_BxT, returns_BxT)``, both 0 where masked.
  """
  check_same_shape(rewards=rewards_BxT, values=values_BxT, mask=mask_BxT)
  for name, value in (("gamma", gamma), ("lam", lam)):
    check_value(name, value, lambda v: (v >= 0) & (v <= 1), "in [0, 1]", required=True)
  if jnp.ndim(rewards_BxT) == 1:  # one sequence [T] (``jax.vmap`` over rows gives these)
    one = lambda x: jnp.asarray(x)[None]
    adv, ret = gae(one(rewards_BxT), one(values_BxT), one(mask_BxT), gamma=gamma, lam=lam)
    return adv[0], ret[0]
  if jnp.ndim(rewards_BxT) != 2:
    raise ValueError(f"expected rewards [B, T] or [T], got shape {list(jnp.shape(rewards_BxT))}")
  dtype = float_dtype(rewards_BxT, values_BxT)
  m = as_bool_mask(mask_BxT)
  r = jnp.where(m, jnp.asarray(rewards_BxT, dtype), 0.0)
  v = jnp.where(m, jnp.asarray(values_BxT, dtype), 0.0)

  def _body(carry, xs):
    next_value, next_adv = carry  # Vₜ₊₁·mₜ₊₁ and Âₜ₊₁ (already 0 where mₜ₊₁ = 0)
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_value - v_t
    adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0.0)
    return (v_t, adv), adv

  zeros_B = jnp.zeros(r.shape[:1], dtype)
  xs = (r.T, v.T, m.T)  # time-major [T, B]
  _, adv_TxB = jax.lax.scan(_body, (zeros_B, zeros_B), xs, reverse=True)
  advantages = adv_TxB.T
  returns = jnp.where(m, advantages + v, 0.0)
  return advantages, returns


def _groups(scores_N: ArrayLike, group_size: int, *, min_size: int) -> jax.Array:
  scores = jnp.asarray(scores_N)
  if scores.ndim != 1:
    raise ValueError(f"expected scores [N], got shape {list(scores.shape)}")
  try:
    group_size = operator.index(group_size)  # an int, NumPy's too; not a float or a tracer
  except TypeError:
    traced = isinstance(group_size, jax.core.Tracer)
    hint = " (under jit, pass it in static_argnames: it sets the shapes)" if traced else ""
    raise ValueError(f"group_size must be an int ≥ {min_size}, got {group_size!r}{hint}") from None
  if group_size < min_size:
    raise ValueError(f"group_size must be an int ≥ {min_size}, got {group_size!r}")
  if scores.shape[0] % group_size:
    raise ValueError(
      f"{scores.shape[0]} scores do not split into groups of {group_size}; "
      "expected N = prompts × group_size with each prompt's responses consecutive"
    )
  return scores.astype(float_dtype(scores)).reshape(-1, group_size)


def group_advantages(
  scores_N: ArrayLike, group_size: int, *, normalize_std: bool = True, std_scope: str = "group"
) -> jax.Array:
  """GRPO advantages: each score relative to its group of responses to the same prompt.

  ``Âᵢ = (sᵢ − mean_g) / (std_g + 1e-6)`` with the unbiased (n−1) standard deviation of the group
  (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300). ``normalize_std=False``
  gives ``sᵢ − mean_g`` (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783).
  ``std_scope="batch"`` divides by the (unbiased) standard deviation of all N scores instead,
  the group's mean still subtracted (Liu et al. 2025, "Tricks or Traps?",
  https://arxiv.org/abs/2508.08221: a group of near-equal scores is not blown up to ±1; TRL's
  ``scale_rewards="batch"``).

  Args:
    scores_N: one scalar score per response ``[N]``; ``N = prompts × group_size`` and each
      group's responses are consecutive.
    group_size: responses per prompt (≥ 2 when ``normalize_std``).
    normalize_std: divide by a standard deviation.
    std_scope: ``"group"`` (each group's) or ``"batch"`` (all the scores').

  Returns:
    ``[N]`` advantages, broadcast later to every token of the response.

  >>> [round(float(a), 3) for a in group_advantages(jnp.array([1.0, 3.0, 0.0, 0.0]), 2)]
  [-0.707, 0.707, 0.0, 0.0]
  """
  if std_scope not in ("group", "batch"):
    raise ValueError(f"std_scope: unknown {std_scope!r}; expected 'group' or 'batch'")
  g = _groups(scores_N, group_size, min_size=2 if normalize_std else 1)
  centered = _centered(g)
  if normalize_std and std_scope == "batch":
    everything = _centered(g.reshape(1, -1))
    var = jnp.sum(jnp.square(everything)) / max(g.size - 1, 1)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    centered = centered / (std + 1e-6)
  elif normalize_std:
    var = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (group_size - 1)
    # √ at 0 has an infinite derivative: a tied group's gradient was NaN. Its advantages are 0.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    centered = centered / (std + 1e-6)
  return centered.reshape(-1)


def _centered(g_GxK: jax.Array) -> jax.Array:
  """``g − mean(g)`` per row, computed on scores shifted by the row's first one.

  A group of identical scores then gives exactly 0 (the float32 mean of equal values can be off by
  an ulp, which the division by ``std + 1e-6`` would blow up to advantages of ~0.2).
  """
  shifted = g_GxK - g_GxK[:, :1]
  return shifted - shifted.mean(axis=1, keepdims=True)


def rloo_advantages(scores_N: ArrayLike, group_size: int) -> jax.Array:
  """REINFORCE leave-one-out advantages.

  ``Âᵢ = sᵢ − (1/(k−1)) Σ_{j≠i} sⱼ`` within each group of ``k = group_size`` responses to the same
  prompt (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al.
  2024, https://arxiv.org/abs/2402.14740).

  Args:
    scores_N: one score per response ``[N]``, each group's responses consecutive.
    group_size: k ≥ 2.

  Returns:
    ``[N]`` advantages.

  >>> rloo_advantages(jnp.array([1.0, 2.0, 6.0]), 3).tolist()
  [-3.0, -1.5, 4.5]
  """
  # sᵢ − (Σⱼ sⱼ − sᵢ)/(k−1) = (k/(k−1))·(sᵢ − mean): exact zeros for a group of equal scores.
  g = _groups(scores_N, group_size, min_size=2)
  return (_centered(g) * (group_size / (group_size - 1))).reshape(-1)
