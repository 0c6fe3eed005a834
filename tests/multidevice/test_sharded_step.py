"""One PPO iteration on meshes of 8 devices equals the single-device one; shardings follow the
rules and survive the step; checkpoints restore onto another mesh."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from ppo_jax import ppo, rollout, writers
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.checkpoint import Checkpointer, CheckpointSettings
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ValueModel
from ppo_jax.models.lora import add_lora
from ppo_jax.optim import OptimHparams, make_actor_critic_optimizer

# Llama family (SwiGLU, GQA, untied head): every dimension a multiple of 4 = the largest axis.
CFG = ModelConfig.llama(
  vocab_size=32,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=64,
  tie_word_embeddings=False,
  initializer_range=0.2,
)
B, P, N, EOS = 8, 5, 6, 1
HP = ppo.PPOHparams(
  max_new_tokens=N, eos_token_id=EOS, temperature=1.0, num_epochs=2, num_minibatches=2
)
LR = 1e-4
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
PROMPTS = np.random.default_rng(0).integers(2, 32, (B, P)).astype(np.int32)
PROMPT_MASK = np.ones((B, P), np.int32)
PROMPT_MASK[1, :2] = PROMPT_MASK[5, :1] = 0


TX = make_actor_critic_optimizer(
  OptimHparams(lr=LR, schedule="constant"), policy_steps=100, value_steps=100
)


def _models_and_state():
  policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  models, params, frozen_policy, reward_params = ActorCritic.build(
    policy, ValueModel(CFG, rngs=nnx.Rngs(3)), RewardModel(CFG, rngs=nnx.Rngs(1))
  )
  state = ppo.init_state(params, TX, HP, seed=0)
  frozen = ppo.Frozen(
    ref_params=jax.tree.map(lambda x: x * 1.1, frozen_policy), reward_params=reward_params
  )
  return models, state, frozen


@functools.cache
def _step_fns(mesh_shape):
  """The jitted steps and placement of a mesh, built once: tests on the same mesh reuse the
  programs compiled by the first."""
  models, state, frozen = _models_and_state()
  placement = None
  if mesh_shape is not None:
    placement = rollout.Placement.build(shd.make_mesh(mesh_shape), state, frozen, TX)
  return rollout.make_step_fns(models, TX, HP, placement=placement), placement


def setup(mesh_shape=None):
  """(step functions, a fresh state and frozen weights placed on the mesh, placement, put)."""
  _, state, frozen = _models_and_state()
  fns, placement = _step_fns(mesh_shape)
  put = jnp.asarray
  if placement is not None:
    state, frozen = shd.place(state, placement.state), shd.place(frozen, placement.frozen)
    put = lambda x: shd.place_batch(x, placement.batch)
  return fns, state, frozen, placement, put


def one_iteration(mesh_shape=None):
  fns, state, frozen, placement, put = setup(mesh_shape)
  pids, pmask = put(PROMPTS), put(PROMPT_MASK)
  gen = fns.sample(state.params["policy"], frozen, ppo.iteration_keys(state)[0], pids, pmask)
  exp, state, roll = fns.score(state, frozen, pids, pmask, gen, None)
  state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
  to_host = lambda t: jax.tree.map(shd.to_host, t)
  return to_host(gen.tokens), to_host({**roll, **upd}), to_host(state.params), state, placement


@pytest.fixture(scope="module")
def reference():
  return one_iteration(None)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_one_iteration_matches_single_device(reference, mesh_shape):
  ref_tokens, ref_metrics, ref_params, _, _ = reference
  tokens, metrics, params, _, _ = one_iteration(mesh_shape)
  np.testing.assert_array_equal(tokens, ref_tokens)  # same keys, same samples
  for k in (
    "objective/scores",
    "objective/kl",
    "loss/policy_avg",
    "loss/value_avg",
    "policy/clipfrac_avg",
    "val/var_explained",
    "grad/norm",
    "policy/entropy_avg",
  ):
    assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), rel=1e-4, abs=1e-5), k
  # Measured 2026-11-21: at most 5e-7 apart after the 4 Adam steps of one iteration.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _lora_iterations(mesh_shape, n=2):
  """Metrics and parameters after ``n`` LoRA PPO iterations (adapters on every projection; a
  head_dim of 16 over a width of 32; minibatches of one row per data × fsdp shard on 2 × 2 × 2)."""
  cfg = CFG.replace(vocab_size=64, head_dim=16, initializer_range=0.02)
  hp = ppo.PPOHparams(max_new_tokens=8, eos_token_id=EOS, num_epochs=2, num_minibatches=2)
  policy = add_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), rank=4, targets="q,k,v,o,gate,up,down")
  models, params, ref_params, reward_params = ActorCritic.build(
    policy, ValueModel(cfg, rngs=nnx.Rngs(1)), RewardModel(cfg, rngs=nnx.Rngs(2))
  )
  state = ppo.init_state(params, TX, hp, seed=0)
  frozen = ppo.Frozen(ref_params=ref_params, reward_params=reward_params)
  placement = rollout.Placement.build(shd.make_mesh(mesh_shape), state, frozen, TX)
  fns = rollout.make_step_fns(models, TX, hp, placement=placement)
  state, frozen = shd.place(state, placement.state), shd.place(frozen, placement.frozen)
  ids = shd.place_batch(np.full((8, 6), 5, np.int32), placement.batch)
  mask = shd.place_batch(np.ones((8, 6), np.int32), placement.batch)
  norms = []
  for _ in range(n):
    gen = fns.sample(state.params["policy"], frozen, ppo.iteration_keys(state)[0], ids, mask)
    exp, state, roll = fns.score(state, frozen, ids, mask, gen, None)
    state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
    norms.append(float(upd["grad/policy_norm"]))
  return norms, jax.tree.map(shd.to_host, state.params["policy"])


def test_lora_on_a_three_axis_mesh_matches_one_axis():
  """With the adapters of the row-parallel o (and down) split as the column-parallel ones, this
  came out wrong on 2 × 2 × 2: the first update's gradient norm 1.8707 against 1.8753 on
  8 × 1 × 1, the parameters diverging after (2026-12-05; XLA's partitioner, as annotations alone
  must not change results; the row-parallel rules avoid it)."""
  norms_8, params_8 = _lora_iterations((8, 1, 1))
  norms_222, params_222 = _lora_iterations((2, 2, 2))
  np.testing.assert_allclose(norms_222, norms_8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_222), jax.tree.leaves(params_8), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_parameters_follow_the_rules_and_keep_them_through_the_step(mesh_shape):
  fns, state, frozen, placement, put = setup(mesh_shape)
  mesh = placement.replicated.mesh
  before = [(x.sharding, x.ndim) for x in jax.tree.leaves(state)]
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    name = shd.path_string(path)
    want = jax.sharding.NamedSharding(mesh, shd.spec_for(name, x.shape, mesh))
    assert x.sharding.is_equivalent_to(want, x.ndim), name
  # The frozen reference and reward model too: a replicated copy would hold every weight on
  # every device.
  for tree in (frozen.ref_params, frozen.reward_params):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      name = shd.path_string(path)
      want = jax.sharding.NamedSharding(mesh, shd.spec_for(name, x.shape, mesh))
      assert x.sharding.is_equivalent_to(want, x.ndim), name
  for tree in (state.params["policy"], frozen.ref_params):
    q = tree["trunk"]["layers"][0]["attn"]["q"]["kernel"]
    if mesh_shape[1] * mesh_shape[2] > 1:  # something to shard parameters over: not replicated
      assert not q.sharding.is_fully_replicated
      assert len({s.data.shape for s in q.addressable_shards}) == 1
      assert q.addressable_shards[0].data.size == q.size // (mesh_shape[1] * mesh_shape[2])
  # Optimizer moments follow the params (each part's, inside optax.multi_transform); counts are
  # replicated.
  parts = state.opt_state[1].inner_states
  for part, params in state.params.items():
    adam = parts[part].inner_state[0]
    for moments in (adam.mu, adam.nu):
      for x, p in zip(jax.tree.leaves(moments[part]), jax.tree.leaves(params), strict=True):
        assert x.sharding.is_equivalent_to(p.sharding, p.ndim), part
    assert adam.count.sharding.is_fully_replicated
  pids, pmask = put(PROMPTS), put(PROMPT_MASK)
  for _ in range(2):
    # The fused iteration on one mesh; elsewhere the three programs the test above compiled
    # (all four declare the same output shardings: compiling each on every mesh took ~40 s).
    if mesh_shape == (2, 2, 2):
      state, _, _ = fns.iterate(state, frozen, pids, pmask)
    else:
      gen = fns.sample(state.params["policy"], frozen, ppo.iteration_keys(state)[0], pids, pmask)
      exp, state, roll = fns.score(state, frozen, pids, pmask, gen, None)
      state, _ = fns.update(state, frozen, exp, roll["objective/kl"])
  after = [x.sharding for x in jax.tree.leaves(state)]
  assert len(after) == len(before)
  for (a, ndim), b in zip(before, after, strict=True):
    assert b.is_equivalent_to(a, ndim), (a, b)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  *_, state, _ = one_iteration((8, 1, 1))
  with Checkpointer(tmp_path / "ckpt", CheckpointSettings(async_save=False)) as ckpt:
    ckpt.save(1, state, {"note": "from (8, 1, 1)"})
  _, target, _, placement2, _ = setup((1, 2, 4))
  with Checkpointer(tmp_path / "ckpt", CheckpointSettings()) as ckpt:
    restored, record = ckpt.restore(target)
  assert record["note"] == "from (8, 1, 1)"
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(shd.to_host(a), shd.to_host(b))
  want = jax.tree.leaves(placement2.state)
  for x, sh in zip(jax.tree.leaves(restored), want, strict=True):
    assert x.sharding.is_equivalent_to(sh, x.ndim)


def test_place_batch_on_one_process():
  mesh = shd.make_mesh((2, 2, 2))
  sh = shd.batch_sharding(mesh, 2)
  x = shd.place_batch({"ids": PROMPTS}, sh)["ids"]
  assert x.sharding == sh and np.array_equal(np.asarray(x), PROMPTS)
  rows = {tuple(range(B))[i[0]] for i in sh.addressable_devices_indices_map((B, P)).values()}
  assert sorted(len(r) for r in rows) == [2, 2, 2, 2]  # 4 row blocks (data × fsdp), tensor copies


def test_indivisible_batch_is_refused(tmp_path):
  with pytest.raises(ValueError, match="not divisible by the mesh's data × fsdp = 8"):
    shd.check_batch(12, shd.make_mesh((2, 4, 1)))
  from ppo_jax import pipeline
  from ppo_jax.config import load_experiment

  root = pathlib.Path(__file__).parents[2]
  config = load_experiment(root / "experiments" / "default.py", "smoke")
  config.mesh.shape, config.ppo.batch_size = (4, 2, 1), 36  # before any work, not after SFT
  with pytest.raises(ValueError, match=r"config\.ppo\.batch_size 36 is not divisible by the mesh"):
    pipeline.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  config.ppo.batch_size, config.rm.batch_size = 32, 12  # named, and found before SFT trains
  with pytest.raises(ValueError, match=r"config\.rm\.batch_size 12 is not divisible by the mesh"):
    pipeline.run(config, tmp_path / "w")
  assert not (tmp_path / "w" / "sft").exists() and not (tmp_path / "w" / "sft_checkpoints").exists()
  # DPO's batch cut to its training pairs (38 of 40), and its micro-batches: before SFT too.
  config = load_experiment(root / "experiments" / "dpo.py", "smoke")
  config.mesh.shape, config.task.num_pairs, config.dpo.batch_size = (4, 2, 1), 40, 64
  with pytest.raises(ValueError, match=r"dpo\.batch_size \(cut to its 38 training rows\) 38 is"):
    pipeline.run(config, tmp_path / "d")
  config.task.num_pairs, config.dpo.batch_size, config.dpo.micro_batch_size = 4096, 32, 4
  with pytest.raises(ValueError, match=r"dpo micro-batch \(config\.dpo\.micro_batch_size\) 4 is"):
    pipeline.run(config, tmp_path / "d")
  assert not (tmp_path / "d" / "sft").exists() and not (tmp_path / "d" / "sft_checkpoints").exists()


def test_dimension_that_does_not_divide_is_replicated_not_wrong(capsys):
  mesh = shd.make_mesh((1, 1, 8))
  spec = shd.spec_for("policy/trunk/embed/embedding", (12, 32), mesh)  # 12 rows over 8
  assert spec == jax.sharding.PartitionSpec(None, "fsdp")
  # Said once, as a note: those parameters' memory is not divided over that axis.
  params = {"trunk": {"embed": {"embedding": jnp.zeros((12, 32))}}}
  for _ in range(2):
    shd.param_shardings(params, mesh)
  assert capsys.readouterr().out == (
    "note: 1 of 1 parameters stay whole on mesh axis tensor (8): a dimension of theirs does not "
    "divide it (e.g. trunk/embed/embedding: 12)\n"
  )


def test_sharded_pipeline_end_to_end(tmp_path, monkeypatch):
  """The smoke pipeline on a (2, 2, 2) mesh: SFT, reward model and PPO all sharded; every model
  built or loaded in the host's memory, before a stage places it (``shd.staged_on_host``)."""
  import importlib.util
  import pathlib

  from ppo_jax import pipeline, stages

  built = []

  def spy(module, name):
    make = getattr(module, name)

    def made(*args, **kwargs):
      built.append((name, jax.config.jax_default_device))
      return make(*args, **kwargs)

    monkeypatch.setattr(module, name, made)

  for module, name in (
    (pipeline, "init_policy"),
    (pipeline, "build_critic"),
    (stages, "RewardModel"),
    (stages, "from_pretrained"),
  ):
    spy(module, name)

  root = pathlib.Path(__file__).parents[2]
  spec = importlib.util.spec_from_file_location("default", root / "experiments" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.mesh.shape = (2, 2, 2)
  # Every stage runs sharded; how well they learn is the single-device tests' business.
  config.task.num_sft = config.task.num_pairs = 256
  config.sft.epochs = config.rm.epochs = 1.0
  config.ppo.iterations = 4
  config.log.progress = False
  config.log.tensorboard = False
  summary = pipeline.run(config, tmp_path)
  assert np.isfinite(summary["after"]["kl"])
  assert (tmp_path / "policy" / "model.safetensors").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
  assert not any(tmp_path.glob("*_checkpoints"))  # SFT's and the reward model's, dropped
  # Resumed on the mesh (restored onto abstract arrays placed by the rules) and extended.
  config.ppo.iterations = 5
  pipeline.run(config, tmp_path)
  assert [r["step"] for r in writers.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
  # Built: the policy, reward model and critic; then (resumed) the policy, and the finished SFT
  # policy and reward model loaded, and the critic again.
  host = jax.local_devices(backend="cpu")[0]
  names = ["init_policy", "RewardModel", "build_critic", "init_policy"]
  assert [n for n, _ in built] == names + ["from_pretrained"] * 2 + ["build_critic"]
  assert all(device == host for _, device in built) and jax.config.jax_default_device is None
  # Exported by a process with one device (the 8-device checkpoint's topology is not there): the
  # policy of step 5 is the policy/ folder.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path.parent / "exported"
  cmd = [sys.executable, "-m", "ppo_jax.main", "export", f"--workdir={tmp_path}", f"--out={out}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "wrote the policy of step 5" in proc.stdout, proc.stderr
  load = lambda w: safetensors.numpy.load_file(str(w / "model.safetensors"))
  a, b = load(out), load(tmp_path / "policy")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)


@functools.cache
def _sft_whole():
  """The parameters (on the host) of ``_sft_train`` on the 2×2×2 mesh, uninterrupted: the
  reference of the resume and micro-batch tests, trained once."""
  return jax.tree.map(shd.to_host, _sft_train((2, 2, 2)))


def _sft_train(mesh_shape, folder=None, stop_after=None, micro=None):
  """``supervised.train`` of SFT on a mesh, checkpointed in ``folder``, in micro-batches of
  ``micro`` rows; a stop requested after step ``stop_after`` raises Preempted."""
  import signal

  from ppo_jax import preemption, stage_checkpoints, supervised
  from ppo_jax.data import Sequences

  rng = np.random.default_rng(0)
  ids = rng.integers(2, 32, (16, 8)).astype(np.int32)
  response = (rng.random((16, 3)) < 0.6).astype(np.float32)  # 0 to 3 tokens: uneven weights
  mask = np.concatenate([np.ones((16, 5), np.int32), response.astype(np.int32)], 1)
  seqs = Sequences(ids, mask, response)
  hp = supervised.SupervisedHparams(
    epochs=2.0, batch_size=8, micro_batch_size=micro, optim=OptimHparams(lr=1e-2)
  )
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))

  def on_step(i, total, row):
    if i + 1 == stop_after:
      preemption.GUARD.signal = signal.SIGTERM

  checkpoints = None
  if folder is not None:
    ckpt = Checkpointer(folder, CheckpointSettings(supervised_every=0))
    checkpoints = stage_checkpoints.Checkpoints(ckpt, {"seed": 0}, ("seed",))
  try:
    params, _ = supervised.train(
      nnx.to_pure_dict(state),
      graphdef,
      supervised.sft_loss,
      lambda i: supervised.sft_batch(seqs, i),
      len(seqs),
      hp,
      seed=0,
      name="sft",
      on_step=on_step,
      checkpoints=checkpoints,
      mesh=shd.make_mesh(mesh_shape),
    )
    return params
  finally:
    preemption.GUARD.signal = None
    if checkpoints is not None:
      ckpt.close()


@pytest.mark.parametrize("n", [13, 5])
def test_held_out_metrics_on_a_mesh_cover_every_row(n):
  """13 held-out rows on data × fsdp = 8 (5: fewer than the split): the rows that do not split
  evenly are evaluated too (they were dropped: 5 printed 'held-out: no rows'), as on one device."""
  from ppo_jax import supervised
  from ppo_jax.data import Sequences

  rng = np.random.default_rng(3)
  ids = rng.integers(2, 32, (n, 8)).astype(np.int32)
  seqs = Sequences(ids, np.ones_like(ids), rng.integers(0, 2, (n, 3)).astype(np.float32))
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  rows = (lambda i: supervised.sft_batch(seqs, i), n)
  one = supervised.evaluate(params, graphdef, supervised.sft_loss, *rows, batch_size=8)
  mesh = shd.make_mesh((2, 4, 1))
  placed = shd.place(params, shd.param_shardings(params, mesh))
  many = supervised.evaluate(placed, graphdef, supervised.sft_loss, *rows, batch_size=8, mesh=mesh)
  assert one["eval_rows"] == many["eval_rows"] == n
  assert many == pytest.approx(one, rel=1e-5)


def test_a_stopped_sharded_stage_resumes_on_the_same_mesh_bitwise_and_on_another_closely(
  tmp_path,
):
  from ppo_jax.preemption import Preempted

  whole = _sft_whole()
  for name, mesh_shape in (("same", (2, 2, 2)), ("other", (1, 2, 4))):
    folder = tmp_path / name
    with pytest.raises(Preempted, match="after step 1 of 4"):
      _sft_train((2, 2, 2), folder, stop_after=1)
    resumed = _sft_train(mesh_shape, folder)
    rules = shd.param_shardings(resumed, shd.make_mesh(mesh_shape))
    for x, sh in zip(jax.tree.leaves(resumed), jax.tree.leaves(rules), strict=True):
      assert x.sharding.is_equivalent_to(sh, x.ndim)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
      if name == "same":
        np.testing.assert_array_equal(a, shd.to_host(b))
      else:  # sums over other splits round differently
        np.testing.assert_allclose(a, shd.to_host(b), rtol=1e-4, atol=1e-6)


def test_sharded_sft_in_micro_batches_trains_as_in_whole_batches(monkeypatch):
  """Batches of 8 rows (of 0 to 3 response tokens each) in micro-batches of 4 on data × fsdp =
  4: the same training (up to the rounding of other sums) as whole batches; micro-batches of 2
  rows, which do not split over the 4 devices of the batch axes, are refused in one line."""
  whole = _sft_whole()
  split = []
  real = shd.split_rows
  monkeypatch.setattr(
    shd, "split_rows", lambda t, parts, mesh=None: split.append(parts) or real(t, parts, mesh)
  )
  micro = jax.tree.map(shd.to_host, _sft_train((2, 2, 2), micro=4))
  assert split == [2]  # traced once, in two micro-batches
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(micro), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"sft micro-batch \(config.sft.micro_batch_size\) 2 is not"):
    _sft_train((2, 2, 2), micro=2)


def test_the_python_example_of_scaling_md_runs(capsys, tmp_path, monkeypatch):
  """docs/scaling.md § From Python, as written: three sharded iterations, the policy's q kernel
  split as the rules say, and the trained policy written as a folder that loads back."""
  text = (pathlib.Path(__file__).parents[2] / "docs" / "scaling.md").read_text()
  section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
  run, save = (block.split("```", 1)[0] for block in section.split("```python\n")[1:3])
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(run, "docs/scaling.md", "exec"), namespace)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 and all(line.startswith("score ") for line in lines[:3])
  assert all(np.isfinite(float(line.split()[-1])) for line in lines[:3])
  assert lines[3] == "P('fsdp', 'tensor')"
  exec(compile(save, "docs/scaling.md", "exec"), namespace)
  from ppo_jax.models import from_pretrained

  loaded = nnx.to_pure_dict(nnx.state(from_pretrained(tmp_path / "trained_policy"), nnx.Param))
  trained = namespace["state"].params["policy"]
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained), strict=True):
    np.testing.assert_array_equal(a, shd.to_host(b))


def test_gspmd_is_warned_against():
  """With Shardy off, XLA's GSPMD computed wrong LoRA gradients under these rules: said."""
  params = {"policy": {"trunk": {"final_norm": {"scale": jax.ShapeDtypeStruct((4,), "float32")}}}}
  mesh = shd.make_mesh((2, 2, 2))
  shardy = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    with pytest.warns(UserWarning, match="jax_use_shardy_partitioner is off: .* keep Shardy"):
      shd.param_shardings(params, mesh)
  finally:
    jax.config.update("jax_use_shardy_partitioner", shardy)
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    shd.param_shardings(params, mesh)


class _Built(Exception):
  """Stops rl.run_ppo once its models are built."""


def test_the_reference_copy_of_a_host_policy_stays_on_the_host(monkeypatch):
  """A policy still in host memory (SFT reused or skipped) is copied for the reference in the
  host's memory too, not on the first accelerator. Here device 0 stands for the host, the mesh is
  devices 4–7, and device 4 is the default device, as the first GPU would be."""
  from ppo_jax import rl
  from ppo_jax.evaluation import Prompts, Scorer

  devices = jax.devices()
  mesh = shd.make_mesh((4, 1, 1), devices[4:])
  with shd.staged_on_host(mesh):
    policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  seen, real = {}, ActorCritic.build

  def build(*args):
    built = real(*args)
    seen["reference"] = {d for x in jax.tree.leaves(built[2]) for d in x.devices()}
    seen["policy"] = {d for x in jax.tree.leaves(built[1]["policy"]) for d in x.devices()}
    raise _Built

  monkeypatch.setattr(rl.ActorCritic, "build", build)
  prompts = Prompts(["p"] * B, PROMPTS, PROMPT_MASK)
  jax.config.update("jax_default_device", devices[4])
  try:
    with pytest.raises(_Built):
      rl.run_ppo(
        policy,
        Scorer(reward_model=RewardModel(CFG, rngs=nnx.Rngs(1))),
        prompts,
        prompts,
        None,
        hp=HP,
        optim=OptimHparams(lr=LR),
        iterations=1,
        batch_size=B,
        critic=None if HP.estimator != "gae" else ValueModel(CFG, rngs=nnx.Rngs(3)),
        seed=0,
        mesh=mesh,
      )
  finally:
    jax.config.update("jax_default_device", None)
  assert seen == {"reference": {devices[0]}, "policy": {devices[0]}}


def test_a_run_without_a_mesh_stays_on_the_default_device(monkeypatch, tmp_path):
  """mesh None: a library caller's ``jax_default_device`` (device 5 here) holds the whole run. The
  fresh state goes where the models are, as the restored state of a resume does, the frozen
  reference and reward model too, and the policy returned stays there; nothing moves to device 0."""
  from ppo_jax import rl
  from ppo_jax.evaluation import Prompts, Scorer

  devices = jax.devices()
  seen, real = [], rl.run_iteration

  def run_iteration(fns, state, frozen, *args, **kwargs):
    on = lambda tree: {d for x in jax.tree.leaves(tree) for d in x.devices()}
    seen.append((on(state), on(frozen)))  # frozen: the reference and the reward model
    return real(fns, state, frozen, *args, **kwargs)

  monkeypatch.setattr(rl, "run_iteration", run_iteration)
  prompts = Prompts(["p"] * B, PROMPTS, PROMPT_MASK)
  no_prompts = Prompts([], PROMPTS[:0], PROMPT_MASK[:0])

  def run(iterations):
    with jax.default_device(devices[5]), Checkpointer(tmp_path, CheckpointSettings()) as ckpt:
      result = rl.run_ppo(
        CausalLM(CFG, rngs=nnx.Rngs(0)),
        Scorer(reward_model=RewardModel(CFG, rngs=nnx.Rngs(1))),
        prompts,
        no_prompts,
        None,
        hp=HP,
        optim=OptimHparams(lr=LR, schedule="constant"),
        iterations=iterations,
        batch_size=B,
        critic=ValueModel(CFG, rngs=nnx.Rngs(3)),
        seed=0,
        checkpointer=ckpt,
      )
    return {d for x in jax.tree.leaves(nnx.state(result.policy)) for d in x.devices()}

  assert run(1) == {devices[5]}  # fresh
  assert run(2) == {devices[5]}  # resumed from the checkpoint of step 1
  assert seen == [({devices[5]}, {devices[5]})] * 2


def test_split_rows_keep_the_rows_split_over_the_batch_axes():
  """Inside a program, rows reshaped into minibatches stay split over ('data', 'fsdp'), even from
  a replicated input (left to GSPMD, every device may compute every row)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = shd.make_mesh((2, 2, 2))
  x = jax.device_put(jnp.arange(32.0).reshape(8, 4), shd.replicated(mesh))
  split = jax.jit(lambda x: shd.split_rows(x, 2, mesh))(x)
  assert split.sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"))), 3)
  np.testing.assert_array_equal(split, np.arange(32.0).reshape(2, 4, 4))
  pinned = jax.jit(lambda x: shd.pin_rows(x, mesh))(x)
  assert pinned.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
