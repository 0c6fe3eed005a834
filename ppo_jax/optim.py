"""Optimizers from plain hyperparameters: AdamW with warm-up, decay, clipping, TF-style epsilon."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimHparams:
  """AdamW and its schedule. ``total_steps`` counts optimizer updates over the whole stage."""

  lr: float = 1e-5
  schedule: str = "linear"  # constant | linear | cosine (decay to 0 after the warm-up)
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  tf_style_eps: bool = False  # ε added to √v before bias correction, as TensorFlow's Adam
  weight_decay: float = 0.0  # decoupled; applied to matrices only (not biases, norms)
  max_grad_norm: float | None = 1.0  # clip by global norm; None: no clipping

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
        f"schedule: unknown {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
      )
    for name in ("lr", "warmup_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")


def learning_rate(hp: OptimHparams, total_steps: int | jax.Array) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then constant, linear or cosine decay
  to 0 at ``total_steps``:

  ``lr(t) = lr · t / w`` for ``t < w``, then ``lr · f((t − w) / (T − w))`` with ``f`` = 1,
  ``1 − x`` or ``(1 + cos πx) / 2`` (``x`` clipped to 1), where ``T = total_steps`` and the
  warm-up ``w = min(warmup_steps, T − 1)`` is cut to fit a short stage. As optax's
  ``linear_schedule`` / ``cosine_decay_schedule`` joined by ``join_schedules``, with one
  difference: ``total_steps`` may be a traced integer, so one compiled step serves every stage
  length (``scale_by_schedule``).
  """
  total = jnp.asarray(total_steps, jnp.int32)
  warmup = jnp.minimum(hp.warmup_steps, jnp.maximum(total - 1, 0))
  decay = jnp.maximum(total - warmup, 1)

  def after(t):
    if hp.schedule == "constant":
      return jnp.asarray(hp.lr, jnp.float32)
    if hp.schedule == "linear":
      return hp.lr * (1 - jnp.clip(t, 0, decay) / decay)
    return hp.lr * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, decay) / decay)))

  def schedule(count):
    t = jnp.asarray(count, jnp.int32)
    warm = -hp.lr * (1 - jnp.clip(t, 0, warmup) / jnp.maximum(warmup, 1)) + hp.lr
    return jnp.where(t < warmup, warm, after(t - warmup)).astype(jnp.float32)

  return schedule


def scale_by_schedule(
  hp: OptimHparams, total_steps: int, part: str | None = None
) -> optax.GradientTransformationExtraArgs:
  """``−lr(t) · update`` with ``learning_rate(hp, T)``: as optax's ``scale_by_learning_rate``
  (the same state, ``ScaleByScheduleState``), but ``T`` may come with each update, traced:
  ``tx.update(g, state, params, horizon=T)`` (``horizon[part]`` where the optimizer has parts),
  else ``total_steps``. A stage resumed with more epochs or iterations then runs the program
  compiled for it before, and stages of other lengths share theirs."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, horizon=None, **extra_args):
    del params, extra_args
    if horizon is None:
      steps = total_steps
    elif part is None:
      steps = horizon
    elif isinstance(horizon, dict) and part in horizon:
      steps = horizon[part]
    else:
      raise ValueError(
        f"horizon: an optimizer of parts takes one per part, {{'policy': P, 'value': V}}; got "
        f"{horizon!r}"
      )
    rate = learning_rate(hp, steps)(state.count)
    updates = jax.tree.map(lambda g: (-rate).astype(g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


class TfAdamState(NamedTuple):
  count: jax.Array  # [] int32
  mu: optax.Updates  # first moments, like params
  nu: optax.Updates  # second moments, like params


def scale_by_tf_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam as TensorFlow computes it: ``m̂ / (√v̂ + ε / √(1 − β₂ᵗ))``.

  TensorFlow's Adam adds ε to √v before the bias correction, so its effective ε is larger early
  in training than PyTorch's/optax's ``m̂ / (√v̂ + ε)``. OpenAI's ``lm-human-preferences`` (the
  reference RLHF-PPO code) used it; Huang et al. 2022 ("The N implementation details of RLHF with
  PPO") found it matters early in training.
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return TfAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    t = count.astype(jnp.float32)
    c1, c2 = 1 - b1**t, 1 - b2**t
    out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps / jnp.sqrt(c2)), mu, nu)
    return out, TfAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def _decay_mask(params):
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def _adamw(
  hp: OptimHparams, total_steps: int, part: str | None = None
) -> list[optax.GradientTransformation]:
  """``Adam (optax or TF-style) → decoupled weight decay → −lr(t)``, as a list of parts."""
  if hp.tf_style_eps:
    parts = [scale_by_tf_adam(hp.b1, hp.b2, hp.eps)]
  else:
    parts = [optax.scale_by_adam(hp.b1, hp.b2, hp.eps)]
  if hp.weight_decay:
    parts.append(optax.add_decayed_weights(hp.weight_decay, mask=_decay_mask))
  parts.append(scale_by_schedule(hp, total_steps, part))
  return parts


def _clip(hp: OptimHparams) -> list[optax.GradientTransformation]:
  return [] if hp.max_grad_norm is None else [optax.clip_by_global_norm(hp.max_grad_norm)]


def make_optimizer(hp: OptimHparams, total_steps: int) -> optax.GradientTransformation:
  """``clip → Adam (optax or TF-style) → decoupled weight decay → −lr(t)``; the schedule ends at
  ``total_steps`` updates, or at ``tx.update(..., horizon=n)``'s ``n`` (``scale_by_schedule``)."""
  return optax.chain(*_clip(hp), *_adamw(hp, total_steps))


def make_actor_critic_optimizer(
  hp: OptimHparams, *, policy_steps: int, value_steps: int, value_lr_scale: float = 1.0
) -> optax.GradientTransformation:
  """``make_optimizer`` for a ``{"policy": ..., "value": ...}`` tree, one Adam per part.

  The gradient is clipped by the global norm of both parts together; then each part has its own
  Adam moments, step count (bias correction) and learning-rate schedule, decaying over
  ``policy_steps`` and ``value_steps`` updates. The critic's rate is ``value_lr_scale`` times the
  schedule (Adam step and decoupled decay alike). With equal steps the updates are the ones
  ``make_optimizer`` gives, bit for bit; the parts differ when one of them sits out updates (the
  policy during a critic warm-up, ``PPOHparams.critic_warmup``, whose moments and count are kept
  as they were: its first update is Adam's first, at the start of its schedule).
  ``tx.update(..., horizon={"policy": P, "value": V})`` moves the two ends, traced.
  """
  if not value_lr_scale > 0:
    raise ValueError(f"critic learning-rate scale: must be > 0, got {value_lr_scale}")
  value = _adamw(hp, value_steps, "value")
  if value_lr_scale != 1.0:
    value.append(optax.scale(value_lr_scale))
  policy = _adamw(hp, policy_steps, "policy")
  parts = {"policy": optax.chain(*policy), "value": optax.chain(*value)}

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}

  return optax.chain(*_clip(hp), optax.multi_transform(parts, labels))


def horizon_change(hp: OptimHparams, count: int, *, old_steps: int, new_steps: int) -> str | None:
  """What moving a schedule's end from ``old_steps`` to ``new_steps`` updates does at update
  ``count`` (a run resumed with another ``ppo.iterations``); None if nothing changes. A constant
  schedule changes only where the stage's length cut its warm-up (``learning_rate``)."""
  if old_steps == new_steps:
    return None
  # A constant schedule's warm-up, cut as learning_rate cuts it: unchanged, nothing to say.
  was, now = (min(hp.warmup_steps, max(n - 1, 0)) for n in (old_steps, new_steps))
  if hp.schedule == "constant" and was == now:
    return None
  rate_at = jax.jit(lambda t, total: learning_rate(hp, total)(t))  # one program, not one per op
  before, after = (float(rate_at(count, total)) for total in (old_steps, new_steps))
  rate = f"is {after:.3g}, not {before:.3g}" if after != before else f"stays {after:.3g}"
  if hp.schedule == "constant":
    return (
      f"constant schedule warms up over {now} updates, not {was} (a warm-up is cut to fit its "
      f"stage): its rate at update {count} {rate}"
    )
  return (
    f"{hp.schedule} schedule decays to 0 at update {new_steps}, not {old_steps}: its rate at "
    f"update {count} {rate}"
  )


def schedule_count(opt_state: optax.OptState) -> jax.Array:
  """The count the learning-rate schedule of an optimizer state reads at its next update (the
  policy's, for ``make_actor_critic_optimizer``).

  It advances only on updates that are applied (a skipped update keeps the whole state), so
  ``schedule(schedule_count(state))`` is the rate the next update uses, where a count derived
  from the iteration number would run ahead after a skip.
  """
  found = [
    (path, v)
    for path, v in optax.tree.get_all_with_path(opt_state, "count")
    if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"
  ]
  if len(found) > 1:  # one per part: the policy's
    found = [(path, v) for path, v in found if under_key(path, "policy")]
  if len(found) != 1:
    raise ValueError(
      f"expected one learning-rate schedule in the optimizer state, found {len(found)}"
    )
  return found[0][1]


def under_key(path, name: str) -> bool:
  """Whether a pytree path runs through the dict key ``name``: with ``"policy"``, the policy's
  parameters, and its part of a ``make_actor_critic_optimizer`` state (counts included)."""
  return any(isinstance(k, jax.tree_util.DictKey) and k.key == name for k in path)
