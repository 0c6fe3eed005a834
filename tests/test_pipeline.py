"""The whole pipeline on the smoke config: it learns, it logs, it is reproducible."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers as tf
from conftest import count_lines, reuse_stages, sigterm_when, smoke_config

import ppo_jax as pj
from ppo_jax import compat, main, pipeline, preemption, stages, writers
from ppo_jax.config import Settings
from ppo_jax.export import export_policy
from ppo_jax.finished import finished_summary
from ppo_jax.rewards import RewardError
from ppo_jax.stage_checkpoints import STAGE_RECORD

REQUIRED_METRICS = (
  "objective/scores",
  "objective/kl",
  "objective/kl_coef",
  "objective/rlhf_reward",
  "policy/approxkl_avg",
  "policy/clipfrac_avg",
  "policy/ratio_clamped_avg",
  "policy/entropy_avg",
  "loss/policy_avg",
  "loss/value_avg",
  "val/clipfrac_avg",
  "val/ratio",
  "val/var_explained",
  "response/length",
  "response/eos_rate",
  "grad/norm",
  "grad/policy_norm",
  "grad/value_norm",
  "lr",
  "time/generate",
  "time/score",
  "time/update",
  "time/iteration",
  "tokens_per_s",
  "gold/score",
  "policy/approxkl_first_minibatch",
)
TIMING = ("time/", "tokens_per_s")


def _rows(workdir):
  return writers.read_metrics(workdir / "metrics.jsonl")


def _mean(rows, key):
  return float(np.mean([r[key] for r in rows]))


def test_smoke_run_raises_reward_and_gold_with_finite_kl(smoke_run):
  workdir, summary = smoke_run
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 16))
  assert all(np.isfinite(r["objective/kl"]) and r["objective/kl"] < 50 for r in rows)
  first, last = rows[:3], rows[-3:]
  assert _mean(last, "objective/scores") > _mean(first, "objective/scores") + 0.3
  assert _mean(last, "gold/score") > _mean(first, "gold/score") + 0.1
  assert summary["after"]["gold"] > summary["before"]["gold"] + 0.1
  assert summary["rm_eval"]["accuracy"] > 0.6  # the labels agree with gold on ~88 % of pairs


def test_every_iteration_starts_with_ratio_one(smoke_run):
  for row in _rows(smoke_run[0]):
    assert row["policy/approxkl_first_minibatch"] < 1e-6
    assert row["policy/clipfrac_first_minibatch"] == 0.0
    assert row["sampler/logprob_mismatch"] < 1e-4  # sampler and trainer agree on log-probs


def test_outputs_in_the_workdir(smoke_run):
  workdir, _ = smoke_run
  rows = _rows(workdir)
  missing = [k for k in REQUIRED_METRICS if k not in rows[0]]
  assert not missing, missing
  config = json.loads((workdir / "config.json").read_text())
  assert config["ppo"]["iterations"] == 15 and config["seed"] == 0
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  for stage in ("sft", "rm", "ppo"):  # each stage's curves
    assert (workdir / "plots" / f"{stage}.png").stat().st_size > 10_000, stage
  table = (workdir / "samples" / "step_000015.md").read_text()
  assert "| prompt | response | score | gold | kl |" in table
  samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
  assert {s["step"] for s in samples} == {5, 10, 15}
  assert (workdir / "sft_metrics.jsonl").exists() and (workdir / "rm_metrics.jsonl").exists()
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary["after"]) == {"score", "gold", "kl", "length"}


def test_a_run_stops_after_its_reward_model_and_goes_on_from_it(smoke_run, tmp_path, capsys):
  """config.stop_after='rm': the stages up to the reward model, a summary of them, no prompts
  read and no policy; its rerun has nothing to do; without stop_after the run goes on to PPO
  from the stages' folders."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "rm")  # sft/ and reward_model/: none trains
  config = smoke_config(stop_after="rm", log__plots=False, log__tensorboard=False)
  config.ppo.update(lora_rank=4, lora_targets="gate")  # GPT-2 has none: the RL stage's concern
  summary = pipeline.run(config, workdir)
  out = capsys.readouterr().out
  assert "config.stop_after='rm': no prompts read" in out and "3/3" not in out
  assert "stopped after the reward model (config.stop_after='rm'): no PPO stage" in out
  assert summary["rm_eval"] == smoke_run[1]["rm_eval"] and summary["stop_after"] == "rm"
  assert not {"policy", "checkpoints", "metrics.jsonl"} & {p.name for p in workdir.iterdir()}
  assert pipeline.run(config, workdir) == summary
  assert "nothing to do" in capsys.readouterr().out
  config.stop_after, config.ppo.iterations, config.ppo.lora_rank = "", 1, 0
  summary = pipeline.run(config, workdir)
  out = capsys.readouterr().out
  assert out.count("loading it instead of training") == 2 and "3/3 PPO" in out
  assert "stop_after" not in summary and (workdir / "policy" / "model.safetensors").is_file()
  # Stopping after the reward model again, even with other RL fields: that run went further.
  written = (workdir / "summary.json").read_text()
  config.update(stop_after="rm", algo="grpo")
  config.ppo.update(group_size=4, kl_coef=0.5)
  assert pipeline.run(config, workdir) == summary
  assert "holds a run of this config that went on past config.stop_after='rm'" in (
    capsys.readouterr().out
  )
  assert (workdir / "summary.json").read_text() == written


def test_rm_eval_on_the_written_held_out_pairs_gives_the_runs_held_out_metrics(
  smoke_run, capsys, tmp_path
):
  """rm_held_out_pairs.jsonl holds the held-out rows as the file had them: ppo-jax rm-eval on it,
  with the run's lengths (read from the reward model's ppo_jax_stage.json when no flag gives
  them), reads the accuracy and margin the run printed."""
  from ppo_jax import rm_eval

  workdir, summary = smoke_run
  held_out = workdir / "rm_held_out_pairs.jsonl"
  rows = [json.loads(line) for line in held_out.read_text().splitlines()]
  assert len(rows) == summary["rm_eval"]["eval_rows"] and set(rows[0]) == {
    "prompt",
    "chosen",
    "rejected",
  }
  config = smoke_config()
  got = rm_eval.evaluate_pairs(workdir / "reward_model", held_out)
  assert (
    f"ppo_jax_stage.json): max_prompt_len {config.data.max_prompt_len}, max_response_len "
    f"{config.data.max_response_len} (flags override)" in capsys.readouterr().out
  )
  assert got["pairs"] == len(rows)
  assert got["accuracy"] == pytest.approx(summary["rm_eval"]["accuracy"], abs=1e-6)  # 1 pair: 0.01
  assert got["margin"] == pytest.approx(summary["rm_eval"]["margin"], rel=1e-4)
  # A run that cut its prompts (data.prompt_overflow=truncate): cut alike, not refused.
  import shutil

  rm = shutil.copytree(workdir / "reward_model", tmp_path / "rm")
  record = json.loads((rm / "ppo_jax_stage.json").read_text())
  record["config"]["data"].update(max_prompt_len=2, prompt_overflow="truncate")
  (rm / "ppo_jax_stage.json").write_text(json.dumps(record))
  assert rm_eval.evaluate_pairs(rm, held_out)["pairs"] == len(rows)
  assert "max_prompt_len 2, max_response_len " in (out := capsys.readouterr().out)
  assert "prompt_overflow 'truncate'" in out


def test_final_policy_loads_in_transformers(smoke_run):
  workdir, _ = smoke_run
  tok = tf.AutoTokenizer.from_pretrained(str(workdir / "policy"))
  hf_model = tf.AutoModelForCausalLM.from_pretrained(str(workdir / "policy")).eval()
  ours = pj.models.from_pretrained(workdir / "policy")
  ids = tok(["review the film : the film was"], return_tensors="np")["input_ids"]
  import torch

  with torch.no_grad():
    want = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours(jnp.asarray(ids)), want, atol=1e-4)


def test_same_seed_same_metrics(smoke_run, tmp_path):
  """Rerunning PPO from the smoke run's saved SFT and reward model reproduces every metric, and
  the summary still reports the reused stages' held-out results."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "again")
  summary = pipeline.run(smoke_config(log__tensorboard=False, log__plots=False), workdir)
  for a, b in zip(_rows(smoke_run[0]), _rows(workdir), strict=True):
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(TIMING)}
    assert drop(a) == drop(b)
  assert summary["rm_eval"]["accuracy"] == smoke_run[1]["rm_eval"]["accuracy"]
  assert summary["sft_eval"] == smoke_run[1]["sft_eval"] and "nll" in summary["sft_eval"]


def test_custom_reward_function_by_import_path_is_optimised(smoke_run, tmp_path):
  workdir = reuse_stages(smoke_run[0], tmp_path / "fn", stages=("sft",))
  config = smoke_config(
    reward__source="function",
    reward__fn="reward_fns:superlatives",
    rm__enabled=False,
    ppo__critic_init="policy",
    log__tensorboard=False,
    log__plots=False,
  )
  pipeline.run(config, workdir)
  rows = _rows(workdir)
  assert not (workdir / "reward_model").exists()
  assert _mean(rows[-3:], "objective/scores") > _mean(rows[:3], "objective/scores") + 0.3


@pytest.mark.parametrize(
  "fn,message",
  [  # one failure at import and one while training; tests/test_rewards.py has all the others
    ("reward_fns:raises", "raised RuntimeError: reward server unreachable"),
    ("broken_reward_module:fn", "RuntimeError: reward module broken at import"),
  ],
)
def test_bad_reward_functions_fail_with_one_line(smoke_run, tmp_path, monkeypatch, fn, message):
  # A module whose own code fails at import (written here: the suite imports every module it
  # finds under tests/ for doctests).
  (tmp_path / "broken_reward_module.py").write_text(
    'raise RuntimeError("reward module broken at import")\n'
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = reuse_stages(smoke_run[0], tmp_path / "bad", stages=("sft",))
  config = smoke_config(
    reward__source="function",
    reward__fn=fn,
    rm__enabled=False,
    ppo__critic_init="policy",
    ppo__iterations=1,
    log__tensorboard=False,
  )
  with pytest.raises(RewardError, match=message) as err:
    pipeline.run(config, workdir)
  assert "\n" not in str(err.value)
  assert (workdir / "sft" / "config.json").exists()  # nothing already saved is lost


def test_a_reward_function_failing_mid_run_keeps_the_last_finished_step(smoke_run, tmp_path):
  """A judge that fails at step 3 (of 4; checkpoints every 10): the run stops in one line saying
  step 2 is saved, and the rerun resumes there (it restarted from step 0)."""
  import reward_fns

  workdir = reuse_stages(smoke_run[0], tmp_path / "judge", stages=("sft",))
  judge = dict(
    reward__source="function",
    reward__fn="reward_fns:fails_on_third_call",
    rm__enabled=False,
    ppo__critic_init="policy",
    log__tensorboard=False,
    log__plots=False,
  )
  # no held-out calls: the third call is step 3's
  config = smoke_config(**judge, ppo__iterations=4, data__eval_prompts=0, checkpoint__every=10)
  reward_fns.CALLS[0] = 0
  with pytest.raises(RewardError, match=r"judge timed out; step 2 is saved in .*checkpoints: a "):
    pipeline.run(config, workdir)
  assert [r["step"] for r in _rows(workdir)] == [1, 2]
  reward_fns.CALLS[0] = 2  # failing again at once, on the step it resumed from (saved already)
  with pytest.raises(RewardError, match=r"judge timed out; step 2 is saved in .*checkpoints: a "):
    pipeline.run(config, workdir)
  pipeline.run(config, workdir)  # calls 4 and 5: the judge is back
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4] and reward_fns.CALLS[0] == 5
  # A gold scorer failing after the update keeps that step, its row logged without gold.
  gold_run = reuse_stages(smoke_run[0], tmp_path / "gold", stages=("sft",))
  config.reward.fn, config.task.gold = "reward_fns:superlatives", "reward_fns:fails_on_third_call"
  reward_fns.CALLS[0] = 0
  with pytest.raises(RewardError, match=r"^gold scorer at step 3 raised .*; step 3 is saved in "):
    pipeline.run(config, gold_run)
  rows = _rows(gold_run)
  assert [r["step"] for r in rows] == [1, 2, 3] and "gold/score" not in rows[2]
  assert (gold_run / "checkpoints" / "3").is_dir()  # where a rerun resumes, as above
  # Failing in the held-out evaluation after the last step (calls: before, step 1, after): the
  # step is saved, where a rerun resumes and only evaluates.
  held_run = reuse_stages(smoke_run[0], tmp_path / "held", stages=("sft",))
  config = smoke_config(**judge, ppo__iterations=1, data__eval_prompts=8)
  reward_fns.CALLS[0] = 0
  with pytest.raises(RewardError, match=r"judge timed out; step 1 is saved in .*checkpoints: a "):
    pipeline.run(config, held_run)
  assert (held_run / "checkpoints" / "1").is_dir() and not (held_run / "policy").exists()


def test_lora_run_trains_adapters_and_exports_a_plain_model(smoke_run, tmp_path):
  workdir = reuse_stages(smoke_run[0], tmp_path / "lora")
  config = smoke_config(
    ppo__lora_rank=8,
    ppo__lora_targets="q,k,v,o,up,down",
    ppo__optim__lr=3e-3,
    data__eval_prompts=128,
    log__tensorboard=False,
    log__plots=False,
  )
  summary = pipeline.run(config, workdir)
  # Held-out prompts sampled with the same keys before and after PPO: an untrained policy scores
  # exactly the same. (The first and last rollouts, batches of 32 drawn afresh, rose by 0.16–0.46
  # over small changes of the CPU's rounding or the learning rate: too noisy to test.) Held-out
  # gains at learning rates 2.5e-3, 3e-3 and 3.5e-3: 0.46, 0.45, 0.22.
  assert summary["held_out"] and summary["after"]["score"] > summary["before"]["score"] + 0.1
  final = safetensors.numpy.load_file(str(workdir / "policy" / "model.safetensors"))
  assert not any("lora" in k for k in final)  # adapters folded in: a plain GPT-2
  sft = safetensors.numpy.load_file(str(workdir / "sft" / "model.safetensors"))
  changed = [k for k in final if not np.array_equal(final[k], sft[k])]
  assert changed and all(
    k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed
  )  # only the adapted projections moved
  args = ["export", "--workdir", str(workdir), "--out", str(tmp_path / "exported")]
  assert main.cli(["ppo-jax", *args]) == 0  # in this process: the DPO test runs it the same way
  exported = safetensors.numpy.load_file(str(tmp_path / "exported" / "model.safetensors"))
  for k in final:
    np.testing.assert_array_equal(exported[k], final[k])

  # A moved workdir exports from its own base and tokenizer (the record's paths are the old ones).
  from ppo_jax.export import export_policy

  moved = workdir.rename(tmp_path / "moved")
  export_policy(moved, tmp_path / "from_moved")
  again = safetensors.numpy.load_file(str(tmp_path / "from_moved" / "model.safetensors"))
  assert again.keys() == final.keys() and all(np.array_equal(again[k], final[k]) for k in final)
  assert (tmp_path / "from_moved" / "tokenizer.json").is_file()

  # Other base weights under the adapters: export and resume both refuse, in one line.
  base = moved / "sft" / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(base))
  name = next(k for k in tensors if k.endswith("c_attn.weight"))
  tensors[name] = tensors[name] + 1e-3
  safetensors.numpy.save_file(tensors, str(base), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"LoRA adapters trained over other base weights than .*sft"):
    export_policy(moved, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  more = config.copy_and_resolve_references()
  more.ppo.iterations += 2
  with pytest.raises(ValueError, match=r"checkpoints holds LoRA adapters trained over other base"):
    pipeline.run(more, moved)


def test_reward_functions_get_the_prompt_rows_other_fields(smoke_run, tmp_path, capsys):
  """GRPO on a prompts file whose rows carry a field ("key", the prompt itself): the reward and
  gold functions take it and check it arrives with its own prompt, through the batches, the
  groups and the held-out evaluation. A function that takes a field the rows lack is refused
  before any training."""
  from conftest import ROOT

  from ppo_jax.config import load_experiment

  texts = [json.loads(line)["prompt"] for line in (smoke_run[0] / "data" / "prompts.jsonl").open()]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": t, "key": t}) + "\n" for t in texts[:64]))
  config = load_experiment(ROOT / "experiments" / "grpo.py", "smoke")
  config.task.name, config.task.gold = "files", "reward_fns:keyed"
  config.model.tokenizer = str(smoke_run[0] / "data" / "tokenizer")
  config.data.prompts, config.data.eval_prompts = str(prompts), 16
  # Two functions, weighed to the gold's (1.5·words − 0.5·words): the second takes no field.
  config.reward.source, config.reward.fn = "function", "reward_fns:keyed,reward_fns:shortness"
  config.reward.weights = "1.5, 0.5"
  config.rm.enabled = False
  config.ppo.iterations = 2
  config.log.progress = config.log.tensorboard = config.log.plots = False
  config.log.samples_every = 1
  summary = pipeline.run(config, tmp_path / "run")
  rows = _rows(tmp_path / "run")
  # The same score as the gold's; the training score is less its missing-EOS penalty. Each
  # function's mean is logged, unweighted.
  assert len(rows) == 2 and all(r["gold/score"] >= r["objective/scores"] for r in rows)
  assert all(r["scores/keyed"] == r["gold/score"] == -r["scores/shortness"] for r in rows)
  assert summary["after"]["gold"] == pytest.approx(summary["after"]["score"], rel=1e-6)
  # The held-out before/after has each function's mean too, and the closing table shows them.
  for when in ("before", "after"):
    got = summary[when]
    assert got["scores/keyed"] == got["gold"] == pytest.approx(-got["scores/shortness"])
  assert "\n  scores/keyed " in capsys.readouterr().out
  # The sample rows have each function's score of their own response, before its weight.
  samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
  assert (
    len(samples) == 2 * 8
    and all(s["scores/keyed"] == s["gold"] == -s["scores/shortness"] for s in samples)
    and any(s["scores/keyed"] > 0 for s in samples)
  )
  # GRPO's groups: each prompt's 4 responses are consecutive rows (the first 8 of each step).
  for step in range(2):
    rows_prompts = [s["prompt"] for s in samples[8 * step : 8 * step + 8]]
    assert rows_prompts == [rows_prompts[0]] * 4 + [rows_prompts[4]] * 4, rows_prompts
  assert (
    "| scores/keyed | scores/shortness |"
    in (tmp_path / "run" / "samples").joinpath("step_000001.md").read_text()
  )
  prompts.write_text(
    "".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts))
  )
  with pytest.raises(
    RewardError,
    match=r"^config.reward.fn 'reward_fns:keyed' takes 'key', a field the prompt rows do",
  ):
    pipeline.run(config, tmp_path / "lacking")
  assert "1/3 supervised" not in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_algorithms_raise_gold(smoke_run, tmp_path, algo):
  from conftest import ROOT

  from ppo_jax.config import load_experiment

  config = load_experiment(ROOT / "experiments" / f"{algo}.py", "smoke")
  config.log.progress = False
  config.log.tensorboard = False
  config.log.plots = False
  workdir = reuse_stages(smoke_run[0], tmp_path / algo)
  summary = pipeline.run(config, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 21))
  first, last = rows[:3], rows[-3:]
  assert _mean(last, "objective/scores") > _mean(first, "objective/scores") + 0.3
  assert _mean(last, "gold/score") > _mean(first, "gold/score") + 0.1
  assert summary["after"]["gold"] > summary["before"]["gold"] + 0.1
  # There is no critic, so no value metrics: absent, not a column of zeros.
  for key in ("val/var_explained", "val/mean", "loss/value_avg", "grad/value_norm"):
    assert not any(key in r for r in rows), key


def test_dpo_raises_gold_without_a_reward_model(smoke_run, tmp_path, capsys):
  from conftest import ROOT

  from ppo_jax.config import load_experiment

  config = load_experiment(ROOT / "experiments" / "dpo.py", "smoke")
  config.log.progress = False
  config.rm.enabled = True  # as in the default config with --config.algo=dpo
  workdir = reuse_stages(smoke_run[0], tmp_path / "dpo", stages=("sft",))
  stale = workdir / "rm_checkpoints" / "3"  # a reward model's, stopped in an earlier run
  stale.mkdir(parents=True)
  capsys.readouterr()
  summary = pipeline.run(config, workdir)
  assert not (workdir / "reward_model").exists()  # DPO trains none
  # … and leaves that stage's checkpoints as they are, saying so.
  assert f"note: {stale.parent} holds checkpoints of the rm stage" in capsys.readouterr().out
  assert stale.is_dir()
  stale.rmdir()
  assert summary["held_out"] and summary["after"]["gold"] > summary["before"]["gold"] + 0.1
  assert summary["before"]["kl"] == 0.0 < summary["after"]["kl"] < 10.0
  assert summary["dpo_eval"]["accuracy"] > 0.6  # implicit reward ranks held-out pairs
  rows = _rows_of(workdir / "dpo_metrics.jsonl")
  assert len(rows) > 10 and _mean(rows[-5:], "reward_margin") > _mean(rows[:5], "reward_margin")
  assert _mean(rows[-5:], "accuracy") > 0.6  # the training pairs are ranked too
  curve = _rows(workdir)  # held-out samples every dpo.eval_every steps, keyed as for PPO
  assert [r["step"] for r in curve] == [0, 20, 40, 60, 61]  # from the reference's samples
  assert curve[0]["gold/score"] == pytest.approx(summary["before"]["gold"])
  assert curve[-1]["gold/score"] == pytest.approx(summary["after"]["gold"])
  assert all({"gold/score", "objective/kl", "response/length"} <= set(r) for r in curve)
  assert any((workdir / "tensorboard").glob("events.out.tfevents.*"))  # log.tensorboard: True
  for plot in ("dpo", "dpo_eval"):  # its training curves and the held-out ones
    assert (workdir / "plots" / f"{plot}.png").stat().st_size > 10_000, plot
  assert not (workdir / "plots" / "ppo.png").exists()
  assert (workdir / "policy" / "model.safetensors").exists()
  # Its last checkpoint stays (as PPO's do). The same command again does nothing, also with other
  # logging settings (they change no result): it prints the finished run's summary and leaves the
  # logs, the summary and TensorBoard's files as they were.
  assert [p.name for p in (workdir / "dpo_checkpoints").iterdir()] == ["61"]
  logs = {n: (workdir / n).read_text() for n in ("metrics.jsonl", "dpo_metrics.jsonl")}
  written = (workdir / "summary.json").read_text()
  events = sorted((workdir / "tensorboard").rglob("*"))
  capsys.readouterr()
  other_logging = config.copy_and_resolve_references()
  other_logging.log.progress = not config.log.progress
  again = pipeline.run(other_logging, workdir)
  out = capsys.readouterr().out
  assert (
    "holds the finished run of this very config: nothing to do (it differs only in "
    + ("log.progress, which change no result;")
    in out
  )
  assert "time of the invocation that finished it" in out and "resuming" not in out
  assert again["after"] == summary["after"] and again["seconds"] == summary["seconds"]
  assert logs == {n: (workdir / n).read_text() for n in logs}
  assert (workdir / "summary.json").read_text() == written
  assert sorted((workdir / "tensorboard").rglob("*")) == events
  # `ppo-jax export` finds the DPO checkpoint: the policy of step 61 is the policy/ folder.
  load = lambda w: safetensors.numpy.load_file(str(w / "model.safetensors"))
  args = ["export", "--workdir", str(workdir), "--out", str(tmp_path / "e")]
  assert main.cli(["ppo-jax", *args]) == 0
  assert "wrote the policy of step 61" in capsys.readouterr().out
  a, b = load(tmp_path / "e"), load(workdir / "policy")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
  vocab = lambda w: tf.AutoTokenizer.from_pretrained(str(w)).get_vocab()
  assert vocab(tmp_path / "e") == vocab(workdir / "policy")
  with pytest.raises(FileNotFoundError, match="dpo/checkpoints: no PPO checkpoints"):
    export_policy(workdir, tmp_path / "e2", stage="ppo")
  # Stopped by SIGTERM after step 25, then resumed: the same curves and policy, bit for bit.
  stopped = reuse_stages(smoke_run[0], tmp_path / "dpo_stopped", stages=("sft",))
  sigterm_when(lambda: count_lines(stopped / "dpo_metrics.jsonl") >= 25)
  with pytest.raises(preemption.Preempted, match="of the dpo stage; checkpoint saved"):
    pipeline.run(config, stopped)
  step = export_policy(stopped, tmp_path / "mid")  # the stopped stage's policy, as it stands
  assert (
    step >= 25
    and json.loads((tmp_path / "mid" / "ppo_jax_checkpoint.json").read_text())["stage"] == "dpo"
  )
  pipeline.run(config, stopped)
  for name in logs:
    assert writers.read_metrics(stopped / name) == writers.read_metrics(workdir / name), name
  a = load(stopped / "policy")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
  assert not all(np.array_equal(load(tmp_path / "mid")[k], b[k]) for k in b)
  # Fewer dpo.epochs than the run trained are refused before anything is written (more extend
  # it: test_supervised's extension test).
  shorter = config.copy_and_resolve_references()
  shorter.dpo.epochs = 0.5
  written = {n: (stopped / n).read_bytes() for n in ("summary.json", "config.json")}
  with pytest.raises(ValueError, match=r"holds step 61, past the 31 steps of dpo\.epochs=0\.5;"):
    pipeline.run(shorter, stopped)
  assert written == {n: (stopped / n).read_bytes() for n in written}


def test_dpo_with_lora_trains_adapters_over_the_sft_policy(smoke_run, tmp_path, capsys):
  """``ppo.lora_rank`` with ``algo=dpo``: the reference is the SFT policy (the base with the
  adapters off, so the first step's implicit reward margin is zero), only the adapters and their
  moments are trained and checkpointed, and the saved policy (adapters merged) is what
  ``ppo-jax export`` makes of the last checkpoint over the ``sft/`` folder it names."""
  import orbax.checkpoint as ocp
  from conftest import ROOT

  from ppo_jax.config import load_experiment

  config = load_experiment(ROOT / "experiments" / "dpo.py", "smoke")
  config.log.update(progress=False, tensorboard=False)
  config.ppo.update(lora_rank=16, lora_targets="q,k,v,o,up,down")
  config.dpo.update(eval_every=0)  # no held-out curve (the DPO test above reads it): 3 samplings
  config.dpo.optim.lr = 3e-3
  config.dpo.loss = "ipo"  # (h − 1/(2β))²: 1/(4β²) at the reference, where DPO's is log 2
  config.dpo.rpo_alpha = 0.2  # and RPO's NLL of the chosen responses beside it
  workdir = reuse_stages(smoke_run[0], tmp_path / "dpo_lora", stages=("sft",))
  summary = pipeline.run(config, workdir)
  rows = _rows_of(workdir / "dpo_metrics.jsonl")
  assert abs(rows[0]["reward_margin"]) < 1e-6  # π = π_ref before the first update
  ipo_at_start = 1 / (4 * config.dpo.beta**2)
  assert rows[0]["loss"] == pytest.approx(ipo_at_start + 0.2 * rows[0]["nll_chosen"], rel=1e-5)
  # IPO's margins (logged from the summed log-ratios, as DPO's) grow as its loss falls.
  assert _mean(rows[-5:], "reward_margin") > _mean(rows[:5], "reward_margin") + 0.02  # 0.046
  assert _mean(rows[-5:], "loss") < _mean(rows[:5], "loss") - 0.5
  assert summary["dpo_eval"]["accuracy"] > 0.55 and summary["after"]["kl"] > 0.05
  assert not (workdir / "ppo_base").exists()  # the base is sft/, already there
  mgr = ocp.CheckpointManager(
    (workdir / "dpo_checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  )
  saved = jax.tree_util.tree_flatten_with_path(mgr.item_metadata(61)["state"])[0]
  mgr.close()
  arrays = [jax.tree_util.keystr(path) for path, m in saved if np.prod(m.shape) > 1]
  assert arrays and all("lora_" in name for name in arrays), arrays  # params and Adam moments
  final = safetensors.numpy.load_file(str(workdir / "policy" / "model.safetensors"))
  sft = safetensors.numpy.load_file(str(workdir / "sft" / "model.safetensors"))
  assert final.keys() == sft.keys()  # adapters folded in: a plain GPT-2
  changed = [k for k in final if not np.array_equal(final[k], sft[k])]
  assert changed and all(
    k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed
  )
  assert export_policy(workdir, tmp_path / "e") == 61
  exported = safetensors.numpy.load_file(str(tmp_path / "e" / "model.safetensors"))
  assert all(np.array_equal(exported[k], final[k]) for k in final)
  capsys.readouterr()
  # Another config that trains the same but evaluates otherwise (dpo.eval_every): resumed at its
  # last step, nothing trained. (Only logging changed: nothing to do, not even a resume.)
  config.log.samples_every = config.log.samples_every + 1
  pipeline.run(config, workdir)
  out = capsys.readouterr().out
  assert "holds the finished run of this very config: nothing to do" in out
  assert "to train longer, raise dpo.epochs (the run goes on from its last checkpoint" in out
  config.dpo.eval_every = config.dpo.eval_every + 1
  pipeline.run(config, workdir)
  assert "resuming from the checkpoint of step 61" in capsys.readouterr().out
  # Finished only with its checkpoints; and they are of the SFT policy in sft/: refused over
  # another one, or when sft/ is gone (before SFT would train again).
  now, s = json.loads(config.to_json_best_effort()), Settings.from_config(config)
  assert finished_summary(s, workdir, now) is not None
  (workdir / "dpo_checkpoints").rename(tmp_path / "aside")
  assert finished_summary(s, workdir, now) is None
  (tmp_path / "aside").rename(workdir / "dpo_checkpoints")
  config.dpo.eval_every = config.dpo.eval_every + 1  # a resume, not a finished run
  record = workdir / "sft" / STAGE_RECORD
  record.write_text(json.dumps({**json.loads(record.read_text()), "id": "another"}))
  with pytest.raises(
    ValueError,
    match="dpo_checkpoints holds checkpoints of a run that started from another SFT policy",
  ):
    pipeline.run(config, workdir)
  (workdir / "sft").rename(tmp_path / "sft")
  with pytest.raises(ValueError, match=r"started from the SFT policy in .*sft, which is gone"):
    pipeline.run(config, workdir)


def test_lora_keeps_its_base_beside_the_adapters_when_sft_was_skipped(tmp_path, capsys):
  """``with_adapters`` (PPO's and DPO's LoRA): without an ``sft/`` folder the base weights are
  written to ``ppo_base/`` for the export to merge onto, and a resume reads them back from there
  rather than trusting the seed to rebuild them bit for bit; with ``sft/``, that is the base."""
  from flax import nnx

  from ppo_jax.config import Settings
  from ppo_jax.export import weights_digest
  from ppo_jax.models import CausalLM, ModelConfig, from_pretrained
  from ppo_jax.models.lora import split_lora

  cfg = ModelConfig.gpt2(
    vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16
  )
  policy = CausalLM(cfg, rngs=nnx.Rngs(0))
  weights = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  ckpts = tmp_path / "checkpoints"
  plain = Settings.from_config(smoke_config())
  assert stages.with_adapters(plain, policy, tmp_path, None, checkpoints=ckpts) == (policy, None)
  s = Settings.from_config(smoke_config(ppo__lora_rank=4))
  adapted, base = stages.with_adapters(s, policy, tmp_path, None, checkpoints=ckpts)
  assert base == tmp_path / "ppo_base" and adapted.cfg.lora_rank == 4
  said = capsys.readouterr().out
  # q,k,v,o (the default): 4 adapters of 16·4 + 4·16 parameters in one layer
  assert said.startswith("LoRA rank 4 on q,k,v,o: 0.001M trainable parameters over the "), said
  assert said.rstrip().endswith(f"M base weights of {base}")
  saved = weights(from_pretrained(base))
  assert same(saved, weights(policy))
  digest = weights_digest(base)

  # Resumed where the seed rebuilds other bits (another CPU; here another seed): ppo_base/ is
  # read, not rewritten, and the adapters sit over the weights they were trained over.
  ckpts.mkdir()
  (ckpts / "7").mkdir()
  rebuilt = CausalLM(cfg, rngs=nnx.Rngs(1))
  adapted, _ = stages.with_adapters(s, rebuilt, tmp_path, None, checkpoints=ckpts)
  assert f"resuming over the base weights in {base}" in capsys.readouterr().out
  assert weights_digest(base) == digest and same(weights(rebuilt), saved)
  assert same(jax.tree.leaves(split_lora(adapted)[2]), saved)
  wider = CausalLM(cfg.replace(hidden_size=32, head_dim=16), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"ppo_base holds a model of other shapes than config\.model"
  ):
    stages.with_adapters(s, wider, tmp_path, None, checkpoints=ckpts)
  # A fresh run (no checkpoints) over a stale ppo_base/ writes it anew.
  (ckpts / "7").rmdir()
  rebuilt = CausalLM(cfg, rngs=nnx.Rngs(2))
  stages.with_adapters(s, rebuilt, tmp_path, None, checkpoints=ckpts)
  assert weights_digest(base) != digest and same(weights(from_pretrained(base)), weights(rebuilt))

  (tmp_path / "ppo_base").rename(tmp_path / "sft")  # a finished SFT stage's folder
  _, base = stages.with_adapters(s, policy, tmp_path, None, checkpoints=ckpts)
  assert base == tmp_path / "sft" and not (tmp_path / "ppo_base").exists()


def _rows_of(path):
  return writers.read_metrics(path)


def test_rollout_summary_skips_non_finite_entries():
  """metrics.jsonl writes a skipped iteration's NaN as a string; the summary averages the rest."""
  rows = [
    {"objective/scores": 1.0, "objective/kl": 0.5},
    {"objective/scores": "nan", "objective/kl": 0.7},
    {"objective/scores": 3.0, "objective/kl": 0.9},
  ]
  assert writers.rollout_summary(rows) == pytest.approx({"score": 2.0, "kl": 0.7})
  assert np.isnan(writers.rollout_summary(rows[1:2])["score"])
  rows[0]["scores/format"] = rows[2]["scores/format"] = 0.5  # several reward functions' means
  assert writers.rollout_summary(rows)["scores/format"] == 0.5


def test_the_held_out_evaluation_averages_each_prompt_once():
  """``evaluation.evaluate`` over 5 held-out prompts in batches of 2 (the last padded with copies
  of its first row): each mean (score, KL, length) is of the 5 prompts' own samples, the padding
  left out; each batch samples with a key of its own (one key would draw the same noise for
  other prompts); without a gold scorer, no gold score (not a NaN)."""
  from types import SimpleNamespace

  from ppo_jax import evaluation
  from ppo_jax.sampling import Generation

  keys = []

  def sample(params, frozen, key, ids, mask):  # response lengths 1, 2, 3, 1, 2 by the prompt id
    keys.append(tuple(np.asarray(jax.random.key_data(key)).ravel()))
    last = np.asarray(ids)[:, -1:]
    mask = (np.arange(3) < last % 3 + 1).astype(np.float32)
    tokens = np.where(mask > 0, last, 0).astype(np.int32)
    return Generation(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32), mask=mask)

  def evaluate(params, frozen, ids, mask):  # the score: the prompt id; the KL: a tenth of it
    score = np.asarray(ids)[:, 1].astype(np.float32)
    return jnp.asarray(score), jnp.asarray(score / 10)

  fns = SimpleNamespace(sample=sample, evaluate=evaluate)
  ids = np.array([[0, i] for i in (3, 4, 5, 6, 7)], np.int32)
  prompts = evaluation.Prompts([f"p{i}" for i in range(5)], ids, np.ones_like(ids))
  got = evaluation.evaluate(
    fns, None, None, prompts, None, batch_size=2, scorer=evaluation.Scorer(), gold=None, seed=3
  )
  assert got == pytest.approx({"score": 5.0, "kl": 0.5, "length": 9 / 5})
  assert len(keys) == 3 and len(set(keys)) == 3


def test_a_sample_row_holds_its_own_responses_scores_and_kl():
  """The rows of samples.jsonl and the samples table: each response with its own score, each
  reward function's score, gold score and KL, in that order, the first ``k`` of the batch."""
  from ppo_jax import evaluation

  batch = evaluation.Prompts(["p0", "p1", "p2"], np.zeros((3, 1), np.int32), np.ones((3, 1)))
  per_sample = {
    "sample/score": np.array([1.0, 2.0, 3.0]),
    "sample/scores/a": np.array([0.5, 0.25, 0.0]),
    "sample/kl": np.array([0.125, 0.375, 0.625]),
  }
  golds = np.array([-1.0, -2.0, -3.0])
  rows = evaluation.sample_rows(None, batch, None, ["r0", "r1", "r2"], per_sample, golds, 2)
  assert rows == [
    {"prompt": "p0", "response": "r0", "score": 1.0, "scores/a": 0.5, "gold": -1.0, "kl": 0.125},
    {"prompt": "p1", "response": "r1", "score": 2.0, "scores/a": 0.25, "gold": -2.0, "kl": 0.375},
  ]
  assert [list(r) for r in rows] == [["prompt", "response", "score", "scores/a", "gold", "kl"]] * 2


def test_progress_into_a_log_is_whole_lines(capsys, monkeypatch):
  """stderr that is no terminal (here pytest's capture; a log file, a batch job): each stage's
  progress is whole lines, one per 30 s and one at the end, not a bar's carriage returns. A line
  shows the metrics of its own step (callers update, then set the postfix), and the time left
  is paced by the steps after the first one trained (not a resumed stage's start, nor the first
  step's compilation)."""
  import sys

  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # as outside a notebook
  bar = writers.progress_bar(4, "ppo")
  for i in range(4):
    bar.update(1)
    bar.set_postfix({"score": f"{i}.5", "kl": "0.1"})
  bar.close()
  assert capsys.readouterr().err == "ppo 4/4, 0 s; score 3.5, kl 0.1\n"
  clock = iter([0.0, 3.0, 3.0, 5.0, 5.0, 6.0, 6.0])  # construction, update(1), the line, …
  monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
  bar = writers.LineProgress(100, "sft", initial=90, every=0.0)  # resumed at step 90
  for i in range(3):
    bar.update(1)
    bar.set_postfix({"nll": i})
  err = capsys.readouterr().err
  assert "\r" not in err and err.splitlines() == [
    "sft 91/100, 3 s; nll 0",  # the first step (compiling): no pace yet
    "sft 92/100, 5 s, ~16 s left; nll 1",  # 2 s for the step after it, 8 to go
    "sft 93/100, 6 s, ~10 s left; nll 2",  # 3 s for 2 steps, 7 to go
  ]
  writers.progress_bar(2, "rm", enabled=False).update(2)  # off: nothing
  assert capsys.readouterr().err == ""


def test_a_terminal_of_no_width_gets_lines_and_a_sized_one_a_bar(monkeypatch):
  """A pty nobody sized (0 columns: some job runners) is a terminal where tqdm draws nothing:
  progress goes there as lines; on a terminal with columns, a bar."""
  import fcntl
  import os
  import struct
  import sys
  import termios

  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
  leader, follower = os.openpty()
  with os.fdopen(follower, "w") as tty, os.fdopen(leader, "rb", buffering=0):
    monkeypatch.setattr(sys, "stderr", tty)
    assert tty.isatty() and os.get_terminal_size(follower).columns == 0
    assert isinstance(writers.progress_bar(3, "ppo"), writers.LineProgress)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    bar = writers.progress_bar(3, "ppo")
    assert not isinstance(bar, writers.LineProgress)
    bar.close()


def test_dpo_may_hold_out_every_prompt_and_ppo_a_quarter(tmp_path, capsys):
  """PPO trains on three quarters of the prompts file at least; DPO samples prompts only to
  evaluate, so all of them may be held out."""
  from conftest import ROOT

  from ppo_jax import data
  from ppo_jax.config import Settings, load_experiment
  from ppo_jax.run_inputs import Inputs, rl_prompts
  from ppo_jax.tokenizer import build_word_tokenizer

  tok = build_word_tokenizer([f"w{i}" for i in range(20)])
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"w{i}"}) + "\n" for i in range(20)))
  inputs = Inputs(tok, "", str(prompts), None, None, None, {})
  layout = data.Layout.of(tok, 4, 4)
  for algo, held in (("dpo", 20), ("ppo", 5)):
    config = load_experiment(ROOT / "experiments" / f"{'dpo' if algo == 'dpo' else 'default'}.py")
    config.data.eval_prompts = 30
    train, held_out = rl_prompts(Settings.from_config(config), inputs, layout)
    assert (len(train), len(held_out)) == (20 - held, held)
    assert held_out.texts == [f"w{i}" for i in range(held)]  # the file's first rows
    word = "(all)" if algo == "dpo" else "(at most a quarter)"
    assert (
      f"data.eval_prompts=30 but 20 prompts: holding out {held} {word}" in capsys.readouterr().out
    )


def test_ppo_holds_out_at_most_a_quarter_rounded_down_saying_so_only_when_it_cuts(tmp_path, capsys):
  from conftest import ROOT

  from ppo_jax import data
  from ppo_jax.config import load_experiment
  from ppo_jax.run_inputs import Inputs, rl_prompts
  from ppo_jax.tokenizer import build_word_tokenizer

  tok = build_word_tokenizer([f"w{i}" for i in range(10)])
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"w{i}"}) + "\n" for i in range(10)))
  inputs = Inputs(tok, "", str(prompts), None, None, None, {})
  config = load_experiment(ROOT / "experiments" / "default.py")
  for asked, held in ((30, 2), (2, 2), (1, 1)):
    config.data.eval_prompts = asked
    train, held_out = rl_prompts(Settings.from_config(config), inputs, data.Layout.of(tok, 4, 4))
    assert (len(train), len(held_out)) == (10 - held, held)
    assert ("holding out" in capsys.readouterr().out) == (held < asked), asked


def test_the_tokenizer_is_the_configured_one_else_the_tasks_or_the_models(tmp_path):
  """model.tokenizer wins over the synthetic task's own tokenizer; a files run without one takes
  the tokenizer of the model folder it starts from (model.init)."""
  from ppo_jax.run_inputs import prepare_inputs
  from ppo_jax.tokenizer import build_word_tokenizer

  mine = tmp_path / "tokenizer"
  build_word_tokenizer(["w1", "w2"]).save_pretrained(str(mine))
  config = smoke_config(task__num_prompts=4, task__num_sft=4, task__num_pairs=4)
  read = lambda: prepare_inputs(Settings.from_config(config), tmp_path / "run")
  task = read()
  assert task.tokenizer_path == str(tmp_path / "run" / "data" / "tokenizer")
  assert "film" in task.tokenizer.get_vocab() and "w1" not in task.tokenizer.get_vocab()
  config.model.tokenizer = str(mine)
  given = read()
  assert given.tokenizer_path == str(mine) and "w1" in given.tokenizer.get_vocab()
  config.task.name, config.model.tokenizer, config.model.init = "files", None, str(mine)
  config.data.update(prompts="p.jsonl", preferences="p.jsonl")
  from_model = read()
  assert from_model.tokenizer_path == str(mine) and "w1" in from_model.tokenizer.get_vocab()


def test_each_reward_functions_curve_is_plotted():
  """``scores/*`` in the plotted names stands for every reward function's curve, in the file's
  order; a constant one and a name no row has are left out."""
  rows = [
    {"step": i, "objective/scores": i, "scores/b": -i, "scores/a": 2 * i, "scores/c": 1.0}
    for i in (1, 2, 3)
  ]
  assert writers.panels(rows, writers.PLOTTED) == ["objective/scores", "scores/b", "scores/a"]
  assert writers.panels(rows, ["gold/score", "scores/a"]) == ["scores/a"]


def test_a_stage_without_a_curve_to_plot_says_so(tmp_path, capsys):
  """SFT's metrics all NaN (a diverged stage): no sft.png, and a line saying why; the reward
  model's curves are plotted."""
  nan_rows = [{"step": i, "nll": "nan", "grad_norm": "nan"} for i in (1, 2, 3)]
  rm_rows = [{"step": i, "accuracy": 0.5 + 0.1 * i} for i in (1, 2, 3)]
  for name, rows in (("sft", nan_rows), ("rm", rm_rows)):
    (tmp_path / f"{name}_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert writers.plot_stages(tmp_path, "ppo") == [tmp_path / "plots" / "rm.png"]
  out = capsys.readouterr().out
  assert f"plots: no sft.png: no curve in {tmp_path / 'sft_metrics.jsonl'} has two different" in out
  assert "rm.png" not in out
  # A run that stopped after the reward model plots no RL stage (another run's metrics.jsonl).
  rl_rows = [{"step": i, "objective/scores": i} for i in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl_rows))
  assert writers.plot_stages(tmp_path, "grpo", stop_after="rm") == [tmp_path / "plots" / "rm.png"]
  assert writers.plot_stages(tmp_path, "grpo")[-1] == tmp_path / "plots" / "grpo.png"


def test_a_run_stopped_after_the_reward_model_plots_none_of_the_later_stages(tmp_path):
  """config.stop_after='rm' in a workdir where another run left DPO's and the RL stage's metrics:
  plots/sft.png and rm.png only (and stop_after='sft': sft.png only)."""
  for name, key in (("sft", "nll"), ("rm", "accuracy"), ("dpo", "loss"), ("", "objective/scores")):
    rows = [{"step": i, key: 0.1 * i} for i in (1, 2)]
    file = tmp_path / (f"{name}_metrics.jsonl" if name else "metrics.jsonl")
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
  plots = tmp_path / "plots"
  assert writers.plot_stages(tmp_path, "dpo", stop_after="rm") == [
    plots / "sft.png",
    plots / "rm.png",
  ]
  assert writers.plot_stages(tmp_path, "ppo", stop_after="sft") == [plots / "sft.png"]
  assert sorted(p.name for p in plots.iterdir()) == ["rm.png", "sft.png"]


def test_a_non_finite_metric_is_logged_as_its_string_under_its_own_key(tmp_path):
  """metrics.jsonl is strict JSON (a bare NaN is not, and jq or a JSON library of another language
  refuses the file): a NaN or an infinite value is written as its string, its key kept."""
  path = tmp_path / "metrics.jsonl"
  writer = writers.MetricsWriter(path, tensorboard_dir=None)
  writer.write(1, {"objective/scores": float("nan"), "objective/kl": -float("inf"), "lr": 0.5})
  writer.close()
  bare = lambda constant: pytest.fail(f"a bare {constant} in {path}")
  rows = [json.loads(line, parse_constant=bare) for line in path.read_text().splitlines()]
  assert rows == [{"step": 1, "objective/scores": "nan", "objective/kl": "-inf", "lr": 0.5}]


def test_a_resumed_log_keeps_the_rows_up_to_its_checkpoint_once_each(tmp_path, capsys):
  """A run stopped after step 5, and a kill cut its step-6 line short; it resumes from the
  checkpoint of step 3: metrics.jsonl keeps steps 1–3 (the checkpoint's own included), drops 4, 5
  and the cut line (said), and the resumed steps follow, each once."""
  path = tmp_path / "metrics.jsonl"
  first = writers.MetricsWriter(path, tensorboard_dir=None)
  for step in range(1, 6):
    first.write(step, {"loss": float(step)})
  first.close()
  with path.open("a") as f:
    f.write('{"step": 6, "lo')
  resumed = writers.MetricsWriter(path, tensorboard_dir=None, resume_step=3)
  for step in (4, 5):
    resumed.write(step, {"loss": step + 0.5})
  resumed.close()
  losses = [1.0, 2.0, 3.0, 4.5, 5.5]
  assert writers.read_metrics(path) == [{"step": s, "loss": v} for s, v in enumerate(losses, 1)]
  assert f"note: {path}: dropped 1 unreadable line (a write cut short)" in capsys.readouterr().out


def _scalars_shown(folder):
  """``(tag, step, value)`` of each scalar TensorBoard shows from the event files in ``folder``,
  read in name order: a SessionLog START at step s (tensorboardX's ``purge_step``) hides those
  written before it at step s or later, as TensorBoard's reader does."""
  import struct

  from tensorboardX.proto.event_pb2 import Event, SessionLog

  shown = []
  for file in sorted(folder.iterdir()):
    data, at = file.read_bytes(), 0
    while at < len(data):  # TFRecords: length, its CRC, the event, its CRC
      (size,) = struct.unpack("<Q", data[at : at + 8])
      event = Event.FromString(data[at + 12 : at + 12 + size])
      at += 12 + size + 4
      if event.session_log.status == SessionLog.START:
        shown = [s for s in shown if s[1] < event.step]
      shown += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return shown


def test_a_resumed_runs_tensorboard_curve_holds_each_step_once(tmp_path):
  """TensorBoard, as metrics.jsonl: a run stopped after step 5 resumes from the checkpoint of step
  3; the curve shows steps 1–3 as first written (the checkpoint's own included) and 4, 5 as the
  resumed run wrote them, none twice and none missing. A non-finite value is left out."""
  board = tmp_path / "tensorboard"
  first = writers.MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=board, prefix="ppo/")
  for step in range(1, 6):
    first.write(step, {"loss": float(step), "kl": float("nan") if step == 2 else 0.0})
  first.close()
  # tensorboardX names a file by the second it opened it: the earlier run's sorts first.
  (old,) = board.iterdir()
  old.rename(board / "events.out.tfevents.0000000001.earlier")
  resumed = writers.MetricsWriter(
    tmp_path / "m.jsonl", tensorboard_dir=board, prefix="ppo/", resume_step=3
  )
  for step in (4, 5):
    resumed.write(step, {"loss": step + 0.5, "kl": 0.0})
  resumed.close()
  shown = _scalars_shown(board)
  losses = [1.0, 2.0, 3.0, 4.5, 5.5]
  assert [(s, v) for tag, s, v in shown if tag == "ppo/loss"] == list(enumerate(losses, 1))
  assert [s for tag, s, _ in shown if tag == "ppo/kl"] == [1, 3, 4, 5]


def test_a_response_holding_a_bar_or_lines_stays_in_its_cell_of_the_samples_table(tmp_path):
  """samples/step_N.md: a '|' in a prompt or response (code, a table the policy wrote) is escaped
  and its line breaks are <br>, so each row is one line with the header's cells; samples.jsonl
  gathers every step's rows as they were."""
  rows = [{"prompt": "a | b", "response": "x || y\n\nso:\r\nz", "score": 0.5}]
  writers.write_samples(tmp_path / "samples", 1, rows)
  writers.write_samples(tmp_path / "samples", 2, [{**rows[0], "score": 1.5}])
  lines = (tmp_path / "samples" / "step_000001.md").read_text().splitlines()
  table = [line for line in lines if line.startswith("|")]
  assert len(lines) == 5 and table == lines[2:]
  assert [line.replace("\\|", "").count("|") for line in table] == [4, 4, 4]  # 3 cells each
  assert table[2] == "| a \\| b | x \\|\\| y<br><br>so:<br>z | 0.500 |"
  written = _rows_of(tmp_path / "samples.jsonl")
  assert [(r["step"], r["score"]) for r in written] == [(1, 0.5), (2, 1.5)]
  assert written[0]["response"] == rows[0]["response"]


def test_the_tokenizers_special_ids_are_used_and_saved(smoke_run, tmp_path, capsys):
  """A checkpoint whose config.json names other EOS and pad ids than its tokenizer. SFT targets
  end with the tokenizer's EOS and sampling stops at it, so the saved model must list it first
  (transformers' ``generate`` stops there); the checkpoint's own EOS id stays as a second one."""
  import shutil

  from ppo_jax.config import Settings
  from ppo_jax.models import save_pretrained
  from ppo_jax.tokenizer import load_tokenizer

  folder = tmp_path / "model"
  shutil.copytree(smoke_run[0] / "sft", folder)
  hf_config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(
    json.dumps({**hf_config, "eos_token_id": 7, "pad_token_id": 9, "dtype": "bfloat16"})
  )
  tok = load_tokenizer(smoke_run[0] / "data" / "tokenizer")
  assert (tok.eos_token_id, tok.pad_token_id) == (1, 0)

  settings = Settings.from_config(smoke_config(model__init=str(folder)))
  policy = stages.init_policy(settings, tok, max_len=16)
  out = capsys.readouterr().out
  assert "config.json has EOS id 7 and pad id 9, the tokenizer EOS 1 and pad 0" in out
  # A bfloat16 checkpoint under the default float32: twice the size on disk, said.
  assert f"note: {folder} holds bfloat16 weights; they train and are saved in float32" in out
  cfg = policy.cfg
  assert (cfg.eos_token_id, cfg.extra_eos_token_ids, cfg.pad_token_id) == (1, (7,), 0)
  # Id 7 is a word of this tokenizer: responses would end at it, which the run notes.
  word = tok.convert_ids_to_tokens(7)
  assert compat.ordinary_stop_ids(tok, (1, 7)).startswith(f"note: stop ids 7 ({word!r}) are ordin")
  assert compat.ordinary_stop_ids(tok, (1,)) is None  # its EOS is a special token
  save_pretrained(policy, tmp_path / "saved")
  saved = tf.AutoConfig.from_pretrained(str(tmp_path / "saved"))
  assert (saved.eos_token_id, saved.pad_token_id) == ([1, 7], 0)

  # The smoke run's own folder agrees with its tokenizer: nothing to say, nothing changed.
  same = stages.init_policy(
    Settings.from_config(smoke_config(model__init=str(smoke_run[0] / "sft"))), tok, max_len=16
  )
  assert "note:" not in capsys.readouterr().out
  assert (same.cfg.eos_token_id, same.cfg.extra_eos_token_ids) == (1, ())


def test_a_pad_that_is_only_the_eos_fallback_is_not_saved():
  """GPT-2 and Llama checkpoints have no pad; load_tokenizer pads with EOS. Saving pad = EOS
  would make transformers' classifiers score before the final EOS, so the config keeps none."""
  import types

  from ppo_jax.models import ModelConfig

  gpt2 = ModelConfig.gpt2(eos_token_id=5, pad_token_id=None, bos_token_id=5)
  tok = types.SimpleNamespace(eos_token_id=5, pad_token_id=5, bos_token_id=5)
  assert stages._tokenizer_ids(gpt2, tok, "gpt2") == gpt2
  own_pad = types.SimpleNamespace(eos_token_id=5, pad_token_id=0, bos_token_id=None)
  assert stages._tokenizer_ids(gpt2, own_pad, "gpt2").pad_token_id == 0  # a real pad is kept


def test_a_skipped_stage_names_the_checkpoints_it_leaves(tmp_path, capsys):
  """A stage this config skips (sft.epochs=0, rm.enabled=False) keeps its checkpoints and says so:
  ``--noresume`` would refuse the workdir for them."""
  import types

  from conftest import smoke_config

  from ppo_jax import stages
  from ppo_jax.config import Settings

  config = smoke_config(sft__epochs=0, rm__enabled=False, ppo__critic_init="policy")
  config.reward.update(source="function", fn="reward_fns:shortness")  # no reward model needed
  s = Settings.from_config(config)
  inputs = types.SimpleNamespace(sft="sft.jsonl", preferences="pairs.jsonl")
  stages.run_sft(s, None, inputs, None, tmp_path)
  stages.run_reward_model(s, None, inputs, None, tmp_path)
  assert "note:" not in capsys.readouterr().out  # nothing left, nothing said
  for name in ("sft", "rm"):
    (tmp_path / f"{name}_checkpoints" / "40").mkdir(parents=True)
  assert stages.run_sft(s, "policy", inputs, None, tmp_path) == ("policy", {})
  assert stages.run_reward_model(s, None, inputs, None, tmp_path) == (None, {})
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
  assert [x.split()[1] for x in lines] == [
    str(tmp_path / f"{n}_checkpoints") for n in ("sft", "rm")
  ]
  assert all("which this run skips; they are left as they are" in x for x in lines)
  assert (tmp_path / "sft_checkpoints" / "40").is_dir() and (tmp_path / "rm_checkpoints").is_dir()


def test_a_finished_stage_is_reused_only_under_its_own_config(smoke_run, tmp_path):
  """sft/ and reward_model/ carry the config they were trained under: a run that would train them
  otherwise refuses in one line, before any training, and deletes nothing."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "changed")
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  for overrides, refused in [
    (
      {"sft__optim__lr": 3e-4},
      r"sft was trained under .*\(sft\.optim\.lr: 0\.01 → 0\.0003\); delete that folder \(and "
      r".*reward_model: it started from that SFT policy\)",
    ),
    (
      {"task__label_noise": 0.3},
      r"reward_model was trained under .*\(task\.label_noise: 0\.2 → 0\.3; the bytes of .*"
      r"preferences\.jsonl\)",
    ),
    ({"rm__epochs": 3.0}, r"reward_model was trained under .*\(rm\.epochs: "),
  ]:
    with pytest.raises(ValueError, match=refused) as err:
      pipeline.run(smoke_config(**overrides), workdir)
    assert "\n" not in str(err.value) and "delete that folder" in str(err.value)
  assert all(p.stat().st_mtime_ns == t for p, t in before.items())
  # sft/ deleted to train it again: the reward model it started from is refused before SFT runs.
  shutil.rmtree(workdir / "sft")
  with pytest.raises(
    ValueError,
    match=r"reward_model was trained .*\(the SFT policy it started from \(.*sft was deleted",
  ):
    pipeline.run(smoke_config(), workdir)
  assert not (workdir / "sft").exists() and not (workdir / "sft_checkpoints").exists()
  # Both deleted, PPO's checkpoints (which started from that sft/) there: refused before SFT
  # trains again, not once SFT and the reward model have trained and PPO would resume.
  shutil.rmtree(workdir / "reward_model")
  shutil.copytree(smoke_run[0] / "checkpoints", workdir / "checkpoints")
  with pytest.raises(
    ValueError,
    match=r"checkpoints holds checkpoints of a run that started from"
    r" the SFT policy in .*sft, which is gone and this run would train again",
  ):
    pipeline.run(smoke_config(), workdir)
  assert not (workdir / "sft").exists() and not (workdir / "sft_checkpoints").exists()


def test_a_summary_without_scores_says_why(capsys):
  """DPO with no held-out prompts has no before/after scores: one line says so, not an empty
  table under a header."""
  summary = {"before": {}, "after": {}, "algo": "dpo", "seconds": 3.0}
  writers.print_summary(summary)
  out = capsys.readouterr().out
  assert (
    out.startswith("no before/after scores: DPO samples no rollouts") and "before DPO" not in out
  )
  summary.update(before={"score": 0.5}, after={"score": 1.5}, algo="ppo", held_out=True)
  writers.print_summary(summary)
  out = capsys.readouterr().out
  assert out.startswith("held-out prompts") and "before PPO    after PPO" in out
  assert "0.5000       1.5000" in out
  # No held-out prompts: the first and last rollouts, labelled so (not "before PPO").
  summary.update(held_out=False, rollouts_compared=3)
  writers.print_summary(summary)
  out = capsys.readouterr().out.splitlines()
  assert out[0].split() == ["PPO", "rollouts", "first", "3", "last", "3"]
  # One rollout (one iteration, no held-out prompts): a before, no after.
  summary.update(before={"score": 0.5}, after={}, rollouts_compared=1)
  writers.print_summary(summary)
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("the one rollout ") and out[1].split()[-2:] == ["0.5000", "—"]


def test_a_hugging_face_qwen3_folder_through_the_whole_pipeline(tmp_path, capsys):
  """`model.init` = a Qwen3 folder (per-head q/k norms, GQA, head_dim ≠ hidden/heads, untied),
  with its tokenizer (and chat template) and JSONL data (SFT and preference rows as
  conversations): SFT → reward model → PPO run on chat prompts, and the exported policy is a
  Qwen3 that transformers loads with ppo_jax's logits."""
  import tiny_hf

  from ppo_jax.tokenizer import build_word_tokenizer

  folder = tmp_path / "qwen3"
  tiny_hf.make("qwen3", folder, seed=11)
  words = [f"w{i}" for i in range(tiny_hf.VOCAB - 7)]
  tok = build_word_tokenizer([*words, "<user>", "<bot>", "<end>"])
  tok.chat_template = (
    "{% for m in messages %}<user> {{ m.content }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
  )
  tok.add_special_tokens({"additional_special_tokens": ["<end>"]})  # the turn's end: not EOS
  end = tok.convert_tokens_to_ids("<end>")
  tok.save_pretrained(str(folder))
  defaults = {"eos_token_id": [5, 7], "do_sample": True, "temperature": 0.6}
  (folder / "generation_config.json").write_text(json.dumps(defaults))
  rng = np.random.default_rng(0)
  line = lambda n: " ".join(rng.choice(words[:20], n))
  turn = lambda role, n: {"role": role, "content": line(n)}
  # SFT and preference rows in the conversational forms of chat datasets.
  files = {
    "prompts": [{"prompt": line(4)} for _ in range(64)],
    "sft": [{"messages": [turn("user", 4), turn("assistant", 6)]} for _ in range(64)],
    "preferences": [
      {
        "chosen": [user := turn("user", 4), turn("assistant", 5)],
        "rejected": [user, turn("assistant", 5)],
      }
      for _ in range(64)
    ],
  }
  for name, rows in files.items():
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  config = smoke_config(
    task__name="files",
    model__init=str(folder),
    data__prompts=str(tmp_path / "prompts.jsonl"),
    data__sft=str(tmp_path / "sft.jsonl"),
    data__preferences=str(tmp_path / "preferences.jsonl"),
    data__chat_template=True,
    data__max_prompt_len=8,  # 4 words in the template's 3 tokens
    data__max_response_len=8,
    data__eval_prompts=0,
    sft__epochs=1.0,
    rm__epochs=1.0,
    rm__center_coef=0.5,
    ppo__iterations=2,
    ppo__batch_size=16,
    ppo__max_new_tokens=8,
    log__samples_every=1,
    log__tensorboard=False,
    log__plots=False,
  )
  workdir = tmp_path / "run"
  summary = pipeline.run(config, workdir)
  assert f"ends an assistant turn with <end> (id {end})" in capsys.readouterr().out
  rows = _rows(workdir)
  assert len(rows) == 2 and all(np.isfinite(r["objective/kl"]) for r in rows)
  rm_rows = _rows_of(workdir / "rm_metrics.jsonl")  # the centering term is in the loss
  assert all(r["loss"] == pytest.approx(r["nll"] + 0.5 * r["center"], rel=1e-5) for r in rm_rows)
  assert any(r["center"] > 0.01 for r in rm_rows)
  # No held-out prompts and two iterations: the first rollout against the last, not both twice.
  assert summary["rollouts_compared"] == 1 and summary["before"] != summary["after"]
  assert rows[0]["policy/approxkl_first_minibatch"] < 1e-6
  samples = [json.loads(x) for x in (workdir / "samples.jsonl").read_text().splitlines()]
  assert samples and all(x["prompt"].count(" ") == 3 for x in samples)  # the user's text
  exported_tok = tf.AutoTokenizer.from_pretrained(str(workdir / "policy"))
  assert exported_tok.chat_template == tok.chat_template
  # The tokenizer's EOS first, the checkpoint's stop ids after, then the template's turn end the
  # responses were trained to end with; its sampling defaults kept.
  gen = json.loads((workdir / "policy" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [tok.eos_token_id, 5, 7, end] and gen["temperature"] == 0.6
  export_policy(workdir, tmp_path / "exported")  # from the last checkpoint: the same file
  exported = tmp_path / "exported" / "generation_config.json"
  assert json.loads(exported.read_text()) == gen
  hf_config = json.loads((workdir / "policy" / "config.json").read_text())
  assert hf_config["model_type"] == "qwen3" and hf_config["architectures"] == ["Qwen3ForCausalLM"]
  rm_config = json.loads((workdir / "reward_model" / "config.json").read_text())
  assert rm_config["architectures"] == ["Qwen3ForSequenceClassification"]
  policy = safetensors.numpy.load_file(str(workdir / "policy" / "model.safetensors"))
  start = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  norm = "model.layers.0.self_attn.q_norm.weight"
  assert not np.array_equal(policy[norm], start[norm])  # the q/k norms were trained too
  hf_model = tf.AutoModelForCausalLM.from_pretrained(str(workdir / "policy")).eval()
  ours = pj.models.from_pretrained(workdir / "policy")
  ids, mask = tiny_hf.batch(seed=12)
  np.testing.assert_allclose(
    np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[mask > 0],
    tiny_hf.torch_logits(hf_model, ids, mask)[mask > 0],
    atol=1e-4,
  )


def test_the_reward_model_starts_from_the_sft_policys_trunk_unless_rm_init_is_scratch(
  tmp_path, monkeypatch
):
  """rm.init='policy' (the default): the reward model trains from the SFT policy's trunk;
  rm.init='scratch': from its own seed."""
  import types

  from flax import nnx

  from ppo_jax import data
  from ppo_jax.models import CausalLM, ModelConfig

  rows = np.ones((2, 4), np.int32)
  seqs = data.Sequences(rows, rows, np.ones((2, 2), bool))
  monkeypatch.setattr(stages, "load_preference_split", lambda *a: ((seqs, seqs), (seqs, seqs)))
  trained = []

  def train_and_save(s, name, model, *args, **kw):
    trained.append(model)
    return model, {}

  monkeypatch.setattr(stages, "_train_and_save", train_and_save)
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  policy = CausalLM(cfg, rngs=nnx.Rngs(0))
  inputs = types.SimpleNamespace(preferences="pairs.jsonl", tokenizer=None)
  for init in ("policy", "scratch"):
    s = Settings.from_config(smoke_config(rm__init=init))
    stages.run_reward_model(s, policy, inputs, None, tmp_path)
  weights = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))
  from_policy, from_scratch = trained
  assert same(from_policy.trunk, policy.trunk) and not same(from_scratch.trunk, policy.trunk)


def test_lora_targets_are_checked_only_by_a_run_that_goes_on_to_the_rl_stage():
  """A run that stops after SFT or the reward model trains no adapters: targets its model lacks
  are refused, before any training, only by a run that goes on to PPO."""

  class Tokenizer:
    eos_token_id, pad_token_id, bos_token_id = 1, 0, None

    def __len__(self):
      return 16

  lora = {"ppo__lora_rank": 4, "ppo__lora_targets": "q,gate"}
  for stop_after in ("sft", "rm"):
    s = Settings.from_config(smoke_config(stop_after=stop_after, **lora))
    assert stages.init_policy(s, Tokenizer(), max_len=16).cfg.model_type == "gpt2"
  with pytest.raises(ValueError, match=r"lora_targets 'q,gate': this gpt2 model has no gate"):
    stages.init_policy(Settings.from_config(smoke_config(**lora)), Tokenizer(), max_len=16)


def test_a_run_stops_after_sft_with_a_summary_of_it_and_no_reward_model(
  smoke_run, tmp_path, capsys
):
  """config.stop_after='sft': the SFT stage (here the smoke run's, loaded) and a summary of it;
  no reward model trained, no RL stage."""
  workdir = reuse_stages(smoke_run[0], tmp_path / "sft_only", stages=("sft",))
  config = smoke_config(stop_after="sft", log__plots=False, log__tensorboard=False)
  summary = pipeline.run(config, workdir)
  out = capsys.readouterr().out
  assert "loading it instead of training" in out and "2/3 reward model" not in out
  assert summary["stop_after"] == "sft" and summary["sft_eval"] == smoke_run[1]["sft_eval"]
  assert json.loads((workdir / "summary.json").read_text())["stop_after"] == "sft"
  outputs = {p.name for p in workdir.iterdir()}
  assert not {"reward_model", "rm_checkpoints", "policy", "checkpoints"} & outputs, outputs


def test_a_finished_sft_folder_is_refused_not_passed_over_by_a_run_that_skips_sft(tmp_path):
  """sft/ trained by an earlier run, and now sft.epochs=0: the folder is refused (deleting it goes
  without SFT), not silently passed over while the later stages start from the untrained
  policy."""
  import types

  from flax import nnx

  from ppo_jax.models import CausalLM, ModelConfig

  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  cfg = ModelConfig.gpt2(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  stages._save(
    Settings.from_config(smoke_config()), "sft", str(data), model, tmp_path / "sft", None, {}
  )
  skipped = Settings.from_config(smoke_config(sft__epochs=0))
  inputs = types.SimpleNamespace(sft=str(data))
  with pytest.raises(ValueError, match=r"trained under .*\(sft\.epochs: [\d.]+ → 0\.0\); delete"):
    stages.run_sft(skipped, "policy", inputs, None, tmp_path)
