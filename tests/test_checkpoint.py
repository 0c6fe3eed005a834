"""Checkpoints, resume, preemption, the non-finite guard and export."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers as tf
from conftest import ROOT, count_lines, reuse_stages, sigterm_when, smoke_config
from flax import nnx

import ppo_jax as pj
from ppo_jax import (
  checkpoint,
  main,
  optim,
  orbax_noise,
  pipeline,
  ppo,
  preemption,
  resume_rules,
  writers,
)
from ppo_jax.export import export_policy
from ppo_jax.preemption import NonFiniteError

TIMING = ("time/", "tokens_per_s")
EXPERIMENT = str(ROOT / "experiments" / "default.py")


def _drop_timing(row):
  return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def _assert_same_metrics(a_dir, b_dir, first_step=1):
  a = [r for r in writers.read_metrics(a_dir / "metrics.jsonl") if r["step"] >= first_step]
  b = [r for r in writers.read_metrics(b_dir / "metrics.jsonl") if r["step"] >= first_step]
  assert [r["step"] for r in a] == [r["step"] for r in b] and a
  for x, y in zip(a, b, strict=True):
    assert _drop_timing(x) == _drop_timing(y), x["step"]


def test_smoke_run_left_checkpoints(smoke_run):
  ckpts = sorted(int(p.name) for p in (smoke_run[0] / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == [10, 15]  # every 10 iterations and at the end


def test_resume_is_bitwise_identical(smoke_run, tmp_path):
  """Resumed from the step-10 checkpoint, steps 11–15 equal the uninterrupted run's bit for bit."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "resumed")
  shutil.copytree(smoke_run[0] / "checkpoints" / "10", workdir / "checkpoints" / "10")
  # A log line the interrupted run wrote after its last checkpoint must not survive the resume.
  (workdir / "metrics.jsonl").write_text(
    "".join(line + "\n" for line in (smoke_run[0] / "metrics.jsonl").read_text().splitlines()[:12])
  )
  pipeline.run(smoke_config(log__plots=False), workdir)
  _assert_same_metrics(smoke_run[0], workdir)
  np.testing.assert_array_equal(
    safetensors.numpy.load_file(str(workdir / "policy" / "model.safetensors"))[
      "transformer.wte.weight"
    ],
    safetensors.numpy.load_file(str(smoke_run[0] / "policy" / "model.safetensors"))[
      "transformer.wte.weight"
    ],
  )


def test_a_resume_holding_out_another_number_of_prompts_is_refused(smoke_run, tmp_path):
  """The held-out prompts are the file's first rows: holding out another number on a resume
  would train on other prompts (it did, silently, when data.eval_prompts could change). Refused
  in one line naming the count to resume with, losing nothing."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "held_out")
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")  # held out none
  files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  with pytest.raises(
    ValueError,
    match=r"^data\.eval_prompts: .* held out 0 prompts, this one 32: .* resume with "
    r"data\.eval_prompts=0, or use a new workdir$",
  ):
    pipeline.run(smoke_config(data__eval_prompts=32, ppo__iterations=16), workdir)
  assert {p: p.read_bytes() for p in files} == files  # the stages and checkpoints as they were


def test_a_record_from_before_the_held_out_count_is_checked_by_its_before(tmp_path):
  """Checkpoints from before ``held_out_rows`` was recorded tell only whether the run held out
  prompts (its before is empty if not): holding out some then and none now, or the reverse,
  trains on other prompts, refused; the same, resumed."""
  from ppo_jax import run_inputs

  run_inputs.check_same_prompts("f", 0, tmp_path, {"before": {}})
  run_inputs.check_same_prompts("f", 8, tmp_path, {"before": {"score": 1.0}})
  with pytest.raises(ValueError, match=r"held out some prompts, this one 0: .*resume with its da"):
    run_inputs.check_same_prompts("f", 0, tmp_path, {"before": {"score": 1.0}})
  with pytest.raises(ValueError, match=r"held out no prompts, this one 8: "):
    run_inputs.check_same_prompts("f", 8, tmp_path, {"before": {}})
  with pytest.raises(ValueError, match=r"held out 8 prompts, this one 4: .*data\.eval_prompts=8"):
    run_inputs.check_same_prompts("f", 4, tmp_path, {"before": {}, "held_out_rows": 8})


def test_the_prompts_fingerprint_covers_the_rows_tokens_and_other_fields():
  """A prompts file whose rows keep their prompts but change a field a reward function reads
  (an answer) is another file to resume on; the same rows give the same fingerprint."""
  from ppo_jax.evaluation import Prompts
  from ppo_jax.run_inputs import prompts_fingerprint

  ids, mask = np.array([[0, 5], [6, 7]], np.int32), np.array([[0, 1], [1, 1]], np.int32)

  def fingerprint(answers, ids=ids):
    rows = lambda cut: Prompts(["a", "b c"][cut], ids[cut], mask[cut], {"answer": answers[cut]})
    return prompts_fingerprint(rows(slice(1, None)), rows(slice(None, 1)))

  assert fingerprint(["1", "2"]) == fingerprint(["1", "2"])
  assert fingerprint(["1", "3"]) != fingerprint(["1", "2"])
  assert fingerprint(["1", "2"], ids + 1) != fingerprint(["1", "2"])


def test_a_resume_on_other_prompts_is_refused(smoke_run, tmp_path, compiled_programs):
  """The checkpoints record a fingerprint of the prompt file's rows, as a supervised stage's do:
  an edited prompts file is refused, and the run's files are left as they were. The resume on
  the original prompts compiles none of the iteration's programs: the fresh run's, cached."""
  prompts = tmp_path / "prompts.jsonl"
  shutil.copy(smoke_run[0] / "data" / "prompts.jsonl", prompts)
  config = lambda iterations: smoke_config(
    task__name="files",
    data__prompts=str(prompts),
    model__tokenizer=str(smoke_run[0] / "data" / "tokenizer"),
    sft__epochs=0.0,
    rm__enabled=False,
    reward__source="function",
    reward__fn="reward_fns:superlatives",
    ppo__critic_init="policy",
    ppo__iterations=iterations,
    ppo__optim__schedule="constant",  # the same update program at 1 and 2 iterations
    ppo__batch_size=8,
    log__tensorboard=False,
    log__plots=False,
  )
  workdir = tmp_path / "run"
  pipeline.run(config(1), workdir)
  metrics = (workdir / "metrics.jsonl").read_text()
  with prompts.open("a") as f:
    f.write(json.dumps({"prompt": "one more"}) + "\n")
  with pytest.raises(ValueError, match=r"checkpoints holds checkpoints trained on other prompts"):
    pipeline.run(config(2), workdir)
  assert (workdir / "metrics.jsonl").read_text() == metrics
  # Its fields too (what a reward function may read), whichever rows are held out.
  rows = prompts.read_text().splitlines(keepends=True)
  prompts.write_text("".join(rows[:-2]) + json.dumps({**json.loads(rows[-2]), "answer": 1}) + "\n")
  with pytest.raises(ValueError, match=r"checkpoints trained on other prompts"):
    pipeline.run(config(2), workdir)
  prompts.write_text("".join(rows[:-1]))
  # A fresh state left uncommitted to its device, as the restored one is not, made each program
  # anew.
  compiled_programs.clear()
  pipeline.run(config(2), workdir)  # the original prompts: resumed
  assert count_lines(workdir / "metrics.jsonl") == 2
  iteration = {"jit_sample_fn", "jit_score_fn", "jit_update_fn"}
  assert not iteration & set(compiled_programs), compiled_programs


def test_a_run_is_finished_only_with_its_summary_outputs_and_last_checkpoint(smoke_run, tmp_path):
  """``finished.finished_summary``: the same config's summary (a stale one of another config, as an
  older ppo_jax left it, does not count), the stage folders, policy/ and the last checkpoint; one
  deleted is remade by the next run rather than skipped."""
  from ppo_jax.config import Settings
  from ppo_jax.finished import finished_summary

  workdir = tmp_path / "w"
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns("tensorboard", "plots"))
  config = smoke_config()
  now, s = json.loads(config.to_json_best_effort()), Settings.from_config(config)
  assert finished_summary(s, workdir, now) == json.loads((workdir / "summary.json").read_text())
  # A run written before a field was added (its config lacks it) is finished under its default.
  older = {k: v for k, v in now.items() if k != "stop_after"}
  for name in ("config.json", "summary.json"):
    written = json.loads((workdir / name).read_text())
    (workdir / name).write_text(
      json.dumps(older if name == "config.json" else {**written, "config": older})
    )
  assert finished_summary(s, workdir, now) is not None
  # Stopping after the reward model: this run went further, unless a field those stages read,
  # or one the synthetic task draws their rows with, differs.
  rm_only = smoke_config(stop_after="rm")
  rm_now, rm_s = json.loads(rm_only.to_json_best_effort()), Settings.from_config(rm_only)
  assert finished_summary(rm_s, workdir, rm_now) is not None
  rm_only.task.num_prompts += 1
  rm_now, rm_s = json.loads(rm_only.to_json_best_effort()), Settings.from_config(rm_only)
  assert finished_summary(rm_s, workdir, rm_now) is None
  config.ppo.iterations = 20
  later = json.loads(config.to_json_best_effort())
  assert finished_summary(Settings.from_config(config), workdir, later) is None
  (workdir / "config.json").write_text(json.dumps(later))  # a longer run, interrupted
  assert finished_summary(Settings.from_config(config), workdir, later) is None  # stale summary
  (workdir / "config.json").write_text(json.dumps(now))
  for name in ("checkpoints/15", "policy", "reward_model", "sft"):
    moved = tmp_path / "moved"
    (workdir / name).rename(moved)
    assert finished_summary(s, workdir, now) is None, name
    moved.rename(workdir / name)
  assert finished_summary(s, workdir, now) is not None


def test_a_summary_is_this_runs_only_if_written_under_the_fields_the_run_reads(smoke_run, tmp_path):
  """``finished.finished_summary`` in a copy of the smoke run, every output there. Its config.json
  of another PPO learning rate (a run of it started there and stopped) beside the smoke run's
  summary.json (as an older ppo_jax left it): not that run's, it is not finished. A run of
  config.stop_after='sft' compares only the fields SFT reads: the smoke run, which went on with
  other reward-model settings, has finished it."""
  from ppo_jax.config import Settings
  from ppo_jax.finished import finished_summary

  workdir = tmp_path / "w"
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns("tensorboard", "plots"))
  as_dict = lambda config: json.loads(config.to_json_best_effort())
  other = smoke_config(ppo__optim__lr=2 * smoke_config().ppo.optim.lr)
  (workdir / "config.json").write_text(json.dumps(as_dict(other)))
  assert finished_summary(Settings.from_config(other), workdir, as_dict(other)) is None
  (workdir / "config.json").write_text(json.dumps(as_dict(smoke_config())))
  sft_only = smoke_config(stop_after="sft", rm__epochs=3.0, task__label_noise=0.3)
  done = finished_summary(Settings.from_config(sft_only), workdir, as_dict(sft_only))
  assert done == json.loads((workdir / "summary.json").read_text())


def _start(workdir, *args, console_script=False):
  """The smoke config in a process of its own: ``python -m ppo_jax.main``, or ``ppo-jax``."""
  program = (
    [os.path.join(os.path.dirname(sys.executable), "ppo-jax")]
    if console_script
    else [sys.executable, "-m", "ppo_jax.main"]
  )
  return subprocess.Popen(
    [*program, f"--config={EXPERIMENT}:smoke", f"--workdir={workdir}",
     "--config.log.progress=False", *args],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    env={**os.environ, "HF_HUB_OFFLINE": "1"},
  )  # fmt: skip


def _wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended early: {proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.001)


def test_kill_9_then_sigterm_then_resume_end_where_the_uninterrupted_run_ended(
  smoke_run, tmp_path, capsys
):
  """One workdir through the two ways a run stops, each resumed by the same command.

  1. ``kill -9`` while step 4 is being saved: the previous checkpoint stays usable.
  2. The console script ``ppo-jax`` resumes; SIGTERM: it saves at the next step boundary
     (checkpoints are otherwise every 100 steps, so that save is the signal's) and exits 143,
     not 0: the run is not done.
  3. A resume (in this process) finishes: metrics equal the uninterrupted run's.
  """
  workdir = reuse_stages(smoke_run[0], tmp_path / "stopped")
  ckpts, metrics = workdir / "checkpoints", workdir / "metrics.jsonl"
  proc = _start(workdir, "--config.checkpoint.every=1")
  in_flight = lambda: (
    ckpts.is_dir() and any(p.name == "4.orbax-checkpoint-tmp" for p in ckpts.iterdir())
  )
  _wait_for(in_flight, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (ckpts / "4").exists()

  proc = _start(workdir, "--config.checkpoint.every=100", console_script=True)
  _wait_for(lambda: len(metrics.read_text().splitlines()) >= 6, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 143, out[-3000:]
  assert "resuming from the checkpoint of step 3" in out
  stopped = len(metrics.read_text().splitlines())
  assert f"stopped by SIGTERM after step {stopped}; checkpoint saved" in out
  assert "run the same command again to resume" in out
  assert sorted(int(p.name) for p in ckpts.iterdir()) == [2, 3, stopped]  # the last 3 kept
  assert stopped < 15 and not (workdir / "policy").exists()

  with metrics.open("a") as f:  # a row cut short, as a kill or a full disk mid-write leaves one
    f.write('{"step": 99, "objective/sco')
  capsys.readouterr()
  pipeline.run(smoke_config(log__plots=False, log__tensorboard=False), workdir)
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint of step {stopped}" in out and "summary" in out
  assert f"note: {metrics}: dropped 1 unreadable line (a write cut short)" in out
  assert not any("tmp" in p.name for p in ckpts.iterdir())
  _assert_same_metrics(smoke_run[0], workdir)
  assert (workdir / "policy" / "model.safetensors").exists()


def test_sigterm_in_sft_and_in_the_reward_model_then_resume_is_bitwise_identical(
  smoke_run, tmp_path, capsys, compiled_programs
):
  """SIGTERM during SFT, then (resumed) during reward-model training, then a resume to the end:
  both stages' weights and per-step metrics equal the uninterrupted run's, bit for bit, and their
  checkpoints are deleted once the stage's model folder is written. The resumes compile nothing
  the smoke run compiled: its PPO's reference was trained in its process, this one's is loaded
  (uncommitted, its scoring program was compiled again)."""
  workdir = tmp_path / "stopped"
  config = smoke_config(ppo__iterations=1, log__plots=False, log__tensorboard=False)
  for name, done in (("sft", None), ("rm", "sft")):
    sigterm_when(lambda name=name: count_lines(workdir / f"{name}_metrics.jsonl") >= 20)
    with pytest.raises(preemption.Preempted, match=f"of the {name} stage; checkpoint saved in"):
      pipeline.run(config, workdir)
    assert any((workdir / f"{name}_checkpoints").iterdir())
    if done:
      assert not (workdir / f"{done}_checkpoints").exists()
      assert "resuming from the checkpoint of step" in capsys.readouterr().out
  with pytest.raises(ValueError, match="rm_checkpoints holds checkpoints and resuming is off"):
    pipeline.run(config, workdir, resume=False)
  pipeline.run(config, workdir)
  assert "rm_checkpoints" in capsys.readouterr().out and not (workdir / "rm_checkpoints").exists()
  # The SFT and reward-model steps, sampling and scoring are the smoke run's programs (PPO's update
  # is not: its learning-rate schedule ends at iteration 1 here).
  cached = {"jit_step", "jit_sample_fn", "jit_score_fn"}
  assert not cached & set(compiled_programs), compiled_programs
  for folder, metrics in (("sft", "sft_metrics.jsonl"), ("reward_model", "rm_metrics.jsonl")):
    a = safetensors.numpy.load_file(str(workdir / folder / "model.safetensors"))
    b = safetensors.numpy.load_file(str(smoke_run[0] / folder / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{folder}: {k}")
    assert writers.read_metrics(workdir / metrics) == writers.read_metrics(smoke_run[0] / metrics)


def test_a_stop_between_stages_starts_no_more_work(smoke_run, tmp_path, monkeypatch):
  """SIGTERM as a stage ends (in SFT's held-out evaluation, say) stops the run before the next
  stage starts: no reward-model step, compilation or checkpoint; the next run goes on from there."""
  import os
  import signal

  workdir = reuse_stages(smoke_run[0], tmp_path / "w", stages=("sft",))
  run_sft = pipeline.run_sft

  def sft_then_sigterm(*args, **kwargs):
    out = run_sft(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(pipeline, "run_sft", sft_then_sigterm)
  config = smoke_config(ppo__iterations=1, log__plots=False, log__tensorboard=False)
  with pytest.raises(preemption.Preempted, match="by SIGTERM before the reward model stage"):
    pipeline.run(config, workdir)
  assert not (workdir / "rm_metrics.jsonl").exists() and not (workdir / "rm_checkpoints").exists()


def test_nan_rewards_are_never_trained_on(smoke_run, tmp_path):
  """A reward model whose scores overflow (finite weights of 3e38: NaN weights are refused as
  they load): each update is skipped and counted; the third in a row stops the run with an
  error naming the quantity and the step."""
  rm = pj.models.from_pretrained(smoke_run[0] / "reward_model")
  rm.head.kernel[...] = jnp.full_like(rm.head.kernel[...], 3e38)
  pj.models.save_pretrained(rm, tmp_path / "nan_rm")
  workdir = reuse_stages(smoke_run[0], tmp_path / "nan", stages=("sft",))
  config = smoke_config(
    reward__model=str(tmp_path / "nan_rm"),
    rm__enabled=False,
    ppo__critic_init="policy",
    log__tensorboard=False,
  )
  with pytest.raises(
    NonFiniteError, match=r"non-finite scores at step 3 of the ppo stage: 3 consecutive"
  ):
    pipeline.run(config, workdir)
  rows = writers.read_metrics(workdir / "metrics.jsonl")
  assert [r["nonfinite/scores"] for r in rows] == [1.0, 1.0, 1.0]
  assert all(r["update/skipped"] == 1.0 for r in rows)


def test_one_nan_rollout_is_skipped_and_training_goes_on():
  """At the step level: NaN scores leave parameters, moments and score statistics untouched, and
  the next finite rollout trains as usual."""
  from test_ppo import PROMPT_MASK, PROMPTS, build

  _, _, state, frozen, fns = build()
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.score_stats))
  gen = fns.sample(state.params["policy"], frozen, jax.random.key(0), PROMPTS, PROMPT_MASK)
  scores = jnp.ones(PROMPTS.shape[0]).at[3].set(jnp.nan)
  exp, state, roll = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, scores)
  state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
  assert float(roll["nonfinite/scores"]) == 1.0 and float(upd["update/skipped"]) == 1.0
  after = jax.tree.map(np.asarray, (state.params, state.opt_state, state.score_stats))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert int(state.step) == 1  # the data cursor moves on
  exp, state, roll = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, jnp.ones(8))
  state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
  assert float(upd["update/skipped"]) == 0.0
  assert not np.array_equal(
    np.asarray(jax.tree.leaves(state.params)[0]), jax.tree.leaves(before[0])[0]
  )


def _copy_of_the_smoke_run(smoke_workdir, workdir, names):
  """``workdir`` holding the smoke run's ``names`` (folders and files), and a snapshot of every
  file in it (path → bytes) to compare with after a refusal."""
  workdir.mkdir(parents=True)
  for name in names:
    src = smoke_workdir / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / name)
  return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def _unchanged(workdir, snapshot):
  """Nothing written, rewritten or deleted in ``workdir`` since ``snapshot`` (but the run's empty
  lock file, ``workdir.LOCK``)."""
  from ppo_jax.workdir import LOCK

  assert not (workdir / LOCK).exists() or (workdir / LOCK).read_bytes() == b""
  now = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != LOCK}
  assert sorted(map(str, now)) == sorted(map(str, snapshot))
  assert [p for p in now if now[p] != snapshot[p]] == []


RUN_FILES = ("sft", "reward_model", "checkpoints", "config.json", "metrics.jsonl", "samples.jsonl")


def test_checkpoint_of_a_different_config_is_refused_before_anything_is_written(
  smoke_run, tmp_path
):
  workdir = tmp_path / "other"
  before = _copy_of_the_smoke_run(smoke_run[0], workdir, RUN_FILES)
  with pytest.raises(ValueError, match=r"different config \(ppo\.kl_coef: 0\.1 → 0\.2\)") as e:
    pipeline.run(smoke_config(ppo__kl_coef=0.2), workdir)
  assert "\n" not in str(e.value)
  assert str(e.value).endswith(f"or delete {workdir / 'checkpoints'} to train again under this one")
  _unchanged(workdir, before)  # config.json, the metrics, the checkpoints; no data/ made
  # A field the finished stages read too: those are named, all the new config would refuse.
  with pytest.raises(ValueError, match=r"different config \(sft\.optim\.lr: 0\.01 → 0\.002") as e:
    pipeline.run(smoke_config(sft__optim__lr=0.002), workdir)
  stale = " and ".join(str(workdir / d) for d in ("checkpoints", "sft", "reward_model"))
  assert str(e.value).endswith(f"or delete {stale} to train again under this one")
  with pytest.raises(ValueError, match=r"different config \(rm\.epochs: 4\.0 → 2\.0") as e:
    pipeline.run(smoke_config(rm__epochs=2.0), workdir)
  stale = " and ".join(str(workdir / d) for d in ("checkpoints", "reward_model"))
  assert str(e.value).endswith(f"or delete {stale} to train again under this one")
  _unchanged(workdir, before)


def test_noresume_refuses_a_workdir_with_checkpoints(smoke_run, tmp_path):
  workdir = reuse_stages(smoke_run[0], tmp_path / "noresume")
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
  with pytest.raises(ValueError, match="holds checkpoints and resuming is off"):
    pipeline.run(smoke_config(), workdir, resume=False)


def _save_stand_in(folder, config, step=1, **record):
  """A checkpoint of ``step`` in ``folder``: a stand-in state, a record of ``config`` (a
  ConfigDict) and ``record``."""
  as_json = json.loads(config.to_json_best_effort())
  with checkpoint.Checkpointer(folder, config.checkpoint) as ckpt:
    ckpt.save(step, {"params": np.zeros(2)}, {"config": as_json, "step": step, **record})
    ckpt.wait()


def _check_workdir(workdir, config, *, resume=True, saved=None):
  """``workdir.check_workdir`` for a run of ``config``, fields added since a save at the
  ``saved`` config's values (default: this one's)."""
  from ppo_jax.config import Settings
  from ppo_jax.workdir import check_workdir

  as_json = json.loads(config.to_json_best_effort())
  defaults = as_json if saved is None else json.loads(saved.to_json_best_effort())
  s = Settings.from_config(config)
  check_workdir(workdir, s=s, config=as_json, resume=resume, defaults=defaults)


@pytest.mark.parametrize("folder", ["sft_checkpoints", "rm_checkpoints", "dpo_checkpoints"])
def test_noresume_refuses_each_stages_checkpoints(tmp_path, folder):
  """--noresume with a stage's checkpoints in the workdir: refused (the supervised stages would
  otherwise resume from them regardless)."""
  config = smoke_config(algo="dpo") if folder == "dpo_checkpoints" else smoke_config()
  _save_stand_in(tmp_path / folder, config)
  _check_workdir(tmp_path, config)
  with pytest.raises(ValueError, match=f"{folder} holds checkpoints and resuming is off"):
    _check_workdir(tmp_path, config, resume=False)


def test_stage_checkpoints_of_a_deleted_sft_policy_are_refused_before_sft_trains(tmp_path):
  """Reward-model checkpoints recorded as started from the SFT policy of ``sft/``, which is gone
  (SFT would train a new one): refused by check_workdir, before SFT trains; not the SFT ones."""
  config = smoke_config(rm__init="policy")
  _save_stand_in(tmp_path / "sft_checkpoints", config, sft_id="x")
  _check_workdir(tmp_path, config)
  _save_stand_in(tmp_path / "rm_checkpoints", config, sft_id="x")
  with pytest.raises(ValueError, match=r"rm_checkpoints holds .* which is gone and this run"):
    _check_workdir(tmp_path, config)


def test_a_workdir_in_use_by_another_run_is_refused(smoke_run, tmp_path, monkeypatch, capsys):
  """A second run on a workdir (a requeued job while the first still runs) would interleave
  metrics and delete the other's checkpoint in flight: refused before it reads anything."""
  from ppo_jax.workdir import in_use

  workdir = reuse_stages(smoke_run[0], tmp_path / "busy")
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
  (workdir / "checkpoints" / "20.orbax-checkpoint-tmp").mkdir()  # the other run's save
  with in_use(workdir):
    with pytest.raises(ValueError, match=r"busy is in use by another run .*use another workdir$"):
      pipeline.run(smoke_config(), workdir)
    assert (workdir / "checkpoints" / "20.orbax-checkpoint-tmp").is_dir()
  with in_use(workdir):  # released: taken again
    pass
  # A workdir where the lock cannot be made (read-only): the run goes on, and says so.
  real_open = os.open

  def refused(path, *args, **kwargs):
    if str(path).endswith(".ppo_jax.lock"):
      raise PermissionError(13, "Permission denied")
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(os, "open", refused)
  with in_use(workdir):
    pass
  assert "cannot be locked (Permission denied): nothing stops a second run" in (
    capsys.readouterr().out
  )


def test_iterations_below_the_saved_step_are_refused(smoke_run, tmp_path):
  workdir = tmp_path / "shorter"
  before = _copy_of_the_smoke_run(smoke_run[0], workdir, RUN_FILES)
  with pytest.raises(ValueError, match=r"holds step 15, past ppo\.iterations=12; raise it") as e:
    pipeline.run(smoke_config(ppo__iterations=12), workdir)
  assert "\n" not in str(e.value)
  _unchanged(workdir, before)  # metrics.jsonl still runs to step 15


def test_another_algorithm_is_refused_where_a_run_left_its_outputs(smoke_run, tmp_path):
  """DPO in a PPO run's workdir would overwrite policy/ and metrics.jsonl: refused, with nothing
  written."""
  workdir = tmp_path / "ppo_then_dpo"
  before = _copy_of_the_smoke_run(smoke_run[0], workdir, (*RUN_FILES, "policy", "summary.json"))
  with pytest.raises(
    ValueError, match=r"holds a ppo run \(checkpoints/, policy/, metrics\.jso"
  ) as e:
    pipeline.run(smoke_config(algo="dpo"), workdir)
  assert "\n" not in str(e.value) and "config.algo=dpo would overwrite it" in str(e.value)
  _unchanged(workdir, before)


def test_remaking_the_task_data_under_trained_stages_is_refused(smoke_run, tmp_path):
  """Another seed would rewrite data/ (the embedded task's files) that sft/ and reward_model/
  learned from: refused before, naming the field, rather than after by the bytes it rewrote."""
  workdir = tmp_path / "seed"
  before = _copy_of_the_smoke_run(
    smoke_run[0], workdir, ("sft", "reward_model", "data", "config.json")
  )
  with pytest.raises(ValueError, match=r"data was made under other settings \(seed: 0 → 3\)") as e:
    pipeline.run(smoke_config(seed=3), workdir)
  assert "\n" not in str(e.value) and "and sft/ learned from it" in str(e.value)
  _unchanged(workdir, before)
  # The pairs' settings change preferences.jsonl alone (drawn after the SFT rows): sft/ does not
  # stand in the way, the reward model this run would reuse does, one it would not read does not.
  check = functools.partial(_check_workdir, workdir)
  with pytest.raises(ValueError, match=r"\(task\.label_noise: 0\.2 → 0\.5\) and reward_model/ l"):
    check(smoke_config(task__label_noise=0.5))
  check(smoke_config(task__label_noise=0.5, rm__enabled=False, ppo__critic_init="policy",
                     reward__source="function", reward__fn="reward_fns:superlatives"))  # fmt: skip
  shutil.rmtree(workdir / "reward_model")
  check(smoke_config(task__label_noise=0.5))
  # SFT's checkpoints (sft/ not written yet) learned from data/ too.
  shutil.rmtree(workdir / "sft")
  check(smoke_config(task__num_prompts=smoke_config().task.num_prompts + 1))
  _save_stand_in(workdir / "sft_checkpoints", smoke_config())
  with pytest.raises(ValueError, match=r"\(task\.num_prompts: .*\) and sft_checkpoints/ learned"):
    check(smoke_config(task__num_prompts=smoke_config().task.num_prompts + 1))


def test_a_stage_checkpoint_of_another_config_is_refused_before_anything_is_written(tmp_path):
  """An SFT checkpoint saved under another sft.* is refused by check_workdir (before config.json
  or data/ are written), not once SFT starts; a field SFT does not read, or a finished sft/ (SFT
  will not train), lets the run go on."""
  _save_stand_in(tmp_path / "sft_checkpoints", smoke_config(), step=4)
  check = functools.partial(_check_workdir, tmp_path, saved=smoke_config())
  with pytest.raises(ValueError, match=r"sft_checkpoints holds checkpoints of a different config "
                     r"\(sft\.optim\.lr: 0\.01 → 0\.002\)"):  # fmt: skip
    check(smoke_config(sft__optim__lr=0.002))
  check(smoke_config(ppo__kl_coef=0.3))  # not an SFT field
  (tmp_path / "sft").mkdir()  # what has_model_folder looks for
  (tmp_path / "sft" / "config.json").write_text("{}")
  (tmp_path / "sft" / "model.safetensors").write_bytes(b"")
  check(smoke_config(sft__optim__lr=0.002))


def _damage(folder):
  """Cuts every array data file of a checkpoint short, as a full disk or an interrupted copy would:
  to its first 64 bytes. All of them, not the largest: which data file holds the policy's arrays
  (all an export reads) depends on orbax's write order, and differs between machines."""
  data = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert len(data) >= 2, sorted(map(str, folder.rglob("*")))
  for path in data:
    path.write_bytes(path.read_bytes()[:64])


# tensorstore's late callbacks into orbax's closed event loop ("Event loop is closed")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_named_in_one_line(smoke_run, tmp_path):
  workdir = reuse_stages(smoke_run[0], tmp_path / "damaged")
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
  _damage(workdir / "checkpoints" / "15")
  with pytest.raises(ValueError, match=r"checkpoints/15 cannot be read, it is damaged") as e:
    pipeline.run(smoke_config(), workdir)
  assert str(e.value).endswith(
    "delete that folder to resume from step 10 (nothing else is touched)"
  )
  assert "\n" not in str(e.value) and len(str(e.value)) < 600
  # As a program: what a user sees on stderr is this one line, nothing from orbax's threads.
  proc = subprocess.run(
    [sys.executable, "-m", "ppo_jax.main", "export", "--workdir", str(workdir), "--out",
     str(tmp_path / "x")],
    capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert "15 cannot be read, it is damaged or incomplete (ValueError: " in proc.stderr
  assert proc.stderr.endswith("; export another step with --step (there are [10])\n")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "15"]  # untouched
  for part in ("state", "meta"):  # a step folder without one of its items (a copy cut short)
    shutil.rmtree(workdir / "checkpoints")
    shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / "15" / part)
    with pytest.raises(ValueError, match=r"checkpoints/15 cannot be read, it is damaged") as e:
      pipeline.run(smoke_config(), workdir)
    assert "\n" not in str(e.value) and str(e.value).endswith("(nothing else is touched)")
  # Files orbax reads without complaint when missing (None: a TypeError traceback, and a resume
  # that blamed "another ppo_jax version"), or that hold no JSON (its error named no folder).
  for damage, why in (
    (lambda step: (step / "state" / "_METADATA").unlink(), "state/_METADATA is missing"),
    (lambda step: (step / "meta" / "metadata").write_text('{"a\x01": 1}'), "JSONDecodeError"),
  ):
    shutil.rmtree(workdir / "checkpoints")
    shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
    damage(workdir / "checkpoints" / "15")
    with pytest.raises(ValueError, match=rf"checkpoints/15 cannot be read, it is damaged .*{why}"):
      export_policy(workdir, tmp_path / "out")


def test_a_checkpoint_whose_record_names_no_model_is_refused_before_reading_it(tmp_path):
  """A DPO checkpoint of an older ppo_jax (its record has no model config): one line, and
  nothing is written."""
  settings = checkpoint.CheckpointSettings(async_save=False)
  with checkpoint.Checkpointer(tmp_path / "dpo_checkpoints", settings) as ckpt:
    ckpt.save(5, {"params": {"w": jnp.ones((2, 2))}}, {"config": {}, "step": 5})
  with pytest.raises(ValueError, match=r"dpo_checkpoints/5: its record names no model config"):
    export_policy(tmp_path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_non_finite_weights_is_not_exported(tmp_path):
  """Training skips non-finite updates, so NaN or inf weights are a damaged checkpoint (bytes
  flipped on disk decoded as them): refused in one line naming the array, nothing written."""
  from ppo_jax.models import ModelConfig

  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  w = np.ones((2, 3), np.float32)
  w[1, 2] = np.inf
  record = {"config": {}, "step": 5, "model_config": cfg.to_dict()}
  settings = checkpoint.CheckpointSettings(async_save=False)
  with checkpoint.Checkpointer(tmp_path / "dpo_checkpoints", settings) as ckpt:
    ckpt.save(5, {"params": {"head": {"w": jnp.asarray(w)}, "b": jnp.zeros(2)}}, record)
  with pytest.raises(ValueError) as e:
    export_policy(tmp_path, tmp_path / "out")
  assert str(e.value).startswith(f"{tmp_path / 'dpo_checkpoints' / '5'}: damaged checkpoint, 1 ")
  assert "1 non-finite values in head.w; it is the only one" in str(e.value)
  assert not (tmp_path / "out").exists()


def test_export_writes_the_tokenizer_and_the_generation_config_the_run_started_from(tmp_path):
  """A DPO checkpoint's policy exported with the run's tokenizer and, over the sampling defaults
  of the checkpoint the run started from (its generation_config.json), the policy's ids (the
  tokenizer's for those its config lacks)."""
  from flax import nnx

  from ppo_jax.models import CausalLM, ModelConfig
  from ppo_jax.tokenizer import build_word_tokenizer

  tokenizer = tmp_path / "tokenizer"
  build_word_tokenizer(["good", "bad", "film"]).save_pretrained(str(tokenizer))
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  cfg = cfg.replace(eos_token_id=2, bos_token_id=1)
  params = nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  started_from = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "eos_token_id": 9}
  record = {"config": {}, "step": 5, "model_config": cfg.to_dict(), "tokenizer": str(tokenizer),
            "generation_config": started_from}  # fmt: skip
  settings = checkpoint.CheckpointSettings(async_save=False)
  with checkpoint.Checkpointer(tmp_path / "dpo_checkpoints", settings) as ckpt:
    ckpt.save(5, {"params": params}, record)
  assert export_policy(tmp_path, tmp_path / "out") == 5
  written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  pad = tf.AutoTokenizer.from_pretrained(tokenizer).pad_token_id  # the config has none
  assert written == {**started_from, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": pad}
  assert (tmp_path / "out" / "tokenizer.json").is_file()
  exported = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  np.testing.assert_array_equal(
    exported["transformer.wte.weight"], params["trunk"]["embed"]["embedding"]
  )


def test_export_never_writes_into_the_run(smoke_run, tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
  elsewhere = reuse_stages(smoke_run[0], tmp_path / "elsewhere", stages=("sft",))
  (workdir / "sft").symlink_to(elsewhere / "sft")  # a stage folder linked in from another disk
  outs = [workdir, workdir / "checkpoints" / "x", workdir / "sft", workdir / "sft" / "y"]
  for out in [*outs, workdir / "dpo_checkpoints" / "z"]:
    code = main.cli(["ppo-jax", "export", "--workdir", str(workdir), "--out", str(out)])
    assert code == 1 and "--out" in capsys.readouterr().err, out
    assert not (out / "ppo_jax_checkpoint.json").exists()
  mine = workdir / "mine"
  export = lambda out: main.cli(["ppo-jax", "export", "--workdir", str(workdir), "--out", str(out)])
  assert export(mine) == 0
  # An earlier export's files, those its record lists, are replaced whole (a shard of another
  # layout goes); the user's stay, weights too. A record from before the lists: the names this
  # export writes and weight shards go. A folder of other files, or a file, is refused and left
  # as it was.
  (mine / "model-00001-of-00002.safetensors").write_bytes(b"stale")
  (mine / "README.md").write_text("my model card")
  (mine / "model_int8.safetensors").write_bytes(b"mine")
  record = json.loads((mine / "ppo_jax_checkpoint.json").read_text())
  assert "model.safetensors" in record["files"] and "config.json" in record["files"]
  record["files"].append("model-00001-of-00002.safetensors")
  (mine / "ppo_jax_checkpoint.json").write_text(json.dumps(record))
  capsys.readouterr()
  assert export(mine) == 0 and not (mine / "model-00001-of-00002.safetensors").exists()
  assert (
    f"kept the files in {mine} that the earlier export did not write: README.md, "
    "model_int8.safetensors" in capsys.readouterr().out
  )
  assert (mine / "README.md").read_text() == "my model card"
  # Ctrl-C while the new files move in: the earlier export is back as it was. A kill -9 there
  # (the earlier one's files set aside in a hidden folder): the next export puts them back first.
  from ppo_jax.export import PREVIOUS, STAGING

  snapshot = lambda: {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
  was, rename, calls = snapshot(), pathlib.Path.rename, []

  def interrupted(self, target):
    if self.parent.name == STAGING:
      calls.append(self.name)
      if len(calls) == 3:
        raise KeyboardInterrupt
    return rename(self, target)

  monkeypatch.setattr(pathlib.Path, "rename", interrupted)
  assert export(mine) == 130 and len(calls) == 3
  monkeypatch.setattr(pathlib.Path, "rename", rename)
  assert snapshot() == was and not list(mine.glob(".ppo_jax*"))
  (mine / PREVIOUS).mkdir()
  for name in ("model.safetensors", "ppo_jax_checkpoint.json"):
    (mine / name).rename(mine / PREVIOUS / name)
  (mine / "model.safetensors").write_bytes(b"half of a new export")
  assert export(mine) == 0 and snapshot().keys() == was.keys()
  assert not list(mine.glob(".ppo_jax*"))
  (mine / "model-00001-of-00002.safetensors").write_bytes(b"stale")
  record = json.loads((mine / "ppo_jax_checkpoint.json").read_text())
  (mine / "ppo_jax_checkpoint.json").write_text(json.dumps({**record, "files": None}))
  assert export(mine) == 0 and not (mine / "model-00001-of-00002.safetensors").exists()
  assert not (mine / "model_int8.safetensors").exists()  # an old record: taken for a shard
  (mine / "README.md").unlink()
  assert (mine / "model.safetensors").exists() and not list(tmp_path.glob("**/.*exporting"))
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "prompts.jsonl").write_text("{}\n")
  (tmp_path / "notes.txt").write_text("mine")
  capsys.readouterr()
  assert export(tmp_path / "data") == 1 and export(tmp_path / "notes.txt") == 1
  err = capsys.readouterr().err.splitlines()
  assert err[0].endswith(
    "--out " + str(tmp_path / "data") + " holds other files (prompts.jsonl)"
    ": choose a new or empty folder (only an earlier export there is replaced)"
  )
  assert err[1].endswith("notes.txt is a file: choose a new or empty folder")
  assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prompts.jsonl"]
  # The current folder (empty), then again over its export; a link to a folder; a folder that
  # holds the workdir: refused.
  here = tmp_path / "here"
  here.mkdir()
  monkeypatch.chdir(here)
  assert export(".") == 0 and export(".") == 0 and (here / "model.safetensors").exists()
  assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in mine.iterdir())
  (tmp_path / "link").symlink_to(here)
  assert export(tmp_path / "link") == 0 and (tmp_path / "link").is_symlink()
  assert not list(tmp_path.glob("**/.ppo_jax_exporting"))
  shutil.copytree(mine, tmp_path / "old_export")
  shutil.copytree(workdir / "checkpoints", tmp_path / "old_export" / "run" / "checkpoints")
  capsys.readouterr()
  assert main.cli(["ppo-jax", "export", "--workdir", str(tmp_path / "old_export" / "run"),
                   "--out", str(tmp_path / "old_export")]) == 1  # fmt: skip
  assert "holds the workdir" in capsys.readouterr().err


def test_export_a_checkpoint(smoke_run, tmp_path, capsys):
  proc = subprocess.run(  # the program itself once (a relative --workdir); in this process below
    [sys.executable, "-m", "ppo_jax.main", "export", "--workdir", smoke_run[0].name, "--out",
     str(tmp_path / "latest")],
    capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    cwd=smoke_run[0].parent,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert "wrote the policy of step 15" in proc.stdout
  record = json.loads((tmp_path / "latest" / "ppo_jax_checkpoint.json").read_text())
  files = sorted(p.name for p in (tmp_path / "latest").iterdir())
  assert record == {
    "workdir": str(smoke_run[0].absolute()),
    "stage": "ppo",
    "step": 15,
    "files": files,  # all it wrote, what a later export there replaces
  }

  def run(*args):
    capsys.readouterr()  # what came before (transformers' progress bars) is not the export's
    code = main.cli(["ppo-jax", "export", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)

  # The latest checkpoint is the final policy, tensor for tensor.
  a = safetensors.numpy.load_file(str(tmp_path / "latest" / "model.safetensors"))
  b = safetensors.numpy.load_file(str(smoke_run[0] / "policy" / "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  proc = run("--workdir", str(smoke_run[0]), "--step", "10", "--out", str(tmp_path / "ten"))
  assert proc.returncode == 0, proc.stderr
  hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ten"))
  ours = pj.models.from_pretrained(tmp_path / "ten")
  import torch

  ids = np.array([[5, 6, 7, 8]])
  with torch.no_grad():
    np.testing.assert_allclose(
      ours(jnp.asarray(ids)), hf(torch.tensor(ids)).logits.numpy(), atol=1e-4
    )
  assert not np.array_equal(
    nnx.state(ours)["trunk"]["embed"]["embedding"][...], b["transformer.wte.weight"]
  )
  proc = run("--workdir", str(smoke_run[0]), "--step", "7", "--out", str(tmp_path / "x"))
  assert proc.returncode == 1 and "no checkpoint of step 7" in proc.stderr
  assert proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
  "field,then,now",
  [
    ("model.attention", "xla", "cudnn"),  # the same maths by another kernel
    ("model.remat", False, True),  # memory, not maths
    ("mesh.shape", [8, 1, 1], [2, 2, 2]),  # checkpoints restore onto another mesh
    ("distributed.num_processes", 1, 2),
    ("checkpoint.every", 10, 100),
    ("stop_after", "reward_model", None),  # a run stopped after its reward model goes on
    ("dpo.epochs", 1, 2),
    ("dpo.eval_every", 10, 20),
    ("data.eval_prompts", 8, 16),
  ],
)
def test_a_resume_may_change_what_changes_no_trained_weight(field, then, now):
  """A checkpoint resumes with these fields changed (and with ``ppo.kl_coef`` changed, not)."""

  def config(value, kl_coef=0.05):
    out = {"ppo": {"kl_coef": kl_coef}}
    *sections, name = field.split(".")
    node = out
    for section in sections:
      node = node.setdefault(section, {})
    node[name] = value
    return out

  assert resume_rules.config_differences(config(then), config(now)) == []
  assert resume_rules.config_differences(config(then), config(now, 0.1)) == [
    "ppo.kl_coef: 0.05 → 0.1"
  ]


def test_config_differences_ignore_what_may_change():
  saved = {"ppo": {"iterations": 10, "kl_coef": 0.05}, "log": {"progress": True}, "seed": 0}
  now = {"ppo": {"iterations": 20, "kl_coef": 0.05}, "log": {"progress": False}, "seed": 1}
  assert resume_rules.config_differences(saved, now) == ["seed: 0 → 1"]
  # Micro-batches are memory, not maths: a run stopped short of memory resumes with smaller ones.
  for section in ("sft", "rm", "dpo", "ppo"):
    saved, now = {section: {"micro_batch_size": None}}, {section: {"micro_batch_size": 4}}
    assert resume_rules.config_differences(saved, now) == []
  saved, now = {"sft": {"batch_size": 8}}, {"sft": {"batch_size": 4}}
  assert resume_rules.config_differences(saved, now) == ["sft.batch_size: 8 → 4"]
  # GRPO never read ppo.whiten_rewards (now refused for it): a run saved with it resumes without.
  grpo = {"algo": "grpo", "ppo": {"whiten_rewards": True}}
  for algo, diffs in (("grpo", []), ("ppo", ["ppo.whiten_rewards: True → False"])):
    now = {"algo": algo, "ppo": {"whiten_rewards": False}}
    assert resume_rules.config_differences({**grpo, "algo": algo}, now) == diffs
  # Data files under the synthetic task, reward.fn under reward.source='model': never read, now
  # refused; a run saved with them resumes with them unset, not with other values.
  saved = {"task": {"name": "synthetic"}, "data": {"sft": "s.jsonl"}, "reward": {"fn": "m:f"}}
  now = {"task": {"name": "synthetic"}, "data": {"sft": None}, "reward": {"fn": None}}
  assert resume_rules.config_differences(saved, now) == []
  now["reward"]["fn"] = "m:g"
  assert resume_rules.config_differences(saved, now) == ["reward.fn: 'm:f' → 'm:g'"]
  saved["reward"]["source"] = now["reward"]["source"] = "function"
  now["reward"]["fn"] = None
  assert resume_rules.config_differences(saved, now) == ["reward.fn: 'm:f' → None"]
  # Several functions and their weights compare as what they mean: spaces, and 1 each unset.
  saved["reward"].update(fn="m:f,m:g", weights=None)
  now["reward"].update(fn="m:f, m:g", weights="1, 1.0")
  assert resume_rules.config_differences(saved, now) == []
  now["reward"]["weights"] = "1,2"
  assert resume_rules.config_differences(saved, now) == ["reward.weights: None → '1,2'"]
  # LoRA off: its targets were never read (a typo there, refused now, may be mended on a resume).
  saved, now = ({"ppo": {"lora_rank": r, "lora_targets": t}} for r, t in ((0, "q,x"), (0, "q")))
  assert resume_rules.config_differences(saved, now) == []
  saved["ppo"]["lora_rank"] = now["ppo"]["lora_rank"] = 4
  assert resume_rules.config_differences(saved, now) == ["ppo.lora_targets: 'q,x' → 'q'"]


def test_paths_compare_as_the_files_they_name(tmp_path, monkeypatch):
  """A run saved with ``data.prompts=data/p.jsonl`` resumes from elsewhere with the absolute path
  (or ``./data/../data/p.jsonl``); another file is a difference."""
  monkeypatch.chdir(tmp_path)
  for field in ("data.prompts", "model.tokenizer", "model.init", "reward.model"):
    section, key = field.split(".")
    saved = {section: {key: "data/p.jsonl"}}
    for same in (str(tmp_path / "data" / "p.jsonl"), "./data/../data/p.jsonl"):
      assert resume_rules.config_differences(saved, {section: {key: same}}) == [], (field, same)
    other = str(tmp_path / "data" / "q.jsonl")
    assert resume_rules.config_differences(saved, {section: {key: other}}) == [
      f"{field}: 'data/p.jsonl' → {other!r}"
    ]
  assert resume_rules.config_differences({"seed": "a"}, {"seed": str(tmp_path / "a")}) != []
  # Records hold the paths resolved: a resume from another folder, by another relative path.
  (tmp_path / "proj").mkdir()
  monkeypatch.chdir(tmp_path / "proj")
  saved = resume_rules.with_paths_resolved({"data": {"prompts": "p.jsonl", "sft": None}})
  assert saved == {"data": {"prompts": str(tmp_path / "proj" / "p.jsonl"), "sft": None}}
  monkeypatch.chdir(tmp_path)
  now = {"data": {"prompts": "proj/p.jsonl", "sft": None}}
  assert resume_rules.config_differences(saved, now) == []


def test_a_field_added_since_the_save_counts_only_off_its_default():
  """A checkpoint written before ``ppo.critic_warmup`` existed resumes under a config that
  leaves it at its default, and is refused under one that sets it."""
  saved = {"ppo": {"kl_coef": 0.05}, "seed": 0}
  defaults = {"ppo": {"kl_coef": 0.05, "critic_warmup": 0}, "seed": 0}
  at_default = {"ppo": {"kl_coef": 0.05, "critic_warmup": 0}, "seed": 0}
  assert resume_rules.config_differences(saved, at_default, defaults=defaults) == []
  assert resume_rules.config_differences(saved, at_default) == ["ppo.critic_warmup: '(absent)' → 0"]
  changed = {"ppo": {"kl_coef": 0.05, "critic_warmup": 5}, "seed": 0}
  assert resume_rules.config_differences(saved, changed, defaults=defaults) == [
    "ppo.critic_warmup: '(absent)' → 5"
  ]
  # A field the current config lacks (removed since) still counts.
  assert resume_rules.config_differences(defaults, saved, defaults=defaults) == [
    "ppo.critic_warmup: 0 → '(absent)'"
  ]


def test_resume_compares_with_the_defaults_and_the_record_of_where_the_run_started(tmp_path):
  """``Checkpointer.resume``: a field added since the save resumes at its default; checkpoints
  of a run from another SFT policy, or LoRA adapters over other base weights, are refused;
  records from before SFT ids and weight digests resume."""
  saved_config = {"ppo": {"kl_coef": 0.05}, "seed": 0}
  defaults = {"ppo": {"kl_coef": 0.05, "critic_warmup": 0}, "seed": 0}
  settings = checkpoint.CheckpointSettings(async_save=False)
  like = {"w": jnp.zeros(3)}
  old, new = tmp_path / "old", tmp_path / "new"
  with checkpoint.Checkpointer(old, settings) as ck:  # a record of before ids and digests
    ck.save(1, {"w": jnp.arange(3.0)}, {"config": saved_config})
  with checkpoint.Checkpointer(new, settings) as ck:
    record = {"config": saved_config, "sft_id": "a", "base_digest": "1" * 64}
    ck.save(1, {"w": jnp.arange(3.0)}, record)
  now = {"config": defaults, "sft_id": "a", "base_policy": "base", "base_digest": "1" * 64}
  for folder in (old, new):
    with checkpoint.Checkpointer(folder, settings) as ck:
      state, _ = ck.resume(like, now, 10, defaults)
      np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0])
  with checkpoint.Checkpointer(new, settings) as ck:
    with pytest.raises(ValueError, match="started from another SFT policy"):
      ck.resume(like, {**now, "sft_id": "b"}, 10, defaults)
    with pytest.raises(ValueError, match="LoRA adapters trained over other base weights"):
      ck.resume(like, {**now, "base_digest": "2" * 64}, 10, defaults)
    with pytest.raises(ValueError, match="critic_warmup"):
      ck.resume(
        like,
        {**now, "config": {**defaults, "ppo": {"kl_coef": 0.05, "critic_warmup": 3}}},
        10,
        defaults,
      )
  # The digest of base weights recorded on one side only: a record of before digests.
  resume_rules.check_same_base({"base_digest": "1" * 64}, {"base_policy": "base"}, tmp_path)
  resume_rules.check_same_base({}, {"base_digest": "1" * 64, "base_policy": "base"}, tmp_path)


def _tiny_state(tx, width=2):
  params = {"policy": {"w": jnp.ones((3, width))}, "value": {"w": jnp.ones((3, 1))}}
  hp = ppo.PPOHparams(max_new_tokens=4, eos_token_id=1)
  return ppo.init_state(params, tx, hp, seed=0)


def test_a_state_of_another_layout_is_refused_in_one_line(tmp_path):
  """A checkpoint whose arrays are not this run's (the optimizer state of an older ppo_jax: one
  Adam over both models; or a parameter of another shape) is refused in one line naming the
  difference, and stays on disk; the same layout restores bit for bit."""
  hp = optim.OptimHparams(lr=0.1)
  joint = optim.make_optimizer(hp, 10)
  split = optim.make_actor_critic_optimizer(hp, policy_steps=10, value_steps=10)
  settings = checkpoint.CheckpointSettings(async_save=False)
  # Saved after one update: parameters and Adam moments unlike the fresh state it restores onto.
  fresh = _tiny_state(joint)
  grads = jax.tree.map(lambda w: jnp.arange(w.size, dtype=w.dtype).reshape(w.shape), fresh.params)
  updates, opt_state = joint.update(grads, fresh.opt_state, fresh.params)
  saved = fresh.replace(
    params=jax.tree.map(lambda p, u: p + u, fresh.params, updates), opt_state=opt_state
  )
  with checkpoint.Checkpointer(tmp_path / "ck", settings) as ck:
    ck.save(1, saved, {"config": {}})
  with checkpoint.Checkpointer(tmp_path / "ck", settings) as ck:  # as a resumed run opens it
    with pytest.raises(
      ValueError, match=r"step 1 holds a state of another layout \(\d+ arrays"
    ) as e:
      ck.restore(_tiny_state(split))
    assert "\n" not in str(e.value) and "new workdir" in str(e.value)
    with pytest.raises(ValueError, match=r"policy\.w is \(3, 2\) there, \(3, 4\) here"):
      ck.restore(_tiny_state(joint, width=4))
    assert ck.latest_step() == 1
    state, record = ck.restore(_tiny_state(joint))
  restored, expected = (jax.tree.leaves((x.params, x.opt_state)) for x in (state, saved))
  assert not np.array_equal(expected[0], fresh.params["policy"]["w"])  # the restore's to do
  for a, b in zip(restored, expected, strict=True):
    np.testing.assert_array_equal(a, b)
  assert record == {"config": {}}


def test_a_full_disk_during_a_save_is_one_line_naming_the_whole_checkpoint(tmp_path, monkeypatch):
  """A save that fails for want of space (tensorstore's RESOURCE_EXHAUSTED … ENOSPC, raised by
  the save or by the wait for an earlier background one) is one OSError line; orbax's threads'
  log records of it are dropped; other failures pass as they are."""
  import logging

  full = "RESOURCE_EXHAUSTED: Failed to write 8 bytes: No space left on device [os_error_code='28']"
  settings = checkpoint.CheckpointSettings(async_save=False)
  with checkpoint.Checkpointer(tmp_path / "ck", settings) as ck:
    ck.save(1, {"w": jnp.ones(3)}, {"step": 1})
    ck.save(2, {"w": jnp.ones(3)}, {"step": 2})

    def fails(message):
      def fn(*args, **kwargs):
        raise ValueError(message)

      return fn

    monkeypatch.setattr(ck._mgr, "save", fails(full))
    with pytest.raises(
      OSError,
      match=r"no space left on the device of .*ck while writing a "
      r"checkpoint; the one of step 2 is whole: free some space",
    ) as e:
      ck.save(3, {"w": jnp.ones(3)}, {"step": 3})
    assert "\n" not in str(e.value)
    monkeypatch.setattr(ck._mgr, "wait_until_finished", fails(full))
    with pytest.raises(OSError, match="no space left on the device"):
      ck.wait()
    monkeypatch.setattr(ck._mgr, "wait_until_finished", fails("something else"))
    with pytest.raises(ValueError, match=r"^something else$"):
      ck.wait()
    monkeypatch.undo()
  import orbax.checkpoint

  record = logging.LogRecord(
    "absl", logging.ERROR, orbax.checkpoint.__file__, 1, "save failed", None, None
  )
  try:
    raise RuntimeError("commit") from ValueError(full)
  except RuntimeError:
    record.exc_info = sys.exc_info()
  reports = orbax_noise.NoSpaceReports
  assert any(isinstance(f, reports) for f in logging.getLogger("absl").filters)
  assert not reports().filter(record)  # orbax's report of a full disk: dropped
  record.pathname = __file__
  assert reports().filter(record)  # a full disk the user's own program reports: kept
  record.pathname, record.exc_info = orbax.checkpoint.__file__, None
  assert reports().filter(record)  # orbax's report of anything else: kept


def test_a_failed_saves_late_reports_are_dropped_and_nothing_else():
  """After a save fails for want of space, asyncio reports each abandoned write ("Task exception
  was never retrieved") and tensorstore's threads call back into orbax's closed loop (an
  unraisable RuntimeError each): hundreds of tracebacks. Both are dropped; other reports pass."""
  import asyncio
  import logging
  import types

  assert any(
    isinstance(f, orbax_noise.NoSpaceReports) for f in logging.getLogger("asyncio").filters
  )
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    error = e
  seen = []
  hook = orbax_noise.quiet_closed_loop_callbacks(seen.append)

  def unraisable(exc_value, tb):
    return types.SimpleNamespace(
      exc_type=type(exc_value), exc_value=exc_value, exc_traceback=tb, err_msg=None, object=None
    )

  native = unraisable(error, error.__traceback__.tb_next)  # call_soon_threadsafe called from C
  hook(native)
  assert seen == []
  from_python = unraisable(error, error.__traceback__)  # a Python caller: reported
  other = unraisable(RuntimeError("something else"), error.__traceback__.tb_next)
  hook(from_python)
  hook(other)
  assert seen == [from_python, other]
  assert getattr(sys.unraisablehook, "ppo_jax", False)


def test_read_blames_damage_only_for_data_loss(tmp_path, capsys):
  def fails(error):
    def fn():
      print("orbax was here", file=sys.stderr)
      try:
        raise error
      except Exception as e:
        raise Exception("Encountered error while reading array index") from e  # orbax's wrap

    return fn

  damaged = r"ck/7 cannot be read, it is damaged .*\(ValueError: OUT_OF_RANGE: bytes\); delete it"
  with pytest.raises(ValueError, match=damaged) as e:
    checkpoint.read(fails(ValueError("OUT_OF_RANGE: bytes")), tmp_path / "ck" / "7", "delete it")
  assert e.value.__cause__ is None and "orbax was here" not in capsys.readouterr().err
  cut = ValueError(
    'FAILED_PRECONDITION: Error reading local file "ck/7/state/_sharding": Invalid JSON'
  )
  with pytest.raises(ValueError, match=r"ck/7 cannot be read, it is damaged .*_sharding"):
    checkpoint.read(fails(cut), tmp_path / "ck" / "7", "delete it")  # a JSON file cut short
  with pytest.raises(Exception, match="Encountered error") as e:  # not damage: raised as it is
    checkpoint.read(fails(RuntimeError("RESOURCE_EXHAUSTED: out of memory")), tmp_path, "")
  assert isinstance(e.value.__cause__, RuntimeError)
  assert "orbax was here" in capsys.readouterr().err  # and what it printed is not lost
  assert checkpoint.read(lambda: 3, tmp_path, "") == 3


def test_a_stop_requested_in_an_earlier_run_is_forgotten():
  guard = preemption.PreemptionGuard()
  with guard:
    guard._handle(signal.SIGTERM, None)
    assert guard.requested
  with guard:
    assert not guard.requested


def test_only_a_second_ctrl_c_stops_at_once():
  """After a first stop signal, a second SIGTERM (a scheduler's repeat) still waits for the
  step boundary; a Ctrl-C then raises at once. At the command's start the first signal is
  remembered, and the second raises."""
  guard = preemption.PreemptionGuard()
  with guard:
    guard._handle(signal.SIGTERM, None)
    try:
      guard._handle(signal.SIGTERM, None)
    except KeyboardInterrupt:  # (pytest would stop the session on it)
      pytest.fail("a second SIGTERM stopped the run at once, without its save")
    assert guard.signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      guard._handle(signal.SIGINT, None)
  try:
    preemption.early_stop(signal.SIGTERM, None)
    assert preemption.EARLY == [signal.SIGTERM]
    with pytest.raises(KeyboardInterrupt):
      preemption.early_stop(signal.SIGINT, None)
  finally:
    preemption.EARLY.clear()


def test_a_stop_that_came_as_the_command_started_is_the_runs():
  """A SIGTERM after the start's last look, before the guard is entered: the run's first step
  boundary stops it (the guard dropped it, and the run went on to the end)."""
  guard = preemption.PreemptionGuard()
  preemption.EARLY[:] = [signal.SIGTERM]
  with guard:
    assert guard.signal == signal.SIGTERM and not preemption.EARLY
  with guard:
    assert not guard.requested


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
  """A script's `ppo-jax ... &` starts it ignoring SIGINT: the Ctrl-C meant for the script does
  not stop the run; SIGTERM still does, and both handlers are put back on exit."""
  guard = preemption.PreemptionGuard()
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  term_before = signal.getsignal(signal.SIGTERM)
  try:
    with guard:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # Python runs handlers between bytecodes of the main thread
      assert not guard.requested
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert guard.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is term_before
  finally:
    signal.signal(signal.SIGINT, before)


def test_checkpoints_of_a_run_from_another_sft_policy_are_refused(tmp_path):
  """PPO's, DPO's and the reward model's records name the SFT training they started from."""
  from ppo_jax.resume_rules import check_same_start

  check_same_start({"sft_id": "a"}, {"sft_id": "a"}, tmp_path)
  check_same_start({}, {"sft_id": "a"}, tmp_path)  # a record from before ids
  for then, now in [("a", "b"), ("a", None), (None, "b")]:
    with pytest.raises(
      ValueError, match=r"started from another SFT policy than the workdir's sft/"
    ):
      check_same_start({"sft_id": then}, {"sft_id": now}, tmp_path)
