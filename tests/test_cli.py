"""The command line (in this process): bad input gets one line naming the problem."""

import contextlib
import io
import json
import re
import sys
import time

import jax
import pytest
from conftest import ROOT

import ppo_jax as pj
from ppo_jax import main

EXPERIMENT = str(ROOT / "experiments" / "default.py")


def _cli(*args):
  """``ppo-jax ARGS`` in this process: (exit status, stdout, stderr). The console script itself
  runs as a program in test_checkpoint.py (the preemption test resumes with it)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main.cli(["ppo-jax", *args])
  return code, out.getvalue(), err.getvalue().strip()


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.ppo.lrr=1e-5", "unknown config field 'ppo.lrr'"),
    ("--config.ppo.optim.lrr=1e-5", "field 'ppo.optim.lrr'; did you mean 'ppo.optim.lr'?"),
    ("--config.pppo.lr=1", "unknown config field 'pppo.lr'; did you mean 'ppo'?"),
    ("--config.ppo.lr=1", "unknown config field 'ppo.lr'; did you mean 'ppo.optim.lr'?"),
    ("--config.lr=1", "field 'lr'; did you mean one of 'dpo.optim.lr', 'ppo.optim.lr', 'rm.optim"),
    ("--config.PPO.kl_coef=1", "unknown config field 'PPO.kl_coef'; did you mean 'ppo.kl_coef'?"),
    ("--config.ppo.KL_coef=1", "field 'ppo.KL_coef'; did you mean 'ppo.kl_coef'?"),
    ("--config.ppo.clip_eps=abc", "config.ppo.clip_eps: expected a number, got 'abc'"),
    ("--config.ppo.iterations=1.5", "config.ppo.iterations: expected an integer, got '1.5'"),
    ("--config.log.progress=maybe", "config.log.progress: expected true or false, got 'maybe'"),
    ("--config.ppo.agg=mean", "config.ppo.agg: unknown 'mean'"),
    ("--config.reward.source=function", "needs config.reward.fn="),
    (
      "--config.data.prompts=/nowhere.jsonl",
      "config.data.prompts is set, but config.task.name='synthetic' makes its own data: add "
      "config.task.name=files to train on the file (or drop config.data.prompts)",
    ),
    ("--config.data.preferences=p.jsonl", "config.data.preferences is set, but config.task.name="),
    (
      "--config.reward.fn=m:f",
      "config.reward.fn is set, but config.reward.source='model' scores with a reward model: add "
      "config.reward.source=function",
    ),
    (
      [
        "--config.reward.source=function",
        "--config.reward.fn=m:f,m:g",
        "--config.reward.weights=1",
      ],
      "config.reward.weights '1': 1 weight for 2 functions",
    ),
    ("--config.reward.weights=1", "config.reward.weights is set, but no config.reward.fn to weigh"),
    (  # the function given is named before the reward model it lacks
      ["--config.rm.enabled=False", "--config.reward.fn=m:f"],
      "config.reward.fn is set, but config.reward.source='model' scores with a reward model",
    ),
    (
      [
        "--config.task.name=files",
        "--config.data.prompts=p.jsonl",
        "--config.reward.source=function",
        "--config.reward.fn=m:f",
      ],
      "needs config.data.preferences=FILE.jsonl to train a reward model (config.reward.source="
      "'function' scores without one: add config.rm.enabled=False)",
    ),
    ("--config.mesh.shape=(0,1,1)", "config.mesh.shape: sizes must be ≥ 1, with at most one -1"),
    ("--config.mesh.shape=(-1,-1,1)", "config.mesh.shape: sizes must be ≥ 1, with at most one"),
    ("--config.ppo.critic_warmup=100000", "critic_warmup 100000 ≥ config.ppo.iterations"),
    ("--config.ppo.batch_size=0", "config.ppo.batch_size: must be ≥ 1, got 0"),
    ("--config.ppo.top_p=1.5", "config.ppo.top_p: must be in (0, 1], got 1.5"),
    ("--config.checkpoint.every=0", "config.checkpoint.every and .keep: must be ≥ 1"),
    ("--config.ppo.temperature=0", "config.ppo.temperature: must be > 0, got 0.0"),
    ("--config.ppo.kl_coef=-0.1", "config.ppo.kl_coef: must be ≥ 0, got -0.1"),
    ("--config.ppo.top_k=-5", "config.ppo.top_k: must be ≥ 0 (0: off), got -5"),
    ("--config.ppo.num_minibatches=3", "config.ppo.batch_size 64 is not divisible by ppo.num_"),
    ("--config.sft.batch_size=0", "config.sft.batch_size: must be ≥ 1, got 0"),
    ("--config.sft.epochs=-1", "config.sft.epochs: must be ≥ 0, got -1"),
    ("--config.rm.epochs=0", "config.rm.epochs: must be > 0 (config.rm.enabled=False skips the"),
    (["--config.algo=dpo", "--config.dpo.epochs=0"], "config.dpo.epochs: must be > 0, got 0"),
    ("--config.dpo.loss=kto", "config.dpo.loss: unknown 'kto'; expected one of sigmoid, ipo, hin"),
    ("--config.dpo.rpo_alpha=-1", "config.dpo.rpo_alpha: must be ≥ 0 (0: none), got -1.0"),
    (
      ["--config.dpo.loss=ipo", "--config.dpo.label_smoothing=0.1"],
      "config.dpo.label_smoothing: conservative DPO's ε applies to loss='sigmoid', not 'ipo'",
    ),
    (  # silently unused before
      ["--config.algo=dpo", "--config.reward.source=function", "--config.reward.fn=m:f"],
      "config.reward.fn is set, but DPO uses no reward: drop it",
    ),
    (
      ["--config.algo=dpo", "--config.reward.model=rm"],
      "config.reward.model is set, but DPO uses no reward: drop it",
    ),
    (
      ["--config.algo=rloo", "--config.ppo.group_size=4", "--config.ppo.value_head_on_policy=True"],
      "config.ppo.value_head_on_policy: rloo has no critic to put a head on; leave it off",
    ),
    ("--config.rm.eval_fraction=1.0", "config.rm.eval_fraction: must be in [0, 1), got 1.0"),
    ("--config.data.max_response_len=0", "config.data.max_prompt_len and .max_response_len"),
    ("--config.log.samples_every=-1", "config.log.samples_every: must be ≥ 0 (0: never)"),
    ("--config.ppo.lora_rank=-2", "config.ppo.lora_rank: must be ≥ 0 (0: no LoRA), got -2"),
    ("--config.ppo.lora_targets=q,x", "config.ppo.lora_targets: 'q,x'; expected a comma-separated"),
    ("--config.model.num_heads=3", "hidden_size 64 is not divisible by config.model.num_heads 3"),
    ("--config.rm.init=foo", "config.rm.init: unknown 'foo'; expected one of policy, scratch"),
    ("--config.rm.center_coef=-0.01", "config.rm.center_coef: must be ≥ 0, got -0.01"),
    ("--config.model.remat=full", "config.model.remat: unknown 'full'; expected one of none, bl"),
    ("--config.model.dtype=float64", "config.model.dtype: unknown 'float64'; expected one of flo"),
    (
      "--config.model.attention=flash",
      "config.model.attention: unknown 'flash'; expected one of x",
    ),
    ("--config.model.attention=cudnn", "config.model.attention='cudnn' computes in bfloat16 or f"),
    ("--config.data.prompt_overflow=drop", "config.data.prompt_overflow: unknown 'drop'; expect"),
    ("--config.task.label_noise=0", "config.task.label_noise: must be > 0"),
    ("--config.ppo.micro_batch_size=5", "config.ppo.micro_batch_size 5 does not divide the mini"),
    ("--config.sft.micro_batch_size=5", "config.sft.micro_batch_size: 5 does not divide batch_s"),
    (
      "--config.distributed.process_id=1",
      "config.distributed.process_id: needs distributed.coordinator (or JAX_COORDINATOR_ADDRESS)",
    ),
    (
      ["--config.distributed.num_processes=2", "--config.distributed.process_id=2"],
      "config.distributed.process_id: must be in [0, num_processes), got 2",
    ),
    ("--config.ppo.optim.lr=None", "config.ppo.optim.lr: cannot be None"),
    ("--config.model.num_heads=0", "config.model.num_heads: must be ≥ 1, got 0"),
    ("--config.model.num_kv_heads=0", "config.model.num_kv_heads: must be ≥ 1 (none: num_heads)"),
    ("--config.ppo.iterations=0", "config.ppo.iterations: must be ≥ 1, got 0"),
    ("--config.data.eval_prompts=-1", "config.data.eval_prompts: must be ≥ 0, got -1"),
    ("--config.ppo.dual_clip=1.0", "config.ppo.dual_clip: must be > 1 (none: off), got 1.0"),
    ("--config.ppo.kl_target=0", "config.ppo.kl_target: must be > 0, got 0.0"),
    ("--config.data.chat_template=True", "config.data.chat_template: the synthetic task's word"),
    ("--config.data.system_prompt=Be brief.", "config.data.system_prompt: needs config.data.chat_"),
    (
      [
        "--config.task.name=files",
        "--config.data.prompts=p.jsonl",
        "--config.model.tokenizer=t",
        "--config.data.chat_template=True",
        "--config.data.prompt_overflow=truncate",
      ],
      "config.data.prompt_overflow='truncate' would cut the chat template's start",
    ),
    (
      '--config.data.chat_template_kwargs={"enable_thinking": false}',
      "config.data.chat_template_kwargs: needs config.data.chat_template=True",
    ),
    (
      [
        "--config.task.name=files",
        "--config.data.prompts=p.jsonl",
        "--config.model.tokenizer=t",
        "--config.data.chat_template=True",
        "--config.data.chat_template_kwargs={enable_thinking: false}",
      ],
      "config.data.chat_template_kwargs: not valid JSON (Expecting property name enclosed in",
    ),
    ("--config.ppo.extra_eos_token_ids=(3,)", "'ppo.extra_eos_token_ids' is not set by the config"),
    ("--config.ppo.kl_mode=loss", "config.ppo.kl_kind: k1 as a loss term (kl_mode loss) has no"),
    (
      ["--config.ppo.kl_adaptive=True", "--config.ppo.kl_coef=0"],
      "config.ppo.kl_coef: the adaptive controller scales β, so it cannot start at 0",
    ),
    (
      ["--config.ppo.kl_adaptive=True", "--config.ppo.kl_horizon=10"],
      "config.ppo.kl_horizon 10 must exceed 0.2 × config.ppo.batch_size (12.8): below its target",
    ),
    (
      ["--config.algo=grpo", "--config.ppo.group_size=4", "--config.ppo.whiten_rewards=True"],
      "config.ppo.whiten_rewards: the grpo estimator compares each score with its group's",
    ),
    ("--config.sft.optim.lr=nan", "config.sft.optim.lr: must be a finite number, got nan"),
    (
      "--config.mesh.shape=(a,1,1)",
      "expected three integers (data, fsdp, tensor), e.g. '(1,-1,1)', got '(a,1,1)'",
    ),
    ("--config.ppo", "--config.ppo: no value (a field is --config.SECTION.FIELD=VALUE)"),
    ("--workdirr=w", "config error: unknown flag --workdirr; did you mean --workdir?"),
    ("--config.mesh.shape=(1,1)", "config.mesh.shape: expected three integers (data, fsdp, tens"),
    ("--config.ppo.optim.lr=inf", "config.ppo.optim.lr: must be a finite number, got inf"),
    ("--config.ppo.lam=1.5", "config.ppo.lam: must be in [0, 1], got 1.5"),
    ("--config.ppo.gamma=-0.1", "config.ppo.gamma: must be in [0, 1], got -0.1"),
    ("--config.ppo.vf_clip=0", "config.ppo.vf_clip: must be > 0 (none: off), got 0.0"),
    ("--config.ppo.vf_coef=-1", "config.ppo.vf_coef: must be ≥ 0, got -1.0"),
    ("--config.ppo.clip_eps_high=0", "config.ppo.clip_eps_high: must be > 0, got 0.0"),
    (
      ["--config.algo=dpo", "--config.ppo.lora_rank=4", "--config.ppo.lora_targets=q,x"],
      "config.ppo.lora_targets: 'q,x'; expected a comma-separated subset of",
    ),
    ("--config.seed=-1", "config.seed: must be ≥ 0, got -1"),  # was an error mid-SFT
    ("--config.stop_after=ppo", "config.stop_after: unknown 'ppo'; expected 'sft', 'rm' or ''"),
    (
      ["--config.stop_after=rm", "--config.algo=dpo"],
      "config.stop_after='rm': this run trains no reward model (DPO learns from the pairs)",
    ),
    (
      ["--config.stop_after=rm", "--config.reward.model=rm"],
      "config.stop_after='rm': this run trains no reward model (config.reward.model gives one)",
    ),
    (
      ["--config.stop_after=sft", "--config.sft.epochs=0"],
      "config.stop_after='sft': this run trains no SFT policy (config.sft.epochs=0)",
    ),
    ("--config.model.num_kv_heads=2", "config.model.num_kv_heads: GPT-2 has as many key/value"),
    ("--config=experiments/dpo.py", f"--config given 2 times ({EXPERIMENT}, experiments/dpo.py)"),
    (  # absl's space form counts too
      ["--config", "experiments/dpo.py", "--config.ppo.batch_size=0"],
      f"--config given 2 times ({EXPERIMENT}, experiments/dpo.py)",
    ),
    ("--config.kl_coeff=0.1", "unknown config field 'kl_coeff'; did you mean 'ppo.kl_coef'?"),
    (["--workdir= ", "--config.ppo.batch_size=0"], "--workdir is empty; name the run's output"),
  ],
)
def test_config_errors_are_one_line(tmp_path, override, expected):
  overrides = override if isinstance(override, list) else [override]
  code, _, err = _cli(f"--config={EXPERIMENT}", f"--workdir={tmp_path / 'w'}", *overrides)
  assert code == 2
  assert err.count("\n") == 0 and err.startswith("ppo-jax: config error:"), err
  assert expected in err
  assert not (tmp_path / "w").exists()  # refused before anything is written


def test_what_a_run_does_not_use_is_not_refused(tmp_path):
  """rm.epochs=0 without a reward model to train, critic_init='reward_model' with the value head
  on the policy (which ignores it): accepted. A None an experiment file sets is named."""
  from ppo_jax.config import Settings, load_experiment
  from ppo_jax.finished import nothing_to_do
  from ppo_jax.workdir import stages_trained

  config = load_experiment(ROOT / "experiments" / "default.py", None)
  config.reward.update(source="function", fn="reward_fns:shortness")
  config.rm.update(enabled=False, epochs=0.0)
  config.ppo.value_head_on_policy = True
  assert Settings.from_config(config).ppo_run.critic_init == "reward_model"
  config.ppo.value_head_on_policy = False
  with pytest.raises(ValueError, match="critic_init='reward_model' needs a reward model"):
    Settings.from_config(config)
  # A reward model alone from files: no prompts file.
  alone = load_experiment(ROOT / "experiments" / "default.py", None)
  alone.task.name, alone.model.tokenizer, alone.data.preferences = "files", "t", "p.jsonl"
  with pytest.raises(ValueError, match=r"data\.prompts=FILE\.jsonl \(or config\.stop_"):
    Settings.from_config(alone)
  alone.stop_after = "rm"
  assert Settings.from_config(alone).stop_after == "rm"
  alone.data.preferences = None  # what an RM-only run needs: no other way out
  with pytest.raises(
    ValueError, match=r"needs config\.data\.preferences=FILE\.jsonl to train a reward model$"
  ):
    Settings.from_config(alone)
  alone.data.preferences = "p.jsonl"
  for arg in (None, "smoke"):  # experiments/reward_model.py: the default experiment up to the RM
    rm_only = load_experiment(ROOT / "experiments" / "reward_model.py", arg)
    assert Settings.from_config(rm_only).stop_after == "rm"
    rm_only.stop_after = ""
    default = load_experiment(ROOT / "experiments" / "default.py", arg)
    assert rm_only.to_dict() == default.to_dict()
  # The RL stage's fields are not checked together where it does not run: SFT alone with no
  # reward at all, a GRPO config without its group size.
  alone.update(stop_after="sft", algo="grpo")
  alone.data.update(sft="s.jsonl", preferences=None)
  alone.rm.enabled = False
  assert Settings.from_config(alone).stop_after == "sft"
  alone.rm.enabled = True  # a reward model it would train without stop_after: not this run's
  sft_only = Settings.from_config(alone)
  now = json.loads(alone.to_json_best_effort())
  hint = nothing_to_do(sft_only, tmp_path, {"config": now}, now)  # what going on needs
  assert hint.endswith(
    "drop config.stop_after (--config.stop_after=) and give config.data.prompts and "
    "config.data.preferences: the next stages start from its sft/). Its summary:"
  )
  alone.data.preferences = "p.jsonl"
  will = stages_trained(Settings.from_config(alone), tmp_path)
  assert will == {"sft": True, "rm": False, "ppo": False, "dpo": False}
  dpo = load_experiment(ROOT / "experiments" / "dpo.py", None)
  dpo.rm.epochs = 0.0  # DPO trains no reward model
  Settings.from_config(dpo)
  dpo.ppo.gamma = None
  with pytest.raises(ValueError, match=r"^config\.ppo\.gamma: cannot be None$"):
    Settings.from_config(dpo)


FILES = {"task.name": "files", "model.tokenizer": "t", "data.preferences": "p.jsonl"}


@pytest.mark.parametrize(
  "fields,expected",
  [
    ({"distributed.num_processes": 0}, "config.distributed.num_processes: must be ≥ 1, got 0"),
    ({"ppo.group_std_scope": "all"}, "config.ppo.group_std_scope: unknown 'all'; expected one of"),
    ({"log.num_samples": -1}, "config.log.num_samples: must be ≥ 0, got -1"),
    ({"ppo.max_nonfinite": 0}, "config.ppo.max_nonfinite: must be ≥ 1, got 0"),
    ({"checkpoint.keep": 0}, "config.checkpoint.every and .keep: must be ≥ 1, got 10 and 0"),
    ({"checkpoint.supervised_every": -1}, "config.checkpoint.supervised_every: must be ≥ 0"),
    ({"ppo.critic_lr_scale": 0.0}, "config.ppo.critic_lr_scale: must be > 0, got 0.0"),
    ({"ppo.early_stop_kl": 0.0}, "config.ppo.early_stop_kl: must be > 0 (none: off), got 0.0"),
    ({"ppo.micro_batch_size": 0}, "config.ppo.micro_batch_size: must be ≥ 1, got 0"),
    ({"ppo.num_minibatches": 0}, "config.ppo.num_minibatches: must be ≥ 1, got 0"),
    ({"ppo.kl_horizon": 0.0}, "config.ppo.kl_horizon: must be > 0, got 0.0"),
    (
      {"ppo.iterations": 10, "ppo.critic_warmup": 10},
      "config.ppo.critic_warmup 10 ≥ config.ppo.iterations 10: the policy would never train",
    ),
    (
      {"algo": "grpo", "ppo.group_size": 3},
      "config.ppo.batch_size 64 is not divisible by config.ppo.group_size 3",
    ),
    (
      {"algo": "grpo", "ppo.group_size": 4, "rm.enabled": False},
      "config.reward.source='model' needs config.rm.enabled=True or config.reward.model=FOLDER",
    ),
    (
      {
        "ppo.fuse": True,
        "ppo.critic_init": "policy",
        "reward.source": "function",
        "reward.fn": "m:f",
        "rm.enabled": False,
      },
      "config.ppo.fuse=True needs reward.source='model'",
    ),
    (
      {"data.sft": "s.jsonl"},
      "config.data.sft is set, but config.task.name='synthetic' makes its own data",
    ),
    (
      {**FILES, "stop_after": "sft"},
      "config.stop_after='sft': this run trains no SFT policy (no config.data.sft=FILE.jsonl)",
    ),
    (
      {**FILES, "data.prompts": "p.jsonl", "data.system_prompt": "Be brief."},
      "config.data.system_prompt: needs config.data.chat_template=True",
    ),
  ],
)
def test_a_value_the_run_would_misuse_is_refused_naming_its_field(fields, expected):
  from ppo_jax.config import Settings, load_experiment

  config = load_experiment(EXPERIMENT)
  config.update_from_flattened_dict(fields)
  with pytest.raises(ValueError, match="^" + re.escape(expected)):
    Settings.from_config(config)


def test_the_edges_of_each_range_are_accepted():
  """The smallest and largest values each check allows: a myopic γ = 0, λ at 0 and 1, a critic
  warm-up one iteration short of the run, no held-out prompts, no samples and no supervised
  checkpoints but at the end, a KL horizon just over the adaptive controller's bound."""
  from ppo_jax.config import Settings, load_experiment

  config = load_experiment(EXPERIMENT)
  config.ppo.update(gamma=0.0, lam=0.0, iterations=10, critic_warmup=9, top_p=1.0, kl_coef=0.1)
  config.ppo.update(early_stop_kl=1e-9, dual_clip=1.001, kl_adaptive=True, kl_horizon=12.81)
  config.ppo.update(micro_batch_size=1, top_k=0)
  config.data.eval_prompts = 0
  config.log.update(num_samples=0, samples_every=0)
  config.checkpoint.supervised_every = 0
  settings = Settings.from_config(config)
  hp = settings.ppo(eos_token_id=1, pad_token_id=0)
  assert (hp.gamma, hp.lam, hp.critic_warmup, hp.kl_horizon) == (0.0, 0.0, 9, 12.81)
  config.ppo.update(gamma=1.0, lam=1.0)
  assert Settings.from_config(config).ppo(eos_token_id=1, pad_token_id=0).lam == 1.0


@pytest.mark.parametrize("algo,estimator", [("ppo", "gae"), ("grpo", "grpo"), ("rloo", "rloo")])
def test_each_algo_trains_with_its_own_advantage_estimator(algo, estimator):
  from ppo_jax.config import Settings, load_experiment

  config = load_experiment(ROOT / "experiments" / ("default.py" if algo == "ppo" else f"{algo}.py"))
  assert config.algo == algo
  hp = Settings.from_config(config).ppo(eos_token_id=1, pad_token_id=0)
  assert hp.estimator == estimator


def test_a_scratch_models_parameters_are_kept_in_param_dtype_else_the_compute_dtype():
  from ppo_jax.config import ModelSettings

  same = ModelSettings(dtype="bfloat16").scratch_config(32)
  assert (same.dtype, same.param_dtype) == ("bfloat16", "bfloat16")
  mixed = ModelSettings(dtype="bfloat16", param_dtype="float32", arch="llama").scratch_config(32)
  assert (mixed.dtype, mixed.param_dtype) == ("bfloat16", "float32")


def test_a_files_run_is_checked_for_its_data_before_any_work(tmp_path):
  (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
  files = [f"--config={EXPERIMENT}", f"--workdir={tmp_path / 'w'}", "--config.task.name=files"]
  files += [f"--config.data.prompts={tmp_path / 'p.jsonl'}", "--config.model.tokenizer=/nowhere"]
  code, _, err = _cli(*files)
  assert code == 2 and err.endswith(
    "config.task.name='files' needs config.data.preferences=FILE.jsonl to train a reward model "
    "(or give one, config.reward.model=FOLDER, or use a reward function with "
    "config.rm.enabled=False)"
  ), err
  code, _, err = _cli(*files, "--config.algo=dpo")
  assert code == 2 and err.endswith("needs config.data.preferences=FILE.jsonl to train DPO"), err
  code, _, err = _cli(*files[:-1], f"--config.data.preferences={tmp_path / 'p.jsonl'}")
  assert code == 2 and err.endswith(
    "config.task.name='files' with config.model.init='scratch' needs config.model.tokenizer"
  ), err
  code, _, err = _cli(*files, f"--config.data.preferences={tmp_path / 'pairs.jsonl'}")
  assert code == 1 and err.endswith(
    f"config.data.preferences: {tmp_path / 'pairs.jsonl'}: no such file"
  ), err
  code, _, err = _cli(
    *files, f"--config.data.preferences={tmp_path / 'p.jsonl'}", f"--config.data.sft={tmp_path}"
  )
  assert code == 1 and err.endswith(
    f"config.data.sft: {tmp_path}: is a folder; expected a JSONL file"
  ), err
  code, _, err = _cli(*files, f"--config.data.preferences={tmp_path / 'p.jsonl'}")
  assert code == 1 and err.endswith("config.model.tokenizer: /nowhere: no such folder"), err
  assert not (tmp_path / "w").exists()  # all refused before the workdir is made


def test_a_config_file_that_does_not_parse_is_one_line(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  code, _, err = _cli(f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'w'}")
  assert code == 2 and err.count("\n") == 0 and "SyntaxError: invalid syntax (bad.py" in err, err


@pytest.mark.parametrize(
  "source,expected",
  [
    ("def get_config(arg):\n  raise RuntimeError('boom')\n", "x.py: RuntimeError: boom"),
    ("import no_such_package\n", "x.py: ModuleNotFoundError: No module named 'no_such_package'"),
    ("CONFIG = 1\n", "x.py: AttributeError: it defines no get_config()"),
    ("def get_config(arg):\n  return {'seed': 0}\n", "returned dict, not a ConfigDict"),
  ],
)
def test_an_experiment_file_that_fails_is_one_line(tmp_path, source, expected):
  (tmp_path / "x.py").write_text(source)
  code, _, err = _cli(f"--config={tmp_path / 'x.py'}", f"--workdir={tmp_path / 'w'}")
  assert code == 2 and err.count("\n") == 0 and expected in err, err


def test_a_config_folder_and_a_bad_export_step_are_one_line(tmp_path):
  code, _, err = _cli(f"--config={ROOT / 'experiments'}", f"--workdir={tmp_path / 'w'}")
  assert code == 2 and "experiments is a folder; expected a python file" in err, err
  code, _, err = _cli("export", f"--workdir={tmp_path}", "--step", "latest", "--out", "x")
  assert (
    code == 2 and err == "ppo-jax export: error: argument --step: 'latest' is not a step number"
  )


def test_export_names_the_checkpoints_it_cannot_choose_between(tmp_path):
  export = lambda *a: _cli("export", f"--workdir={tmp_path}", "--out", str(tmp_path / "x"), *a)
  code, _, err = export()
  assert code == 1 and err.endswith(
    "no checkpoints/ or dpo_checkpoints/ to export (not a ppo_jax workdir, or a run stopped "
    "before its first checkpoint)"
  ), err
  (tmp_path / "policy").mkdir()
  code, _, err = export()
  assert code == 1 and err.endswith(f"(its finished policy is {tmp_path / 'policy'}, already a "
                                    "Hugging Face folder)"), err  # fmt: skip
  (tmp_path / "policy").rmdir()
  code, _, err = _cli("export", f"--workdir={tmp_path / 'none'}", "--out", str(tmp_path / "x"))
  assert (
    code == 1 and err == f"ppo-jax export: error: --workdir {tmp_path / 'none'}: no such folder"
  )
  # A flag's typo is named before the flags it leaves missing; no abbreviations.
  code, _, err = _cli("export", "--outt", str(tmp_path / "x"), f"--workdir={tmp_path}")
  assert code == 2 and err == "ppo-jax export: error: unknown flag --outt; did you mean --out?"
  code, _, err = _cli("export", "--work", str(tmp_path), "--out", str(tmp_path / "x"))
  assert code == 2 and err == "ppo-jax export: error: unknown flag --work; did you mean --workdir?"
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
  (tmp_path / "dpo_checkpoints").mkdir()  # empty (a stage stopped before its first save): not one
  code, _, err = export()
  assert code == 1 and err.endswith("/checkpoints: no complete checkpoint"), err
  (tmp_path / "dpo_checkpoints" / "notes.txt").write_text("not a checkpoint")
  code, _, err = export()
  assert code == 1 and err.endswith(
    "holds both PPO (checkpoints/) and DPO (dpo_checkpoints/) checkpoints: choose one with "
    "--stage ppo or --stage dpo"
  ), err
  code, _, err = export("--stage", "dpo")  # chosen: that folder's own complaint
  assert code == 1 and err.endswith("dpo_checkpoints: no complete checkpoint"), err
  code, _, err = export("--stage", "sft")
  assert code == 2 and err.startswith("ppo-jax export: error: argument --stage: invalid choice")
  code, out, _ = _cli("export", "--help")
  assert code == 0 and "--stage {ppo,dpo}" in out
  code, _, err = _cli("export", "--out", "x")
  assert (
    code == 2 and err == "ppo-jax export: error: the following arguments are required: --workdir"
  )


def test_reward_and_gold_functions_are_imported_before_any_training(tmp_path):
  code, _, err = _cli(
    f"--config={EXPERIMENT}:smoke", f"--workdir={tmp_path / 'w'}", "--config.task.gold=nosuch:f"
  )
  assert code == 1 and "config.task.gold 'nosuch:f': cannot import 'nosuch'" in err, err
  assert not (tmp_path / "w" / "sft").exists()


def test_lora_targets_the_model_lacks_are_refused_before_any_training(tmp_path):
  code, _, err = _cli(
    f"--config={EXPERIMENT}:smoke",
    f"--workdir={tmp_path / 'w'}",
    "--config.ppo.lora_rank=4",
    "--config.ppo.lora_targets=q,gate",
  )
  assert code == 1 and err.count("\n") == 0, err
  assert "lora_targets 'q,gate': this gpt2 model has no gate projection" in err
  assert not (tmp_path / "w" / "sft").exists()


@pytest.mark.parametrize("where", ["file", "file/run"])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(tmp_path, where):
  (tmp_path / "file").write_text("notes")
  code, _, err = _cli(f"--config={EXPERIMENT}:smoke", f"--workdir={tmp_path / where}")
  assert code == 1 and err.count("\n") == 0, err
  assert f"--workdir {tmp_path / where}: cannot create it as a folder" in err
  assert (tmp_path / "file").read_text() == "notes"


def test_none_from_the_command_line_sets_none():
  """``=None`` unsets a field that takes None; absl alone would parse it as a float or 'None'."""
  from ppo_jax.config import Settings

  config, _, _ = main.parse_flags(
    ["ppo-jax", f"--config={EXPERIMENT}", "--workdir=w", "--config.ppo.vf_clip=None"]
    + ["--config.ppo.missing_eos_penalty=none", "--config.ppo.optim.max_grad_norm=None"]
    + ["--config.data.sft=None", "--config.ppo.kl_coef=0.1"]
  )
  hp = Settings.from_config(config).ppo(eos_token_id=1, pad_token_id=0)
  assert (hp.vf_clip, hp.missing_eos_penalty, hp.kl_coef) == (None, None, 0.1)
  assert config.ppo.optim.max_grad_norm is None and config.data.sft is None
  # model.remat's choices include the text "none": it stays a text, not None.
  config, _, _ = main.parse_flags(
    ["ppo-jax", f"--config={EXPERIMENT}", "--workdir=w", "--config.model.remat=none"]
  )
  assert config.model.remat == "none" and Settings.from_config(config).model.remat == "none"
  # The last value given wins, None or not.
  config, _, _ = main.parse_flags(
    ["ppo-jax", f"--config={EXPERIMENT}", "--workdir=w", "--config.ppo.vf_clip=None"]
    + ["--config.ppo.vf_clip=0.3", "--config.ppo.dual_clip=3", "--config.ppo.dual_clip=None"]
  )
  assert (config.ppo.vf_clip, config.ppo.dual_clip) == (0.3, None)
  # absl's space form too.
  config, _, _ = main.parse_flags(
    ["ppo-jax", f"--config={EXPERIMENT}", "--workdir=w", "--config.ppo.vf_clip", "None"]
    + ["--config.ppo.kl_coef", "0.3"]
  )
  assert (config.ppo.vf_clip, config.ppo.kl_coef) == (None, 0.3)


def test_none_in_the_space_form_is_taken_in_either_case():
  config, _, _ = main.parse_flags(
    ["ppo-jax", f"--config={EXPERIMENT}", "--workdir=w", "--config.ppo.vf_clip", "none"]
    + ["--config.ppo.optim.max_grad_norm", "None", "--config.ppo.kl_coef", "0.3"]
  )
  assert (config.ppo.vf_clip, config.ppo.optim.max_grad_norm, config.ppo.kl_coef) == (
    None,
    None,
    0.3,
  )


def test_distributed_starts_from_the_config_then_the_environment(monkeypatch):
  """Each field of config.distributed comes before its JAX_* variable; a coordinator from the
  environment is enough for the process count and id; auto=True alone starts it (JAX finds the
  cluster); nothing set starts nothing."""
  from ppo_jax.config import DistributedSettings

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  monkeypatch.setattr(main, "_DISTRIBUTED", [])
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  main.start_distributed(DistributedSettings())
  main.start_distributed(DistributedSettings(auto=True))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "env-host:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  main.start_distributed(DistributedSettings(num_processes=2, process_id=1))
  main.start_distributed(DistributedSettings(coordinator="host:1"))
  assert calls == [
    ((None,), {"num_processes": None, "process_id": None}),
    (("env-host:1234",), {"num_processes": 2, "process_id": 1}),
    (("host:1",), {"num_processes": 4, "process_id": 3}),
  ]


def test_command_flags_are_checked_before_the_command_runs(monkeypatch, capsys):
  """A value of a flag that is no value (a mesh of four sizes, a negative step, a temperature
  with --greedy) is a flag error, exit status 2, and nothing runs; a negative first weight is the
  value of --reward-weights, as -1 first is of --mesh; a data.* field in the command's error is
  named by its flag."""
  from ppo_jax import conversations, inference

  calls = []

  def sample_file(**flags):
    calls.append(flags)
    conversations.template_kwargs(flags["chat_template_kwargs"])  # as the sampler reads them

  monkeypatch.setattr(inference, "sample_file", sample_file)
  base = ["ppo-jax", "sample", "--model=m", "--prompts=p.jsonl", "--out=o.jsonl"]
  weights = ["--reward-fn=a:f,b:g", "--reward-weights", "-0.5,1", "--mesh=1,-1,1"]
  assert main.cli([*base, *weights]) == 0
  assert (calls[0]["reward_weights"], calls[0]["mesh"]) == ("-0.5,1", (1, -1, 1))
  assert main.cli([*base, "--mesh", "-1,1,1"]) == 0 and calls[1]["mesh"] == (-1, 1, 1)
  for args, message in (
    (["--mesh=1,1,1,1"], "argument --mesh: '1,1,1,1' is not DATA,FSDP,TENSOR (three integers)"),
    (["--greedy", "--temperature=0.5"], "--greedy takes the most likely token: --temperature"),
  ):
    assert main.cli([*base, *args]) == 2, args
    assert capsys.readouterr().err.startswith(f"ppo-jax sample: error: {message}")
  export = ["ppo-jax", "export", "--workdir=w", "--out=x", "--step=-1"]
  assert main.cli(export) == 2 and capsys.readouterr().err == (
    "ppo-jax export: error: argument --step: '-1' is not a step number\n"
  )
  assert len(calls) == 2
  assert main.cli([*base, "--chat-template", "--chat-template-kwargs={thinking: 0}"]) == 1
  assert capsys.readouterr().err.startswith(
    "ppo-jax sample: error: --chat-template-kwargs: not valid JSON"
  )


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.mesh.shape=(2,1,1)", "mesh.shape (2, 1, 1) needs 2 devices, but there are 1"),
    ("--config.model.init=nowhere", "config.model.init nowhere: no such folder"),
    (  # was refused once the task's data were written
      ["--config.model.arch=llama", "--config.model.num_kv_heads=3"],
      "config.model: unsupported model config: num_heads 4 not a multiple of num_kv_heads 3",
    ),
    (  # before the task's data are written, not after
      "--config.ppo.max_new_tokens=40",
      "data.max_prompt_len + max response length = 48 exceeds the model's 32 positions",
    ),
    pytest.param(
      ["--config.model.attention=cudnn", "--config.model.dtype=bfloat16"],
      "config.model.attention='cudnn' needs an NVIDIA GPU, and this run's devices are cpu",
      marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="asserts it off a GPU"),
    ),
  ],
)
def test_run_time_problems_found_before_the_workdir_is_touched(tmp_path, override, expected):
  overrides = override if isinstance(override, list) else [override]
  code, _, err = _cli(f"--config={EXPERIMENT}:smoke", f"--workdir={tmp_path / 'w'}", *overrides)
  assert code == 1 and err.count("\n") == 0 and expected in err, err
  assert not (tmp_path / "w").exists()


def test_sequences_that_fill_the_positions_exactly_are_accepted():
  """The smoke GPT-2 has 32 positions and 8-token prompts: 24 new tokens fit, 25 do not."""
  from conftest import smoke_config

  from ppo_jax.config import Settings
  from ppo_jax.workdir import preflight

  preflight(Settings.from_config(smoke_config(ppo__max_new_tokens=24)))
  with pytest.raises(ValueError, match=r"= 33 exceeds the model's 32 positions"):
    preflight(Settings.from_config(smoke_config(ppo__max_new_tokens=25)))


def test_a_model_init_ppo_jax_cannot_run_is_refused_before_anything_is_written(tmp_path):
  """A config.json of a GPT-2 whose width its head count does not divide failed in SFT's first
  forward (a reshape traceback), after config.json and the task's data were written."""
  folder = tmp_path / "m"
  folder.mkdir()
  (folder / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32, "n_head": 5}')
  code, _, err = _cli(
    f"--config={EXPERIMENT}:smoke", f"--workdir={tmp_path / 'w'}", f"--config.model.init={folder}"
  )
  assert code == 1 and err.count("\n") == 0, err
  assert f"config.model.init {folder}: unsupported model config: gpt2's hidden_size 32" in err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "field,inside,expected",
  [  # a causal LM as the reward model would get a random score head
    ("reward.model", "sft", "config.reward.model: {w}/sft is not a reward model (architectures "),
    ("reward.model", "", "config.reward.model {w} is a ppo_jax workdir; its model is {w}/reward_m"),
    ("model.init", "", "config.model.init {w} is a ppo_jax workdir; its model is {w}/policy"),
    ("model.init", "reward_model", "config.model.init {w}/reward_model: holds a sequence-class"),
    ("model.tokenizer", "", "config.model.tokenizer: {w}: no tokenizer files; it is a ppo_jax wor"),
  ],
)
def test_a_model_folder_of_the_wrong_kind_is_refused_before_sft(
  smoke_run, tmp_path, field, inside, expected
):
  """A reward model where the policy starts, a causal LM as the reward model, a workdir for a
  model or tokenizer folder: one line naming the field, and nothing written."""
  w = smoke_run[0]
  code, _, err = _cli(
    f"--config={EXPERIMENT}:smoke",
    f"--workdir={tmp_path / 'w'}",
    f"--config.{field}={w / inside if inside else w}",
    *(["--config.rm.enabled=False"] if field == "reward.model" else []),
  )
  assert code == 1 and err.count("\n") == 0 and expected.format(w=w) in err, err
  assert not (tmp_path / "w").exists()


def test_a_reward_model_that_cannot_read_the_run_is_refused_before_anything_is_written(
  smoke_run, tmp_path
):
  """A reward model with a tokenizer of other ids, too few positions for the run's sequences,
  several labels or an architecture ppo_jax does not run: refused before the workdir is made
  (they were found once config.json and the task's data were written, or after SFT)."""
  import json
  import shutil

  from ppo_jax.tokenizer import build_word_tokenizer

  w = smoke_run[0]
  other = shutil.copytree(w / "reward_model", tmp_path / "other_vocab")
  for name in other.iterdir():
    if name.name.startswith(("tokenizer", "vocab", "special_tokens")):
      name.unlink()
  build_word_tokenizer(["x", "y"]).save_pretrained(str(other))
  short = shutil.copytree(w / "reward_model", tmp_path / "short")
  config = json.loads((short / "config.json").read_text())
  (short / "config.json").write_text(json.dumps({**config, "n_positions": 8}))
  # Two labels, or an architecture ppo_jax does not run: found when loaded, after SFT, before.
  two = shutil.copytree(w / "reward_model", tmp_path / "two_labels")
  (two / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"}}))
  neox = shutil.copytree(w / "reward_model", tmp_path / "neox")
  (neox / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  for folder, expected in (
    (other, f"config.reward.model: {other}: its tokenizer gives other ids to the tokens"),
    (short, "exceeds the reward model's 8 positions"),
    (two, f"config.reward.model {two}: a classifier of num_labels=2; a reward model gives one"),
    (neox, f"config.reward.model {neox}: unsupported architecture 'gpt_neox'"),
  ):
    code, _, err = _cli(
      f"--config={EXPERIMENT}:smoke",
      f"--workdir={tmp_path / 'w'}",
      f"--config.reward.model={folder}",
      f"--config.model.tokenizer={w / 'sft'}",
      "--config.rm.enabled=False",
    )
    assert code == 1 and err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "w").exists()


def test_missing_workdir(tmp_path):
  code, _, err = _cli(f"--config={EXPERIMENT}")
  assert code == 2 and err == (
    "ppo-jax: config error: --config and --workdir are required (ppo-jax --help)"
  )


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_prints_the_usage(flag):
  code, out, err = _cli(flag, f"--config={EXPERIMENT}")  # help wins over the rest
  assert code == 0 and not err
  assert out.startswith("usage: ppo-jax --config=FILE[:ARG] --workdir=DIR") and "--noresume" in out
  code, out, err = _cli()  # no arguments: the usage, as an error
  assert code == 2 and not out and err.startswith("usage: ppo-jax")


def test_an_unknown_command_is_named(tmp_path):
  """A first word that is no command is refused (it was ignored, the run going ahead)."""
  code, out, err = _cli("sampel", "--model=x")
  assert (
    code == 2
    and not out
    and err
    == (
      "ppo-jax: error: unknown command 'sampel'; did you mean 'sample'? commands: export, sample, "
      "rm-eval, or none to run an experiment (--config=... --workdir=...)"
    )
  )
  code, _, err = _cli("foo", f"--config={EXPERIMENT}", f"--workdir={tmp_path / 'w'}")
  assert code == 2 and "unknown command 'foo'; commands:" in err and not (tmp_path / "w").exists()


def test_version_names_the_libraries():
  code, out, err = _cli("--version")
  assert (
    code == 0 and not err and out.startswith(f"ppo_jax {pj.__version__} (jax {jax.__version__}")
  )
  assert "flax " in out and "orbax-checkpoint " in out and "python 3." in out


def _files_args(tokenizer, prompts, tmp_path, *extra):
  pairs = tmp_path / "pairs.jsonl"  # read only by the reward model, after what these tests probe
  pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
  return (
    f"--config={EXPERIMENT}",
    f"--workdir={tmp_path / 'run'}",
    "--config.task.name=files",
    f"--config.data.prompts={prompts}",
    f"--config.model.tokenizer={tokenizer}",
    f"--config.data.preferences={pairs}",
    "--config.log.progress=False",
    *extra,
  )


def test_malformed_jsonl_names_file_and_line(smoke_run, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "review the film :"}\n{"prompt": "review the\n')
  code, _, err = _cli(*_files_args(smoke_run[0] / "data" / "tokenizer", prompts, tmp_path))
  assert code == 1 and err.count("\n") == 0
  assert f"{prompts}:2: not valid JSON" in err


def test_a_bad_preference_row_is_found_before_sft_trains(smoke_run, tmp_path):
  prompts, sft = tmp_path / "prompts.jsonl", tmp_path / "sft.jsonl"
  prompts.write_text(json.dumps({"prompt": "review the film :"}) + "\n")
  sft.write_text(json.dumps({"prompt": "review the film :", "response": "good"}) + "\n")
  tokenizer = smoke_run[0] / "data" / "tokenizer"
  args = _files_args(tokenizer, prompts, tmp_path, f"--config.data.sft={sft}")
  pairs = tmp_path / "pairs.jsonl"  # a blank line, a good row, one without its rejected response
  pairs.write_text(
    '\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
  )
  code, _, err = _cli(*args)
  assert code == 1 and err.count("\n") == 0 and f"{pairs}:3: missing field 'rejected'" in err, err
  assert [p.name for p in (tmp_path / "run").iterdir()] == [".ppo_jax.lock"]  # SFT never ran
  # A prompt over data.max_prompt_len: found too (the file is read and tokenized before SFT).
  pairs.write_text(json.dumps({"prompt": " ".join(["a"] * 30), "chosen": "b", "rejected": "c"}))
  code, _, err = _cli(*args)
  assert code == 1 and f"{pairs}:1: prompt of 30 tokens is longer than data.max_prompt" in err, err
  assert [p.name for p in (tmp_path / "run").iterdir()] == [".ppo_jax.lock"]


def test_prompt_longer_than_allowed(smoke_run, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  long = " ".join(["the"] * 30)
  # A blank line between: the error names the line, not the row.
  prompts.write_text("\n\n".join(json.dumps({"prompt": p}) for p in ["review the film :", long]))
  code, _, err = _cli(*_files_args(smoke_run[0] / "data" / "tokenizer", prompts, tmp_path))
  assert code == 1 and err.count("\n") == 0
  assert f"{prompts}:3: prompt of 30 tokens is longer than data.max_prompt_len=8" in err


def test_tokenizer_larger_than_the_embedding(smoke_run, tmp_path):
  from ppo_jax.tokenizer import build_word_tokenizer

  big = build_word_tokenizer([f"w{i}" for i in range(200)])
  big.save_pretrained(str(tmp_path / "big_tok"))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(8)))
  code, _, err = _cli(
    *_files_args(
      tmp_path / "big_tok", prompts, tmp_path, f"--config.model.init={smoke_run[0] / 'sft'}"
    )
  )
  assert code == 1 and err.count("\n") == 0
  assert "tokenizer has 204 tokens but the model's embedding has only 50 rows" in err


def test_broken_model_folder_names_the_tensors(smoke_run, tmp_path):
  import shutil

  import numpy as np
  import safetensors.numpy

  folder = tmp_path / "broken"
  shutil.copytree(smoke_run[0] / "sft", folder)
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  del tensors["transformer.h.1.mlp.c_fc.weight"]
  tensors["transformer.ln_f.bias"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": "review the film :"}) for _ in range(8)))
  code, _, err = _cli(*_files_args(folder, prompts, tmp_path, f"--config.model.init={folder}"))
  assert code == 1 and err.count("\n") == 0, err
  assert "missing tensors: transformer.h.1.mlp.c_fc.weight" in err
  assert "misshaped tensors: transformer.ln_f.bias [3] (expected [64])" in err


def test_a_second_ctrl_c_stops_at_once_in_one_line(monkeypatch, tmp_path):
  """The first Ctrl-C asks for a stop at the next step boundary (and says a second one stops at
  once); the second exits 130 at once in one line, wherever the run is: inside a checkpoint save,
  whose threads (here one that would sleep a minute) must not hold the exit up nor print
  tracebacks. A Ctrl-C outside the training loops (KeyboardInterrupt) is the same line."""
  import signal
  import subprocess
  import textwrap

  from ppo_jax import pipeline, preemption

  script = textwrap.dedent(
    """
    import os, signal, threading, time
    from ppo_jax import preemption
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (CI's job ignores it)
    preemption.GUARD.exit_at_once = True  # as the CLI sets it
    with preemption.GUARD:
      threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon: as orbax's
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)
    """
  )
  t0 = time.monotonic()
  done = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=ROOT
  )
  assert time.monotonic() - t0 < 30 and done.returncode == 130, done
  assert "received SIGINT; stopping at the next step boundary (Ctrl-C again: stop at once" in (
    done.stdout
  )
  assert done.stderr.strip() == preemption.STOPPED_AT_ONCE
  assert "stopped at once by Ctrl-C; a save in progress is dropped" in done.stderr
  # In Python (a notebook's kernel, which an exit would take down) it is a KeyboardInterrupt.
  with preemption.GUARD:
    preemption.GUARD._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
      preemption.GUARD._handle(signal.SIGINT, None)

  def run(config, workdir, *, resume):
    raise KeyboardInterrupt

  monkeypatch.setattr(pipeline, "run", run)
  code, _, err = _cli("--config=experiments/default.py", f"--workdir={tmp_path / 'w'}")
  assert code == 130 and err == preemption.STOPPED_AT_ONCE


@pytest.mark.parametrize("sig, code, by", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_a_stop_while_the_command_starts_ends_it_in_one_line(
  tmp_path, monkeypatch, terminal_sigint, sig, code, by
):
  """Ctrl-C or SIGTERM during the start (imports, the config load) is remembered and ends the
  command where the start checks, in one line, before anything is written; the handlers that
  were there before are put back."""
  import os
  import signal

  parse = main.parse_flags

  def signalled_while_parsing(argv):
    os.kill(os.getpid(), getattr(signal, sig))
    time.sleep(0.05)  # Python runs the handler between bytecodes
    return parse(argv)

  monkeypatch.setattr(main, "parse_flags", signalled_while_parsing)
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  got, out, err = _cli(f"--config={EXPERIMENT}:smoke", f"--workdir={tmp_path / 'w'}")
  assert (got, out, err) == (
    code,
    "",
    f"ppo-jax: interrupted by {by} while starting; nothing was run",
  )
  assert not (tmp_path / "w").exists()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_command_starts_without_importing_jax_and_the_package_names_resolve():
  """``ppo-jax`` imports ``ppo_jax.main`` first: JAX's second of imports comes after its stop
  handlers are in place. ``import ppo_jax as pj`` still reaches every name it exports."""
  import subprocess

  check = "import sys, ppo_jax.main; print('jax' in sys.modules, 'numpy' in sys.modules)"
  done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
  assert done.stdout.split() == ["False", "False"], done.stderr
  for name in pj.__all__:
    assert getattr(pj, name) is not None and name in dir(pj)
  assert sorted(pj.__all__) == sorted([*pj._FROM, *pj._SUBMODULES])
  assert pj.gae.__module__ == "ppo_jax.advantages" and pj.models.__name__ == "ppo_jax.models"
  assert pj.sharding.__name__ == "ppo_jax.sharding"  # any submodule, as before
  with pytest.raises(AttributeError, match="module 'ppo_jax' has no attribute 'gea'"):
    pj.gea  # noqa: B018


def test_a_workdir_holding_other_files_is_refused_before_anything_is_written(tmp_path):
  """A model folder or a project's data given as the workdir, which a run would write config.json
  and data/ over: refused in one line, and nothing in it changes. ``--workdir=`` (the current
  folder) is a config error. A log, SLURM's output, dotfiles or copied stage folders in a new
  workdir are let be."""
  from ppo_jax.workdir import check_not_foreign

  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "llama"}')
  (model / "model.safetensors").write_bytes(b"weights")
  project = tmp_path / "project"
  (project / "data").mkdir(parents=True)
  (project / "data" / "prompts.jsonl").write_text('{"prompt": "mine"}\n')
  for folder, why in (
    (model, "a config.json that is not a ppo_jax run's (a model folder?), which a run would "
     "write its own over: use a new folder"),
    (project, "a data/ folder no ppo_jax run wrote, and the synthetic task would write its "
     "files over it: move it away, or use a new folder"),
  ):  # fmt: skip
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    code, _, err = _cli(f"--config={EXPERIMENT}:smoke", f"--workdir={folder}")
    assert (code, err) == (1, f"ppo-jax: error: --workdir {folder} holds {why}")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
  assert (model / "config.json").read_text() == '{"model_type": "llama"}'
  check_not_foreign(project, writes_data=False)  # a files run writes no data/
  # A run killed after writing data/, before its config.json: its lock file says it was a run's.
  (project / ".ppo_jax.lock").write_text("")
  check_not_foreign(project, writes_data=True)
  code, _, err = _cli(f"--config={EXPERIMENT}:smoke", "--workdir=")
  assert (code, err) == (
    2,
    "ppo-jax: config error: --workdir is empty; name the run's output folder",
  )
  fresh = tmp_path / "fresh"
  for name in ("train.log", "slurm-1234.out", ".DS_Store", "sft/config.json", "data/"):
    (fresh / name).parent.mkdir(parents=True, exist_ok=True)
    if not name.endswith("/"):
      (fresh / name).write_text("x")
  check_not_foreign(fresh, writes_data=True)


def test_a_warning_is_one_line_once_naming_the_stage_folder(monkeypatch, tmp_path):
  """Python's warning format (two lines, the warning call's source) is the command's one line,
  said once; a stage folder's hidden staging name (``.reward_model.partial``) is its own."""
  import warnings

  def parse_flags(argv):
    for _ in range(2):  # two places that warn the same
      warnings.warn(f"{tmp_path}/.reward_model.partial: pad and EOS share id 1", stacklevel=1)
    raise ValueError("stop here")

  monkeypatch.setattr(main, "parse_flags", parse_flags)
  shown = warnings.showwarning
  with warnings.catch_warnings():
    warnings.simplefilter("always")
    code, _, err = _cli(f"--config={EXPERIMENT}", f"--workdir={tmp_path}")
  assert (code, err) == (
    2,
    f"warning: {tmp_path}/reward_model: pad and EOS share id 1\nppo-jax: config error: stop here",
  )
  assert warnings.showwarning is shown


def test_python_takes_the_command_lines_config_forms(tmp_path):
  """``load_experiment("FILE:ARG")`` as ``--config=FILE:ARG``; ``pipeline.run`` a dict
  (``config.to_dict()``) as the ConfigDict (it raised AttributeError: 'dict' has no 'seed')."""
  from ppo_jax import pipeline
  from ppo_jax.config import load_experiment

  smoke = load_experiment(f"{EXPERIMENT}:smoke")
  assert smoke == load_experiment(EXPERIMENT, "smoke") != load_experiment(EXPERIMENT)
  as_dict = smoke.to_dict()
  as_dict["ppo"]["batch_size"] = 0
  with pytest.raises(ValueError, match=r"^config\.ppo\.batch_size: must be ≥ 1, got 0$"):
    pipeline.run(as_dict, tmp_path / "w")
  assert not (tmp_path / "w").exists()
