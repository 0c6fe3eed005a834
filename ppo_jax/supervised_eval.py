"""Held-out metrics of the supervised stages (SFT, reward model, DPO): every held-out row, in
fixed-size batches, on one device or a mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from ppo_jax import sharding as shd
from ppo_jax.supervised_step import COUNTS, batch_shardings, weight_of, with_frozen


def evaluate(
  params: Any,
  graphdef: nnx.GraphDef,
  loss_fn,
  make_batch,
  n: int,
  *,
  batch_size: int,
  mesh=None,
  frozen: Any = None,
  loss_args: dict[str, Any] | None = None,
) -> dict[str, float]:
  """Metrics over held-out rows, token-weighted where the loss reports ``num_tokens``
  (``frozen``, ``loss_args``: as for ``train``).

  Full batches, then the tail of fewer than ``batch_size`` rows as one more call (a second
  compilation). On a mesh the placed calls' rows split evenly over the batch axes; the last
  ``n mod (data × fsdp)`` rows go in one call of their own, replicated (every device computes
  them), so a mesh, on one process or several, evaluates every row as one device does.
  """
  if n == 0:
    return {}
  batch_size = min(batch_size, n)
  split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  if split > 1:  # rows must split evenly over the batch axes
    batch_size = max(split, batch_size // split * split)
  put = (lambda b: b) if mesh is None else (lambda b: shd.place_batch(b, batch_shardings(b, mesh)))
  if mesh is not None and frozen is not None:  # as train places them (no copy if they are)
    frozen = shd.place(frozen, shd.param_shardings(frozen, mesh))
  fn = jax.jit(lambda p, f, b, a: loss_fn(with_frozen(p, f), graphdef, b, **(a or {}))[1])
  sums: dict[str, float] = {}
  weight_total = 0.0
  placed = n // split * split
  calls = [(np.arange(s, min(s + batch_size, placed)), put) for s in range(0, placed, batch_size)]
  if n > placed:  # every process hands over the whole tail, each device holds all of it
    calls.append((np.arange(placed, n), lambda b: shd.place_batch(b, shd.replicated(mesh))))
  for idx, hand_over in calls:
    got = fn(params, frozen, hand_over(make_batch(idx)), loss_args)
    metrics = {k: float(shd.to_host(v)) for k, v in got.items()}
    w = weight_of(metrics, float(len(idx)))
    weight_total += w
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v * w
  out = {k: v / weight_total for k, v in sums.items() if k not in COUNTS}
  out["eval_rows"] = float(n)
  return out
