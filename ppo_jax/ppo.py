"""PPO for language models: rollout → experience (rewards, GAE) → clipped updates.

One iteration (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF with
PPO", https://arxiv.org/abs/2403.17031):

1. ``sample_responses``: the policy samples ``N`` tokens per prompt (``pj.generate``'s core).
2. ``make_experience``: log-probs of the policy and the frozen reference, critic values, the
   score (reward model at the last real token, or given), the EOS penalty, the per-token reward
   ``rₜ = −β·KLₜ (+ score at the last token)``, GAE, whitening.
3. ``train_step``: ``num_epochs`` × ``num_minibatches`` clipped policy and value steps, each a
   ``lax.scan``; a minibatch may be split in micro-batches whose gradients add up to exactly the
   minibatch's token-mean gradient.

Everything is a pure function of ``PPOState``; ``make_step_fns`` jits them once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ppo_jax import masking
from ppo_jax.actor_critic import ActorCritic, Params, forward, response_logprobs, reward_scores
from ppo_jax.advantages import gae
from ppo_jax.kl import KL_KINDS, adaptive_kl_update, kl_estimate
from ppo_jax.logprobs import entropy_from_logits, token_logprobs
from ppo_jax.losses import policy_loss, value_loss
from ppo_jax.masking import masked_mean, masked_sum, masked_whiten
from ppo_jax.models.transformer import last_token_index
from ppo_jax.sampling import Generation, sample

Metrics = dict[str, jax.Array]
KL_MODES = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class PPOHparams:
  """PPO's hyperparameters (static under jit). Names follow the papers."""

  # Rollout.
  max_new_tokens: int = 32
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 1.0
  eos_token_id: int | None = None
  pad_token_id: int = 0
  # Update.
  num_epochs: int = 4
  num_minibatches: int = 1
  micro_batch_size: int | None = None  # None: the whole minibatch at once
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  vf_clip: float | None = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  agg: str = "token-mean"
  # Advantages.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  whiten_rewards: bool = False
  normalize_scores: bool = False  # by running mean/std of the scores
  missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
  recompute_logprobs: bool = True  # old log-probs from a training-style forward, not the sampler
  # KL to the reference policy.
  kl_coef: float = 0.05
  kl_kind: str = "k1"
  kl_mode: str = "reward"  # reward: −β·KL per token in the reward; loss: β·KL added to the loss
  kl_adaptive: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10000.0

  def __post_init__(self):
    checks = {
      "agg": (self.agg, masking.AGG_MODES),
      "kl_kind": (self.kl_kind, KL_KINDS),
      "kl_mode": (self.kl_mode, KL_MODES),
    }
    for name, (value, allowed) in checks.items():
      if value not in allowed:
        raise ValueError(f"{name}: unknown {value!r}; expected one of {', '.join(allowed)}")
    for name in ("num_epochs", "num_minibatches", "max_new_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")

  def minibatch_layout(self, batch_size: int) -> tuple[int, int]:
    """``(minibatch size, micro-batches per minibatch)`` for a rollout of ``batch_size``."""
    if batch_size % self.num_minibatches:
      raise ValueError(
        f"ppo.batch_size {batch_size} is not divisible by ppo.num_minibatches "
        f"{self.num_minibatches}"
      )
    mb = batch_size // self.num_minibatches
    micro = self.micro_batch_size or mb
    if mb % micro:
      raise ValueError(f"minibatch size {mb} is not divisible by ppo.micro_batch_size {micro}")
    return mb, mb // micro


@flax.struct.dataclass
class RunningStats:
  """Running mean and variance (Chan et al.'s parallel Welford update) of a scalar stream."""

  count: jax.Array  # [] float32
  mean: jax.Array  # [] float32
  m2: jax.Array  # [] float32: Σ (x − mean)²

  @classmethod
  def zeros(cls) -> RunningStats:
    # Three distinct buffers: the state is donated, and a buffer may be donated only once.
    return cls(*(jnp.zeros([], jnp.float32) for _ in range(3)))

  def update(self, x_N: jax.Array) -> RunningStats:
    n = jnp.asarray(x_N.shape[0], jnp.float32)
    batch_mean = jnp.mean(x_N)
    batch_m2 = jnp.sum(jnp.square(x_N - batch_mean))
    total = self.count + n
    delta = batch_mean - self.mean
    mean = self.mean + delta * n / total
    m2 = self.m2 + batch_m2 + jnp.square(delta) * self.count * n / total
    return RunningStats(total, mean, m2)

  @property
  def std(self) -> jax.Array:
    return jnp.sqrt(self.m2 / jnp.maximum(self.count - 1.0, 1.0))


@flax.struct.dataclass
class PPOState:
  """Everything PPO's iterations change. ``key`` is fixed; iteration t uses fold_in(key, t)."""

  step: jax.Array  # [] int32: completed PPO iterations
  params: Params  # {"policy": ..., "value": ...}
  opt_state: optax.OptState
  kl_coef: jax.Array  # [] float32: β
  score_stats: RunningStats
  key: jax.Array  # typed PRNG key


@flax.struct.dataclass
class Frozen:
  """Models PPO reads but never trains."""

  ref_params: Params  # the reference policy (same graph as the policy)
  reward_params: Params | None  # the reward model; None when scores come from a function


@flax.struct.dataclass
class Experience:
  """One rollout, ready for the update. L = P + N."""

  ids: jax.Array  # [B, L] int32: prompt (left-padded) then response
  mask: jax.Array  # [B, L] int32: attention mask
  response_mask: jax.Array  # [B, N] float32
  old_logprobs: jax.Array  # [B, N]
  ref_logprobs: jax.Array  # [B, N]
  old_values: jax.Array  # [B, N]
  advantages: jax.Array  # [B, N]
  returns: jax.Array  # [B, N]


def init_state(
  params: Params, tx: optax.GradientTransformation, hp: PPOHparams, *, seed: int
) -> PPOState:
  """A fresh state. ``params`` are copied: the jitted steps donate the state's buffers, and the
  live models the parameters came from must stay usable."""
  params = jax.tree.map(jnp.copy, params)
  return PPOState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    opt_state=tx.init(params),
    kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
    score_stats=RunningStats.zeros(),
    key=jax.random.key(seed),
  )


def iteration_keys(state: PPOState) -> tuple[jax.Array, jax.Array]:
  """(sampling key, shuffling key) of the current iteration."""
  k = jax.random.fold_in(state.key, state.step)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


# --------------------------------------------------------------------------------------------------
# 1. Rollout.


def sample_responses(
  models: ActorCritic,
  policy_params: Params,
  key: jax.Array,
  prompt_ids_BxP,
  prompt_mask_BxP,
  *,
  hp: PPOHparams,
) -> Generation:
  eos = () if hp.eos_token_id is None else (hp.eos_token_id,)
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
    eos_token_ids=eos,
    pad_token_id=hp.pad_token_id,
  )


# --------------------------------------------------------------------------------------------------
# 2. Experience.


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
  ids = jnp.concatenate([prompt_ids_BxP, gen.tokens], axis=1)
  mask = jnp.concatenate([prompt_mask_BxP.astype(jnp.int32), gen.mask.astype(jnp.int32)], axis=1)
  m = gen.mask
  logits, values = forward(models, state.params, ids, mask, n)
  logp = token_logprobs(logits, gen.tokens, temperature=hp.temperature)
  old_logp = logp if hp.recompute_logprobs else gen.logprobs
  ref_logp = response_logprobs(
    models.policy, frozen.ref_params, ids, mask, n, temperature=hp.temperature
  )
  if scores_B is None:
    scores_B = reward_scores(models.reward, frozen.reward_params, ids, mask)
  scores_B = scores_B.astype(jnp.float32)

  has_eos = (
    jnp.any((gen.tokens == hp.eos_token_id) & (m > 0), axis=-1)
    if hp.eos_token_id is not None
    else jnp.zeros(m.shape[:1], bool)
  )
  if hp.missing_eos_penalty is not None:
    scores_B = jnp.where(has_eos, scores_B, scores_B - hp.missing_eos_penalty)
  stats = state.score_stats.update(scores_B)
  shaped = (scores_B - stats.mean) / (stats.std + 1e-8) if hp.normalize_scores else scores_B

  kl_BxN = jnp.where(m > 0, kl_estimate(old_logp, ref_logp, kind=hp.kl_kind), 0.0)
  non_score_BxN = -state.kl_coef * kl_BxN if hp.kl_mode == "reward" else jnp.zeros_like(kl_BxN)
  last = last_token_index(m)
  rewards = non_score_BxN.at[jnp.arange(m.shape[0]), last].add(shaped)
  if hp.whiten_rewards:
    rewards = masked_whiten(rewards, m, shift_mean=False)
  values = jnp.where(m > 0, values, 0.0)
  advantages, returns = gae(rewards, values, m, gamma=hp.gamma, lam=hp.lam)
  if hp.whiten_advantages:
    advantages = masked_whiten(advantages, m)

  exp = Experience(
    ids=ids,
    mask=mask,
    response_mask=m,
    old_logprobs=old_logp,
    ref_logprobs=ref_logp,
    old_values=values,
    advantages=advantages,
    returns=returns,
  )
  seq_kl = masked_sum(kl_BxN, m, axis=-1)
  non_score = masked_sum(non_score_BxN, m, axis=-1)
  resid_var = _masked_var(returns - values, m)
  metrics = {
    "objective/scores": jnp.mean(scores_B),
    "objective/scores_std": jnp.std(scores_B),
    "objective/kl": jnp.mean(seq_kl),
    "objective/kl_coef": state.kl_coef,
    "objective/non_score_reward": jnp.mean(non_score),
    "objective/rlhf_reward": jnp.mean(scores_B) + jnp.mean(non_score),
    "objective/entropy": jnp.mean(masked_sum(-old_logp, m, axis=-1)),
    "val/var_explained": 1.0 - resid_var / jnp.maximum(_masked_var(returns, m), 1e-8),
    "val/mean": masked_mean(values, m),
    "response/length": jnp.mean(jnp.sum(m, axis=-1)),
    "response/eos_rate": jnp.mean(has_eos.astype(jnp.float32)),
    "sampler/logprob_mismatch": jnp.max(jnp.where(m > 0, jnp.abs(gen.logprobs - logp), 0.0)),
    # Per-sample values ([B]) for the sample tables; the trainer logs only the scalars.
    "sample/score": scores_B,
    "sample/kl": seq_kl,
  }
  return exp, state.replace(score_stats=stats), metrics


def _masked_var(x, m):
  mean = masked_mean(x, m)
  return masked_mean(jnp.square(x - mean), m)


# --------------------------------------------------------------------------------------------------
# 3. Update.


def _loss(
  params: Params,
  micro: Experience,
  weights: dict[str, jax.Array],
  kl_coef: jax.Array,
  models: ActorCritic,
  hp: PPOHparams,
) -> tuple[jax.Array, Metrics]:
  """The micro-batch's share of the minibatch loss and metrics.

  Each term is its micro-batch aggregate times ``wᵢ / W`` (its aggregation weight over the whole
  minibatch's), so the micro-batches' losses, gradients and metrics add up exactly to the
  minibatch's.
  """
  n = hp.max_new_tokens
  m = micro.response_mask
  logits, values = forward(models, params, micro.ids, micro.mask, n)
  logp = token_logprobs(logits, micro.ids[:, -n:], temperature=hp.temperature)
  pg, pg_m = policy_loss(
    logp,
    micro.old_logprobs,
    micro.advantages,
    m,
    clip_eps=hp.clip_eps,
    clip_eps_high=hp.clip_eps_high,
    dual_clip=hp.dual_clip,
    agg=hp.agg,
  )
  vf, vf_m = value_loss(values, micro.old_values, micro.returns, m, clip_eps=hp.vf_clip, agg=hp.agg)
  entropy = masked_mean(entropy_from_logits(logits, temperature=hp.temperature), m)
  share_agg = pg_m[masking.agg_weight_key(hp.agg)] / weights["agg"]
  share_tok = pg_m["num_tokens"] / weights["tokens"]
  loss = share_agg * (pg + hp.vf_coef * vf) - hp.entropy_coef * share_tok * entropy
  kl_loss = jnp.zeros([])
  if hp.kl_mode == "loss":
    kl_loss = masking.aggregate(kl_estimate(logp, micro.ref_logprobs, kind=hp.kl_kind), m, hp.agg)
    loss = loss + share_agg * kl_coef * kl_loss
  metrics = {
    "loss/policy_avg": share_agg * pg,
    "loss/value_avg": share_agg * vf,
    "loss/kl_avg": share_agg * kl_loss,
    "policy/approxkl_avg": share_tok * pg_m["approx_kl"],
    "policy/clipfrac_avg": share_tok * pg_m["clipfrac"],
    "policy/dual_clipfrac_avg": share_tok * pg_m["dual_clipfrac"],
    "policy/entropy_avg": share_tok * entropy,
    "val/clipfrac_avg": share_tok * vf_m["clipfrac"],
    "val/ratio": share_tok * pg_m["ratio"],
    "val/error": share_tok * vf_m["error"],
  }
  return loss, metrics


def _split(tree, parts: int):
  return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), tree)


def minibatch_gradients(
  models: ActorCritic,
  params: Params,
  mb: Experience,
  kl_coef: jax.Array,
  n_micro: int,
  *,
  hp: PPOHparams,
) -> tuple[Params, Metrics]:
  """Gradient and metrics of one minibatch, accumulated over ``n_micro`` micro-batches.

  Each micro-batch's loss is weighted by its share of the minibatch's aggregation weight (tokens
  for token-mean, non-empty rows for the seq-mean modes), so the summed gradient is the
  minibatch's own, whatever ``n_micro``.
  """
  weights = {
    "agg": masking.agg_weight(mb.response_mask, hp.agg),
    "tokens": masking.agg_weight(mb.response_mask, "token-mean"),
  }

  def micro_step(grads, micro):
    g, metrics = jax.grad(_loss, has_aux=True)(params, micro, weights, kl_coef, models, hp)
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(micro_step, zeros, _split(mb, n_micro))
  return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics)


@dataclasses.dataclass(frozen=True)
class TrainHparams:
  """What ``train_step`` needs besides arrays (hashable: a jit static argument)."""

  models: ActorCritic
  tx: optax.GradientTransformation
  ppo: PPOHparams


def train_step(
  state: PPOState, batch: Experience, *, hparams: TrainHparams
) -> tuple[PPOState, Metrics]:
  """PPO's update: ``num_epochs`` passes over ``batch`` in ``num_minibatches`` minibatches.

  Each epoch draws a fresh permutation; epochs and minibatches are ``lax.scan``s, and a minibatch
  may be accumulated over micro-batches (``minibatch_gradients``). Jit it with
  ``jax.jit(train_step, static_argnames="hparams", donate_argnums=0)``.
  """
  models, tx, hp = hparams.models, hparams.tx, hparams.ppo
  exp = batch
  B = exp.ids.shape[0]
  _, n_micro = hp.minibatch_layout(B)
  _, perm_key = iteration_keys(state)

  def minibatch_step(carry, mb: Experience):
    params, opt_state = carry
    grads, metrics = minibatch_gradients(models, params, mb, state.kl_coef, n_micro, hp=hp)
    metrics["grad/norm"] = optax.tree.norm(grads)
    metrics["grad/policy_norm"] = optax.tree.norm(grads["policy"])
    metrics["grad/value_norm"] = optax.tree.norm(grads["value"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), metrics

  def epoch(carry, key):
    shuffled = jax.tree.map(lambda x: x[jax.random.permutation(key, B)], exp)
    return jax.lax.scan(minibatch_step, carry, _split(shuffled, hp.num_minibatches))

  keys = jax.random.split(perm_key, hp.num_epochs)
  (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state), keys)
  # metrics: [epochs, minibatches] each.
  out = {k: jnp.mean(v) for k, v in metrics.items()}
  out["policy/approxkl_first_minibatch"] = metrics["policy/approxkl_avg"][0, 0]
  out["policy/clipfrac_first_minibatch"] = metrics["policy/clipfrac_avg"][0, 0]
  return state.replace(params=params, opt_state=opt_state), out


def finish_iteration(
  state: PPOState, metrics: Metrics, batch_size: int, *, hp: PPOHparams
) -> PPOState:
  """Advances the step and, if adaptive, the KL coefficient (from the rollout's KL)."""
  kl_coef = state.kl_coef
  if hp.kl_adaptive:
    kl_coef = adaptive_kl_update(
      kl_coef, metrics["objective/kl"], batch_size, target=hp.kl_target, horizon=hp.kl_horizon
    )
  return state.replace(step=state.step + 1, kl_coef=kl_coef)


# --------------------------------------------------------------------------------------------------
# Jitted entry points.


def evaluation_scores(
  models: ActorCritic, policy_params: Params, frozen: Frozen, ids_BxL, mask_BxL, *, hp: PPOHparams
) -> tuple[jax.Array, jax.Array]:
  """(reward-model scores or zeros, KL(π ‖ π_ref) per sequence, k1) of sampled sequences."""
  n = hp.max_new_tokens
  logp = response_logprobs(
    models.policy, policy_params, ids_BxL, mask_BxL, n, temperature=hp.temperature
  )
  ref_logp = response_logprobs(
    models.policy, frozen.ref_params, ids_BxL, mask_BxL, n, temperature=hp.temperature
  )
  m = mask_BxL[:, -n:]
  kl = masked_sum(kl_estimate(logp, ref_logp, kind="k1"), m, axis=-1)
  if models.reward is None:
    return jnp.zeros_like(kl), kl
  return reward_scores(models.reward, frozen.reward_params, ids_BxL, mask_BxL), kl


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted pieces of a PPO iteration, built once by ``make_step_fns``.

  - ``sample(policy_params, key, prompt_ids, prompt_mask) → Generation``
  - ``score(state, frozen, prompt_ids, prompt_mask, gen, scores) → (experience, state, metrics)``;
    ``scores=None`` reads the reward model.
  - ``update(state, experience, rollout_kl) → (state, metrics)``: the PPO epochs, then the step
    and KL-coefficient advance.
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
  lr_schedule: Callable[[Any], Any] | None = None,
) -> StepFns:
  def sample_fn(policy_params, key, prompt_ids, prompt_mask):
    return sample_responses(models, policy_params, key, prompt_ids, prompt_mask, hp=hp)

  def score_fn(state, frozen, prompt_ids, prompt_mask, gen, scores):
    return make_experience(models, state, frozen, prompt_ids, prompt_mask, gen, scores, hp=hp)

  def update_fn(state, exp, rollout_kl):
    new_state, metrics = train_step(state, exp, hparams=TrainHparams(models, tx, hp))
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step * hp.num_epochs * hp.num_minibatches))
    new_state = finish_iteration(new_state, {"objective/kl": rollout_kl}, exp.ids.shape[0], hp=hp)
    return new_state, metrics

  def iterate(state, frozen, prompt_ids, prompt_mask):
    key, _ = iteration_keys(state)
    gen = sample_fn(state.params["policy"], key, prompt_ids, prompt_mask)
    exp, state, roll_metrics = score_fn(state, frozen, prompt_ids, prompt_mask, gen, None)
    state, upd_metrics = update_fn(state, exp, roll_metrics["objective/kl"])
    return state, {**roll_metrics, **upd_metrics}, gen

  return StepFns(
    sample=jax.jit(sample_fn),
    score=jax.jit(score_fn, donate_argnums=0),
    update=jax.jit(update_fn, donate_argnums=0),
    iterate=jax.jit(iterate, donate_argnums=0),
    evaluate=jax.jit(functools.partial(evaluation_scores, models, hp=hp)),
  )
