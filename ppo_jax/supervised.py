"""The supervised stages of RLHF: SFT (masked next-token loss) and the Bradley–Terry reward model.

Both train a plain-dict parameter tree with one jitted step over fixed-shape batches drawn by
``rows.batch_indices`` (deterministic in seed and step) and report held-out metrics.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax import sharding as shd
from ppo_jax import writers
from ppo_jax.actor_critic import policy_logits, reward_scores
from ppo_jax.data import Sequences
from ppo_jax.logprobs import token_logprobs
from ppo_jax.masking import masked_count, masked_mean
from ppo_jax.optim import (
  OptimHparams,
  horizon_change,
  make_optimizer,
  schedule_count,
)
from ppo_jax.preemption import GUARD, Preempted, nonfinite_streak, stop_requested
from ppo_jax.preference import bradley_terry_loss
from ppo_jax.rows import batch_indices
from ppo_jax.stage_checkpoints import Checkpoints
from ppo_jax.supervised_eval import evaluate
from ppo_jax.supervised_step import batch_shardings, check_mesh_rows, make_step

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SupervisedHparams:
  epochs: float = 1.0  # passes over the training rows; 0: none (the pipeline skips SFT)
  batch_size: int = 32
  eval_fraction: float = 0.05  # rows held out for evaluation
  # Rows per forward and backward pass (None: the whole batch); the gradients of a step's
  # micro-batches are accumulated, so the step is the same, with their activations only.
  micro_batch_size: int | None = None
  optim: OptimHparams = dataclasses.field(
    default_factory=lambda: OptimHparams(lr=1e-4, warmup_steps=10)
  )

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size: must be ≥ 1, got {self.batch_size}")
    if not self.epochs >= 0:
      raise ValueError(f"epochs: must be ≥ 0, got {self.epochs}")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
    if self.micro_batch_size is not None:
      if self.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: must be ≥ 1, got {self.micro_batch_size}")
      if self.batch_size % self.micro_batch_size:
        raise ValueError(
          f"micro_batch_size: {self.micro_batch_size} does not divide batch_size {self.batch_size}"
        )

  def micro_batches(self, rows: int) -> int:
    """Micro-batches of a step of ``rows`` (``batch_size``, or all training rows when fewer): the
    fewest that split it evenly into at most ``micro_batch_size`` rows each."""
    n = math.ceil(rows / (self.micro_batch_size or rows))
    while rows % n:
      n += 1
    return n

  def steps_said(self, n_train: int, name: str) -> str:
    """``the N steps of NAME.epochs=E``: what a checkpoint past them is refused with."""
    return f"the {self.steps(n_train)} steps of {name}.epochs={self.epochs}"

  def steps(self, n_train: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_train`` rows, in batches of ``batch_size``
    (of all rows when there are fewer: ``train`` draws batches of that size); none for 0 epochs."""
    if self.epochs == 0:
      return 0
    return max(1, math.ceil(self.epochs * n_train / min(self.batch_size, max(n_train, 1))))


# --------------------------------------------------------------------------------------------------
# Losses.


def sft_loss(params, graphdef: nnx.GraphDef, batch: Batch) -> tuple[jax.Array, Metrics]:
  """Token-mean negative log-likelihood of the response tokens (prompt tokens carry no loss).

  ``L = −Σ m·log π(yₜ | y<ₜ, x) / Σ m`` over the response mask ``m``.
  """
  n = batch["response_mask"].shape[1]
  logits, _ = policy_logits(graphdef, params, batch["ids"], batch["mask"], n)
  targets = batch["ids"][:, -n:]
  logp = token_logprobs(logits, targets)
  m = batch["response_mask"]
  loss = -masked_mean(logp, m)
  metrics = {
    "nll": loss,
    "token_accuracy": masked_mean(jnp.argmax(logits, -1) == targets, m),
    "num_tokens": masked_count(m),
  }
  return loss, metrics


def reward_loss(
  params, graphdef: nnx.GraphDef, batch: Batch, *, center_coef: float = 0.0
) -> tuple[jax.Array, Metrics]:
  """Bradley–Terry loss of the reward model on (chosen, rejected) pairs, one forward of 2B rows
  (the batch's ``margin``, if any, and ``center_coef``: ``bradley_terry_loss``'s)."""
  B = batch["chosen_ids"].shape[0]
  ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  scores = reward_scores(graphdef, params, ids, mask)
  loss, metrics = bradley_terry_loss(
    scores[:B], scores[B:], batch.get("margin"), center_coef=center_coef
  )
  metrics["score_mean"] = jnp.mean(scores)
  return loss, metrics


def sft_batch(seqs: Sequences, idx: np.ndarray) -> Batch:
  return {"ids": seqs.ids[idx], "mask": seqs.mask[idx], "response_mask": seqs.response_mask[idx]}


def pair_batch(pairs: tuple[Sequences, Sequences], idx: np.ndarray) -> Batch:
  """The pairs' rows ``idx`` (and their margins, ``[B]``, when the file gives them)."""
  chosen, rejected = pairs
  margin = {} if chosen.margin is None else {"margin": chosen.margin[idx]}
  return {
    "chosen_ids": chosen.ids[idx],
    "chosen_mask": chosen.mask[idx],
    "rejected_ids": rejected.ids[idx],
    "rejected_mask": rejected.mask[idx],
    **margin,
  }


# --------------------------------------------------------------------------------------------------
# Training loop.


Rows = tuple[Callable[[np.ndarray], Batch], int]  # (make_batch(row_indices), number of rows)


def fit(
  name: str,
  params,
  graphdef: nnx.GraphDef,
  loss_fn: Callable[..., tuple[jax.Array, Metrics]],
  hp: SupervisedHparams,
  train_rows: Rows,
  eval_rows: Rows,
  *,
  workdir,
  seed: int,
  progress: bool = True,
  on_params: Callable[[int, Any], None] | None = None,
  checkpoints: Checkpoints | None = None,
  mesh=None,
  frozen: Any = None,
  max_nonfinite: int = 3,
  loss_args: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, float]]:
  """A supervised stage: ``train`` on ``train_rows`` with a progress bar and per-step metrics in
  ``WORKDIR/{name}_metrics.jsonl`` (rows past a resumed checkpoint's step dropped), then
  ``evaluate`` on ``eval_rows``; prints and returns ``(params, held-out metrics)``. ``frozen`` and
  ``loss_args``: as for ``train``."""
  total = hp.steps(train_rows[1])
  # A resumed stage's bar starts at its checkpoint.
  done = min(checkpoints.checkpointer.latest_step() or 0, total) if checkpoints is not None else 0
  bar = writers.progress_bar(total, name, initial=done, enabled=progress)
  out: dict[str, Any] = {}  # the metrics writer, opened at the first step trained here

  def on_step(i, n, row):
    if "writer" not in out:
      path = pathlib.Path(workdir) / f"{name}_metrics.jsonl"
      out["writer"] = writers.MetricsWriter(path, tensorboard_dir=None, resume_step=i)
    out["writer"].write(i + 1, row)
    bar.update(1)
    if i % 10 == 0 or i + 1 == n:
      bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("nll", "loss", "accuracy")})

  try:
    params, _ = train(
      params,
      graphdef,
      loss_fn,
      *train_rows,
      hp,
      seed=seed,
      name=name,
      on_step=on_step,
      on_params=on_params,
      checkpoints=checkpoints,
      mesh=mesh,
      frozen=frozen,
      max_nonfinite=max_nonfinite,
      loss_args=loss_args,
    )
  finally:
    bar.close()
    if "writer" in out:
      out["writer"].close()
  held_out = evaluate(
    params,
    graphdef,
    loss_fn,
    *eval_rows,
    batch_size=hp.micro_batch_size or hp.batch_size,  # what fits in training fits here
    mesh=mesh,
    frozen=frozen,
    loss_args=loss_args,
  )
  fmt = lambda k, v: f"{k} {v:.0f}" if k == "eval_rows" else f"{k} {v:.4f}"  # a count, not a mean
  print("held-out: " + (", ".join(fmt(k, v) for k, v in held_out.items()) or "no rows"))
  return params, held_out


def train(
  params: Any,
  graphdef: nnx.GraphDef,
  loss_fn: Callable[..., tuple[jax.Array, Metrics]],
  make_batch: Callable[[np.ndarray], Batch],
  n_train: int,
  hp: SupervisedHparams,
  *,
  seed: int,
  name: str = "supervised",
  on_step: Callable[[int, int, dict[str, float]], None] | None = None,
  on_params: Callable[[int, Any], None] | None = None,
  checkpoints: Checkpoints | None = None,
  mesh=None,
  frozen: Any = None,
  max_nonfinite: int = 3,
  loss_args: dict[str, Any] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
  """Trains ``params`` for ``hp.steps(n_train)`` steps; returns them and the per-step metrics of
  the steps trained in this call.

  ``make_batch(row_indices)`` builds a batch of training rows; ``on_step(step, total, metrics)``
  reports progress; ``on_params(steps_done, params)`` may look at the parameters after each step
  (before the next step donates them). On a ``mesh``, parameters and optimizer states follow
  ``sharding.RULES`` and batch rows are split over ``('data', 'fsdp')``.

  With ``checkpoints`` the stage resumes from its latest checkpoint (batches are a pure function
  of seed and step, so the steps after it are those of an uninterrupted stage), saves as
  ``Checkpoints`` says, and on SIGTERM/SIGINT saves after the current step and raises
  ``Preempted``. Without, a stop request raises ``Preempted`` and the stage starts over when run
  again.

  ``frozen``: weights the loss reads but nothing trains (the base weights under LoRA adapters);
  the loss then gets ``(params, frozen)``. They are an argument of the jitted step, not a constant
  baked into it, and are neither saved nor donated. ``loss_args``: numbers ``loss_fn`` takes as
  keyword arguments (DPO's β, ε), inputs of the step too: a sweep over them runs one program.

  A step whose loss or gradient is not finite changes nothing (metric ``skipped``);
  ``max_nonfinite`` in a row raise ``NonFiniteError``.
  """
  total = hp.steps(n_train)
  if total == 0:
    return params, []
  tx = make_optimizer(hp.optim, total)
  batch_size = min(hp.batch_size, n_train)
  n_micro = hp.micro_batches(batch_size)
  jit_kw: dict[str, Any] = {}
  if mesh is None:
    put = lambda batch: batch
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # where NumPy arrays go
    param_sh = jax.tree.map(lambda x: getattr(x, "sharding", device), params)
    opt_sh = jax.tree.map(lambda _: jax.tree.leaves(param_sh)[0], jax.eval_shape(tx.init, params))
    # Committed (LoRA's base: trained here or loaded), as the params below: the same programs.
    frozen = None if frozen is None else jax.device_put(frozen, jax.tree.leaves(param_sh)[0])
  else:
    check_mesh_rows(hp, n_train, mesh, name)
    param_sh = shd.param_shardings(params, mesh)
    opt_sh = shd.optimizer_shardings(tx, params, param_sh, mesh)
    put = lambda batch: shd.place_batch(batch, batch_shardings(batch, mesh))
    frozen_sh = None if frozen is None else shd.param_shardings(frozen, mesh)
    frozen = None if frozen is None else shd.place(frozen, frozen_sh)
    jit_kw = dict(
      in_shardings=(param_sh, opt_sh, frozen_sh, None, None, None),
      out_shardings=(param_sh, opt_sh, None),
    )

  ckpt, record, resumed = None, {}, None
  if checkpoints is not None:
    ckpt = checkpoints.checkpointer
    record = {
      "config": checkpoints.config,
      "rows": n_train,
      "data": checkpoints.fingerprint,
      **checkpoints.meta,
    }
    # Restored onto abstract arrays: a fresh state is never allocated beside the saved one.
    like = {
      "params": shd.abstract(params, param_sh),
      "opt_state": shd.abstract(jax.eval_shape(tx.init, params), opt_sh),
    }
    resumed = checkpoints.resume(record, like, total, limit=hp.steps_said(n_train, name))
  streak = 0  # updates skipped in a row, carried over a resume
  if resumed is not None:
    params, opt_state, start, streak, saved = resumed
    was = _total_then(hp, saved, name, n_train)
    if was is not None and was != total:  # another number of epochs (dpo.epochs may change)
      count = int(schedule_count(opt_state))
      change = horizon_change(hp.optim, count, old_steps=was, new_steps=total)
      rate = f"; its {change}" if change else ""
      writers.say(f"{name} now ends at step {total}, not {was}{rate}")
  else:  # copied: the step donates them, and they may share buffers with a live model
    start = 0
    params = jax.tree.map(jnp.copy, params if mesh is None else shd.place(params, param_sh))
    # Committed, as restored ones are: a resume then runs (and finds cached) the same programs.
    params = jax.device_put(params, param_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

  # The schedule's end is an argument, not a constant of the program: a resume with more epochs
  # (or any stage of another length with these shapes) runs the program compiled before.
  step = make_step(loss_fn, graphdef, tx, hp.optim, n_micro=n_micro, mesh=mesh)
  step = jax.jit(step, donate_argnums=(0, 1), **jit_kw)
  every = ckpt.settings.supervised_every if ckpt is not None else 0
  history = []
  for i in range(start, total):
    batch = put(make_batch(batch_indices(n_train, batch_size, i, seed=seed)))
    params, opt_state, metrics = step(params, opt_state, frozen, batch, np.int32(total), loss_args)
    row = {k: float(shd.to_host(v)) for k, v in metrics.items()}
    history.append(row)
    if on_step is not None:
      on_step(i, total, row)
    # At the limit it raises: what was saved stays, and the weights are not written as a model.
    streak = nonfinite_streak(
      streak,
      "loss or gradient" if row["skipped"] else None,
      step=i + 1,
      limit=max_nonfinite,
      stage=name,
      see=f"{name}_metrics.jsonl",
      hint=f"; lower {name}.optim.lr, or check the data",
    )
    if on_params is not None:
      on_params(i + 1, params)
    done, stop = i + 1, stop_requested()
    at_end = done == total and checkpoints is not None and checkpoints.save_at_end
    if ckpt is not None and (at_end or stop or (every and done % every == 0)):
      state = {"params": params, "opt_state": opt_state}
      ckpt.save(done, state, {**record, "step": done, "nonfinite_streak": streak})
    if stop:
      if ckpt is not None:
        ckpt.wait()
      raise Preempted(
        f"stopped by {GUARD.signal_name} after step {done} of {total} of the {name} stage; "
        + (
          f"checkpoint saved in {ckpt.directory}"
          if ckpt is not None
          else "it starts over when the run is resumed"
        )
      )
  if ckpt is not None:
    ckpt.wait()
  return params, history


def _total_then(hp: SupervisedHparams, saved: dict, name: str, n_train: int) -> int | None:
  """The steps of a checkpoint's stage, from the epochs its record's config gave; None if it
  names none."""
  epochs = saved.get("config", {}).get(name, {}).get("epochs")
  return dataclasses.replace(hp, epochs=epochs).steps(n_train) if epochs else None
