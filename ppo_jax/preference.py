"""Losses on preference pairs: the Bradley–Terry reward-model loss and DPO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ppo_jax.masking import check_same_shape, check_value, float_dtype

Metrics = dict[str, jax.Array]

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def _pairs(**arrays: ArrayLike) -> list[jax.Array]:
  check_same_shape(**arrays)
  for name, x in arrays.items():
    if jnp.ndim(x) != 1:
      raise ValueError(f"expected {name} of shape [B], got {list(jnp.shape(x))}")
    if not jnp.size(x):  # a mean over no pairs is nan
      raise ValueError(f"{name} is empty: expected at least one pair")
  dtype = float_dtype(*arrays.values())
  return [jnp.asarray(x, dtype) for x in arrays.values()]


def bradley_terry_loss(
  chosen_scores_B: ArrayLike,
  rejected_scores_B: ArrayLike,
  margin_B: ArrayLike | None = None,
  *,
  center_coef: float = 0.0,
) -> tuple[jax.Array, Metrics]:
  """Bradley–Terry negative log-likelihood of the human preferences (reward-model training).

  ``P(chosen ≻ rejected) = σ(s_c − s_r)``, ``nll = mean(−log σ(s_c − s_r − m)) =
  mean(softplus(−(s_c − s_r − m)))`` (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT,
  https://arxiv.org/abs/2203.02155, eq. 1; the margin ``m``, 0 without ``margin_B``, is Llama
  2's for graded preferences, Touvron et al. 2023, https://arxiv.org/abs/2307.09288, eq. 2), and
  ``loss = nll + c·mean((s_c + s_r)²)``: the likelihood fixes score differences only, and the
  centering term (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244, eq. 2;
  ``c = center_coef``, TRL's ``center_rewards_coefficient``, which it recommends at 0.01) holds
  the scores near 0.

  Args:
    chosen_scores_B: reward-model scores of the preferred responses ``[B]``.
    rejected_scores_B: scores of the other responses ``[B]``.
    margin_B: how far each chosen response should score above the other ``[B]`` (none: 0).
    center_coef: ``c ≥ 0``, the weight of the centering term.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``nll``, ``accuracy`` (fraction with ``s_c > s_r``),
    ``margin`` (mean ``s_c − s_r``), ``center`` (``mean((s_c + s_r)²)``) and ``num_pairs``.

  >>> loss, m = bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]))
  >>> round(float(loss), 4), float(m["accuracy"])  # (softplus(−1) + log 2) / 2
  (0.5032, 0.5)
  """
  check_value("center_coef", center_coef, lambda c: c >= 0.0, "≥ 0", required=True)
  chosen, rejected = _pairs(chosen_scores_B=chosen_scores_B, rejected_scores_B=rejected_scores_B)
  margin = chosen - rejected
  if margin_B is not None:
    check_same_shape(chosen_scores_B=chosen, margin_B=margin_B)
  wanted = 0.0 if margin_B is None else jnp.asarray(margin_B, margin.dtype)
  nll = jnp.mean(jax.nn.softplus(-(margin - wanted)))
  center = jnp.mean(jnp.square(chosen + rejected))
  loss = nll + center_coef * center
  metrics = {
    "loss": loss,
    "nll": nll,
    "center": center,
    "accuracy": jnp.mean(margin > 0, dtype=jnp.float32),
    "margin": jnp.mean(margin),
    "num_pairs": jnp.asarray(margin.shape[0], jnp.float32),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def dpo_loss(
  pol_chosen_logp_B: ArrayLike,
  pol_rejected_logp_B: ArrayLike,
  ref_chosen_logp_B: ArrayLike,
  ref_rejected_logp_B: ArrayLike,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  kind: str = "sigmoid",
) -> tuple[jax.Array, Metrics]:
  """Direct Preference Optimization loss, and the IPO and hinge losses on the same pairs.

  With ``h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))`` (sequence
  log-probabilities, summed over response tokens for DPO and hinge):

  - ``sigmoid``: ``loss = mean((1 − ε)·softplus(−β h) + ε·softplus(β h))``, Rafailov et al.
    2023, https://arxiv.org/abs/2305.18290, eq. 7; ``ε = label_smoothing`` is the conservative
    DPO of Mitchell 2023 ("A note on DPO with noisy preferences"), which treats each label as
    flipped with probability ε.
  - ``ipo``: ``loss = mean((h − 1/(2β))²)``, Azar et al. 2023, https://arxiv.org/abs/2310.12036,
    eq. 17 (β is their τ): it regresses ``h`` to a finite target instead of pushing it to
    infinity, so deterministic preferences do not drive β·h without bound. The DPO stage gives it
    log-probabilities averaged over the response tokens, as TRL does.
  - ``hinge``: ``loss = mean(max(0, 1 − β h))``, SLiC-HF's calibration loss (Zhao et al. 2023,
    https://arxiv.org/abs/2305.10425) on DPO's log-ratio, as in RSO (Liu et al. 2024,
    https://arxiv.org/abs/2309.06657).

  The reference log-probabilities get no gradient.

  Args:
    pol_chosen_logp_B: ``log π(y_c | x)`` ``[B]``.
    pol_rejected_logp_B: ``log π(y_r | x)`` ``[B]``.
    ref_chosen_logp_B: ``log π_ref(y_c | x)`` ``[B]``.
    ref_rejected_logp_B: ``log π_ref(y_r | x)`` ``[B]``.
    beta: β, the strength of the implicit KL constraint (IPO's τ; 1/β the hinge's margin).
    label_smoothing: ε in ``[0, 0.5)`` (``sigmoid`` only).
    kind: ``sigmoid`` (DPO), ``ipo`` or ``hinge``.

  Returns:
    ``(loss, metrics)`` with ``loss``, the implicit rewards ``reward_chosen`` (mean
    ``β(log π − log π_ref)`` of the chosen) and ``reward_rejected``, ``reward_margin``,
    ``accuracy`` (fraction with the chosen reward the larger) and ``num_pairs``.

  >>> loss, _ = dpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.0]),
  ...                    jnp.array([-1.0]), beta=1.0)
  >>> round(float(loss), 4)  # softplus(−1)
  0.3133
  """
  if kind not in DPO_LOSSES:
    raise ValueError(f"kind: unknown {kind!r}; expected one of {', '.join(DPO_LOSSES)}")
  check_value("beta", beta, lambda b: b > 0.0, "> 0", required=True)
  if kind != "sigmoid":  # a traced ε passes: the caller's sweep, its own business
    check_value("label_smoothing", label_smoothing, lambda e: e == 0.0, f"0 with kind={kind!r}")
  check_value(
    "label_smoothing",
    label_smoothing,
    lambda e: (e >= 0.0) & (e < 0.5),
    "in [0, 0.5)",
    required=True,
  )
  pol_c, pol_r, ref_c, ref_r = _pairs(
    pol_chosen_logp_B=pol_chosen_logp_B,
    pol_rejected_logp_B=pol_rejected_logp_B,
    ref_chosen_logp_B=ref_chosen_logp_B,
    ref_rejected_logp_B=ref_rejected_logp_B,
  )
  reward_c = beta * (pol_c - jax.lax.stop_gradient(ref_c))
  reward_r = beta * (pol_r - jax.lax.stop_gradient(ref_r))
  h = reward_c - reward_r  # β times the log-ratio difference
  if kind == "ipo":
    terms = (h / beta - 1.0 / (2.0 * beta)) ** 2
  elif kind == "hinge":
    terms = jax.nn.relu(1.0 - h)
  else:
    terms = (1.0 - label_smoothing) * jax.nn.softplus(-h) + label_smoothing * jax.nn.softplus(h)
  loss = jnp.mean(terms)
  metrics = {
    "loss": loss,
    "reward_chosen": jnp.mean(reward_c),
    "reward_rejected": jnp.mean(reward_r),
    "reward_margin": jnp.mean(h),
    "accuracy": jnp.mean(h > 0, dtype=jnp.float32),
    "num_pairs": jnp.asarray(h.shape[0], jnp.float32),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
