"""The jitted step of the supervised stages (SFT, reward model, DPO), whole-batch or accumulated
over micro-batches, and the check that its batches split over a mesh (``check_mesh_rows``).

A loss here is a mean over its batch's weight: tokens for SFT (``num_tokens`` in its metrics),
pairs for the reward model and DPO (``num_pairs``), rows otherwise. Micro-batches ``i`` of
weights ``wᵢ`` with means ``Lᵢ`` recombine to the whole batch's mean exactly:

  ``L = Σᵢ wᵢ Lᵢ / Σᵢ wᵢ``, so ``∇L = Σᵢ wᵢ ∇Lᵢ / Σᵢ wᵢ``

(gradient accumulation; only one micro-batch's activations are live at a time, in a
``lax.scan``). The weights are counts the loss reports, known only after each forward, so the
gradients are summed weighted and divided once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ppo_jax import sharding as shd
from ppo_jax.optim import OptimHparams, learning_rate, schedule_count

if TYPE_CHECKING:
  from ppo_jax.supervised import SupervisedHparams

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
COUNTS = ("num_tokens", "num_pairs")  # metrics that are counts: summed, not averaged


def weight_of(metrics: dict, rows: int) -> Any:
  """A batch's weight in a mean over batches: its ``num_tokens`` (SFT), ``num_pairs`` (reward
  model, DPO), else its ``rows``."""
  return next((metrics[k] for k in COUNTS if k in metrics), rows)


def accumulated_value_and_grad(
  loss: Callable[[Any, Batch], tuple[jax.Array, Metrics]],
  params: Any,
  batch: Batch,
  n_micro: int,
  *,
  mesh=None,
) -> tuple[tuple[jax.Array, Metrics], Any]:
  """``jax.value_and_grad(loss, has_aux=True)(params, batch)``, computed over ``n_micro``
  micro-batches of the batch's rows one after another: the same loss, metrics and gradient (up to
  the rounding of the sums), with the activations of ``rows / n_micro`` rows at a time.

  Means are weighted by ``weight_of`` each micro-batch's metrics, counts summed; a batch of weight
  0 (no response token) gives 0 with zero gradients, as its whole-batch mean does. On a ``mesh``
  each micro-batch's rows stay split over ``('data', 'fsdp')``.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  if n_micro == 1:
    return grad_fn(params, batch)
  rows = jax.tree.leaves(batch)[0].shape[0] // n_micro

  def micro_step(sums, micro):
    (value, metrics), grads = grad_fn(params, micro)
    w = jnp.asarray(weight_of(metrics, rows), jnp.float32)
    return jax.tree.map(lambda s, g: s + w * g.astype(jnp.float32), sums, grads), (
      value,
      metrics,
      w,
    )

  # Summed in float32 whatever the parameters' dtype (bf16 sums of weights in the thousands
  # round), and cast back at the end.
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  sums, (values, metrics, w) = jax.lax.scan(micro_step, zeros, shd.split_rows(batch, n_micro, mesh))
  total = jnp.sum(w)
  total = jnp.where(total > 0, total, 1.0)
  mean = lambda x: jnp.sum(w * x) / total
  grads = jax.tree.map(lambda s, p: (s / total).astype(p.dtype), sums, params)
  metrics = {k: jnp.sum(v) if k in COUNTS else mean(v) for k, v in metrics.items()}
  return (mean(values), metrics), grads


def make_step(
  loss_fn: Callable[..., tuple[jax.Array, Metrics]],
  graphdef: nnx.GraphDef,
  tx,
  optim: OptimHparams | None = None,
  *,
  n_micro: int = 1,
  mesh=None,
):
  """The supervised step ``(params, opt_state, frozen, batch, horizon, loss_args) → (params,
  opt_state, metrics)`` that ``supervised.train`` jits: the gradient of ``loss_fn(params,
  graphdef, batch, **loss_args)`` (of ``loss_fn((params, frozen), ...)`` when ``frozen`` is not
  None), accumulated over ``n_micro`` micro-batches (``accumulated_value_and_grad``), and one
  update of ``tx``.

  ``loss_args``: numbers the loss takes as keyword arguments (DPO's β and ε), inputs of the
  program rather than constants: a sweep over them runs one program. None: no arguments.

  ``horizon``: the update count at which ``tx``'s schedule ends (``optim.scale_by_schedule``),
  an argument so that every stage length runs one program; None keeps ``tx``'s own. ``metrics``
  adds the gradient's global norm and, given ``optim`` (``tx``'s hyperparameters; it needs
  ``horizon``), the rate of this update (``lr``: a skipped update does not advance the
  schedule's count)."""

  def step(params, opt_state, frozen, batch, horizon=None, loss_args=None):
    loss = lambda p, b: loss_fn(with_frozen(p, frozen), graphdef, b, **(loss_args or {}))
    (value, metrics), grads = accumulated_value_and_grad(loss, params, batch, n_micro, mesh=mesh)
    metrics["grad_norm"] = optax.tree.norm(grads)
    extra = {} if horizon is None else {"horizon": horizon}
    if optim is not None:
      if horizon is None:
        raise ValueError("make_step(optim=...) reports the rate where the schedule ends: a horizon")
      metrics["lr"] = learning_rate(optim, horizon)(schedule_count(opt_state))
    updates, new_opt_state = tx.update(grads, opt_state, params, **extra)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were.
    ok = jnp.isfinite(value) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return (
      keep(optax.apply_updates(params, updates), params),
      keep(new_opt_state, opt_state),
      metrics,
    )

  return step


def with_frozen(params, frozen):
  """What a loss reads: ``params``, or ``(params, frozen)`` (``nnx.merge``'s states in order)."""
  return params if frozen is None else (params, frozen)


def check_mesh_rows(hp: SupervisedHparams, n_train: int, mesh, name: str) -> None:
  """Refuses a step whose batch, or micro-batch, of the ``n_train`` training rows does not split
  evenly over the ``mesh``'s batch axes (``config.NAME.*`` named)."""
  batch_size = min(hp.batch_size, n_train)
  cut = f" (cut to its {n_train} training rows)" if batch_size < hp.batch_size else ""
  shd.check_batch(batch_size, mesh, f"config.{name}.batch_size{cut}")
  micro = batch_size // hp.micro_batches(batch_size)
  if micro < batch_size:
    what = f"the row count of each {name} micro-batch (config.{name}.micro_batch_size)"
    shd.check_batch(micro, mesh, what)


def batch_shardings(batch: Batch, mesh) -> dict:
  """Each batch array's rows over the mesh's batch axes."""
  return {k: shd.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
