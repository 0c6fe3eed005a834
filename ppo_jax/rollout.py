"""Rollouts and the jitted PPO iteration.

One iteration (Ouyang et al. 2022, InstructGPT; Huang et al. 2024, "The N+ implementation details
of RLHF with PPO"):

1. ``sample_responses``: the policy samples ``N`` tokens per prompt (``pj.generate``'s core).
2. ``make_experience``: log-probs of the policy and the frozen reference, critic values, the
   score (reward model at the last real token, or given), the EOS penalty, the per-token reward
   ``rₜ = −β·KLₜ (+ score at the last token)``, GAE, whitening, the non-finite checks.
3. ``ppo.train_step``: the clipped updates.

``make_step_fns`` jits these once, separately (timed per phase) and fused into one program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ppo_jax.actor_critic import (
  ActorCritic,
  Params,
  critic_values,
  forward,
  response_logprobs,
  reward_scores,
)
from ppo_jax.advantages import gae, group_advantages, rloo_advantages
from ppo_jax.kl import kl_estimate
from ppo_jax.logprobs import token_logprobs
from ppo_jax.masking import masked_mean, masked_sum, masked_var, masked_whiten
from ppo_jax.models.transformer import last_token_index
from ppo_jax.optim import OptimHparams, learning_rate, schedule_count
from ppo_jax.placement import Placement
from ppo_jax.ppo import (
  Experience,
  Frozen,
  Metrics,
  PPOHparams,
  PPOState,
  TrainHparams,
  finish_iteration,
  iteration_keys,
  policy_trains,
  program_hparams,
  train_step,
)
from ppo_jax.sampling import Generation, sample


def sample_responses(
  models: ActorCritic,
  policy_params: Params,
  key: jax.Array,
  prompt_ids_BxP,
  prompt_mask_BxP,
  *,
  hp: PPOHparams,
) -> Generation:
  return sample(
    models.policy,
    policy_params,
    prompt_ids_BxP,
    prompt_mask_BxP,
    key,
    max_new_tokens=hp.max_new_tokens,
    temperature=hp.temperature,
    top_k=hp.top_k,
    top_p=hp.top_p,
    eos_token_ids=hp.stop_ids,
    pad_token_id=hp.pad_token_id,
  )


def make_experience(
  models: ActorCritic,
  state: PPOState,
  frozen: Frozen,
  prompt_ids_BxP,
  prompt_mask_BxP,
  gen: Generation,
  scores_B: jax.Array | None = None,
  *,
  hp: PPOHparams,
) -> tuple[Experience, PPOState, Metrics]:
  """Scores, KL-shaped rewards, values and GAE advantages of a rollout.

  ``scores_B`` comes from a reward function; None reads the reward model. Returns the experience,
  the state with updated score statistics, and the rollout's metrics.
  """
  n = hp.max_new_tokens
  if gen.tokens.shape[1] != n:
    raise ValueError(
      f"gen has {gen.tokens.shape[1]} response tokens per row, hp.max_new_tokens is {n}: sample "
      "with the same max_new_tokens (ppo_jax.rollout.sample_responses does)"
    )
  if (
    gen.tokens.shape[0] != prompt_ids_BxP.shape[0] or prompt_ids_BxP.shape != prompt_mask_BxP.shape
  ):
    raise ValueError(
      f"expected one response per prompt row: prompt_ids {list(prompt_ids_BxP.shape)}, "
      f"prompt_mask {list(prompt_mask_BxP.shape)}, gen.tokens {list(gen.tokens.shape)}"
    )
  ids = jnp.concatenate([prompt_ids_BxP, gen.tokens], axis=1)
  mask = jnp.concatenate([prompt_mask_BxP.astype(jnp.int32), gen.mask.astype(jnp.int32)], axis=1)
  m = gen.mask
  # The policy's own forward pass runs only when something reads it: recomputed old log-probs, or
  # a value head on its trunk. Otherwise the sampler's log-probs serve (one forward pass fewer).
  if hp.recompute_logprobs or models.shared_trunk:
    logits, values = forward(models, state.params, ids, mask, n, frozen_policy=frozen.ref_params)
    logp = token_logprobs(logits, gen.tokens, temperature=hp.temperature)
  else:
    values, logp = critic_values(models, state.params, ids, mask, n), None
  old_logp = logp if hp.recompute_logprobs else gen.logprobs
  ref_vars = models.reference_vars(state.params["policy"], frozen.ref_params)
  ref_logp = response_logprobs(models.policy, ref_vars, ids, mask, n, temperature=hp.temperature)
  B = ids.shape[0]
  if scores_B is None:
    if models.reward is None or frozen.reward_params is None:
      raise ValueError("scores_B is None and there is no reward model: pass the scores [B]")
    scores_B = reward_scores(models.reward, frozen.reward_params, ids, mask)
  scores_B = jnp.asarray(scores_B, jnp.float32)
  if scores_B.shape != (B,):
    raise ValueError(
      f"scores_B: expected one score per response, shape [{B}], got {list(scores_B.shape)}"
    )

  has_eos = jnp.any(jnp.isin(gen.tokens, jnp.asarray(hp.stop_ids, jnp.int32)) & (m > 0), axis=-1)
  if hp.missing_eos_penalty is not None:
    scores_B = jnp.where(has_eos, scores_B, scores_B - hp.missing_eos_penalty)
  finite_scores = jnp.all(jnp.isfinite(scores_B))
  # Non-finite scores must not poison the running statistics: keep the old ones.
  stats = jax.tree.map(
    lambda new, old: jnp.where(finite_scores, new, old),
    state.score_stats.update(scores_B),
    state.score_stats,
  )
  shaped = (scores_B - stats.mean) / (stats.std + 1e-8) if hp.normalize_scores else scores_B

  kl_BxN = jnp.where(m > 0, kl_estimate(old_logp, ref_logp, kind=hp.kl_kind), 0.0)
  non_score_BxN = -state.kl_coef * kl_BxN if hp.kl_mode == "reward" else jnp.zeros_like(kl_BxN)
  if hp.estimator == "gae":
    last = last_token_index(m)
    rewards = non_score_BxN.at[jnp.arange(m.shape[0]), last].add(shaped)
    if hp.whiten_rewards:
      rewards = masked_whiten(rewards, m, shift_mean=False)
    values = jnp.where(m > 0, values, 0.0)
    advantages, returns = gae(rewards, values, m, gamma=hp.gamma, lam=hp.lam)
    if hp.whiten_advantages:
      advantages = masked_whiten(advantages, m)
  else:
    advantages, returns = group_relative(shaped + masked_sum(non_score_BxN, m, axis=-1), m, hp=hp)
    values = jnp.zeros_like(advantages)
  finite_adv = jnp.all(jnp.isfinite(jnp.where(m > 0, advantages, 0.0))) & jnp.all(
    jnp.isfinite(jnp.where(m > 0, returns, 0.0))
  )
  ok = finite_scores & finite_adv

  exp = Experience(
    ids=ids,
    mask=mask,
    response_mask=m,
    old_logprobs=old_logp,
    ref_logprobs=ref_logp,
    old_values=values,
    advantages=advantages,
    returns=returns,
    ok=jnp.broadcast_to(ok, m.shape[:1]),
  )
  seq_kl = masked_sum(kl_BxN, m, axis=-1)
  non_score = masked_sum(non_score_BxN, m, axis=-1)
  metrics = {
    "objective/scores": jnp.mean(scores_B),
    "objective/scores_std": jnp.std(scores_B),
    "objective/kl": jnp.mean(seq_kl),
    "objective/kl_coef": state.kl_coef,
    "objective/non_score_reward": jnp.mean(non_score),
    "objective/rlhf_reward": jnp.mean(scores_B) + jnp.mean(non_score),
    "objective/entropy": jnp.mean(masked_sum(-old_logp, m, axis=-1)),
    "response/length": jnp.mean(jnp.sum(m, axis=-1)),
    "response/eos_rate": jnp.mean(has_eos.astype(jnp.float32)),
    # Guard: 1 when the quantity is not finite (the update is then skipped).
    "nonfinite/scores": 1.0 - finite_scores.astype(jnp.float32),
    "nonfinite/advantages": (finite_scores & ~finite_adv).astype(jnp.float32),
    # Per-sample values ([B]) for the sample tables; the trainer logs only the scalars.
    "sample/score": scores_B,
    "sample/kl": seq_kl,
  }
  if hp.estimator == "gae":  # only PPO has a critic (critic-free values and returns are zeros)
    metrics["val/mean"] = masked_mean(values, m)
    resid_var = masked_var(returns - values, m, unbiased=False)
    metrics["val/var_explained"] = 1.0 - resid_var / jnp.maximum(
      masked_var(returns, m, unbiased=False), 1e-8
    )
  if logp is not None:  # how far the sampler's log-probs are from the trainer's
    metrics["sampler/logprob_mismatch"] = jnp.max(jnp.where(m > 0, jnp.abs(gen.logprobs - logp), 0))
  return exp, state.replace(score_stats=stats), metrics


def group_relative(scores_B: jax.Array, mask_BxN: jax.Array, *, hp: PPOHparams):
  """Critic-free ``(advantages, returns)``: each response's score against the other responses
  to its prompt (``group_advantages`` for GRPO, ``rloo_advantages`` for RLOO), the same for every
  token of the response; returns are zero (there is no critic to fit). With ``kl_mode="reward"``
  the scores already carry −β·KL summed over the response."""
  if hp.estimator == "grpo":
    adv_B = group_advantages(
      scores_B, hp.group_size, normalize_std=hp.group_std, std_scope=hp.group_std_scope
    )
  else:
    adv_B = rloo_advantages(scores_B, hp.group_size)
  advantages = adv_B[:, None] * mask_BxN
  return advantages, jnp.zeros_like(advantages)


def evaluation_scores(
  models: ActorCritic, policy_params: Params, frozen: Frozen, ids_BxL, mask_BxL, *, hp: PPOHparams
) -> tuple[jax.Array, jax.Array]:
  """(reward-model scores or zeros, KL(π ‖ π_ref) per sequence, k1) of sampled sequences."""
  n = hp.max_new_tokens
  policy_vars = models.policy_vars(policy_params, frozen.ref_params)
  logp = response_logprobs(
    models.policy, policy_vars, ids_BxL, mask_BxL, n, temperature=hp.temperature
  )
  ref_vars = models.reference_vars(policy_params, frozen.ref_params)
  ref_logp = response_logprobs(
    models.policy, ref_vars, ids_BxL, mask_BxL, n, temperature=hp.temperature
  )
  m = mask_BxL[:, -n:]
  kl = masked_sum(kl_estimate(logp, ref_logp, kind="k1"), m, axis=-1)
  if models.reward is None:
    return jnp.zeros_like(kl), kl
  return reward_scores(models.reward, frozen.reward_params, ids_BxL, mask_BxL), kl


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted pieces of a PPO iteration, built once by ``make_step_fns``.

  - ``sample(policy_params, frozen, key, prompt_ids, prompt_mask) → Generation``
  - ``score(state, frozen, prompt_ids, prompt_mask, gen, scores) → (experience, state, metrics)``;
    ``scores=None`` reads the reward model.
  - ``update(state, frozen, experience, rollout_kl) → (state, metrics)``: the PPO epochs, then
    the step and KL-coefficient advance.
  - ``iterate(state, frozen, prompt_ids, prompt_mask) → (state, metrics, gen)``: all of the above
    as one XLA program (reward model only).
  - ``evaluate(policy_params, frozen, ids, mask) → (scores, kl)`` of sampled sequences.

  ``score``, ``update`` and ``iterate`` donate the state they are given.
  """

  sample: Callable[..., Generation]
  score: Callable[..., tuple[Experience, PPOState, Metrics]]
  update: Callable[..., tuple[PPOState, Metrics]]
  iterate: Callable[..., tuple[PPOState, Metrics, Generation]]
  evaluate: Callable[..., tuple[jax.Array, jax.Array]]


def make_step_fns(
  models: ActorCritic,
  tx: optax.GradientTransformation,
  hp: PPOHparams,
  optim: OptimHparams | None = None,
  placement: Placement | None = None,
) -> StepFns:
  """Jits the iteration's pieces once, with in/out shardings and donation when ``placement``
  is given (a sharded run), with shardings left to JAX otherwise (one device). With ``optim``
  (``tx``'s hyperparameters), an update reports its rate (``lr``), which needs
  ``Frozen.horizon``. With ``Frozen.hparams`` (``hp.numbers()``, or another config's of the same
  ``hp.structure()``) the programs take those numbers as inputs: a sweep over them compiles
  nothing more."""

  def sample_fn(policy_params, frozen, key, prompt_ids, prompt_mask):
    policy_vars = models.policy_vars(policy_params, frozen.ref_params)
    h = program_hparams(hp, frozen)
    return sample_responses(models, policy_vars, key, prompt_ids, prompt_mask, hp=h)

  def score_fn(state, frozen, prompt_ids, prompt_mask, gen, scores):
    h = program_hparams(hp, frozen)
    return make_experience(models, state, frozen, prompt_ids, prompt_mask, gen, scores, hp=h)

  def update_fn(state, frozen, exp, rollout_kl):
    hparams = TrainHparams(models, tx, hp, mesh=None if placement is None else placement.mesh)
    new_state, metrics = train_step(state, exp, hparams=hparams, frozen=frozen)
    h = program_hparams(hp, frozen)
    if optim is not None:
      if frozen.horizon is None:
        raise ValueError(
          "make_step_fns(optim=...) reports the rate where the schedules end: give "
          "Frozen(horizon={'policy': P, 'value': V})"
        )
      lr = learning_rate(optim, frozen.horizon["policy"])(schedule_count(state.opt_state))
      metrics["lr"] = jnp.where(policy_trains(state, h), lr, 0.0)  # 0 while the critic warms up
    new_state = finish_iteration(new_state, {"objective/kl": rollout_kl}, exp.ids.shape[0], hp=h)
    return new_state, metrics

  def iterate(state, frozen, prompt_ids, prompt_mask):
    key, _ = iteration_keys(state)
    gen = sample_fn(state.params["policy"], frozen, key, prompt_ids, prompt_mask)
    exp, state, roll_metrics = score_fn(state, frozen, prompt_ids, prompt_mask, gen, None)
    state, upd_metrics = update_fn(state, frozen, exp, roll_metrics["objective/kl"])
    return state, {**roll_metrics, **upd_metrics}, gen

  def evaluate(policy_params, frozen, ids, mask):
    h = program_hparams(hp, frozen)
    return evaluation_scores(models, policy_params, frozen, ids, mask, hp=h)

  if placement is None:
    return StepFns(
      sample=jax.jit(sample_fn),
      score=jax.jit(score_fn, donate_argnums=0),
      update=jax.jit(update_fn, donate_argnums=0),
      iterate=jax.jit(iterate, donate_argnums=0),
      evaluate=jax.jit(evaluate),
    )
  p = placement
  policy_sh = p.state.params["policy"]
  return StepFns(
    sample=jax.jit(
      sample_fn,
      in_shardings=(policy_sh, p.frozen, p.replicated, p.batch, p.batch),
      out_shardings=p.generation,
    ),
    score=jax.jit(
      score_fn,
      in_shardings=(p.state, p.frozen, p.batch, p.batch, p.generation, None),
      out_shardings=(p.experience, p.state, None),
      donate_argnums=0,
    ),
    update=jax.jit(
      update_fn,
      in_shardings=(p.state, p.frozen, p.experience, p.replicated),
      out_shardings=(p.state, None),
      donate_argnums=0,
    ),
    iterate=jax.jit(
      iterate,
      in_shardings=(p.state, p.frozen, p.batch, p.batch),
      out_shardings=(p.state, None, p.generation),
      donate_argnums=0,
    ),
    evaluate=jax.jit(
      evaluate,
      in_shardings=(policy_sh, p.frozen, p.batch, p.batch),
      out_shardings=(p.vector, p.vector),
    ),
  )
