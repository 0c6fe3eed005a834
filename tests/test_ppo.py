"""The PPO step on tiny models: experience assembly, micro-batching, fusion, compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ppo_jax import ppo, rollout
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ScalarHead, ValueModel
from ppo_jax.models.lora import add_lora
from ppo_jax.optim import OptimHparams, learning_rate, make_actor_critic_optimizer, schedule_count

CFG = ModelConfig.gpt2(
  vocab_size=24,
  hidden_size=32,
  num_layers=1,
  num_heads=2,
  max_position_embeddings=24,
  initializer_range=0.2,
)
B, P, N, EOS = 8, 5, 6, 1
HP = ppo.PPOHparams(
  max_new_tokens=N, eos_token_id=EOS, temperature=1.0, num_epochs=2, num_minibatches=2
)


def build(hp=HP, *, shared=False, lr=1e-3, lora_rank=0):
  policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  reward = RewardModel(CFG, rngs=nnx.Rngs(1))
  critic = (
    ScalarHead(CFG.hidden_size, rngs=nnx.Rngs(2)) if shared else ValueModel(CFG, rngs=nnx.Rngs(3))
  )
  if lora_rank:
    policy = add_lora(policy, rank=lora_rank, targets="q,k,v,o,up,down")
  models, params, frozen_policy, reward_params = ActorCritic.build(policy, critic, reward)
  optim = OptimHparams(lr=lr, schedule="constant")
  tx = make_actor_critic_optimizer(optim, policy_steps=100, value_steps=100)
  state = ppo.init_state(params, tx, hp, seed=0)
  frozen = ppo.Frozen(ref_params=frozen_policy, reward_params=reward_params)
  return models, tx, state, frozen, rollout.make_step_fns(models, tx, hp, learning_rate(optim, 100))


PROMPTS = jnp.asarray(np.random.default_rng(0).integers(2, 24, (B, P)), jnp.int32)
PROMPT_MASK = jnp.ones((B, P), jnp.int32).at[1, :2].set(0).at[5, :1].set(0)


def one_iteration(fns, state, frozen, scores=None):
  gen = fns.sample(
    state.params["policy"], frozen, ppo.iteration_keys(state)[0], PROMPTS, PROMPT_MASK
  )
  exp, state, roll = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
  return state, {**roll, **upd}, gen, exp


def test_returns_are_the_discounted_kl_penalties_and_the_score_at_the_last_token():
  """Per-token rewards rₜ = −β·k1ₜ, plus the score at each row's last real token (Ziegler et al.
  2019): with λ = 1 the returns are the discounted sums Rₜ = Σ_{k≥t} γ^{k−t} rₖ, whatever the
  values (no bootstrap past the last token); γ = 0.5 places the score token by token."""
  hp = dataclasses.replace(HP, gamma=0.5, lam=1.0, whiten_advantages=False, kl_coef=0.3)
  _, _, state, frozen, fns = build(hp)
  # A policy that is not the reference, so the KL penalty is not zero.
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  scores = jnp.linspace(-1.0, 2.0, B)
  exp, _, metrics = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  kl = (exp.old_logprobs - exp.ref_logprobs) * gen.mask
  has_eos = np.asarray(jnp.any((gen.tokens == EOS) & (gen.mask > 0), -1))
  m = np.asarray(gen.mask)
  lengths = m.sum(-1).astype(int)
  assert len(set(lengths)) > 1  # rows of several lengths: the last token moves
  rewards = -0.3 * np.asarray(kl, np.float64)
  rewards[np.arange(B), lengths - 1] += np.asarray(scores, np.float64)
  want = np.zeros((B, N))
  for b in range(B):
    following = 0.0
    for t in reversed(range(lengths[b])):
      following = want[b, t] = rewards[b, t] + 0.5 * following
  np.testing.assert_allclose(np.asarray(exp.returns) * m, want, rtol=1e-5, atol=1e-5)
  assert float(metrics["objective/kl"]) == pytest.approx(float(kl.sum(-1).mean()), rel=1e-5)
  assert float(metrics["response/eos_rate"]) == pytest.approx(has_eos.mean())
  np.testing.assert_array_equal(exp.advantages * (1 - gen.mask), 0.0)


def test_values_are_the_critics_of_the_state_before_each_response_token():
  """old_values[:, t] = V(s_t), the critic's value at the last position of the prefix that ends
  before response token t (the prompt and tokens 0 … t − 1), computed here on that prefix alone."""
  models, _, state, frozen, fns = build()
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)  # (donated)
  critic = nnx.merge(models.value, state.params["value"])
  last = jax.jit(lambda ids, mask: critic(ids, mask)[:, -1])
  m = np.asarray(exp.response_mask)
  got = np.asarray(exp.old_values)
  for t in range(N):
    want = last(exp.ids[:, : P + t], exp.mask[:, : P + t])
    np.testing.assert_allclose(got[:, t] * m[:, t], want * m[:, t], atol=1e-5, err_msg=str(t))


def test_the_models_other_stop_ids_end_responses_and_count_as_eos():
  """``extra_eos_token_ids`` (an Instruct model's end of text beside its end of turn): sampling
  stops at the first of any stop id, and such a response escapes the missing-EOS penalty."""
  free = dataclasses.replace(HP, eos_token_id=None)  # no stop: where would each row go?
  _, _, state, frozen, fns = build(free)
  key = jax.random.key(4)
  tokens = np.asarray(fns.sample(state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK).tokens)
  other = int(tokens[0, 2])  # a token row 0 emits third
  hp = dataclasses.replace(HP, extra_eos_token_ids=(other,), missing_eos_penalty=2.0)
  _, _, state, frozen, fns = build(hp)
  gen = fns.sample(state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK)
  stop = np.isin(tokens, (EOS, other))
  ends = np.where(stop.any(-1), stop.argmax(-1) + 1, N)  # each row's first stop, included
  np.testing.assert_array_equal(np.asarray(gen.lengths), ends)
  assert ends[0] <= 3
  scores = jnp.arange(B, dtype=jnp.float32)
  _, _, m = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  np.testing.assert_allclose(
    m["sample/score"], np.where(stop.any(-1), np.arange(B), np.arange(B) - 2.0)
  )
  assert hp.stop_ids == (EOS, other) and free.stop_ids == ()
  # Without an EOS the extra ids still stop; one equal to the EOS is listed once.
  assert dataclasses.replace(free, extra_eos_token_ids=(other,)).stop_ids == (other,)
  assert dataclasses.replace(HP, extra_eos_token_ids=(other, EOS)).stop_ids == (EOS, other)
  listed = dataclasses.replace(HP, extra_eos_token_ids=[other, other])  # a jit static: hashable
  assert listed == dataclasses.replace(HP, extra_eos_token_ids=(other,))
  assert hash(listed) == hash(dataclasses.replace(HP, extra_eos_token_ids=(other,)))


def test_a_resume_says_when_the_stop_ids_changed(capsys):
  """A checkpoint records the ids its responses stopped at; one from before that record is read
  from its policy config. A resume that stops at others says so, in one line."""
  from ppo_jax.rl import _note_stop_ids

  _note_stop_ids({"stop_ids": [2, 7]}, (2, 7))
  _note_stop_ids({"model_config": {"eos_token_id": 2, "extra_eos_token_ids": [7]}}, (2, 7))
  _note_stop_ids({}, (2, 7))  # a record with neither: nothing to compare
  assert capsys.readouterr().out == ""
  _note_stop_ids({"model_config": {"eos_token_id": 2, "extra_eos_token_ids": []}}, (2, 7))
  _note_stop_ids({"stop_ids": [2]}, (2, 7))
  lines = capsys.readouterr().out.splitlines()
  assert (
    lines
    == [
      "note: the checkpoint's responses stopped at token ids [2]; from here they stop "
      "at [2, 7] (the policy checkpoint's, its generation_config.json's, and with "
      "data.chat_template its turn end)"
    ]
    * 2
  )


def test_missing_eos_penalty_and_running_score_statistics():
  hp = dataclasses.replace(HP, missing_eos_penalty=2.0, normalize_scores=True)
  _, _, state, frozen, fns = build(hp)
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(4), PROMPTS, PROMPT_MASK)
  has_eos = np.asarray(jnp.any((gen.tokens == EOS) & (gen.mask > 0), -1))
  assert 0 < has_eos.sum() < B  # both kinds of rows are present
  scores = jnp.arange(B, dtype=jnp.float32)
  _, state, m = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  penalised = np.where(has_eos, np.arange(B), np.arange(B) - 2.0)
  np.testing.assert_allclose(m["sample/score"], penalised)
  _, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores * 3)
  seen = np.concatenate([penalised, np.where(has_eos, 3 * np.arange(B), 3 * np.arange(B) - 2.0)])
  assert float(state.score_stats.mean) == pytest.approx(seen.mean(), rel=1e-6)
  assert float(state.score_stats.std) == pytest.approx(seen.std(ddof=1), rel=1e-5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_micro_batch_gradients_equal_the_full_minibatch_gradient(agg):
  """Gradient and metrics of a minibatch of 8 in 4 micro-batches equal those in one."""
  hp = dataclasses.replace(HP, agg=agg, kl_mode="loss", kl_kind="k2", entropy_coef=0.01)
  models, _, state, frozen, fns = build(hp)
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(5), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  exp = exp.replace(ref_logprobs=exp.ref_logprobs - 0.1)  # a KL term that is not zero
  grads = jax.jit(
    lambda n: ppo.minibatch_gradients(models, state.params, exp, state.kl_coef, n, hp=hp),
    static_argnums=0,
  )
  (g1, m1), (g4, m4) = grads(1), grads(4)
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g1)) > 0
  # float32 sums in another order: tolerance relative to the gradient's largest entry.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)
  for k in m1:
    assert float(m1[k]) == pytest.approx(float(m4[k]), rel=1e-5, abs=1e-6), k


def test_scores_are_checked_before_they_are_used():
  """No scores and no reward model, or scores of another shape than [B], responses of another
  width than max_new_tokens or rows than the prompts: one line each (a GraphDef error and shape
  errors deep inside, before)."""
  models, _, state, frozen, fns = build(HP)
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  make = lambda scores, fr: rollout.make_experience(
    models, state, fr, PROMPTS, PROMPT_MASK, gen, scores, hp=HP
  )
  with pytest.raises(ValueError, match="scores_B is None and there is no reward model"):
    make(None, frozen.replace(reward_params=None))
  with pytest.raises(ValueError, match=rf"one score per response, shape \[{B}\], got \[{B}, 1\]"):
    make(np.zeros((B, 1)), frozen)
  exp, _, _ = make([1.0] * B, frozen)  # a list serves
  assert exp.ids.shape[0] == B
  N = HP.max_new_tokens
  short = gen.replace(**{k: getattr(gen, k)[:, :-1] for k in ("tokens", "logprobs", "mask")})
  with pytest.raises(
    ValueError,
    match=rf"gen has {N - 1} response tokens per row, hp.max_new_tokens is {N}",
  ):
    rollout.make_experience(models, state, frozen, PROMPTS, PROMPT_MASK, short, None, hp=HP)
  with pytest.raises(ValueError, match="expected one response per prompt row"):
    rollout.make_experience(models, state, frozen, PROMPTS[:-1], PROMPT_MASK[:-1], gen, None, hp=HP)


def test_an_all_masked_minibatch_gives_zero_loss_and_zero_gradients():
  """A minibatch whose rows have no response token (a caller's batch of empty responses): 0 with
  zero gradients, as ``masking.aggregate`` promises, not 0/0 (a NaN the run counts as a
  non-finite loss)."""
  hp = dataclasses.replace(HP, kl_mode="loss", kl_kind="k3", entropy_coef=0.01)
  models, _, state, frozen, fns = build(hp)
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, jnp.linspace(-1, 2, B))
  n = exp.response_mask.shape[1]
  empty = exp.replace(
    response_mask=jnp.zeros_like(exp.response_mask), mask=exp.mask.at[:, -n:].set(0)
  )
  grads, metrics = ppo.minibatch_gradients(models, state.params, empty, state.kl_coef, 2, hp=hp)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  for k in ("loss/policy_avg", "loss/value_avg", "loss/kl_avg"):
    assert float(metrics[k]) == 0.0, k


@pytest.mark.parametrize("shared", [False, True])
def test_sampler_logprobs_skip_the_policy_pass_and_change_only_old_logprobs(shared):
  """recompute_logprobs=False: old log-probs are the sampler's; values, reference log-probs and
  scores are unchanged; with a separate critic the scoring program has one forward pass fewer."""
  runs = {}
  for recompute in (True, False):
    hp = dataclasses.replace(HP, recompute_logprobs=recompute, whiten_advantages=False)
    _, _, state, frozen, fns = build(hp, shared=shared)
    gen = fns.sample(state.params["policy"], frozen, jax.random.key(6), PROMPTS, PROMPT_MASK)
    exp, _, metrics = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
    hlo = fns.score.lower(state, frozen, PROMPTS, PROMPT_MASK, gen, None).as_text()
    runs[recompute] = gen, exp, metrics, hlo.count("dot_general")
  (_, exp_r, m_r, dots_r), (gen_s, exp_s, m_s, dots_s) = runs[True], runs[False]
  np.testing.assert_array_equal(exp_s.old_logprobs, gen_s.logprobs)
  for name in ("ref_logprobs", "old_values", "response_mask"):
    np.testing.assert_array_equal(getattr(exp_s, name), getattr(exp_r, name), err_msg=name)
  np.testing.assert_allclose(exp_s.old_logprobs, exp_r.old_logprobs, atol=1e-5)  # same model
  assert float(m_s["objective/scores"]) == float(m_r["objective/scores"])
  if shared:  # the value head reads the policy's trunk: that pass runs either way
    assert dots_s == dots_r and "sampler/logprob_mismatch" in m_s
  else:
    assert dots_s < dots_r and "sampler/logprob_mismatch" not in m_s


def test_first_minibatch_ratio_is_one_to_rounding():
  """The old log-probs recomputed as the update computes them: approx KL (~1e-13 measured) and
  clip fraction 0 on the first minibatch."""
  _, _, state, frozen, fns = build()
  for _ in range(3):
    state, metrics, _, _ = one_iteration(fns, state, frozen)
    assert float(metrics["policy/approxkl_first_minibatch"]) < 1e-6
    assert float(metrics["policy/clipfrac_first_minibatch"]) == 0.0


def test_fused_iteration_equals_the_separate_programs():
  _, _, s1, frozen, fns = build()
  _, _, s2, _, _ = build()
  s1, m1, gen1, _ = one_iteration(fns, s1, frozen)
  s2, m2, gen2 = fns.iterate(s2, frozen, PROMPTS, PROMPT_MASK)
  np.testing.assert_array_equal(gen1.tokens, gen2.tokens)
  for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
    assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(s1.step) == int(s2.step) == 1


def test_nothing_recompiles_after_the_first_iteration():
  _, _, state, frozen, fns = build()
  for _ in range(3):
    state, _, _, _ = one_iteration(fns, state, frozen)
    state, _, _ = fns.iterate(state, frozen, PROMPTS, PROMPT_MASK)
  for name in ("sample", "score", "update", "iterate"):
    assert getattr(fns, name)._cache_size() == 1, name


def test_value_head_on_the_policy_trunk():
  _, _, state, frozen, fns = build(shared=True)
  assert set(state.params["value"]) == {"kernel"}  # only the head: no second trunk
  before = jax.tree.map(jnp.copy, state.params)
  state, metrics, _, _ = one_iteration(fns, state, frozen)
  assert np.isfinite(float(metrics["loss/value_avg"]))
  assert not np.allclose(before["value"]["kernel"], state.params["value"]["kernel"])


def test_adaptive_kl_and_kl_as_loss():
  hp = dataclasses.replace(
    HP, kl_adaptive=True, kl_target=1e-3, kl_horizon=100.0, kl_mode="loss", kl_kind="k2"
  )
  _, _, state, frozen, fns = build(hp, lr=1e-2)
  coefs = []
  for _ in range(4):
    state, metrics, _, _ = one_iteration(fns, state, frozen)
    coefs.append(float(state.kl_coef))
  assert float(metrics["objective/non_score_reward"]) == 0.0  # the KL is not in the reward
  assert float(metrics["loss/kl_avg"]) > 0.0
  assert coefs[-1] > coefs[0]  # KL above its tiny target: the coefficient rises


def test_adaptive_kl_coefficient_holds_during_the_critic_warm_up():
  """finish_iteration: β stays put while the policy is frozen (its KL to the reference says
  nothing about β), then follows Ziegler et al.'s update; a non-finite KL leaves it alone."""
  hp = dataclasses.replace(
    HP, kl_adaptive=True, kl_coef=0.1, kl_target=6.0, kl_horizon=100.0, critic_warmup=2
  )
  state = ppo.init_state({"policy": {"w": jnp.zeros(2)}, "value": {}}, optax.sgd(0.1), hp, seed=0)
  coefs = []
  for kl in (0.0, 0.0, 0.0, float("nan"), 12.0):
    state = ppo.finish_iteration(state, {"objective/kl": jnp.asarray(kl)}, 50, hp=hp)
    coefs.append(float(state.kl_coef))
  # KL 0 is below target (e = −0.2): 0.1·(1 − 0.2·50/100) = 0.09 once the warm-up is over.
  assert coefs[:4] == pytest.approx([0.1, 0.1, 0.09, 0.09], rel=1e-6)
  assert coefs[4] == pytest.approx(0.09 * 1.1, rel=1e-6)  # KL twice the target: e = +0.2
  assert int(state.step) == 5


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match=r"not divisible by ppo\.num_minibatches"):
    dataclasses.replace(HP, num_minibatches=3).minibatch_layout(8)
  with pytest.raises(ValueError, match=r"ppo\.micro_batch_size 3 does not divide the minibatch"):
    dataclasses.replace(HP, micro_batch_size=3).minibatch_layout(8)


def test_lora_trains_adapters_and_keeps_one_copy_of_the_base():
  _, _, state, frozen, fns = build(lora_rank=4, lr=1e-2)
  names = {shd_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params["policy"])}
  assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)  # only adapters train
  base_before = jax.tree.map(np.asarray, frozen.ref_params)
  for _ in range(3):
    state, metrics, _, exp = one_iteration(fns, state, frozen)
    assert float(metrics["policy/approxkl_first_minibatch"]) < 1e-6
  jax.tree.map(np.testing.assert_array_equal, base_before, frozen.ref_params)  # base untouched
  lora_b = [
    x
    for p, x in jax.tree_util.tree_leaves_with_path(state.params["policy"])
    if shd_path(p).endswith("lora_b")
  ]
  assert any(float(jnp.abs(x).max()) > 0 for x in lora_b)  # adapters moved from zero
  # The reference is the base with adapters off: its log-probs differ from the policy's now.
  assert float(jnp.abs(exp.ref_logprobs - exp.old_logprobs).max()) > 0
  assert float(metrics["objective/kl"]) != 0.0


def test_lora_train_step_needs_the_base():
  models, tx, state, frozen, fns = build(lora_rank=2)
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(0), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  with pytest.raises(ValueError, match="needs frozen="):
    ppo.train_step(state, exp, hparams=ppo.TrainHparams(models, tx, HP))


def shd_path(path):
  from ppo_jax.sharding import path_string

  return path_string(path)


@pytest.mark.parametrize("estimator, kl_mode", [("grpo", "loss"), ("rloo", "reward")])
def test_critic_free_estimators_use_the_group_advantages(estimator, kl_mode):
  """GRPO's and RLOO's advantages are their baselines' over the group's scores; with the KL in
  the reward (experiments/rloo.py), over each score less β·Σₜ k1ₜ, the penalty folded in first."""
  from ppo_jax.advantages import group_advantages, rloo_advantages

  kind = "k3" if kl_mode == "loss" else "k1"
  hp = dataclasses.replace(
    HP, estimator=estimator, group_size=4, kl_mode=kl_mode, kl_kind=kind, kl_coef=0.3
  )
  policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  models, params, frozen_policy, reward_params = ActorCritic.build(
    policy, None, RewardModel(CFG, rngs=nnx.Rngs(1))
  )
  if kl_mode == "reward":  # a reference the policy is not: the penalty differs row by row
    frozen_policy = jax.tree.map(lambda x: x * 1.5, frozen_policy)
  assert params["value"] == {} and models.value is None  # no critic in memory
  tx = make_actor_critic_optimizer(
    OptimHparams(lr=1e-3, schedule="constant"), policy_steps=100, value_steps=100
  )
  state = ppo.init_state(params, tx, hp, seed=0)
  frozen = ppo.Frozen(ref_params=frozen_policy, reward_params=reward_params)
  fns = rollout.make_step_fns(models, tx, hp)
  before = jax.tree.map(jnp.copy, state.params["policy"])
  scores = jnp.asarray([0.0, 1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0])  # second group: all equal
  state, metrics, gen, exp = one_iteration(fns, state, frozen, scores)
  m = np.asarray(gen.mask)
  if kl_mode == "reward":  # β Σₜ (log π − log π_ref) over each response's tokens, in float64
    k1 = np.asarray(exp.old_logprobs, np.float64) - np.asarray(exp.ref_logprobs, np.float64)
    penalty = 0.3 * (k1 * m).sum(-1)
    assert np.ptp(penalty[4:]) > 1e-3  # the equal scores' group is no longer equal
    shaped = np.asarray(scores, np.float64) - penalty
    np.testing.assert_allclose(
      np.asarray(metrics["objective/kl"]), (k1 * m).sum(-1).mean(), rtol=1e-5
    )
  else:
    shaped = np.asarray(scores)
  advantage = group_advantages if estimator == "grpo" else rloo_advantages
  expected_B = np.asarray(advantage(jnp.asarray(shaped, jnp.float32), 4))
  np.testing.assert_allclose(np.asarray(exp.advantages), expected_B[:, None] * m, atol=1e-5)
  if kl_mode == "loss":
    assert np.all(np.asarray(exp.advantages)[4:] == 0.0)  # equal scores teach nothing
    assert float(metrics["loss/kl_avg"]) >= 0.0
  assert np.all(np.asarray(exp.old_values) == 0.0) and np.all(np.asarray(exp.returns) == 0.0)
  # No critic, no value metrics (not a column of zeros in the logs).
  critic_keys = ("loss/value_avg", "val/clipfrac_avg", "val/error", "val/mean", "grad/value_norm")
  assert not set(critic_keys) & set(metrics), sorted(set(critic_keys) & set(metrics))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state.params["policy"])
  assert any(jax.tree.leaves(moved))


def test_group_estimators_check_their_group_size():
  with pytest.raises(ValueError, match=r"group_size: grpo .* needs ≥ 2"):
    dataclasses.replace(HP, estimator="grpo")
  with pytest.raises(ValueError, match=r"estimator: unknown 'ppo'"):
    dataclasses.replace(HP, estimator="ppo")


def _policy_leaves(tree):
  """The leaves under a "policy" key: the policy's parameters or its optimizer moments."""
  paths = jax.tree_util.tree_leaves_with_path(tree)
  return [np.asarray(x) for p, x in paths if any(getattr(k, "key", None) == "policy" for k in p)]


@pytest.mark.parametrize("shared", [False, True])
def test_critic_warmup_trains_only_the_critic_then_both(shared):
  """critic_warmup=2: two iterations leave the policy and its optimizer state (Adam's moments and
  step count, the schedule's count) bit for bit as they were while the critic learns (with a
  head on the policy's trunk, the trunk stays too); the third trains the policy, whose count
  then starts from 0 while the critic's is two iterations on."""
  _, _, state, frozen, fns = build(dataclasses.replace(HP, critic_warmup=2), shared=shared)
  policy0, moments0 = _policy_leaves(state.params), _policy_leaves(state.opt_state)
  value0 = jax.tree.map(np.asarray, state.params["value"])
  # Adam's μ and ν of every leaf, Adam's count and the schedule's
  assert moments0 and len(moments0) == 2 * len(policy0) + 2
  per_iteration = HP.num_epochs * HP.num_minibatches
  for it in range(3):
    state, metrics, _, _ = one_iteration(fns, state, frozen)
    assert float(metrics["update/skipped"]) == 0.0
    # Reported during the warm-up too (≈ 0 there: a ratio of 1 times whitened advantages).
    assert np.isfinite(float(metrics["loss/policy_avg"]))
    policy = _policy_leaves(state.params)
    same = [np.array_equal(a, b) for a, b in zip(policy0, policy, strict=True)]
    if it < 2:
      assert all(same), it
      # Nothing reaches the policy (with a head on its trunk, the trunk's gradient is dropped
      # before the joint clipping): the norm clipped is the critic's alone.
      assert float(metrics["grad/policy_norm"]) == 0.0
      assert float(metrics["grad/norm"]) == pytest.approx(float(metrics["grad/value_norm"]))
      assert float(metrics["lr"]) == 0.0  # the policy's rate: it does not move
      assert float(metrics["policy/clipfrac_avg"]) == 0.0  # so its ratio stays 1
      moments = _policy_leaves(state.opt_state)
      assert all(np.array_equal(a, b) for a, b in zip(moments0, moments, strict=True))
    else:
      assert not any(same)
      assert float(metrics["lr"]) == pytest.approx(1e-3)
  assert int(schedule_count(state.opt_state)) == per_iteration  # the policy's
  counts = {
    int(v)
    for path, v in optax.tree.get_all_with_path(state.opt_state, "count")
    if any(getattr(k, "key", None) == "value" for k in path)
  }
  assert counts == {3 * per_iteration}
  for a, b in zip(jax.tree.leaves(value0), jax.tree.leaves(state.params["value"]), strict=True):
    assert not np.array_equal(a, b)


def test_critic_warmup_gradient_is_the_value_loss_alone():
  """train_policy=False drops the policy's terms from the loss: with a separate critic the
  policy's gradient is exactly zero and the critic's is the one it gets with them."""
  hp = dataclasses.replace(HP, kl_mode="loss", kl_kind="k3", entropy_coef=0.01)
  models, _, state, frozen, fns = build(hp)
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(5), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  exp = exp.replace(ref_logprobs=exp.ref_logprobs - 0.1)  # a KL term that is not zero
  grads = jax.jit(
    lambda on: ppo.minibatch_gradients(
      models, state.params, exp, state.kl_coef, 1, hp=hp, train_policy=on
    )
  )
  (g_on, m_on), (g_off, m_off) = grads(True), grads(False)
  assert all(not np.any(x) for x in jax.tree.leaves(g_off["policy"]))
  assert any(np.any(x) for x in jax.tree.leaves(g_on["policy"]))
  for a, b in zip(jax.tree.leaves(g_on["value"]), jax.tree.leaves(g_off["value"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  for k in m_on:  # the metrics are the same either way
    assert float(m_on[k]) == pytest.approx(float(m_off[k]), rel=1e-6, abs=1e-9), k


def test_critic_warmup_needs_a_critic():
  with pytest.raises(ValueError, match="grpo estimator has no critic to warm up"):
    dataclasses.replace(HP, estimator="grpo", group_size=2, critic_warmup=3)
  with pytest.raises(ValueError, match="critic_warmup: must be ≥ 0"):
    dataclasses.replace(HP, critic_warmup=-1)


def test_hyperparameters_that_would_train_silently_wrong_are_refused():
  with pytest.raises(ValueError, match=r"kl_kind: k1 as a loss term .* use k2 .* or k3"):
    dataclasses.replace(HP, kl_mode="loss", kl_kind="k1")
  with pytest.raises(ValueError, match=r"kl_coef: the adaptive controller .* cannot start at 0"):
    dataclasses.replace(HP, kl_adaptive=True, kl_coef=0.0)
  with pytest.raises(ValueError, match="missing_eos_penalty: needs eos_token_id"):
    dataclasses.replace(HP, eos_token_id=None, missing_eos_penalty=1.0)


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_loss_ignores_what_sits_at_masked_positions(kind):
  """kl_mode=loss: a reference log-prob far off at a masked token (k3's e^{−d} overflows there)
  changes neither the loss nor the gradient; and the penalty enters the loss with a plus sign."""
  hp = dataclasses.replace(HP, kl_mode="loss", kl_kind=kind)
  models, _, state, frozen, fns = build(hp)
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(5), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  exp = exp.replace(response_mask=exp.response_mask.at[:, -2:].set(0.0))  # last tokens: masked
  far = exp.replace(ref_logprobs=exp.ref_logprobs.at[:, -2:].set(200.0))
  grad = lambda e: ppo.minibatch_gradients(models, state.params, e, state.kl_coef, 1, hp=hp)
  (g_far, m_far), (g, m) = grad(far), grad(exp)
  assert float(m["loss/kl_avg"]) > 0.0
  assert float(m_far["loss/kl_avg"]) == float(m["loss/kl_avg"])
  for a, b in zip(jax.tree.leaves(g_far), jax.tree.leaves(g), strict=True):
    np.testing.assert_array_equal(a, b)
  # The penalty is added to the loss (GRPO's J − β·D_KL): (g(β) − g(0)) / β is the gradient of
  # the KL term alone, so a short step against it lowers the logged KL by |step|·|gradient|.
  g0, _ = ppo.minibatch_gradients(models, state.params, exp, 0.0 * state.kl_coef, 1, hp=hp)
  d = jax.tree.map(lambda a, b: (a - b) / state.kl_coef, g, g0)
  norm = float(optax.tree.norm(d))
  step = 1e-3 / norm
  moved = state.params.copy()
  moved["policy"] = jax.tree.map(lambda p, x: p - step * x, state.params["policy"], d["policy"])
  _, m_moved = ppo.minibatch_gradients(models, moved, exp, state.kl_coef, 1, hp=hp)
  change = float(m_moved["loss/kl_avg"]) - float(m["loss/kl_avg"])
  assert change == pytest.approx(-1e-3 * norm, rel=0.1)


def test_lr_metric_is_the_rate_of_the_updates_applied():
  """A linear decay over 5 iterations of 4 updates: a NaN-score iteration applies no update, so
  the next iteration logs (and uses) the rate the skipped one would have."""
  models, _, state, frozen, _ = build()
  hp_optim = OptimHparams(lr=1.0, schedule="linear")
  tx = make_actor_critic_optimizer(hp_optim, policy_steps=20, value_steps=40)
  state = ppo.init_state(state.params, tx, HP, seed=0)
  fns = rollout.make_step_fns(models, tx, HP, learning_rate(hp_optim, 20))
  lrs, skipped = [], []
  for scores in (None, jnp.full((B,), jnp.nan), None):
    state, metrics, _, _ = one_iteration(fns, state, frozen, scores)
    lrs.append(float(metrics["lr"]))
    skipped.append(float(metrics["update/skipped"]))
  assert skipped == [0.0, 1.0, 0.0]
  np.testing.assert_allclose(lrs, [1.0, 0.8, 0.8], rtol=1e-6)  # not 0.6: nothing was applied


def test_early_stopping_skips_every_update_after_the_kl_passes_the_limit():
  """2 epochs × 2 minibatches. A limit never reached changes nothing (the parameters of no
  limit); a limit below any KL stops from the second minibatch on: the first minibatch sees the
  rollout's own policy (KL exactly 0), so one Adam step is taken and three are skipped."""
  runs = {}
  for limit in (None, 1e9, 1e-12):
    _, _, state, frozen, fns = build(dataclasses.replace(HP, early_stop_kl=limit))
    state, metrics, _, _ = one_iteration(fns, state, frozen)
    counts = {
      int(x)
      for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if "count" in jax.tree_util.keystr(path)
    }
    runs[limit] = state.params, counts, float(metrics["update/early_stopped"])
    assert float(metrics["update/skipped"]) == 0.0  # counts non-finite values alone
  assert runs[None][1:] == runs[1e9][1:] == ({4}, 0.0)
  for a, b in zip(jax.tree.leaves(runs[None][0]), jax.tree.leaves(runs[1e9][0]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert runs[1e-12][1:] == ({1}, 0.75)
  # While the critic warms up the policy does not move: the sampler's log-probs, a float
  # rounding off the update's, pass a limit of 1e-30, and stop nothing.
  hp = dataclasses.replace(HP, critic_warmup=1, early_stop_kl=1e-30, recompute_logprobs=False)
  _, _, state, frozen, fns = build(hp)
  state, metrics, _, _ = one_iteration(fns, state, frozen)
  assert float(metrics["policy/approxkl_first_minibatch"]) > 1e-30
  assert float(metrics["update/early_stopped"]) == 0.0
  # Once the policy trains, they put the first minibatch over the limit: nothing is applied,
  # and nothing after it computed (the averages are its own).
  params = jax.tree.map(np.array, state.params["policy"])  # a copy: the update donates
  state, metrics, _, _ = one_iteration(fns, state, frozen)
  assert float(metrics["update/early_stopped"]) == 1.0
  for k in ("approxkl", "clipfrac"):
    assert float(metrics[f"policy/{k}_avg"]) == float(metrics[f"policy/{k}_first_minibatch"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params["policy"]), strict=True):
    np.testing.assert_array_equal(a, b)
