"""The PPO step on tiny models: experience assembly, micro-batching, fusion, compilation."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref
from flax import nnx

from ppo_jax import ppo, rollout
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ScalarHead, ValueModel
from ppo_jax.models.lora import add_lora
from ppo_jax.optim import OptimHparams, make_actor_critic_optimizer, schedule_count
from ppo_jax.sampling import Generation

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
  horizon = {"policy": jnp.int32(100), "value": jnp.int32(100)}
  # The numbers as inputs, as rl.run_ppo gives them (test_hparams_numbers: the same results).
  frozen = ppo.Frozen(frozen_policy, reward_params, horizon=horizon, hparams=hp.numbers())
  return models, tx, state, frozen, rollout.make_step_fns(models, tx, hp, optim)


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


def test_normalized_scores_use_the_statistics_that_include_this_batch():
  """normalize_scores: the score enters as (s − μ)/(σ + 1e-8), μ and σ the running mean and std
  (ddof 1, ``RunningStats.std``) of every score seen, this batch's included: the first batch is
  not divided by the 1e-8 of no statistics yet, the second is centred on both batches'. With
  γ = λ = 1 and β = 0 each real token's return is its row's shaped score."""
  hp = dataclasses.replace(
    HP, normalize_scores=True, gamma=1.0, lam=1.0, kl_coef=0.0, whiten_advantages=False
  )
  _, _, state, frozen, fns = build(hp)
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  m = np.asarray(gen.mask)
  seen = np.zeros(0)
  for scores in (np.linspace(-1.0, 2.0, B), 3.0 + np.arange(B) ** 2 / 4.0):
    scores = np.float32(scores).astype(np.float64)
    exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, jnp.asarray(scores))
    seen = np.concatenate([seen, scores])
    shaped = (scores - seen.mean()) / (seen.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(exp.returns) * m, shaped[:, None] * m, atol=1e-5)


def test_whitened_rewards_are_scaled_over_the_real_tokens_only():
  """whiten_rewards: the per-token rewards (−β·k1ₜ, plus the score at the last real token) are
  scaled by their std over the real tokens and keep their mean there (``masked_whiten`` with
  shift_mean=False, ddof 1), the padding after each response counting for nothing; then GAE.
  Checked against the float64 references of both."""
  hp = dataclasses.replace(
    HP, whiten_rewards=True, gamma=0.9, lam=0.95, kl_coef=0.3, whiten_advantages=False
  )
  _, _, state, frozen, fns = build(hp)
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  scores = jnp.linspace(-1.0, 2.0, B)
  exp, _, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  m = np.asarray(gen.mask)
  lengths = m.sum(-1).astype(int)
  assert lengths.min() < N  # padding a whitening over every slot would count
  kl = np.asarray(exp.old_logprobs, np.float64) - np.asarray(exp.ref_logprobs, np.float64)
  rewards = np.where(m > 0, -0.3 * kl, 0.0)
  rewards[np.arange(B), lengths - 1] += np.asarray(scores, np.float64)
  values = np.asarray(exp.old_values, np.float64)
  adv, ret = ref.gae(ref.masked_whiten(rewards, m, False), values, m, 0.9, 0.95)
  np.testing.assert_allclose(np.asarray(exp.advantages) * m, adv, atol=1e-5)
  np.testing.assert_allclose(np.asarray(exp.returns) * m, ret, atol=1e-5)


def test_nothing_past_a_responses_end_reaches_its_scores_values_or_advantages():
  """The sequence mask is the prompt's, then the sampler's: so the reward model reads each row's
  last real token, and other ids after each row's end change no score, value, log-prob or
  advantage at a real token. The advantages are whitened over the real tokens alone: 0 after
  the end, mean 0 and std 1 (ddof 1, as ``masked_whiten``) over the real tokens."""
  _, _, state, frozen, fns = build()
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  real = np.asarray(gen.mask) > 0
  assert not real.all()  # some rows end before N
  exp, state, metrics = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  np.testing.assert_array_equal(exp.mask, np.concatenate([PROMPT_MASK, gen.mask], axis=1))
  adv = np.asarray(exp.advantages, np.float64)
  np.testing.assert_array_equal(adv[~real], 0.0)
  assert abs(adv[real].mean()) < 1e-5
  assert adv[real].std(ddof=1) == pytest.approx(1.0, rel=1e-4)
  other = gen.replace(tokens=jnp.where(gen.mask > 0, gen.tokens, 7))  # 7: neither pad nor EOS
  exp2, _, metrics2 = fns.score(state, frozen, PROMPTS, PROMPT_MASK, other, None)
  np.testing.assert_allclose(metrics2["sample/score"], metrics["sample/score"], atol=1e-6)
  for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
    a, b = np.asarray(getattr(exp, name)), np.asarray(getattr(exp2, name))
    np.testing.assert_allclose(b[real], a[real], atol=1e-6, err_msg=name)


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
  """The penalty falls on the rows with no stop id among their real tokens, an EOS in the last
  slot (a response that ended exactly at max_new_tokens) counting as one; the running mean and
  std (ddof 1) are of every penalised score seen, and a batch of NaN scores leaves them as they
  were (finite), not poisoned."""
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
  before = jax.tree.map(np.array, state.score_stats)  # a copy: score donates the state
  _, state, m = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, jnp.full((B,), jnp.nan))
  assert float(m["nonfinite/scores"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, state.score_stats, before)
  assert np.isfinite(float(state.score_stats.std))
  # Responses written by hand: each row's EOS at the slot given, None for a row cut off without
  # one; the real tokens are 1 up to and including the EOS, the rest padding.
  ends = [N - 1, None, 2, None, 0, N - 1, None, 3]
  tokens = np.random.default_rng(1).integers(2, CFG.vocab_size, (B, N))  # neither EOS nor pad
  mask = np.ones((B, N), np.float32)
  for b, end in enumerate(ends):
    if end is not None:
      tokens[b, end], tokens[b, end + 1 :], mask[b, end + 1 :] = EOS, hp.pad_token_id, 0.0
  hand = Generation(
    tokens=jnp.asarray(tokens, jnp.int32), logprobs=jnp.zeros((B, N)), mask=jnp.asarray(mask)
  )
  _, _, m = fns.score(state, frozen, PROMPTS, PROMPT_MASK, hand, scores)
  cut = np.asarray([end is None for end in ends])
  np.testing.assert_allclose(m["sample/score"], np.where(cut, np.arange(B) - 2.0, np.arange(B)))
  assert float(m["response/eos_rate"]) == pytest.approx(1.0 - cut.mean())


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
  scores are unchanged; with a separate critic the scoring program has one forward pass fewer.
  recompute_logprobs=True: the sampler's log-probs are not read (shifted by 1, the old log-probs
  stay the recomputed ones; only the mismatch metric sees the shift)."""
  runs = {}
  for recompute in (True, False):
    hp = dataclasses.replace(HP, recompute_logprobs=recompute, whiten_advantages=False)
    _, _, state, frozen, fns = build(hp, shared=shared)
    gen = fns.sample(state.params["policy"], frozen, jax.random.key(6), PROMPTS, PROMPT_MASK)
    if recompute:  # (the state is donated: the next call reads the one returned, the same params)
      shifted = gen.replace(logprobs=gen.logprobs + 1.0)
      exp_shifted, state, m_shifted = fns.score(state, frozen, PROMPTS, PROMPT_MASK, shifted, None)
    exp, _, metrics = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
    if recompute:
      np.testing.assert_array_equal(exp_shifted.old_logprobs, exp.old_logprobs)
      assert float(m_shifted["sampler/logprob_mismatch"]) > 0.9
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
  """One program or three, the same iteration: responses, metrics, parameters, and the adaptive
  β, which both move by the rollout's KL (a policy apart from its reference: not zero)."""
  hp = dataclasses.replace(HP, kl_adaptive=True, kl_target=1e-3, kl_horizon=100.0)
  _, _, s1, frozen, fns = build(hp)
  _, _, s2, _, _ = build(hp)
  frozen = frozen.replace(ref_params=jax.tree.map(lambda x: x * 1.5, frozen.ref_params))
  s1, m1, gen1, _ = one_iteration(fns, s1, frozen)
  s2, m2, gen2 = fns.iterate(s2, frozen, PROMPTS, PROMPT_MASK)
  assert float(m2["objective/kl"]) > 0.0
  want = ref.adaptive_kl(hp.kl_coef, float(m2["objective/kl"]), B, 1e-3, 100.0)
  assert float(s1.kl_coef) == pytest.approx(want, rel=1e-6)
  assert float(s2.kl_coef) == pytest.approx(want, rel=1e-6)
  assert want != pytest.approx(hp.kl_coef)
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


def test_the_steps_donate_the_state_they_are_given_and_nothing_else():
  """score, update and iterate donate their first argument, the state (its buffers become the new
  state's); sample donates nothing: its policy parameters are the state's own, which score and
  update read next. Both the programs jitted with shardings (a one-device mesh here) and those
  without; the lowerings say what is donated (nothing is compiled)."""
  from ppo_jax import sharding as shd

  models, tx, state, frozen, fns = build()
  placement = rollout.Placement.build(shd.make_mesh(), state, frozen, tx)
  placed = rollout.make_step_fns(models, tx, HP, placement=placement)
  key = ppo.iteration_keys(state)[0]
  gen = jax.eval_shape(fns.sample, state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK)
  exp, _, roll = jax.eval_shape(fns.score, state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  for which, f in (("unplaced", fns), ("placed", placed)):
    lowered = {
      "sample": f.sample.lower(state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK),
      "score": f.score.lower(state, frozen, PROMPTS, PROMPT_MASK, gen, None),
      "update": f.update.lower(state, frozen, exp, roll["objective/kl"]),
      "iterate": f.iterate.lower(state, frozen, PROMPTS, PROMPT_MASK),
    }
    for name, low in lowered.items():
      args, kwargs = low.args_info
      assert not kwargs
      donated = [[info.donated for info in jax.tree.leaves(arg)] for arg in args]
      assert all(len(d) for d in donated[:2]), (which, name)
      if name == "sample":
        assert not any(map(any, donated)), (which, name)
      else:
        assert all(donated[0]) and not any(map(any, donated[1:])), (which, name)


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
  coefs, kls = [float(state.kl_coef)], []
  for _ in range(4):
    state, metrics, _, _ = one_iteration(fns, state, frozen)
    coefs.append(float(state.kl_coef))
    kls.append(float(metrics["objective/kl"]))
  assert float(metrics["objective/non_score_reward"]) == 0.0  # the KL is not in the reward
  assert float(metrics["loss/kl_avg"]) > 0.0
  assert coefs[-1] > coefs[0]  # KL above its tiny target: the coefficient rises
  # Ziegler et al.'s update from each rollout's KL, n_steps = the B responses of the iteration
  # (B/horizon = 0.08: counting the N tokens of a response instead moves β by 0.06·e).
  want = [ref.adaptive_kl(c, kl, B, 1e-3, 100.0) for c, kl in zip(coefs, kls, strict=False)]
  assert coefs[1:] == pytest.approx(want, rel=1e-6)


def test_each_iteration_draws_its_own_keys():
  """iteration_keys folds the step into the run's key: the sampling and shuffling keys of steps 0
  and 1 are four different keys (one key for every step would sample the same responses again
  while the policy has not moved, as in the critic's warm-up, and shuffle in one order)."""
  state = ppo.init_state({"policy": {"w": jnp.zeros(2)}, "value": {}}, optax.sgd(0.1), HP, seed=0)
  keys = [*ppo.iteration_keys(state), *ppo.iteration_keys(state.replace(step=state.step + 1))]
  assert len({np.asarray(jax.random.key_data(k)).tobytes() for k in keys}) == 4


def test_each_epoch_shuffles_the_minibatches_anew():
  """train_step draws a fresh permutation each epoch, not one order replayed. 4 rows in
  minibatches of 2, 2 epochs, plain SGD: each epoch's ordered split of the rows (6 of them) gives
  its own parameters, composed here from ``minibatch_gradients``; train_step's final parameters
  are one of the 36, and within twelve iterations some iteration's two epochs split the rows
  differently (a chance repeat at all twelve is 6⁻¹²; a replayed order repeats at every one)."""
  models, _, state, frozen, fns = build()
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(3), PROMPTS, PROMPT_MASK)
  exp, state, _ = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, jnp.linspace(-1, 2, B))
  exp = jax.tree.map(lambda x: x[:4], exp)
  lr = 0.1
  tx = optax.sgd(lr)
  sgd_state = ppo.init_state(state.params, tx, HP, seed=0)
  hparams = ppo.TrainHparams(models, tx, HP)
  step = jax.jit(lambda s: ppo.train_step(s, exp, hparams=hparams))
  grad = jax.jit(
    lambda p, rows: ppo.minibatch_gradients(
      models, p, jax.tree.map(lambda x: x[rows], exp), sgd_state.kl_coef, 1, hp=HP
    )[0]
  )

  def epoch(params, split):
    for rows in split:
      params = jax.tree.map(lambda p, g: p - lr * g, params, grad(params, jnp.asarray(rows)))
    return params

  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  splits = [(a, tuple(sorted({0, 1, 2, 3} - set(a)))) for a in itertools.combinations(range(4), 2)]
  after_one = {s: epoch(sgd_state.params, s) for s in splits}
  finals = {(s1, s2): flat(epoch(after_one[s1], s2)) for s1 in splits for s2 in splits}
  used = []
  for it in range(12):  # (the program compiled once: the step is traced)
    got = flat(step(sgd_state.replace(step=jnp.asarray(it, jnp.int32)))[0].params)
    (best, d1), (_, d2) = sorted(
      ((k, np.abs(v - got).max()) for k, v in finals.items()), key=lambda kv: kv[1]
    )[:2]
    assert d1 < 0.01 * d2, (it, d1, d2)  # one candidate, and only one, is train_step's
    used.append(best)
    if best[0] != best[1]:
      break
  assert used[-1][0] != used[-1][1], used  # a replayed order repeats at every step


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


def test_a_minibatch_is_cut_into_micro_batches_that_divide_it():
  layout = lambda **kw: dataclasses.replace(HP, num_minibatches=2, **kw).minibatch_layout(8)
  assert layout() == (4, 1) and layout(micro_batch_size=2) == (4, 2)
  with pytest.raises(ValueError, match=r"micro_batch_size 8 does not divide the minibatch size 4"):
    layout(micro_batch_size=8)


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
  tokens = []
  for it in range(3):
    state, metrics, gen, _ = one_iteration(fns, state, frozen)
    tokens.append(np.asarray(gen.tokens))
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
      # The same policy samples other responses: each iteration has its own sampling key.
      assert it == 0 or not np.array_equal(tokens[it], tokens[it - 1])
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
  the next iteration logs (and uses) the rate the skipped one would have; another horizon moves
  the decay's end without compiling again."""
  models, _, state, frozen, _ = build()
  hp_optim = OptimHparams(lr=1.0, schedule="linear")
  tx = make_actor_critic_optimizer(hp_optim, policy_steps=20, value_steps=40)
  state = ppo.init_state(state.params, tx, HP, seed=0)
  frozen = frozen.replace(horizon={"policy": jnp.int32(20), "value": jnp.int32(40)})
  fns = rollout.make_step_fns(models, tx, HP, hp_optim)
  lrs, skipped = [], []
  for scores in (None, jnp.full((B,), jnp.nan), None):
    state, metrics, _, _ = one_iteration(fns, state, frozen, scores)
    lrs.append(float(metrics["lr"]))
    skipped.append(float(metrics["update/skipped"]))
  assert skipped == [0.0, 1.0, 0.0]
  np.testing.assert_allclose(lrs, [1.0, 0.8, 0.8], rtol=1e-6)  # not 0.6: nothing was applied
  # The schedules' end is an input (Frozen.horizon), not a constant of the program: a run resumed
  # with 10 iterations instead of 5 decays over 40 updates, and compiles nothing new.
  key = ppo.iteration_keys(state)[0]
  gen = jax.eval_shape(fns.sample, state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK)
  exp, _, roll = jax.eval_shape(fns.score, state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  with pytest.raises(ValueError, match=r"give Frozen\(horizon=\{'policy': P, 'value': V\}\)"):
    jax.eval_shape(fns.update, state, frozen.replace(horizon=None), exp, roll["objective/kl"])
  longer = frozen.replace(horizon={"policy": jnp.int32(40), "value": jnp.int32(80)})
  _, metrics, _, _ = one_iteration(fns, state, longer)
  assert float(metrics["lr"]) == pytest.approx(1 - 8 / 40, rel=1e-6)  # 8 updates applied
  assert fns.update._cache_size() == 1


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


def test_the_critic_starts_from_the_model_its_init_names_with_a_zero_head_where_promised():
  """``build_critic``: a head on the policy's trunk starts at zero; a separate critic takes the
  policy's trunk under a zero head, or the reward model's trunk and head; a missing reward model
  or one of another architecture is refused."""
  from ppo_jax.actor_critic import build_critic

  policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  reward = RewardModel(CFG, rngs=nnx.Rngs(1))
  leaves = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))
  zero = lambda head: not np.any(np.asarray(head.kernel[...]))
  assert not zero(reward.head) and not same(policy.trunk, reward.trunk)

  head = build_critic(policy, reward, shared_trunk=True, init="reward_model", seed=2)
  assert isinstance(head, ScalarHead) and zero(head)
  for init, source in (("policy", policy), ("reward_model", reward)):
    critic = build_critic(policy, reward, shared_trunk=False, init=init, seed=2)
    assert isinstance(critic, ValueModel) and same(critic.trunk, source.trunk), init
    assert zero(critic.head) if init == "policy" else same(critic.head, reward.head)
  assert zero(build_critic(policy, None, shared_trunk=False, init="policy", seed=2).head)
  with pytest.raises(ValueError, match=r"critic_init='reward_model' but there is no reward model"):
    build_critic(policy, None, shared_trunk=False, init="reward_model", seed=2)
  for other in (CFG.replace(num_layers=2), CFG.replace(hidden_size=16, head_dim=8)):
    with pytest.raises(ValueError, match=r"needs a reward model of the policy's architecture"):
      rm = RewardModel(other, rngs=nnx.Rngs(1))
      build_critic(policy, rm, shared_trunk=False, init="reward_model", seed=2)
