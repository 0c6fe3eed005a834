"""PPO's state and update: ``PPOState`` and ``train_step`` (hyperparameters: ``PPOHparams``, from
``ppo_jax.hparams``).

``train_step`` runs ``num_epochs`` × ``num_minibatches`` clipped policy and value steps over one
rollout's ``Experience``, each a ``lax.scan``; a minibatch may be split in micro-batches whose
gradients add up to exactly the minibatch's (Schulman et al. 2017; Huang et al. 2024, "The N+
implementation details of RLHF with PPO", https://arxiv.org/abs/2403.17031). The rollout that
produces the ``Experience`` is ``ppo_jax.rollout``.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ppo_jax import masking
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import ActorCritic, Params, forward
from ppo_jax.hparams import PPOHparams
from ppo_jax.kl import adaptive_kl_update, kl_estimate
from ppo_jax.logprobs import entropy_from_logits, token_logprobs
from ppo_jax.losses import policy_loss, value_loss
from ppo_jax.masking import masked_mean
from ppo_jax.optim import under_key

Metrics = dict[str, jax.Array]


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
  """What PPO's programs read but never change: the models it does not train, where the
  learning-rate schedules end, and the hyperparameters' numbers.

  ``horizon``: ``{"policy": P, "value": V}`` int32 scalars, the updates after which the two
  schedules of ``optim.make_actor_critic_optimizer`` end (``optim.scale_by_schedule``); None
  keeps the optimizer's own. An input of the programs, not a constant compiled into them: a run
  resumed with more iterations, or a run of another length, runs the programs compiled before.

  ``hparams``: ``PPOHparams.numbers()`` (clip ε, γ, λ, the coefficients, …) as inputs of the
  programs, which then compile only ``hp.structure()``: one program serves a sweep over them
  (``frozen.replace(hparams=other.numbers())``). None compiles the numbers in. Inside the
  programs they are traced, so only a ``PPOHparams`` checks them: give ``numbers()`` of one, not
  a dict written by hand (γ = 1.5 there would run).
  """

  ref_params: Params  # the reference policy's weights; with LoRA the base weights (shared)
  reward_params: Params | None  # the reward model; None when scores come from a function
  horizon: dict[str, jax.Array] | None = None
  hparams: dict[str, jax.Array] | None = None


def program_hparams(hp: PPOHparams, frozen: Frozen | None) -> PPOHparams:
  """The hyperparameters a program runs with: ``hp``'s structure with ``frozen.hparams``' numbers
  (traced inside jit), or ``hp`` itself when ``frozen`` carries none."""
  if frozen is not None and frozen.hparams is not None:
    return hp.structure().with_numbers(frozen.hparams)
  if hp.is_structure:
    raise ValueError(
      "hparams: a PPOHparams.structure() leaves its numbers to the program's inputs; give "
      "Frozen(hparams=hp.numbers())"
    )
  return hp


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
  ok: jax.Array  # [B] bool, the same in every row: scores and advantages are finite


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


def policy_trains(state: PPOState, hp: PPOHparams) -> jax.Array | bool:
  """Whether this iteration updates the policy: past ``hp.critic_warmup`` (a static True when
  there is no warm-up, so the program is the same as without the option)."""
  return state.step >= hp.critic_warmup if hp.critic_warmup else True


def iteration_keys(state: PPOState) -> tuple[jax.Array, jax.Array]:
  """(sampling key, shuffling key) of the current iteration."""
  k = jax.random.fold_in(state.key, state.step)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


# --------------------------------------------------------------------------------------------------
# 3. Update.


def _loss(
  params: Params,
  micro: Experience,
  weights: dict[str, jax.Array],
  kl_coef: jax.Array,
  models: ActorCritic,
  hp: PPOHparams,
  frozen_policy: Params | None,
  policy_on: jax.Array,
) -> tuple[jax.Array, Metrics]:
  """The micro-batch's share of the minibatch loss and metrics.

  Each term is its micro-batch aggregate times ``wᵢ / W`` (its aggregation weight over the whole
  minibatch's), so the micro-batches' losses, gradients and metrics add up exactly to the
  minibatch's. ``policy_on`` (0 or 1) scales the policy's terms (the clipped surrogate, entropy
  and KL); the metrics report them either way.
  """
  n = hp.max_new_tokens
  m = micro.response_mask
  logits, values = forward(models, params, micro.ids, micro.mask, n, frozen_policy=frozen_policy)
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
  critic = models.value is not None
  vf = jnp.zeros([])
  if critic:
    old_v, returns = micro.old_values, micro.returns
    vf, vf_m = value_loss(values, old_v, returns, m, clip_eps=hp.vf_clip, agg=hp.agg)
  entropy = masked_mean(entropy_from_logits(logits, temperature=hp.temperature), m)
  share_agg = pg_m[masking.agg_weight_key(hp.agg)] / weights["agg"]
  share_tok = pg_m["num_tokens"] / weights["tokens"]
  loss = share_agg * (policy_on * pg + hp.vf_coef * vf)
  loss = loss - policy_on * hp.entropy_coef * share_tok * entropy
  kl_loss = jnp.zeros([])
  if hp.kl_mode == "loss":
    # d = 0 at masked tokens, so nothing there reaches the gradient (k3's e^{−d} could be inf).
    ref = micro.ref_logprobs
    kl_loss = masking.aggregate(
      kl_estimate(jnp.where(m > 0, logp, ref), ref, kind=hp.kl_kind), m, agg=hp.agg
    )
    loss = loss + policy_on * share_agg * kl_coef * kl_loss
  metrics = {
    "loss/policy_avg": share_agg * pg,
    "loss/kl_avg": share_agg * kl_loss,
    "policy/approxkl_avg": share_tok * pg_m["approx_kl"],
    "policy/clipfrac_avg": share_tok * pg_m["clipfrac"],
    "policy/dual_clipfrac_avg": share_tok * pg_m["dual_clipfrac"],
    "policy/ratio_clamped_avg": share_tok * pg_m["ratio_clamped"],
    "policy/entropy_avg": share_tok * entropy,
    "val/ratio": share_tok * pg_m["ratio"],
  }
  if critic:  # critic-free runs (GRPO, RLOO) log no value metrics rather than zeros
    metrics["loss/value_avg"] = share_agg * vf
    metrics["val/clipfrac_avg"] = share_tok * vf_m["clipfrac"]
    metrics["val/error"] = share_tok * vf_m["error"]
  return loss, metrics


def minibatch_gradients(
  models: ActorCritic,
  params: Params,
  mb: Experience,
  kl_coef: jax.Array,
  n_micro: int,
  *,
  hp: PPOHparams,
  frozen_policy: Params | None = None,
  mesh=None,
  train_policy: jax.Array | bool = True,
) -> tuple[Params, Metrics]:
  """Gradient and metrics of one minibatch, accumulated over ``n_micro`` micro-batches.

  Each micro-batch's loss is weighted by its share of the minibatch's aggregation weight (tokens
  for token-mean, non-empty rows for the seq-mean modes), so the summed gradient is the
  minibatch's own, whatever ``n_micro``. ``frozen_policy``: the base weights under LoRA adapters
  (they get no gradient). ``train_policy=False`` leaves out the policy's loss terms (the critic
  warm-up); a critic on the policy's trunk still sends its gradient there.
  """
  policy_on = jnp.asarray(train_policy, jnp.float32)
  weights = {  # counts; at least 1, so an all-masked minibatch gives 0 with zero gradients
    "agg": jnp.maximum(masking.agg_weight(mb.response_mask, agg=hp.agg), 1.0),
    "tokens": jnp.maximum(masking.agg_weight(mb.response_mask, agg="token-mean"), 1.0),
  }

  def micro_step(grads, micro):
    g, metrics = jax.grad(_loss, has_aux=True)(
      params, micro, weights, kl_coef, models, hp, frozen_policy, policy_on
    )
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(micro_step, zeros, shd.split_rows(mb, n_micro, mesh))
  return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics)


@dataclasses.dataclass(frozen=True)
class TrainHparams:
  """What ``train_step`` needs besides arrays (hashable: a jit static argument)."""

  models: ActorCritic
  tx: optax.GradientTransformation
  ppo: PPOHparams
  mesh: jax.sharding.Mesh | None = None  # sharded run: rows stay over ('data', 'fsdp')


def train_step(
  state: PPOState, batch: Experience, *, hparams: TrainHparams, frozen: Frozen | None = None
) -> tuple[PPOState, Metrics]:
  """PPO's update: ``num_epochs`` passes over ``batch`` in ``num_minibatches`` minibatches.

  Each epoch draws a fresh permutation; epochs and minibatches are ``lax.scan``s, and a minibatch
  may be accumulated over micro-batches (``minibatch_gradients``). ``frozen`` is needed when the
  policy trains LoRA adapters (its base weights are there). While ``state.step`` is below
  ``hp.critic_warmup`` only the critic trains: the policy's loss terms are left out and its
  parameters and optimizer state kept, so its first update uses a critic trained that long. With
  ``hp.early_stop_kl``, a minibatch whose approximate KL(π_old ‖ π) (before its update) exceeds it
  is not applied, and the iteration's later ones' gradients are not computed (a ``lax.cond``;
  the metrics average the minibatches computed; ``update/early_stopped`` is the fraction not
  applied; as any skipped update, they do not advance the learning-rate schedule). Jit with
  ``jax.jit(train_step, static_argnames="hparams", donate_argnums=0)``; with ``frozen.hparams``
  (``hp.numbers()``) the numbers are inputs, and ``TrainHparams(ppo=hp.structure())`` keeps one
  compiled program across a sweep of them.

  It leaves ``state.step`` (which the next iteration's keys, the critic warm-up and the data
  order read) and the adaptive β as they were: end each iteration with ``finish_iteration(state,
  rollout_metrics, B, hp=hp)``, as ``rollout.make_step_fns``' ``update`` does.
  """
  models, tx, mesh = hparams.models, hparams.tx, hparams.mesh
  hp = program_hparams(hparams.ppo, frozen)
  if models.lora and frozen is None:
    raise ValueError("a LoRA policy's train_step needs frozen= (its base weights)")
  frozen_policy = None if frozen is None else frozen.ref_params
  horizon = None if frozen is None else frozen.horizon
  extra = {} if horizon is None else {"horizon": horizon}  # where the schedules end (Frozen)
  exp = batch
  B = exp.ids.shape[0]
  _, n_micro = hp.minibatch_layout(B)
  _, perm_key = iteration_keys(state)
  train_policy = policy_trains(state, hp)

  def minibatch_step(carry, mb: Experience):
    params, opt_state, stopped = carry
    gradients = lambda: minibatch_gradients(
      models,
      params,
      mb,
      state.kl_coef,
      n_micro,
      hp=hp,
      frozen_policy=frozen_policy,
      mesh=mesh,
      train_policy=train_policy,
    )
    if hp.early_stop_kl is None:
      grads, metrics = gradients()
    else:  # once stopped, a minibatch's gradient is not computed: zeros stand in, unused
      zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(gradients))
      grads, metrics = jax.lax.cond(stopped, zeros, gradients)
      metrics["update/not_run"] = stopped.astype(jnp.float32)
    if train_policy is not True:  # warming up: what a critic on the policy's trunk sends there is
      # not applied, and must not shrink the critic's step through the joint clipping norm
      zero = lambda g: jnp.where(train_policy, g, jnp.zeros_like(g))
      grads = {**grads, "policy": jax.tree.map(zero, grads["policy"])}
    grad_norm = optax.tree.norm(grads)
    loss_finite = jnp.isfinite(sum(v for k, v in metrics.items() if k.startswith("loss/")))
    rollout_ok = jnp.all(mb.ok)
    if hp.early_stop_kl is not None:  # while the critic warms up the policy does not move
      over = metrics["policy/approxkl_avg"] > hp.early_stop_kl
      stopped = stopped | (over if train_policy is True else over & train_policy)
    finite = rollout_ok & loss_finite & jnp.isfinite(grad_norm)
    apply = finite & ~stopped
    updates, new_opt_state = tx.update(grads, opt_state, params, **extra)
    new_params = optax.apply_updates(params, updates)

    # Non-finite anything: this minibatch's update is skipped, parameters and moments unchanged;
    # while the critic warms up, the policy's weights and moments stay too.
    def keep(new, old):
      def pick(path, a, b):
        ok = apply
        if train_policy is not True and under_key(path, "policy"):
          ok = ok & train_policy
        return jnp.where(ok, a, b)

      return jax.tree_util.tree_map_with_path(pick, new, old)

    metrics["grad/norm"] = grad_norm
    metrics["grad/policy_norm"] = optax.tree.norm(grads["policy"])
    if models.value is not None:
      metrics["grad/value_norm"] = optax.tree.norm(grads["value"])
    metrics["nonfinite/loss"] = (rollout_ok & ~loss_finite).astype(jnp.float32)
    metrics["nonfinite/grads"] = (rollout_ok & loss_finite & ~jnp.isfinite(grad_norm)).astype(
      jnp.float32
    )
    metrics["update/skipped"] = (~finite).astype(jnp.float32)  # for non-finite values
    metrics["update/early_stopped"] = stopped.astype(jnp.float32)
    return (keep(new_params, params), keep(new_opt_state, opt_state), stopped), metrics

  def epoch(carry, key):
    shuffled = shd.pin_rows(jax.tree.map(lambda x: x[jax.random.permutation(key, B)], exp), mesh)
    return jax.lax.scan(minibatch_step, carry, shd.split_rows(shuffled, hp.num_minibatches, mesh))

  keys = jax.random.split(perm_key, hp.num_epochs)
  carry = (state.params, state.opt_state, jnp.zeros([], bool))
  (params, opt_state, _), metrics = jax.lax.scan(epoch, carry, keys)
  # metrics: [epochs, minibatches] each; the means are over the minibatches computed (early
  # stopping computes none after it stops; the first is always computed).
  not_run = metrics.pop("update/not_run", None)  # with early stopping
  out = {k: jnp.mean(v) for k, v in metrics.items()}
  if not_run is not None:
    ran = 1.0 - not_run
    computed = {k: v for k, v in metrics.items() if not k.startswith("update/")}
    out |= {k: jnp.sum(v * ran) / jnp.sum(ran) for k, v in computed.items()}
  out["policy/approxkl_first_minibatch"] = metrics["policy/approxkl_avg"][0, 0]
  out["policy/clipfrac_first_minibatch"] = metrics["policy/clipfrac_avg"][0, 0]
  return state.replace(params=params, opt_state=opt_state), out


def finish_iteration(
  state: PPOState, metrics: Metrics, batch_size: int, *, hp: PPOHparams
) -> PPOState:
  """Advances the step (the data cursor moves on even if the update was skipped) and, if
  adaptive, the KL coefficient (from the rollout's KL), except during the critic's warm-up: the
  policy does not move then, so its KL says nothing about β (from the reference it is 0, and
  the controller would only shrink β). A horizon ≤ 0.2 × batch_size would make β ≤ 0 below the
  target KL (a reward for drifting away): refused when the horizon is compiled in and by the
  config; as a program input (``Frozen.hparams``) it cannot be checked, and β stays where it was."""
  kl_coef = state.kl_coef
  if hp.kl_adaptive:
    new = adaptive_kl_update(
      kl_coef, metrics["objective/kl"], batch_size, target=hp.kl_target, horizon=hp.kl_horizon
    )
    # A non-finite KL leaves β alone, as do an iteration of the critic's warm-up and a step that
    # would not keep β positive.
    ok = jnp.isfinite(new) & (new > 0) & policy_trains(state, hp)
    kl_coef = jnp.where(ok, new, kl_coef)
  return state.replace(step=state.step + 1, kl_coef=kl_coef)
