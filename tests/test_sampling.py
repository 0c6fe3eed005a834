"""pj.generate: greedy == transformers, log-probs == a full forward, filtering, keys, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
from flax import nnx
from jax.extend.core import jaxprs_in_params

import ppo_jax as pj
from ppo_jax.sampling import filter_logits, sample

N_NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name → (ppo_jax model, torch model)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name in tiny_hf.CONFIGS:
    hf_model = tiny_hf.make(name, root / name, seed=5)
    out[name] = (pj.models.from_pretrained(root / name), hf_model)
  return out


def _hf_greedy(hf_model, ids, mask, eos):
  with torch.no_grad():
    out = hf_model.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=N_NEW,
      eos_token_id=eos,
      pad_token_id=tiny_hf.PAD,
    )
  got = out[:, ids.shape[1] :].numpy()
  return np.pad(got, ((0, 0), (0, N_NEW - got.shape[1])), constant_values=tiny_hf.PAD)


@pytest.mark.parametrize("name", list(tiny_hf.CONFIGS))
def test_greedy_equals_transformers_with_eos(models, name):
  model, hf_model = models[name]
  ids, mask = tiny_hf.batch(seed=6, B=4, T=7, left_pad=(0, 2, 4, 1))
  # Two stop ids that the model emits mid-way (the second listed first), each the first of the
  # two in some row, so rows stop early on either one (greedy rows run as without a stop id
  # until they stop).
  free_run = _hf_greedy(hf_model, ids, mask, eos=None)
  first = int(free_run[1, 4])
  # (a row's first stop id in the last slot leaves the row full length: it ends no row early)
  ends = lambda ids: {next((int(t) for t in row[:-1] if t in ids), None) for row in free_run}
  second = next(
    (int(t) for t in free_run[:, 1:].ravel() if t != first and {first, t} <= ends({first, t})),
    None,
  )
  assert second is not None, f"no second stop id ends a row of the free run early: {free_run}"
  eos = [second, first]
  want = _hf_greedy(hf_model, ids, mask, eos=eos)
  gen = pj.generate(
    model,
    ids,
    mask,
    key=jax.random.key(0),
    max_new_tokens=N_NEW,
    greedy=True,
    eos_token_id=eos,
    pad_token_id=tiny_hf.PAD,
  )
  np.testing.assert_array_equal(gen.tokens, want)
  lengths = np.asarray(gen.lengths)
  # Rows stopped early (their tails masked), on each of the two ids.
  assert {int(gen.tokens[b, n - 1]) for b, n in enumerate(lengths) if n < N_NEW} == set(eos)
  for b, n in enumerate(lengths):
    assert gen.tokens[b, n - 1] in eos or n == N_NEW
    np.testing.assert_array_equal(gen.mask[b], np.arange(N_NEW) < n)
    np.testing.assert_array_equal(gen.logprobs[b, n:], 0.0)


def _recomputed_logprobs(model, ids, mask, gen, temperature):
  """token_logprobs of a full forward over prompt + response, at the response tokens."""
  full = jnp.concatenate([jnp.asarray(ids), gen.tokens], axis=1)
  full_mask = jnp.concatenate([jnp.asarray(mask), gen.mask.astype(jnp.int32)], axis=1)
  logits = model(full, full_mask)[:, ids.shape[1] - 1 : -1]
  return logits, pj.token_logprobs(logits, gen.tokens, temperature=temperature)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3", "mistral", "gemma2", "gemma3"])
def test_sampled_logprobs_equal_full_forward(models, name):
  """At τ = 0.7 (τ = 1 takes the same path: it divides by 1)."""
  model, _ = models[name]
  temperature = 0.7
  # The last row's prompt is empty: its first token's log-prob once read the response too.
  ids, mask = tiny_hf.batch(seed=7, B=4, T=7, left_pad=(0, 2, 4, 7))
  gen = pj.generate(
    model,
    ids,
    mask,
    key=jax.random.key(1),
    max_new_tokens=N_NEW,
    temperature=temperature,
    eos_token_id=tiny_hf.EOS,
  )
  _, want = _recomputed_logprobs(model, ids, mask, gen, temperature)
  real = np.asarray(gen.mask) > 0
  np.testing.assert_allclose(np.asarray(gen.logprobs)[real], np.asarray(want)[real], atol=1e-5)


def _filtered_samples(models, temperature, top_k, top_p):
  """(generation, full-forward logits, their log-probs) of 8 llama3 prompts, under seeds 0–2."""
  model, _ = models["llama3"]
  ids, mask = tiny_hf.batch(seed=8, B=8, T=5, left_pad=(0,) * 8)
  for seed in range(3):
    gen = pj.generate(
      model,
      ids,
      mask,
      key=jax.random.key(seed),
      max_new_tokens=N_NEW,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    yield gen, *_recomputed_logprobs(model, ids, mask, gen, temperature)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_filtered_sampling_stays_in_the_allowed_set(models, top_k, top_p):
  temperature = 0.8
  for gen, logits, want in _filtered_samples(models, temperature, top_k, top_p):
    # The log-probs are the full tempered softmax's (the policy's, which PPO's ratio recomputes),
    # not the filtered distribution's.
    np.testing.assert_allclose(np.asarray(gen.logprobs), np.asarray(want), atol=1e-5)
    z = np.asarray(logits, np.float64) / temperature
    for b in range(z.shape[0]):
      for t in range(N_NEW):
        order = np.argsort(-z[b, t])
        p = np.exp(z[b, t][order] - z[b, t].max())
        p /= p.sum()
        n_p = int(np.searchsorted(np.cumsum(p), top_p - 1e-6) + 1)  # smallest set with mass ≥ p
        allowed = set(order[: min(n_p, top_k or len(order))].tolist())
        assert int(gen.tokens[b, t]) in allowed


def test_greedy_logprobs_are_at_the_temperature_given(models):
  """greedy=True picks the argmax; its log-probs are still the tempered softmax's (τ = 0.7)."""
  model, _ = models["llama3"]
  ids, mask = tiny_hf.batch(seed=8, B=4, T=5, left_pad=(0,) * 4)
  gen = pj.generate(model, ids, mask, greedy=True, temperature=0.7, max_new_tokens=N_NEW)
  _, want = _recomputed_logprobs(model, ids, mask, gen, 0.7)
  np.testing.assert_allclose(np.asarray(gen.logprobs), np.asarray(want), atol=1e-5)


def test_each_step_draws_with_a_key_of_its_own(models):
  """Uniform logits (a zero unembedding): every token a fresh uniform draw over the vocabulary,
  so no two consecutive steps draw the same token in all 8 rows (a key reused by the next step
  would make them equal)."""
  model = nnx.clone(models["llama3"][0])
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
  ids, mask = tiny_hf.batch(seed=8, B=8, T=5, left_pad=(0,) * 8)
  tokens = np.asarray(
    pj.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=N_NEW).tokens
  )
  assert len(np.unique(tokens)) > N_NEW  # uniform indeed
  for i in range(N_NEW - 1):
    assert not (tokens[:, i] == tokens[:, i + 1]).all(), i


def test_filter_logits_hand_computed():
  probs = [0.5, 0.2, 0.15, 0.1, 0.05]
  keep = lambda p=probs, **kw: np.isfinite(
    np.asarray(filter_logits(jnp.log(jnp.array([p])), **kw))
  )[0].tolist()
  assert keep(top_k=2) == [True, True, False, False, False]
  assert keep(top_p=0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
  assert keep(top_p=0.6) == [True, True, False, False, False]
  assert keep(top_p=0.86) == [True, True, True, True, False]
  assert keep(top_k=3, top_p=0.99) == [True, True, True, False, False]
  # Ties at the cut are kept whole, whatever their token ids' order.
  tied = [0.1, 0.3, 0.3, 0.3]
  assert keep(tied, top_k=2) == keep(tied, top_p=0.5) == [False, True, True, True]


def test_top_p_reads_the_mass_left_after_top_k():
  """Top-k first, then the nucleus of what it kept, renormalised (as transformers' warpers
  chain them): of 0.5, 0.2, 0.15 (0.85 kept), the first two hold 0.82 ≥ 0.8, so the third goes;
  over the whole distribution the first two hold only 0.7, and top-p alone keeps three."""
  probs = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(filter_logits(probs, **kw)))[0].tolist()
  assert keep(top_p=0.8) == [True, True, True, False, False]
  assert keep(top_k=3, top_p=0.8) == [True, True, False, False, False]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (0.7, 5, 0.8)])
def test_samples_follow_the_tempered_filtered_distribution(models, temperature, top_k, top_p):
  """Each token is a draw from q: softmax(logits / τ) cut to its top k, renormalised, then to
  the smallest set of most likely tokens whose mass reaches top_p, renormalised (float64 NumPy,
  from a full forward's logits). Over 3 keys × 8 rows × 12 steps the sampled tokens' log q, less
  each step's expectation under q, sum to within 5 standard deviations (a draw at τ = 1, or from
  a nucleus over the mass before top-k, lands tens of them off, or outside q)."""
  deviation = variance = 0.0
  for gen, logits, _ in _filtered_samples(models, temperature, top_k, top_p):
    z_NxV = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1]) / temperature
    for z, token in zip(z_NxV, np.asarray(gen.tokens).ravel(), strict=True):
      order = np.argsort(-z)
      p = np.exp(z[order] - z.max())
      p[top_k or len(p) :] = 0.0
      p /= p.sum()
      q = np.where(np.cumsum(p) - p < top_p, p, 0.0)
      q /= q.sum()
      log_q = np.log(np.where(q > 0, q, 1.0))
      mean = q @ log_q
      q_token = q[order == token][0]
      deviation += (np.log(q_token) if q_token > 0 else -np.inf) - mean
      variance += q @ (log_q - mean) ** 2
  assert abs(deviation) < 5 * np.sqrt(variance), deviation / np.sqrt(variance)


def test_same_key_same_sample(models):
  model, _ = models["qwen2"]
  ids, mask = tiny_hf.batch(seed=9)
  run = lambda seed: pj.generate(model, ids, mask, key=jax.random.key(seed), max_new_tokens=N_NEW)
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)


def test_row_keys_make_a_row_independent_of_the_batch(models):
  """With one key per row a row samples the same whatever rows share its batch and where it
  sits; raw key data (``[B, 2]``) means the same keys."""
  model, _ = models["llama3"]
  ids, mask = tiny_hf.batch(seed=9)  # [3, T], left-padded to different lengths
  keys = jax.random.split(jax.random.key(3), len(ids))
  run = lambda rows, k: pj.generate(model, ids[rows], mask[rows], key=k, max_new_tokens=N_NEW)
  whole = run(np.arange(len(ids)), keys)
  order = np.array([2, 0, 1])
  shuffled = run(order, keys[order])
  np.testing.assert_array_equal(shuffled.tokens, whole.tokens[order])
  np.testing.assert_allclose(shuffled.logprobs, whole.logprobs[order], rtol=1e-5, atol=1e-6)
  alone = run(np.array([1]), keys[1:2])
  np.testing.assert_array_equal(alone.tokens, whole.tokens[1:2])
  raw = run(np.arange(len(ids)), jax.random.key_data(keys))
  np.testing.assert_array_equal(raw.tokens, whole.tokens)
  # Not one stream for all rows: one key for the batch samples otherwise.
  shared = run(np.arange(len(ids)), keys[0])
  assert not np.array_equal(shared.tokens, whole.tokens)
  with pytest.raises(ValueError, match=r"one PRNG key or one per row \(\[3\]\), got shape \[2\]"):
    run(np.arange(len(ids)), keys[:2])


def test_decode_loop_is_one_program(models):
  model, _ = models["gpt2"]
  graphdef, params = nnx.split(model)
  ids, mask = tiny_hf.batch()
  jaxpr = jax.make_jaxpr(
    lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=N_NEW, eos_token_ids=(5,))
  )(nnx.to_pure_dict(params), ids, mask, jax.random.key(0))
  assert any(e.primitive.name == "while" for e in jaxpr.eqns)


def test_without_eos_the_loop_has_a_fixed_trip_count(models):
  model, _ = models["gpt2"]
  ids, mask = tiny_hf.batch(seed=10)
  run = lambda eos: pj.generate(
    model, ids, mask, key=jax.random.key(3), max_new_tokens=N_NEW, eos_token_id=eos
  )
  # An EOS id outside the vocabulary is never sampled, so the early-exit loop runs every step too.
  fixed, early_exit = run(None), run(tiny_hf.VOCAB)
  for a, b in zip(jax.tree.leaves(fixed), jax.tree.leaves(early_exit), strict=True):
    np.testing.assert_array_equal(a, b)
  graphdef, params = nnx.split(model)
  hlo = (
    jax.jit(lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=N_NEW))
    .lower(nnx.to_pure_dict(params), ids, mask, jax.random.key(0))
    .compile()
    .as_text()
  )
  # The prefill makes the first token, the loop the other N − 1.
  assert f'"known_trip_count":{{"n":"{N_NEW - 1}"}}' in hlo


@pytest.mark.parametrize(
  "B,greedy", [(1, True), (4, True), (4, False)], ids=["1-greedy", "4-greedy", "4-sampled"]
)
def test_eos_check_every_does_not_change_the_sample(models, B, greedy):
  model, hf_model = models["llama3"]
  ids, mask = tiny_hf.batch(seed=6, B=4, T=7, left_pad=(0, 2, 4, 1))
  ids, mask = ids[:B], mask[:B]
  # An EOS that row 0 emits at slot 4: with one greedy row the whole batch is done there.
  eos = int(_hf_greedy(hf_model, ids, mask, eos=None)[0, 4])
  run = lambda k: pj.generate(
    model,
    ids,
    mask,
    key=jax.random.key(7),
    max_new_tokens=N_NEW,
    greedy=greedy,
    eos_token_id=eos,
    pad_token_id=tiny_hf.PAD,
    eos_check_every=k,
  )
  want = run(1)  # checked after every step
  if greedy:
    assert int(want.lengths[0]) <= 5
  # N − 1 = 11 loop steps: 2 unchecked + 3 chunks of 3, all unchecked.
  for k in (3, N_NEW + 5):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(run(k)), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=f"eos_check_every={k}")


def test_with_eos_the_steps_run_in_chunks_of_known_length(models):
  model, _ = models["gpt2"]
  graphdef, params = nnx.split(model)
  ids, mask = tiny_hf.batch(seed=10)
  hlo = (
    jax.jit(
      lambda p, i, m, k: sample(
        graphdef, p, i, m, k, max_new_tokens=N_NEW, eos_token_ids=(5,), eos_check_every=4
      )
    )
    .lower(nnx.to_pure_dict(params), ids, mask, jax.random.key(0))
    .compile()
    .as_text()
  )
  # N − 1 = 11 steps: 3 unchecked, then chunks of 4 with the all-done check between them.
  assert '"known_trip_count":{"n":"4"}' in hlo
  assert '"known_trip_count":{"n":"3"}' in hlo
  assert f'"known_trip_count":{{"n":"{N_NEW - 1}"}}' not in hlo


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def test_decode_loop_reads_weights_in_the_compute_dtype(tmp_path):
  tiny_hf.make("llama3", tmp_path, seed=11)
  mixed = pj.models.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
  ids, mask = tiny_hf.batch(seed=12)
  graphdef, params = nnx.split(mixed)
  pure = nnx.to_pure_dict(params)
  weight_shapes = {x.shape for x in jax.tree.leaves(pure) if x.ndim >= 2}
  for eos in ((), (tiny_hf.EOS,)):
    jaxpr = jax.make_jaxpr(
      lambda p, i, m, k, eos=eos: sample(
        graphdef, p, i, m, k, max_new_tokens=N_NEW, eos_token_ids=eos
      )
    )(pure, ids, mask, jax.random.key(0))
    loops = [e for e in jaxpr.eqns if e.primitive.name in ("while", "scan")]
    assert loops
    casts = [
      e
      for loop in loops
      for body in jaxprs_in_params(loop.params)
      for e in _eqns(body)
      if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape in weight_shapes
    ]
    assert not casts, f"the decode step casts {len(casts)} weights on every step"
  # The weights cast before the loop are those a bf16 copy of the model holds.
  bf16 = pj.models.from_pretrained(tmp_path, dtype="bfloat16")
  run = lambda m: pj.generate(m, ids, mask, key=jax.random.key(4), max_new_tokens=N_NEW)
  for a, b in zip(jax.tree.leaves(run(mixed)), jax.tree.leaves(run(bf16)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_decode_loop_reads_norm_scales_and_biases_in_float32(tmp_path):
  """Only matrices are narrowed before the loop: GPT-2's LayerNorm scales and biases, which it
  reads in float32 (as Gemma's and OLMo's RMSNorm read theirs), enter the decode steps as the
  float32 master values its own forward reads, not rounded to bfloat16."""
  tiny_hf.make("gpt2", tmp_path, seed=11)
  mixed = pj.models.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
  ids, mask = tiny_hf.batch(seed=12)
  graphdef, params = nnx.split(mixed)
  pure = nnx.to_pure_dict(params)
  vectors = [x for x in jax.tree.leaves(pure) if x.ndim == 1]
  assert vectors and all(x.dtype == jnp.float32 for x in vectors)
  jaxpr = jax.make_jaxpr(lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=N_NEW))(
    pure, ids, mask, jax.random.key(0)
  )
  read = [
    v.aval.dtype
    for e in jaxpr.eqns
    if e.primitive.name in ("while", "scan")
    for v in e.invars
    if v.aval.shape in {x.shape for x in vectors}
  ]
  assert len(read) >= len(vectors) and set(read) == {jnp.dtype(jnp.float32)}, read


def test_lora_adapters_are_folded_before_the_decode_loop(models):
  """A policy with adapters samples with ``W + (α/r)·A B`` folded in once: no step of the decode
  loop multiplies by an adapter, and the log-probs are the unfolded full forward's (to float32
  rounding), the samples those of the merged model."""
  from ppo_jax.models.lora import add_lora, merge_lora, split_lora

  model = add_lora(models["llama3"][0], rank=4, targets="q,k,v,o,gate,up,down", seed=1)
  graphdef, adapters, base = split_lora(model)
  # Non-zero B (fresh adapters are the identity change): an adapter that were skipped would show.
  adapters = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x) + 0.05, adapters)
  model = nnx.merge(graphdef, adapters, base)
  ids, mask = tiny_hf.batch(seed=13)
  trace = lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=N_NEW)
  jaxpr = jax.make_jaxpr(trace)((adapters, base), ids, mask, jax.random.key(0))
  adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
  loops = [e for e in jaxpr.eqns if e.primitive.name in ("while", "scan")]
  products = [
    e
    for loop in loops
    for body in jaxprs_in_params(loop.params)
    for e in _eqns(body)
    if e.primitive.name == "dot_general" and any(v.aval.shape in adapter_shapes for v in e.invars)
  ]
  assert loops and not products, f"{len(products)} adapter products in every decode step"

  gen = pj.generate(model, ids, mask, key=jax.random.key(3), max_new_tokens=N_NEW)
  _, full = _recomputed_logprobs(model, ids, mask, gen, 1.0)
  np.testing.assert_allclose(gen.logprobs, np.asarray(full) * np.asarray(gen.mask), atol=2e-5)
  merged = pj.generate(merge_lora(model), ids, mask, key=jax.random.key(3), max_new_tokens=N_NEW)
  np.testing.assert_array_equal(gen.tokens, merged.tokens)
  np.testing.assert_allclose(gen.logprobs, merged.logprobs, atol=2e-6)


def test_prefill_attends_over_the_prompt_only(models):
  """The prefill scores each prompt query against the ``P`` prompt keys, not against all ``P + N``
  slots of a cache whose slots past the prompt are still empty."""
  model, _ = models["llama3"]
  graphdef, params = nnx.split(model)
  ids, mask = tiny_hf.batch(seed=5)
  P, S = ids.shape[1], ids.shape[1] + N_NEW
  trace = lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=N_NEW)
  jaxpr = jax.make_jaxpr(trace)(nnx.to_pure_dict(params), ids, mask, jax.random.key(0))
  products = [  # the attention products, grouped queries: [B, H_kv, …] with 5 dims
    e.outvars[0].aval.shape
    for e in _eqns(jaxpr.jaxpr)
    if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim == 5
  ]
  prefill_scores = [s for s in products if s.count(P) == 2 and S not in s]
  over_the_cache = [s for s in products if P in s and S in s]
  assert len(prefill_scores) == model.cfg.num_layers and not over_the_cache, products


def test_cudnn_decoding_reads_a_sequence_major_cache(models, monkeypatch):
  """``attention="cudnn"`` decodes through ``jax.nn.dot_product_attention`` over a ``[B, S, H_kv,
  D]`` cache. Off a GPU that call's XLA lowering stands in for cuDNN's kernel (``FUSED`` patched,
  and the config's bf16/fp16 rule, which is the kernel's, lifted so float32 can be compared), so
  everything runs but the kernel: the cache's layout and writes and the masks. Same samples and
  log-probs as ``attend`` over the heads-major cache."""
  import dataclasses

  from ppo_jax.models import layers

  model, _ = models["llama3"]
  monkeypatch.setitem(layers.FUSED, "cudnn", "xla")
  cfg = dataclasses.replace(model.cfg)
  object.__setattr__(cfg, "attention", "cudnn")  # in float32: the kernel's dtype rule lifted
  fused = pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))
  nnx.update(fused, nnx.state(model))
  assert fused.trunk.init_cache(2, 5)[0].k.shape == (2, 5, cfg.num_kv_heads, cfg.head_dim)
  ids, mask = tiny_hf.batch(seed=7, B=4, T=7, left_pad=(0, 2, 4, 1))
  kw = dict(key=jax.random.key(2), max_new_tokens=N_NEW, eos_token_id=tiny_hf.EOS)
  want, got = pj.generate(model, ids, mask, **kw), pj.generate(fused, ids, mask, **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  assert np.asarray(got.mask).sum() > 2 * ids.shape[0]  # several steps decoded, not only EOS


def test_bad_arguments(models):
  model, _ = models["gpt2"]  # 48 learned positions
  ids, mask = tiny_hf.batch(T=40)
  with pytest.raises(ValueError, match="prompt length 40 \\+ max_new_tokens 12 exceeds"):
    pj.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=12)
  with pytest.raises(ValueError, match="top_p must be in"):
    pj.generate(model, ids[:, :4], mask[:, :4], key=jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="attention_mask shape"):
    pj.generate(model, ids[:, :4], mask[:, :3], key=jax.random.key(0), max_new_tokens=2)
  # Greedy draws nothing: no key needed (the same tokens as with one); sampling needs one.
  small = dict(max_new_tokens=3, greedy=True)
  np.testing.assert_array_equal(
    pj.generate(model, ids[:, :4], mask[:, :4], **small).tokens,
    pj.generate(model, ids[:, :4], mask[:, :4], key=jax.random.key(5), **small).tokens,
  )
  value_model = pj.models.ValueModel(model.cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="a ValueModel has no LM head to sample from"):
    pj.generate(value_model, ids[:, :4], mask[:, :4], **small)
  with pytest.raises(ValueError, match="key is None: sampling needs a PRNG key"):
    pj.generate(model, ids[:, :4], mask[:, :4], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"key must be a PRNG key \(jax.random.key\(0\)\)"):
    pj.generate(model, ids[:, :4], mask[:, :4], key=0, max_new_tokens=2)
  with pytest.raises(ValueError, match="eos_check_every must be ≥ 1"):
    pj.generate(
      model, ids[:, :4], mask[:, :4], key=jax.random.key(0), max_new_tokens=2, eos_check_every=0
    )
  # Greedy picks ignore τ but the log-probs use it: τ = 0 gave NaN log-probs.
  with pytest.raises(ValueError, match="temperature must be > 0"):
    pj.generate(
      model,
      ids[:, :4],
      mask[:, :4],
      key=jax.random.key(0),
      max_new_tokens=2,
      greedy=True,
      temperature=0.0,
    )
  # Sizes and integer arguments: one line each, not a crash deep in the trace.
  run = lambda i, m, **kw: pj.generate(model, i, m, key=jax.random.key(0), **kw)
  for shape in ((0, 4), (2, 0)):
    with pytest.raises(ValueError, match=r"needs at least one row and one column"):
      run(np.zeros(shape, np.int32), None, max_new_tokens=2)
  few, few_mask = ids[:, :4], mask[:, :4]
  with pytest.raises(ValueError, match=r"top_k must be ≥ 0 \(0: no top-k filter\), got -1"):
    run(few, few_mask, max_new_tokens=2, top_k=-1)
  with pytest.raises(ValueError, match=r"^top_k must be an integer, got 2.5"):
    run(few, few_mask, max_new_tokens=2, top_k=2.5)
  with pytest.raises(ValueError, match=r"^max_new_tokens must be an integer, got 5.0"):
    run(few, few_mask, max_new_tokens=5.0)
  with pytest.raises(ValueError, match=r"^temperature must be a number > 0, got None"):
    run(few, few_mask, max_new_tokens=2, temperature=None)
  # NumPy's and JAX's integer scalars are integers; a missing pad id pads with the stop token
  # (row 0's first token sampled without one, made the stop token: the rest of it is padding).
  stop = int(run(few, few_mask, max_new_tokens=8).tokens[0, 0])
  base = run(few, few_mask, max_new_tokens=8, eos_token_id=stop, pad_token_id=stop)
  same = run(
    few,
    few_mask,
    max_new_tokens=np.int64(8),
    eos_token_id=jnp.int32(stop),
    pad_token_id=None,
    top_k=jnp.array(0),
  )
  assert int(same.lengths[0]) == 1 and (np.asarray(same.tokens[0]) == stop).all()
  np.testing.assert_array_equal(same.tokens, base.tokens)
  # An id outside the vocabulary, even in the left padding, would make the row NaN.
  bad = np.asarray(ids[:, :4]).copy()
  bad[0, 0] = -100
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\) \(min -100"):
    pj.generate(model, bad, mask[:, :4], key=jax.random.key(0), max_new_tokens=2)
