"""The supervised stages: their step count (epochs over the training rows in batches of the size
drawn), and their checkpoints."""

import contextlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ppo_jax import checkpoint, preemption, stage_checkpoints, supervised
from ppo_jax.data import Sequences
from ppo_jax.models import CausalLM, ModelConfig
from ppo_jax.optim import OptimHparams, make_optimizer
from ppo_jax.supervised import SupervisedHparams
from ppo_jax.supervised_step import make_step


@pytest.mark.parametrize(
  "epochs,batch_size,n,steps",
  [
    (3, 32, 10, 3),  # fewer rows than a batch: batches of all 10 rows, three of them
    (3, 32, 64, 6),
    (1.5, 32, 64, 3),
    (1, 32, 65, 3),  # the last step reads into the next epoch
    (0.01, 32, 64, 1),  # at least one step
    (0, 32, 64, 0),  # none: the pipeline skips SFT
  ],
)
def test_steps_are_epochs_over_the_rows(epochs, batch_size, n, steps):
  assert SupervisedHparams(epochs=epochs, batch_size=batch_size).steps(n) == steps


# --------------------------------------------------------------------------------------------------
# Checkpoints: a stopped stage resumes where it stopped, bit for bit.

CFG = ModelConfig.gpt2(
  vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16
)
HP = SupervisedHparams(epochs=2.0, batch_size=4, optim=OptimHparams(lr=1e-2, warmup_steps=2))
CONFIG = {"seed": 0, "sft": {"epochs": 2.0}, "ppo": {"kl_coef": 0.1}, "model": {"remat": "none"}}
FIELDS = ("seed", "sft.", "model.")


def _rows(n=12, seed=0):
  rng = np.random.default_rng(seed)
  P, R = 3, 4
  ids = rng.integers(2, 16, (n, P + R)).astype(np.int32)
  resp = np.ones((n, R), np.float32)
  resp[::3, 2:] = 0
  mask = np.concatenate([np.ones((n, P), np.int32), resp.astype(np.int32)], 1)
  seqs = Sequences(ids, mask, resp)
  return (lambda i: supervised.sft_batch(seqs, i)), n


def _train(folder=None, *, stop_after=None, every=0, config=CONFIG, rows=None, data="a"):
  """``train`` of the tiny model, checkpointed in ``folder``; a stop requested after step
  ``stop_after`` (as SIGTERM would) raises Preempted."""
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))

  def on_step(i, total, row):
    if stop_after is not None and i + 1 == stop_after:
      preemption.GUARD.signal = signal.SIGTERM

  settings = checkpoint.CheckpointSettings(supervised_every=every, async_save=True)
  with contextlib.ExitStack() as stack:
    checkpoints = None
    if folder is not None:
      ckpt = stack.enter_context(checkpoint.Checkpointer(folder, settings))
      checkpoints = stage_checkpoints.Checkpoints(ckpt, config, FIELDS, fingerprint=data)
    try:
      return supervised.train(
        nnx.to_pure_dict(state),
        graphdef,
        supervised.sft_loss,
        *(rows or _rows()),
        HP,
        seed=0,
        name="sft",
        on_step=on_step,
        checkpoints=checkpoints,
      )
    finally:
      preemption.GUARD.signal = None


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_stopped_stage_resumes_bit_for_bit(tmp_path):
  """Stopped after step 2 of 6 (a checkpoint every 4 steps, none yet), then again after step 5
  (past the step-4 one), then resumed: the parameters and every step's metrics are those of
  an uninterrupted stage."""
  whole, history = _train()
  assert len(history) == HP.steps(12) == 6
  # Each step's learning rate: the warm-up from 0 to 1e-2 over 2 steps, then the decay.
  assert [r["lr"] for r in history[:3]] == pytest.approx([0.0, 5e-3, 1e-2])
  assert 0 < history[5]["lr"] < history[3]["lr"] < 1e-2
  folder = tmp_path / "sft_checkpoints"
  with pytest.raises(preemption.Preempted, match=r"after step 2 of 6 of the sft stage; checkpoint"):
    _train(folder, stop_after=2, every=4)
  with pytest.raises(preemption.Preempted, match="after step 5 of 6"):
    _train(folder, stop_after=5, every=4)
  assert sorted(int(p.name) for p in folder.iterdir()) == [2, 4, 5]
  resumed, rest = _train(folder, every=4)
  _equal(resumed, whole)
  assert rest == history[5:]
  assert sorted(int(p.name) for p in folder.iterdir()) == [4, 5, 6]  # the end, 3 kept


def test_more_dpo_epochs_extend_a_finished_stage_and_fewer_are_refused(tmp_path, capsys):
  """``dpo.epochs`` may change on resume: more go on from the last checkpoint with the decaying
  schedule stretched to the new end (said); fewer than the steps done are refused in one line
  naming them. (The pipeline refuses them before SFT: test_pipeline's DPO test.)"""
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  settings = checkpoint.CheckpointSettings(supervised_every=0, async_save=False)

  def run(epochs):
    hp = SupervisedHparams(epochs=epochs, batch_size=4, optim=HP.optim)
    config = {"seed": 0, "dpo": {"epochs": epochs}}
    with checkpoint.Checkpointer(tmp_path, settings) as ckpt:
      checkpoints = stage_checkpoints.Checkpoints(ckpt, config, ("seed", "dpo."))
      params = nnx.to_pure_dict(state)
      return supervised.train(params, graphdef, supervised.sft_loss, *_rows(), hp, seed=0,
                              name="dpo", checkpoints=checkpoints)  # fmt: skip

  _, done = run(2.0)
  capsys.readouterr()
  _, more = run(3.0)
  assert (len(done), len(more)) == (6, 3)  # steps 7 to 9 of 9
  assert "dpo now ends at step 9, not 6; its linear schedule decays to 0 at update 9, not 6" in (
    capsys.readouterr().out
  )
  with pytest.raises(ValueError, match=r"holds step 9, past the 3 steps of dpo\.epochs=1\.0;"):
    run(1.0)


def test_without_checkpoints_a_stop_says_the_stage_starts_over():
  with pytest.raises(preemption.Preempted, match="after step 3 of 6 of the sft stage; it starts"):
    _train(stop_after=3)


def test_a_stage_of_another_config_or_other_data_is_refused(tmp_path):
  folder = tmp_path / "sft_checkpoints"
  with pytest.raises(preemption.Preempted):
    _train(folder, stop_after=2)
  other = {**CONFIG, "sft": {"epochs": 3.0}}
  diff = r"different config \(sft\.epochs: 2\.0 → 3\.0\)"
  with pytest.raises(ValueError, match=diff):  # named, though the data changed too
    _train(folder, config=other, data="b")
  with pytest.raises(ValueError, match=r"trained on other data \(12 rows then, 14 now;"):
    _train(folder, rows=_rows(14))
  with pytest.raises(ValueError, match=r"trained on other data \(12 rows then, 12 now;"):
    _train(folder, data="b")
  # What the stage does not read may change (PPO's section), and what changes no result (remat).
  _, rest = _train(folder, config={**CONFIG, "ppo": {"kl_coef": 0.2}, "model": {"remat": "block"}})
  assert len(rest) == 4


# --------------------------------------------------------------------------------------------------
# Frozen weights: LoRA adapters trained over base weights the step reads but never updates.


def test_frozen_weights_are_arguments_of_the_compiled_step_not_constants(monkeypatch):
  """What ``train``'s docstring claims, read from the step program it compiles: every base array
  is a parameter of the module (one per array), and no constant has a base matrix's shape."""
  from ppo_jax.models.lora import add_lora, split_lora

  model = add_lora(CausalLM(CFG, rngs=nnx.Rngs(0)), rank=2, targets="q,v", seed=1)
  graphdef, adapters, base = split_lora(model)
  real_jit, programs = jax.jit, []

  def spying_jit(fn, **kw):
    jitted = real_jit(fn, **kw)
    if kw.get("donate_argnums") != (0, 1):  # not the step (the optimizer's init, say)
      return jitted

    def call(*args):
      programs.append((args, jitted.lower(*args).as_text()))
      return jitted(*args)

    return call

  monkeypatch.setattr(supervised.jax, "jit", spying_jit)
  supervised.train(adapters, graphdef, supervised.sft_loss, *_rows(), HP, seed=0, frozen=base)
  args, text = programs[0]
  # The step's third argument: the base (committed to its device, the same values)
  assert jax.tree.structure(args[2]) == jax.tree.structure(base)
  for a, b in zip(jax.tree.leaves(args[2]), jax.tree.leaves(base), strict=True):
    np.testing.assert_array_equal(a, b)
  signature = next(line for line in text.splitlines() if "func.func public @main(" in line)
  assert signature.count("%arg") == len(jax.tree.leaves(args))  # base's arrays among them
  shapes = {"x".join(map(str, x.shape)) for x in jax.tree.leaves(base) if x.ndim == 2}
  constants = [line for line in text.splitlines() if "stablehlo.constant" in line]
  assert shapes and not [c for c in constants for shape in shapes if f"tensor<{shape}x" in c]


def test_frozen_weights_are_read_and_not_trained():
  """``train(adapters, frozen=base)`` gives the adapters of a loss that closes over the base (the
  same arithmetic), leaves the base arrays as they were (not donated, not updated), and another
  base gives another history: the loss reads the weights it is given."""
  from ppo_jax.models.lora import add_lora, split_lora

  model = add_lora(CausalLM(CFG, rngs=nnx.Rngs(0)), rank=2, targets="q,v", seed=1)
  graphdef, adapters, base = split_lora(model)
  before = jax.tree.map(np.array, base)
  rows = _rows()

  def run(frozen, loss_fn=supervised.sft_loss):
    return supervised.train(adapters, graphdef, loss_fn, *rows, HP, seed=0, frozen=frozen)

  trained, history = run(base)
  _equal(base, before)  # still readable (not donated) and unchanged
  assert jax.tree.structure(trained) == jax.tree.structure(adapters)
  assert history[-1]["nll"] < history[0]["nll"]
  b = trained["trunk"]["layers"][0]["attn"]["v"]["lora_b"]
  assert np.abs(np.asarray(b)).max() > 0  # B starts at zero: the adapters trained
  closed, closed_history = run(None, lambda p, g, batch: supervised.sft_loss((p, base), g, batch))
  for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(closed), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert [r["nll"] for r in history] == pytest.approx([r["nll"] for r in closed_history], 1e-5)
  other = jax.tree.map(lambda x: x * 0.5, base)
  _, other_history = run(other)
  assert other_history[0]["nll"] != pytest.approx(history[0]["nll"], 1e-3)
  held_out = supervised.evaluate(
    trained, graphdef, supervised.sft_loss, *rows, batch_size=4, frozen=base
  )
  assert held_out["eval_rows"] == 12 and held_out["nll"] < history[0]["nll"]


def _nan_rows(bad_steps, *, n=4):
  """Rows of a least-squares fit, one row per step (batch size 1, no shuffle matters): the rows
  whose step is in ``bad_steps`` hold a NaN target."""
  x = np.arange(1.0, n + 1, dtype=np.float32)

  def make_batch(idx):
    return {"x": x[idx], "bad": np.isin(idx, list(bad_steps)).astype(np.float32)}

  def loss_fn(params, graphdef, batch):
    target = jnp.where(batch["bad"] > 0, jnp.nan, 2.0 * batch["x"])
    loss = jnp.mean((params["w"] * batch["x"] - target) ** 2)
    return loss, {"loss": loss}

  return loss_fn, make_batch, n


def test_a_non_finite_step_changes_nothing_and_a_run_of_them_stops_the_stage(capsys):
  """A NaN loss skips its update (parameters and Adam's moments as before, ``skipped`` = 1) and
  training goes on; ``max_nonfinite`` of them in a row raise NonFiniteError naming the stage."""
  hp = SupervisedHparams(batch_size=1, epochs=3.0, optim=OptimHparams(lr=0.1, schedule="constant"))
  params = {"w": jnp.zeros(())}
  loss_fn, make_batch, n = _nan_rows({1})  # one row in four: one bad step per epoch
  trained, history = supervised.train(params, None, loss_fn, make_batch, n, hp, seed=0)
  skipped = [r["skipped"] for r in history]
  assert sum(skipped) == 3 and all(np.isnan(r["loss"]) for r in history if r["skipped"])
  # Finite after the steps that followed each bad one: no NaN reached w or Adam's moments.
  assert 0.5 < float(trained["w"]) <= 2.0  # on its way from 0 to the fit, 2
  assert capsys.readouterr().out.count("non-finite loss or gradient; update skipped (1 in a row")
  # Each step's lr is the rate its update uses: a skipped step does not advance the schedule
  # (linear from 1 to 0 over 12 steps: 1 − applied/12, applied = the updates before it).
  linear = SupervisedHparams(
    batch_size=1, epochs=3.0, optim=OptimHparams(lr=1.0, schedule="linear")
  )
  _, history = supervised.train(params, None, loss_fn, make_batch, n, linear, seed=0)
  applied = np.cumsum([0.0] + [1.0 - r["skipped"] for r in history[:-1]])
  assert [r["lr"] for r in history] == pytest.approx(list(1.0 - applied / 12))
  assert applied[-1] < len(history) - 1  # a step was skipped before the last: the test has teeth
  # Every row bad, at most 2 in a row: the second step stops the stage.
  loss_fn, make_batch, n = _nan_rows({0, 1, 2, 3})
  with pytest.raises(preemption.NonFiniteError, match=r"at step 2 of the sft stage: 2 consec"):
    supervised.train(params, None, loss_fn, make_batch, n, hp, seed=0, name="sft", max_nonfinite=2)


def test_the_count_of_skipped_updates_in_a_row_survives_a_resume(tmp_path):
  """Stopped after 2 skipped updates in a row, the resumed stage stops at the third
  (``max_nonfinite`` = 3): the count is saved with the checkpoint, not restarted at 0."""
  hp = SupervisedHparams(batch_size=1, epochs=2.0, optim=OptimHparams(lr=0.1, schedule="constant"))
  loss_fn, make_batch, n = _nan_rows({0, 1, 2, 3})

  def stop_after_2(i, total, row):
    if i + 1 == 2:
      preemption.GUARD.signal = signal.SIGTERM

  settings = checkpoint.CheckpointSettings(supervised_every=0, async_save=False)
  with checkpoint.Checkpointer(tmp_path / "ck", settings) as ck:
    checkpoints = stage_checkpoints.Checkpoints(ck, CONFIG, FIELDS)
    run = lambda **kw: supervised.train(
      {"w": jnp.zeros(())}, None, loss_fn, make_batch, n, hp, seed=0, name="sft",
      max_nonfinite=3, checkpoints=checkpoints, **kw
    )  # fmt: skip
    try:
      with pytest.raises(preemption.Preempted, match="after step 2 of 8"):
        run(on_step=stop_after_2)
    finally:
      preemption.GUARD.signal = None
    with pytest.raises(preemption.NonFiniteError, match=r"at step 3 of the sft stage: 3 consec"):
      run()


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_held_out_metrics_cover_every_row_whatever_the_batch_size(stage):
  """Batches of 5 over 12 rows (5, 5, then the tail of 2): the metrics (token-weighted for SFT,
  pair-weighted for the reward model) of one batch of all 12 rows, not of the first 10."""
  from ppo_jax.models import RewardModel

  if stage == "sft":
    model, loss_fn, rows = CausalLM(CFG, rngs=nnx.Rngs(0)), supervised.sft_loss, _rows()
    key = "nll"
  else:
    model, loss_fn, key = RewardModel(CFG, rngs=nnx.Rngs(0)), supervised.reward_loss, "margin"
    rng = np.random.default_rng(1)
    sides = [Sequences(rng.integers(2, 16, (12, 6)).astype(np.int32), *[np.ones((12, 6))] * 2)]
    sides.append(Sequences(rng.integers(2, 16, (12, 6)).astype(np.int32), *[np.ones((12, 6))] * 2))
    rows = ((lambda i: supervised.pair_batch(tuple(sides), i)), 12)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  whole = supervised.evaluate(params, graphdef, loss_fn, *rows, batch_size=12)
  batched = supervised.evaluate(params, graphdef, loss_fn, *rows, batch_size=5)
  first_ten = supervised.evaluate(params, graphdef, loss_fn, rows[0], 10, batch_size=5)
  assert batched["eval_rows"] == whole["eval_rows"] == 12
  assert batched == pytest.approx(whole, rel=1e-5)
  assert first_ten[key] != pytest.approx(whole[key], rel=1e-5)  # the tail counts


# --------------------------------------------------------------------------------------------------
# Micro-batches: the gradient of the whole batch, a micro-batch's activations at a time.


def _pair_rows(n=6, seed=1):
  """``n`` (chosen, rejected) pairs with responses of different lengths, and reference
  log-probabilities for DPO."""
  rng = np.random.default_rng(seed)
  sides = []
  for _ in range(2):
    resp = (rng.random((n, 4)) < 0.7).astype(np.float32)
    mask = np.concatenate([np.ones((n, 3), np.int32), resp.astype(np.int32)], 1)
    sides.append(Sequences(rng.integers(2, 16, (n, 7)).astype(np.int32), mask, resp))
  ref = (rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32))
  return tuple(sides), ref


@pytest.mark.parametrize("stage", ["sft", "dpo-bf16"])
def test_micro_batches_give_the_whole_batch_loss_metrics_and_gradient(stage):
  """6 rows in 3 micro-batches of 2: loss, metrics and gradient of the production step's
  accumulation equal the whole batch's: SFT's in fp32, weighted by tokens; DPO's with bf16
  parameters, weighted by ``num_pairs``, summed in float32 and the gradient in bf16 as the whole
  batch's. SFT's micro-batches hold 6, 6 and 8 response tokens: a plain mean of their means (not
  token-weighted) would differ, and is checked to."""
  from ppo_jax import dpo
  from ppo_jax.supervised_step import accumulated_value_and_grad

  if stage == "sft":
    model, loss_fn = CausalLM(CFG, rngs=nnx.Rngs(0)), supervised.sft_loss
    batch = _rows(6)[0](np.arange(6))
  else:
    model = CausalLM(CFG, rngs=nnx.Rngs(0))
    loss_fn = lambda p, g, b: dpo.dpo_objective(p, g, b, beta=0.5)
    batch = dpo.pair_batch(*_pair_rows(), np.arange(6))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  rtol, atol = (1e-5, 1e-7) if stage == "sft" else (2e-2, 2e-3)
  if stage == "dpo-bf16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  loss = lambda p, b: loss_fn(p, graphdef, b)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  run = lambda n: jax.jit(lambda p, b: accumulated_value_and_grad(loss, p, b, n))(params, batch)
  (whole, whole_m), whole_g = run(1)
  (acc, acc_m), acc_g = run(3)
  np.testing.assert_allclose(acc, whole, rtol=rtol)
  assert acc_m.keys() == whole_m.keys()
  for k in whole_m:
    np.testing.assert_allclose(acc_m[k], whole_m[k], rtol=rtol, atol=atol, err_msg=k)
  for a, b in zip(jax.tree.leaves(acc_g), jax.tree.leaves(whole_g), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=10 * rtol, atol=atol
    )
  if stage == "sft":
    assert [int(batch["response_mask"][i : i + 2].sum()) for i in (0, 2, 4)] == [6, 6, 8]
    plain = np.mean(
      [loss(params, {k: v[i : i + 2] for k, v in batch.items()})[0] for i in (0, 2, 4)]
    )
    assert abs(plain - whole) > 1e-4


@pytest.mark.parametrize(
  "batch_size,micro,rows,n",
  [(8, 2, 8, 4), (8, None, 8, 1), (8, 4, 6, 2), (8, 4, 5, 5), (8, 8, 3, 1)],
)
def test_micro_batches_of_a_step(batch_size, micro, rows, n):
  """A step of ``rows`` (all training rows when fewer than ``batch_size``) in the fewest even
  micro-batches of at most ``micro_batch_size`` rows."""
  hp = SupervisedHparams(batch_size=batch_size, micro_batch_size=micro)
  assert hp.micro_batches(rows) == n


def test_a_micro_batch_size_that_does_not_divide_the_batch_is_refused():
  with pytest.raises(ValueError, match="micro_batch_size: 3 does not divide batch_size 8"):
    SupervisedHparams(batch_size=8, micro_batch_size=3)
  with pytest.raises(ValueError, match="micro_batch_size: must be ≥ 1, got 0"):
    SupervisedHparams(batch_size=8, micro_batch_size=0)


def _linear_loss(params, graphdef, batch):
  """w·Σx: a gradient of Σx whatever w (so each step moves w by minus its rate, Adam's first
  steps on a constant gradient)."""
  del graphdef
  return jnp.sum(params["w"] * batch["x"]), {}


def _ones(rows):
  return {"x": np.ones(len(rows), np.float32)}


def test_the_logged_rate_is_the_rate_applied():
  """A linear decay over 3 steps of one row: w moves by exactly minus the logged lr each step
  (the history's lr is the schedule the optimizer runs, not a copy of another horizon)."""
  optim = OptimHparams(lr=0.1, schedule="linear", max_grad_norm=None)
  hp = SupervisedHparams(batch_size=1, epochs=3.0, optim=optim)
  trained, history = supervised.train(
    {"w": jnp.zeros(())}, None, _linear_loss, _ones, 1, hp, seed=0
  )
  assert len(history) == 3 and history[0]["lr"] > history[-1]["lr"] > 0
  assert float(trained["w"]) == pytest.approx(-sum(r["lr"] for r in history), rel=1e-4)


def test_where_the_schedule_ends_is_an_input_of_the_step():
  """The step takes the stage's length (``horizon``): one compiled step runs stages of 3 and 6
  steps, each at its own rate (a linear decay from 0.1: 0.1·(1 − 1/3), 0.1·(1 − 1/6) at step 1),
  so a stage resumed with more epochs runs the program it ran."""
  optim = OptimHparams(lr=0.1, schedule="linear", max_grad_norm=None)
  tx = make_optimizer(optim, 100)
  step = jax.jit(make_step(_linear_loss, None, tx, optim))
  params = {"w": jnp.zeros(())}
  _, state, _ = step(params, tx.init(params), None, _ones([0]), np.int32(3))
  for total in (3, 6):
    moved, _, metrics = step(params, state, None, _ones([0]), np.int32(total))
    assert float(metrics["lr"]) == pytest.approx(0.1 * (1 - 1 / total), rel=1e-6)
    assert float(moved["w"]) == pytest.approx(-float(metrics["lr"]), rel=1e-4)
  assert step._cache_size() == 1
  with pytest.raises(ValueError, match=r"reports the rate where the schedule ends: a horizon"):
    step(params, state, None, _ones([0]))


def _scaled_loss(params, graphdef, batch, *, scale):
  """scale·w·Σx: its gradient scale·Σx, whatever w."""
  del graphdef
  value = scale * jnp.sum(params["w"] * batch["x"])
  return value, {"value": value}


def test_the_losss_numbers_are_inputs_of_the_step():
  """``loss_args`` (DPO's β, ε) reach the loss as keyword arguments, arrays the step takes: one
  compiled step runs each scale (SGD at rate 1 moves w by −scale), as does a whole stage and its
  held-out evaluation."""
  tx = optax.sgd(1.0)
  step = jax.jit(make_step(_scaled_loss, None, tx))
  params = {"w": jnp.zeros(())}
  for scale in (2.0, 5.0):
    args = {"scale": np.float32(scale)}
    moved, _, _ = step(params, tx.init(params), None, _ones([0]), None, args)
    assert float(moved["w"]) == pytest.approx(-scale, rel=1e-6)
  assert step._cache_size() == 1
  hp = SupervisedHparams(batch_size=1, epochs=1.0, optim=OptimHparams(lr=0.1, max_grad_norm=None))
  trained, history = supervised.train(
    {"w": jnp.ones(())}, None, _scaled_loss, _ones, 1, hp, seed=0, loss_args={"scale": 3.0}
  )
  assert len(history) == 1 and history[0]["value"] == pytest.approx(3.0)
  held_out = supervised.evaluate(
    trained, None, _scaled_loss, _ones, 2, batch_size=2, loss_args={"scale": 4.0}
  )
  assert held_out["value"] == pytest.approx(4.0 * 2 * float(trained["w"]), rel=1e-6)


def test_a_finite_loss_with_an_infinite_gradient_is_skipped():
  """√|w| at w = 0: the loss is 0, its gradient infinite; the step is skipped and counted, and
  w stays finite."""
  sqrt_loss = lambda params, graphdef, batch: (jnp.sum(jnp.sqrt(jnp.abs(params["w"]))), {})
  hp = SupervisedHparams(batch_size=1, epochs=1.0, optim=OptimHparams(lr=0.1, schedule="constant"))
  trained, history = supervised.train({"w": jnp.zeros(())}, None, sqrt_loss, _ones, 1, hp, seed=0)
  assert history[0]["skipped"] == 1 and float(trained["w"]) == 0.0


def test_the_seed_draws_the_batch_order():
  """Two seeds, one epoch of 8 rows in batches of 2: each covers every row once, in other orders."""
  orders = {}
  for seed in (0, 1):
    seen = []
    make = lambda rows, seen=seen: seen.append(rows.tolist()) or _ones(rows)
    hp = SupervisedHparams(batch_size=2, epochs=1.0, optim=OptimHparams(lr=0.1))
    supervised.train({"w": jnp.zeros(())}, None, _linear_loss, make, 8, hp, seed=seed)
    assert sorted(np.concatenate(seen).tolist()) == list(range(8))
    orders[seed] = seen
  assert orders[0] != orders[1]
