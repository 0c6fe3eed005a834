"""Masked reductions over token batches.

Every tensor of per-token quantities in ppo_jax comes with a ``mask_BxT`` that is 1.0 on real
response tokens and 0.0 elsewhere (prompt, padding, tokens after EOS). A mask selects, it does not
weigh: any entry > 0 counts as 1 (``m = 1[mask > 0]`` in the formulas below). Positions where the
mask is 0 may hold anything, even ``inf`` or ``nan``: these functions select with ``jnp.where``
rather than multiplying by the mask, so such values reach neither the results nor the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def float_dtype(*xs: ArrayLike) -> jnp.dtype:
  """The compute dtype for ``xs``: their common float type, at least float32."""
  return jnp.result_type(jnp.float32, *[jnp.asarray(x).dtype for x in xs])


def concrete(x: object) -> np.ndarray | None:
  """``x``'s value as a NumPy array when it has one now (a number, a list, an array, even one a
  jitted function closes over), for checks in Python; None for a tracer (inside jit, vmap, grad),
  which goes unchecked, as does an array spread over several processes (no one process holds
  it). Read with NumPy, so nothing is staged into a trace."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def check_value(
  name: str,
  value: object,
  ok: Callable[[np.ndarray], np.ndarray],
  what: str,
  *,
  required: bool = False,
):
  """Raises ``ValueError("{name} must be {what}, got …")`` unless ``ok`` holds for every entry of
  ``value``; values without one now (``concrete``) pass unchecked, and None too unless
  ``required`` (a hyperparameter with no "off")."""
  if value is None and required:
    raise ValueError(f"{name} must be {what}, got None")
  v = None if value is None else concrete(value)
  if v is not None and not np.all(ok(v)):
    got = f"{v.item()}" if v.ndim == 0 else f"an array from {v.min()} to {v.max()}"
    raise ValueError(f"{name} must be {what}, got {got}")


def check_ids(ids: object, vocab_size: int, *, what: str, hint: str = "") -> None:
  """Raises ``ValueError("{what} [0, V) (min …, max …){hint}")`` when concrete ``ids`` leave the
  vocabulary (an id past it embeds or picks nan; a negative one wraps to another token)."""
  v = concrete(ids)
  if v is not None and v.size:
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"{what} [0, {vocab_size}) (min {lo}, max {hi}){hint}")


def as_bool_mask(mask: ArrayLike) -> jax.Array:
  """A boolean view of a 0/1 (float, int or bool) mask."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask > 0


def check_same_shape(**arrays: ArrayLike) -> None:
  """Raises ValueError naming the arrays when their shapes differ."""
  shapes = {name: np.shape(x) for name, x in arrays.items()}  # lists too
  if len(set(shapes.values())) > 1:
    listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
    widest = max(shapes.values(), key=len)
    per_row = [n for n, s in shapes.items() if len(s) == 1 and len(widest) == 2 and s == widest[:1]]
    full = next(n for n, s in shapes.items() if s == widest)
    hint = (
      f" ({per_row[0]} holds one value per sequence, as group_advantages gives: broadcast it "
      f"over the tokens, jnp.broadcast_to({per_row[0]}[:, None], {full}.shape))"
      if per_row
      else ""
    )
    raise ValueError(f"expected arrays of one shape, got {listed}{hint}")


def check_BxT(**arrays: ArrayLike) -> None:
  """``check_same_shape``, and the shape is ``[B, T]`` (``jax.vmap`` maps any axis before)."""
  check_same_shape(**arrays)
  name, x = next(iter(arrays.items()))
  if np.ndim(x) != 2:
    names = ", ".join(arrays)
    raise ValueError(
      f"expected {names} of shape [B, T] (jax.vmap for more leading axes), "
      f"got {name}{list(np.shape(x))}"
    )


def masked_sum(x: ArrayLike, mask: ArrayLike, axis=None) -> jax.Array:
  """Σ x·m over ``axis`` (all axes when None); masked entries never enter the sum."""
  x = jnp.asarray(x, float_dtype(x))
  return jnp.sum(jnp.where(as_bool_mask(mask), x, 0.0), axis=axis)


def masked_count(mask: ArrayLike, axis=None) -> jax.Array:
  """Σ m over ``axis``: the number of real tokens, as float32."""
  return jnp.sum(as_bool_mask(mask), axis=axis, dtype=jnp.float32)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis=None) -> jax.Array:
  """Mean of ``x`` over the entries where ``mask`` is 1 (any entry > 0 counts as 1).

  ``masked_mean(x, m) = Σ x·m / Σ m`` with ``m = 1[mask > 0]``; over ``axis`` when given
  (``axis=-1`` gives one mean per row). Where ``Σ m = 0`` the result is 0, with zero (finite)
  gradients.

  Args:
    x: values, any shape, e.g. ``[B, T]``.
    mask: 1.0 on real entries, 0.0 elsewhere; same shape as ``x``.
    axis: axis or axes to reduce; ``None`` reduces everything to a scalar.

  Returns:
    The masked mean, float32 (float64 for float64 inputs).

  >>> float(masked_mean(jnp.array([1.0, 2.0, 1e3]), jnp.array([1.0, 1.0, 0.0])))
  1.5
  """
  check_same_shape(x=x, mask=mask)
  total = masked_sum(x, mask, axis=axis)
  count = masked_count(mask, axis=axis).astype(total.dtype)
  return total / jnp.maximum(count, 1.0)


def masked_var(x: ArrayLike, mask: ArrayLike, *, unbiased: bool = True) -> jax.Array:
  """Variance of the masked entries of ``x`` (one scalar over all axes).

  ``var = Σ m·(x − x̄)² / (n − 1)`` with ``n = Σ m`` (Bessel's correction, as TRL whitens);
  ``unbiased=False`` divides by ``n``, as OpenAI's ``lm-human-preferences`` (``tf.nn.moments``).
  Returns 0 when fewer than two entries (one, unbiased) are real.
  """
  x, _ = _shifted(x, mask)
  mean = masked_mean(x, mask)
  return _var(_centred(x, mask, mean), mask, unbiased=unbiased)


def _var(centred: jax.Array, mask: ArrayLike, *, unbiased: bool) -> jax.Array:
  n = masked_count(mask).astype(centred.dtype)
  denom = n - 1.0 if unbiased else n
  return jnp.where(denom > 0, jnp.sum(jnp.square(centred)) / jnp.maximum(denom, 1.0), 0.0)


def masked_whiten(x: ArrayLike, mask: ArrayLike, *, shift_mean: bool = True) -> jax.Array:
  """Whitens the masked entries of ``x`` to zero mean and unit variance.

  ``w = (x − x̄) / √(var + 1e-8)`` with the masked mean ``x̄`` and the unbiased masked variance
  ``var`` over the whole batch (``masked_var``). With ``shift_mean=False`` the mean is added back,
  ``w = (x − x̄) / √(var + 1e-8) + x̄``: only the scale is normalised (used for rewards, whose sign
  carries meaning). Entries where the mask is 0 are set to 0.

  Used for advantages (Schulman et al. 2017, PPO; Huang et al. 2022, "The 37 implementation details
  of PPO") and per-token rewards (``ppo.whiten_rewards``, as TRL's PPO trainer; Ziegler et al.
  2019 instead normalise the reward model's score once, to mean 0 and variance 1).

  Args:
    x: values ``[B, T]`` (any shape).
    mask: 1.0 on real entries, same shape as ``x``.
    shift_mean: whether the result keeps zero mean (True) or the input's mean (False).

  Returns:
    Array of ``x``'s shape, float32 (float64 for float64 inputs), 0 where masked.
  """
  check_same_shape(x=x, mask=mask)
  x, shift = _shifted(x, mask)
  mean = masked_mean(x, mask)
  centred = _centred(x, mask, mean)
  w = centred * jax.lax.rsqrt(_var(centred, mask, unbiased=True) + 1e-8)
  if not shift_mean:
    w = w + (mean + shift)
  return jnp.where(as_bool_mask(mask), w, 0.0)


def _shifted(x: ArrayLike, mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """``(x − s, s)`` with ``s`` the largest real entry (0 without a finite one), a constant to the
  gradient: mean and variance do not change, but equal entries centre to exactly 0. (The float32
  mean of equal values can be off by an ulp, which ``1/√(0 + 1e-8)`` would blow up to ±1.)"""
  x = jnp.asarray(x, float_dtype(x))
  s = jnp.max(jnp.where(as_bool_mask(mask), x, -jnp.inf), initial=-jnp.inf)
  s = jax.lax.stop_gradient(jnp.where(jnp.isfinite(s), s, 0.0))
  return x - s, s


def _centred(x: ArrayLike, mask: ArrayLike, mean: jax.Array) -> jax.Array:
  """``x − x̄`` where the mask is 1, 0 elsewhere: selected before anything multiplies it, so an
  ``inf`` at a masked position sends no ``0·inf`` into the gradient of the mean or variance."""
  return jnp.where(as_bool_mask(mask), jnp.asarray(x, mean.dtype) - mean, 0.0)


def aggregate(loss_BxT: ArrayLike, mask_BxT: ArrayLike, *, agg: str = "token-mean") -> jax.Array:
  """Reduces per-token losses ``[B, T]`` to a scalar.

  - ``"token-mean"``: ``Σ_bt ℓ·m / Σ_bt m``, every real token weighs the same (DAPO, Yu et al.
    2025).
  - ``"seq-mean-token-mean"``: the mean over non-empty rows of each row's token mean (GRPO,
    Shao et al. 2024): every sequence weighs the same.
  - ``"seq-mean-token-sum"``: the mean over non-empty rows of each row's token sum (Dr. GRPO,
    Liu et al. 2025, up to its constant): no length normalisation.

  An all-masked batch gives 0 with zero gradients. To combine micro-batches exactly, weigh each
  micro-batch's result by ``agg_weight(mask, agg=agg)``.
  """
  check_BxT(loss=loss_BxT, mask=mask_BxT)
  if agg == "token-mean":
    return masked_mean(loss_BxT, mask_BxT)
  if agg == "seq-mean-token-mean":
    per_row = masked_mean(loss_BxT, mask_BxT, axis=-1)
  elif agg == "seq-mean-token-sum":
    per_row = masked_sum(loss_BxT, mask_BxT, axis=-1)
  else:
    raise ValueError(f"unknown agg {agg!r}; expected one of {', '.join(AGG_MODES)}")
  return masked_mean(per_row, masked_count(mask_BxT, axis=-1) > 0)


def counts(mask_BxT: ArrayLike) -> dict[str, jax.Array]:
  """``num_tokens`` (Σ m) and ``num_seqs`` (rows with a real token): the aggregation weights."""
  return {
    "num_tokens": masked_count(mask_BxT),
    "num_seqs": jnp.sum(masked_count(mask_BxT, axis=-1) > 0, dtype=jnp.float32),
  }


def agg_weight(mask_BxT: ArrayLike, *, agg: str = "token-mean") -> jax.Array:
  """The denominator of ``aggregate``: real tokens (token-mean) or non-empty rows (seq-mean-*).

  Micro-batches ``i`` with results ``Lᵢ`` and weights ``wᵢ`` recombine exactly into the full
  batch's result as ``Σ wᵢ·Lᵢ / Σ wᵢ`` (and the same for gradients). The losses return both
  counts in their metrics; ``agg_weight_key(agg)`` names the one that applies.
  """
  return counts(mask_BxT)[agg_weight_key(agg)]


def agg_weight_key(agg: str) -> str:
  """``"num_tokens"`` for token-mean, ``"num_seqs"`` for the seq-mean modes."""
  if agg not in AGG_MODES:
    raise ValueError(f"unknown agg {agg!r}; expected one of {', '.join(AGG_MODES)}")
  return "num_tokens" if agg == "token-mean" else "num_seqs"
