"""The PPO stage: a linear loop over iterations around the jitted steps of ``ppo.py``.

Host work per iteration is small: pick the prompt batch (a pure function of seed and step), run
the jitted steps, and, for a Python reward or a gold scorer, decode the responses to text.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ppo_jax import ppo, rollout
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import ActorCritic, merge
from ppo_jax.checkpoint import Checkpointer
from ppo_jax.evaluation import (
  Prompts,
  Scorer,
  decode_responses,
  evaluate,
  host_generation,
  put_rows,
  sample_rows,
  shared_score_parts,
  shared_scores,
)
from ppo_jax.models.lora import merge_lora
from ppo_jax.models.transformer import CausalLM, ScalarHead, ValueModel
from ppo_jax.optim import (
  OptimHparams,
  horizon_change,
  make_actor_critic_optimizer,
  schedule_count,
)
from ppo_jax.preemption import GUARD, Preempted, nonfinite_streak, stop_requested
from ppo_jax.rewards import RewardError, RewardFn, RewardSum, summed
from ppo_jax.rows import batch_indices
from ppo_jax.run_inputs import check_same_prompts, prompts_fingerprint
from ppo_jax.writers import say


def _note_stop_ids(saved: dict, now: tuple[int, ...]) -> None:
  """Says so when a resumed run's responses stop at other ids than its checkpoint's did (its
  record's ``stop_ids``; from before they were recorded, the policy config's EOS ids): a run
  saved before ppo_jax read generation_config.json, say."""
  then = saved.get("stop_ids")
  if then is None and "model_config" in saved:
    cfg = saved["model_config"]
    then = [
      i for i in (cfg.get("eos_token_id"), *cfg.get("extra_eos_token_ids", ())) if i is not None
    ]
  if then is not None and list(dict.fromkeys(then)) != list(now):
    say(
      f"note: the checkpoint's responses stopped at token ids {list(dict.fromkeys(then))}; from "
      f"here they stop at {list(now)} (the policy checkpoint's, its generation_config.json's, and "
      "with data.chat_template its turn end)"
    )


@dataclasses.dataclass
class PPOResult:
  policy: CausalLM
  before: dict[str, float]
  after: dict[str, float]
  history: list[dict[str, float]]


GUARDED = ("scores", "advantages", "loss", "grads")  # in the order they arise


def run_iteration(
  fns: rollout.StepFns,
  state: ppo.PPOState,
  frozen: ppo.Frozen,
  batch: Prompts,
  *,
  scorer: Scorer,
  tokenizer: Any,
  fuse: bool,
  step: int,
  placement: rollout.Placement | None = None,
):
  """One PPO iteration: ``(state, scalar metrics, per-sample metrics, host generation, decoded
  responses)`` (the responses: None unless a reward function needed them)."""
  pids, pmask = put_rows(batch.ids, placement), put_rows(batch.mask, placement)
  t0 = time.perf_counter()
  host_metrics, host_per_sample, texts = {}, {}, None
  if fuse:
    state, metrics, gen = fns.iterate(state, frozen, pids, pmask)
    jax.block_until_ready(state.step)
  else:
    gen = fns.sample(state.params["policy"], frozen, ppo.iteration_keys(state)[0], pids, pmask)
    jax.block_until_ready(gen.tokens)
    host_metrics["time/generate"] = time.perf_counter() - t0
    scores = None
    if scorer.fn is not None:
      host = host_generation(gen)
      texts = decode_responses(tokenizer, host.tokens, host.mask)
      parts = shared_score_parts(scorer.fn, batch, texts, name=scorer.fn_name, step=step)
      if isinstance(scorer.fn, RewardSum):  # each function's scores, before the weights
        for n, column in zip(scorer.fn.names, parts.T, strict=True):
          host_metrics[f"scores/{n}"] = float(column.mean())
          host_per_sample[f"sample/scores/{n}"] = column
      scores = put_rows(
        summed(scorer.fn, parts, name=scorer.fn_name, step=step), placement, vector=True
      )
    t1 = time.perf_counter()
    exp, state, roll_metrics = fns.score(state, frozen, pids, pmask, gen, scores)
    jax.block_until_ready(exp.advantages)
    host_metrics["time/score"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    state, upd_metrics = fns.update(state, frozen, exp, roll_metrics["objective/kl"])
    jax.block_until_ready(state.step)
    host_metrics["time/update"] = time.perf_counter() - t2
    metrics = {**roll_metrics, **upd_metrics}
  elapsed = time.perf_counter() - t0
  fetched = {k: shd.to_host(v) for k, v in metrics.items()}
  row = {k: float(v) for k, v in fetched.items() if np.ndim(v) == 0}
  per_sample = {k: v for k, v in fetched.items() if np.ndim(v) == 1} | host_per_sample
  row.update(host_metrics)
  row["time/iteration"] = elapsed
  gen = host_generation(gen)
  row["tokens_per_s"] = float(gen.mask.sum()) / elapsed
  return state, row, per_sample, gen, texts


def _kept(error: RewardError, step: int, checkpointer: Checkpointer) -> RewardError:
  """``error`` (a reward function's or the gold scorer's) saying that step ``step``, the last
  finished, is saved (once the save is written) and where a rerun resumes."""
  checkpointer.wait()
  where = checkpointer.directory
  return RewardError(f"{error}; step {step} is saved in {where}: a rerun resumes there")


def run_ppo(
  policy: CausalLM,
  scorer: Scorer,
  prompts: Prompts,
  eval_prompts: Prompts,
  tokenizer: Any,
  *,
  hp: ppo.PPOHparams,
  optim: OptimHparams,
  critic_lr_scale: float = 1.0,
  iterations: int,
  batch_size: int,
  critic: ValueModel | ScalarHead | None,
  seed: int,
  fuse: bool = False,
  gold: RewardFn | None = None,
  log: Callable[[int, dict[str, float], Callable[[int], list[dict]]], None] | None = None,
  checkpointer: Checkpointer | None = None,
  record: dict[str, Any] | None = None,
  config_defaults: dict[str, Any] | None = None,
  max_nonfinite: int = 3,
  mesh=None,
) -> PPOResult:
  """Runs PPO iterations of ``batch_size`` prompts against ``scorer`` until step ``iterations``.

  With a ``checkpointer`` holding checkpoints, the run resumes from the latest one (refusing one
  written by a different config or past step ``iterations``: ``Checkpointer.resume``) and saves
  every ``checkpointer.settings.every`` iterations, at the end, and when SIGTERM/SIGINT asks it
  to stop (then raising ``Preempted``). ``record`` (the config, model config, tokenizer path)
  goes into every checkpoint; ``config_defaults`` (every config field's default) lets a
  checkpoint saved before a field existed resume. An iteration whose update was skipped for
  non-finite values is counted; ``max_nonfinite`` in a row raise ``NonFiniteError``.

  ``critic_lr_scale`` multiplies the critic's learning rate (the policy's is ``optim.lr``;
  without a critic there is nothing to scale). Policy and critic have separate Adam states and
  schedules: the critic's decays over all ``iterations``, the policy's over the iterations after
  ``hp.critic_warmup``.

  ``log(step, metrics, samples)`` receives each iteration's metrics; ``samples(k)`` builds the
  sample-table rows of that iteration's first ``k`` responses on demand.
  """
  hp.minibatch_layout(batch_size)  # fail early on indivisible sizes
  if batch_size % hp.group_size:
    raise ValueError(
      f"ppo.batch_size {batch_size} is not divisible by ppo.group_size {hp.group_size}"
    )
  if (critic is None) != (hp.estimator != "gae"):
    raise ValueError(f"the {hp.estimator} estimator needs {'a' if critic is None else 'no'} critic")
  with shd.staged_on_host(mesh):  # the reference's copy of a policy still on the host stays there
    models, params, frozen_policy, reward_params = ActorCritic.build(
      policy, critic, scorer.reward_model
    )
  if hp.critic_warmup and hp.critic_warmup >= iterations:
    raise ValueError(
      f"ppo.critic_warmup {hp.critic_warmup} ≥ ppo.iterations {iterations}: the policy would never"
      " train"
    )
  per_iteration = hp.num_epochs * hp.num_minibatches
  policy_updates_by = lambda n: (n - hp.critic_warmup) * per_iteration  # n iterations in all
  policy_updates, value_updates = policy_updates_by(iterations), iterations * per_iteration
  tx = make_actor_critic_optimizer(
    optim,
    policy_steps=policy_updates,
    value_steps=value_updates,
    value_lr_scale=critic_lr_scale,
  )
  # Where the schedules end and the hyperparameters' numbers: inputs of the programs (a resume
  # with more iterations, or a run with another clip ε, runs the ones compiled before).
  horizon = {"policy": np.int32(policy_updates), "value": np.int32(value_updates)}
  frozen = ppo.Frozen(frozen_policy, reward_params, horizon=horizon, hparams=hp.numbers())
  make_state = functools.partial(ppo.init_state, tx=tx, hp=hp, seed=seed)
  abstract = jax.eval_shape(make_state, params)
  placement = None
  if mesh is None:
    # Where the models are: fresh and restored states alike. The reference and reward model too:
    # a resume loads them from disk (uncommitted), a fresh run trained them here (committed), and
    # score_fn was compiled again on every first resume.
    device = shd.device_of(params)
    state_sh = jax.tree.map(lambda _: device, abstract)
    frozen = jax.device_put(frozen, device)
  else:
    shd.check_batch(batch_size, mesh)
    placement = rollout.Placement.build(mesh, abstract, frozen, tx)
    state_sh = placement.state
    frozen = shd.place(frozen, placement.frozen)
  fns = rollout.make_step_fns(models, tx, hp, optim, placement)
  # A resume on other prompts is refused, as a supervised stage's on other data is.
  prints = prompts_fingerprint(prompts, eval_prompts)
  record = {
    **(record or {}),
    "stop_ids": list(hp.stop_ids),
    "prompts": prints,
    "held_out_rows": len(eval_prompts),
  }

  resumed = None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    # Restored onto abstract arrays: a fresh state is never allocated beside the saved one. The
    # key is concrete (a restore reads its implementation), and placed as the state's would be.
    like = shd.abstract(abstract, state_sh)
    # Made by a program: device_put cannot place onto other processes' devices.
    key = jax.jit(lambda: jax.random.key(seed), out_shardings=state_sh.key)()
    like = like.replace(key=key)
    same = functools.partial(check_same_prompts, prints, len(eval_prompts), checkpointer.directory)
    resumed = checkpointer.resume(like, record, iterations, config_defaults, check=same)
  if resumed:
    state, saved = resumed
    _note_stop_ids(saved, hp.stop_ids)
  elif mesh is None:  # committed to the device, as a restored state is: the same programs
    state = jax.device_put(make_state(params), state_sh)
  else:  # created straight onto its shardings (a plain tx.init would leave counts on device 0)
    params = shd.place(params, placement.state.params)
    state = jax.jit(make_state, out_shardings=placement.state)(params)

  eval_kw = dict(
    batch_size=batch_size, scorer=scorer, gold=gold, seed=seed + 1, placement=placement
  )

  def held_out(policy_params):
    if not len(eval_prompts):
      return {}
    return evaluate(fns, policy_params, frozen, eval_prompts, tokenizer, **eval_kw)

  before, streak = None, 0
  if resumed:
    before, streak = saved["before"], saved["nonfinite_streak"]
    was = saved.get("config", {}).get("ppo", {}).get("iterations", iterations)
    change = horizon_change(
      optim,
      int(schedule_count(state.opt_state)),
      old_steps=policy_updates_by(was),
      new_steps=policy_updates,
    )
    if change:
      say(
        f"ppo.iterations {was} → {iterations}: the learning-rate schedules of policy and critic "
        f"now end at iteration {iterations}; the policy's {change}"
      )
  if before is None:
    before = held_out(state.params["policy"])

  def save(done: int) -> None:  # the state, as it is, after ``done`` iterations
    record_now = {**record, "step": done, "before": before, "nonfinite_streak": streak}
    checkpointer.save(done, state, record_now)

  history = []
  for it in range(int(state.step), iterations):
    step = it + 1
    # group_size responses per prompt, consecutive (1 for PPO)
    idx = batch_indices(len(prompts), batch_size // hp.group_size, it, seed=seed)
    batch = prompts.take(np.repeat(idx, hp.group_size))
    try:
      state, row, per_sample, gen, texts = run_iteration(  # gen: on the host
        fns,
        state,
        frozen,
        batch,
        scorer=scorer,
        tokenizer=tokenizer,
        fuse=fuse,
        step=step,
        placement=placement,
      )
    except RewardError as e:  # before the update: the last finished step is kept, as a stop's
      if checkpointer is None or it == 0:
        raise
      if it % checkpointer.settings.every and it != checkpointer.latest_step():  # not saved yet
        save(it)
      raise _kept(e, it, checkpointer) from e
    golds = gold_error = None
    if gold is not None:  # after the update: a failure keeps this step (saved below)
      texts = texts or decode_responses(tokenizer, gen.tokens, gen.mask)
      try:
        golds = shared_scores(gold, batch, texts, name="gold scorer", step=step)
        row["gold/score"] = float(np.mean(golds))
      except RewardError as e:
        gold_error = e
    history.append(row)
    if log is not None:
      log(
        step,
        row,
        lambda k, b=batch, g=gen, t=texts, s=per_sample, o=golds: sample_rows(
          tokenizer, b, g, t, s, o, k
        ),
      )

    bad = [q for q in GUARDED if row.get(f"nonfinite/{q}", 0.0) > 0]
    skipped = round(row.get("update/skipped", 1.0) * per_iteration)
    streak = nonfinite_streak(
      streak,
      bad[0] if bad else None,
      step=step,
      limit=max_nonfinite,
      stage="ppo",
      see="nonfinite/* in metrics.jsonl",
      skipped="update skipped"
      if skipped >= per_iteration
      else f"{skipped} of {per_iteration} minibatch updates skipped, the others applied",
    )
    stop = stop_requested()
    if checkpointer is not None and (
      step % checkpointer.settings.every == 0 or step == iterations or stop or gold_error
    ):
      save(step)
    if gold_error is not None:
      if checkpointer is None:
        raise gold_error
      raise _kept(gold_error, step, checkpointer) from gold_error
    if stop:
      if checkpointer is not None:
        checkpointer.wait()
      raise Preempted(
        f"stopped by {GUARD.signal_name} after step {step}"
        + (f"; checkpoint saved in {checkpointer.directory}" if checkpointer is not None else "")
      )
  if checkpointer is not None:
    checkpointer.wait()
  try:
    after = held_out(state.params["policy"])
  except RewardError as e:  # the last step is saved: a rerun resumes there and evaluates again
    if checkpointer is None:
      raise
    raise _kept(e, int(state.step), checkpointer) from e
  policy_vars = models.policy_vars(state.params["policy"], frozen.ref_params)
  if jax.process_count() > 1:  # save_pretrained needs whole arrays on this host
    policy_vars = jax.tree.map(shd.to_host, policy_vars)
  final = merge(models.policy, policy_vars)
  if models.lora:  # adapters folded into the weights: a plain Hugging Face model
    final = merge_lora(final)
  return PPOResult(policy=final, before=before, after=after, history=history)
