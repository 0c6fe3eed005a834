"""The experiment config: a locked ``ml_collections.ConfigDict`` built from the hyperparameter
dataclasses, and its conversion back to them at the entry point.

Defaults live in one place, the dataclasses; ``base_config()`` mirrors them as a ConfigDict that
``experiments/*.py`` edit and the CLI overrides (``--config.ppo.clip_eps=0.1``). The dict is
locked, so a typo in a field name fails with that name. Pure functions never see the ConfigDict:
``Settings.from_config`` turns it into frozen dataclasses first.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from ppo_jax.checkpoint import CheckpointSettings
from ppo_jax.dpo import DPOSettings
from ppo_jax.hparams import PPOHparams
from ppo_jax.optim import OptimHparams
from ppo_jax.supervised import SupervisedHparams

# Fields of PPOHparams that come from the tokenizer (and the model's stop ids), not the config.
_FROM_TOKENIZER = ("eos_token_id", "pad_token_id", "extra_eos_token_ids")
TASKS = ("synthetic", "files")
CRITIC_INITS = ("reward_model", "policy")
# config.algo → the advantage estimator of the RL stage (PPOHparams.estimator)
# (dpo trains offline on preference pairs and uses only the sampler settings of ppo.*)
ALGOS = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "dpo": "gae"}
ARCHS = ("gpt2", "llama")
# config.stop_after: the stage a run ends with ("": the last, config.algo's)
STOPS = ("", "sft", "rm")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  name: str = "synthetic"  # synthetic: the embedded review task; files: data.* JSONL paths
  gold: str | None = None  # "pkg.module:fn" scoring responses for the gold/score metric
  num_prompts: int = 2048  # synthetic task sizes
  num_sft: int = 4096
  num_pairs: int = 4096
  label_noise: float = 0.2  # τ of the simulated labeller


@dataclasses.dataclass(frozen=True)
class DataSettings:
  prompts: str | None = None  # JSONL {"prompt"}
  sft: str | None = None  # JSONL {"prompt", "response"}
  preferences: str | None = None  # JSONL {"prompt", "chosen", "rejected"}
  max_prompt_len: int = 16  # P: prompts are left-padded to this
  max_response_len: int = 16  # R of SFT and preference responses (EOS included)
  prompt_overflow: str = "error"  # error | truncate (keep the last tokens)
  eval_prompts: int = 256  # held-out prompts for the before/after evaluation
  chat_template: bool = False  # each prompt as a user turn of the tokenizer's chat template
  system_prompt: str | None = None  # with chat_template: a system turn before each prompt
  # With chat_template: the template's own variables, a JSON object ('{"enable_thinking": false}')
  chat_template_kwargs: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  init: str = "scratch"  # "scratch" or a local Hugging Face folder
  tokenizer: str | None = None  # default: the init folder, or the task's tokenizer
  arch: str = "gpt2"  # scratch models: gpt2 | llama
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  max_position_embeddings: int = 64
  dtype: str = "float32"  # compute dtype
  param_dtype: str | None = None  # default: dtype
  remat: str = "none"  # none | block | dots
  attention: str = "xla"  # xla | cudnn (fused forwards and decoding; NVIDIA GPU, bf16/fp16 dtype)

  def numerics(self) -> dict[str, str | None]:
    """The ``ModelConfig`` fields this section sets on a loaded model (not its architecture)."""
    return dict(
      dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention
    )

  def param_dtype_or(self) -> str:
    """The parameters' dtype: ``param_dtype``, else the compute ``dtype``."""
    return self.param_dtype or self.dtype

  def scratch_config(self, vocab_size: int, **special_ids: int | None):
    """The ``ModelConfig`` of a model from scratch (``init="scratch"``); ``special_ids``: its
    ``eos_token_id``, ``pad_token_id``, ``bos_token_id``."""
    from ppo_jax.models import ModelConfig

    common = dict(
      vocab_size=vocab_size,
      hidden_size=self.hidden_size,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      max_position_embeddings=self.max_position_embeddings,
      **{**self.numerics(), "param_dtype": self.param_dtype_or()},
      **special_ids,
    )
    if self.arch == "gpt2":
      return ModelConfig.gpt2(**common)
    return ModelConfig.llama(num_kv_heads=self.num_kv_heads or self.num_heads, **common)


@dataclasses.dataclass(frozen=True)
class RMSettings:
  enabled: bool = True  # train a reward model (needed unless reward.model or reward.fn is set)
  init: str = "policy"  # policy: trunk of the SFT policy + a fresh head; scratch: random
  center_coef: float = 0.0  # c·mean((s_c + s_r)²) added to the loss (Eisenstein et al. 2023)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
  source: str = "model"  # model | function
  fn: str | None = None  # "pkg.module:fn(prompts, responses) -> scores" when source=function
  weights: str | None = None  # "1,0.5": one per function of fn "a:f,b:g" (default: 1 each)
  model: str | None = None  # an existing HF reward-model folder (skips training one)


@dataclasses.dataclass(frozen=True)
class PPORunSettings:
  iterations: int = 100
  batch_size: int = 64  # responses per iteration (batch_size // group_size prompts)
  value_head_on_policy: bool = False  # critic = a head on the policy's trunk (less memory)
  critic_init: str = "reward_model"  # reward_model | policy (trunk + zero-initialised head)
  critic_lr_scale: float = 1.0  # critic's learning rate / the policy's; ignored without a critic
  fuse: bool = False  # one XLA program per iteration (reward model only; no per-phase times)
  max_nonfinite: int = 3  # consecutive updates skipped for NaN/inf before the run stops
  lora_rank: int = 0  # > 0: train LoRA adapters over the frozen policy (which is the reference)
  lora_alpha: float = 16.0
  lora_targets: str = "q,k,v,o"  # among q, k, v, o, gate, up, down


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  shape: tuple = (-1, 1, 1)  # (data, fsdp, tensor); one −1 takes the remaining devices


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """Several processes (hosts) through ``jax.distributed``; off when nothing is set."""

  coordinator: str | None = None  # "host:port" of process 0 (env: JAX_COORDINATOR_ADDRESS)
  num_processes: int | None = None  # (env: JAX_NUM_PROCESSES)
  process_id: int | None = None  # (env: JAX_PROCESS_ID)
  auto: bool = False  # let JAX detect the cluster (Cloud TPU pods, SLURM, ...)

  def __post_init__(self):
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"num_processes: must be ≥ 1, got {self.num_processes}")
    top = self.num_processes if self.num_processes is not None else float("inf")
    if self.process_id is not None and not 0 <= self.process_id < top:
      raise ValueError(f"process_id: must be in [0, num_processes), got {self.process_id}")
    given = [f for f in ("num_processes", "process_id") if getattr(self, f) is not None]
    if given and not (self.coordinator or self.auto or os.environ.get("JAX_COORDINATOR_ADDRESS")):
      raise ValueError(
        f"{given[0]}: needs distributed.coordinator (or JAX_COORDINATOR_ADDRESS) or "
        "distributed.auto=True; without one each process would run alone, as process 0"
      )


@dataclasses.dataclass(frozen=True)
class LogSettings:
  samples_every: int = 10  # iterations between sample tables (0: never)
  num_samples: int = 8
  tensorboard: bool = True
  plots: bool = True
  progress: bool = True


SECTIONS: dict[str, tuple[type, ...]] = {
  "task": (TaskSettings,),
  "data": (DataSettings,),
  "model": (ModelSettings,),
  "sft": (SupervisedHparams,),
  "rm": (SupervisedHparams, RMSettings),
  "dpo": (SupervisedHparams, DPOSettings),
  "reward": (RewardSettings,),
  "ppo": (PPOHparams, PPORunSettings),
  "log": (LogSettings,),
  "checkpoint": (CheckpointSettings,),
  "mesh": (MeshSettings,),
  "distributed": (DistributedSettings,),
}


def _leaf_type(tp: Any) -> type | None:
  """``int`` for ``int | None``; None for a type that is not optional."""
  args = typing.get_args(tp)
  if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
    return next(a for a in args if a is not type(None))
  return None


def nullable_fields() -> set[str]:
  """Dotted names of the fields that take None (``ppo.vf_clip``: no value clipping)."""
  sections = [(name, cls) for name, classes in SECTIONS.items() for cls in classes]
  sections += [(f"{name}.optim", OptimHparams) for name in ("sft", "rm", "dpo", "ppo")]
  return {
    f"{name}.{field}"
    for name, cls in sections
    for field, tp in typing.get_type_hints(cls).items()
    if _leaf_type(tp) is not None
  }


def _section(*classes: type) -> ml_collections.ConfigDict:
  node = ml_collections.ConfigDict()
  for cls in classes:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
      if f.name in _FROM_TOKENIZER or f.name == "estimator":  # set by config.algo
        continue
      value = getattr(defaults, f.name)
      if dataclasses.is_dataclass(value):
        node[f.name] = _section_from(value)
      elif value is None:
        node[f.name] = config_dict.placeholder(_leaf_type(hints[f.name]))
      else:
        node[f.name] = value
  return node


def _section_from(instance: Any) -> ml_collections.ConfigDict:
  node = _section(type(instance))
  for f in dataclasses.fields(instance):
    value = getattr(instance, f.name)
    if value is not None and not dataclasses.is_dataclass(value):
      node[f.name] = value
  return node


def load_experiment(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of an experiment file (``experiments/*.py``), loaded by its path: how one
  experiment builds on another (``experiments/grpo.py`` on ``default.py``). The command line's
  ``FILE:ARG`` is taken too (``load_experiment("experiments/default.py:smoke")``)."""
  path = pathlib.Path(path)
  if arg is None and not path.is_file() and ":" in path.name:
    name, arg = path.name.split(":", 1)
    path = path.with_name(name)
  if not path.is_file():
    raise FileNotFoundError(f"no experiment file {path}")
  spec = importlib.util.spec_from_file_location(f"ppo_jax_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default, locked (experiments change values, never add fields)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.algo = "ppo"
  config.stop_after = ""
  for name, classes in SECTIONS.items():
    config[name] = _section(*classes)
  config.rm.optim = _section_from(OptimHparams(lr=5e-4, warmup_steps=10))
  config.dpo.optim = _section_from(OptimHparams(lr=1e-4, warmup_steps=10))
  config.sft.optim = _section_from(OptimHparams(lr=1e-3, warmup_steps=10))
  config.ppo.optim = _section_from(OptimHparams(lr=1e-5, schedule="linear"))
  config.lock()
  return config


def default_values() -> dict[str, Any]:
  """Every field's default, as the JSON a run's config.json holds (a fresh dict each call)."""
  return json.loads(_default_text())


@functools.cache
def _default_text() -> str:
  return base_config().to_json_best_effort()


def _build(cls: type, node: ml_collections.ConfigDict, path: str, **extra: Any) -> Any:
  kwargs = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.name in extra:
      kwargs[f.name] = extra[f.name]
    elif f.name in node:
      value = node[f.name]
      if value is None and _leaf_type(hints[f.name]) is None:  # an experiment file's None
        raise ValueError(f"config.{path}.{f.name}: cannot be None")
      if isinstance(value, ml_collections.ConfigDict):
        value = _build(OptimHparams, value, f"{path}.{f.name}")
      kwargs[f.name] = value
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"config.{path}.{e}") from None  # errors start with the field's name


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole config as frozen dataclasses."""

  seed: int
  algo: str
  stop_after: str
  task: TaskSettings
  data: DataSettings
  model: ModelSettings
  sft: SupervisedHparams
  rm: SupervisedHparams
  rm_run: RMSettings
  dpo: SupervisedHparams
  dpo_run: DPOSettings
  reward: RewardSettings
  ppo_run: PPORunSettings
  ppo_optim: OptimHparams
  log: LogSettings
  checkpoint: CheckpointSettings
  mesh: MeshSettings
  distributed: DistributedSettings
  raw: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    settings = cls(
      seed=int(config.seed),
      algo=str(config.algo),
      stop_after=str(config.stop_after),
      task=_build(TaskSettings, config.task, "task"),
      data=_build(DataSettings, config.data, "data"),
      model=_build(ModelSettings, config.model, "model"),
      sft=_build(SupervisedHparams, config.sft, "sft"),
      rm=_build(SupervisedHparams, config.rm, "rm"),
      rm_run=_build(RMSettings, config.rm, "rm"),
      dpo=_build(SupervisedHparams, config.dpo, "dpo"),
      dpo_run=_build(DPOSettings, config.dpo, "dpo"),
      reward=_build(RewardSettings, config.reward, "reward"),
      ppo_run=_build(PPORunSettings, config.ppo, "ppo"),
      ppo_optim=_build(OptimHparams, config.ppo.optim, "ppo.optim"),
      log=_build(LogSettings, config.log, "log"),
      checkpoint=_build(CheckpointSettings, config.checkpoint, "checkpoint"),
      mesh=_build(MeshSettings, config.mesh, "mesh"),
      distributed=_build(DistributedSettings, config.distributed, "distributed"),
      raw=config,
    )
    if settings.algo not in ALGOS:
      raise ValueError(
        f"config.algo: unknown {settings.algo!r}; expected one of {', '.join(ALGOS)}"
      )
    if settings.stop_after not in STOPS:
      raise ValueError(
        f"config.stop_after: unknown {settings.stop_after!r}; expected 'sft', 'rm' or '' (the "
        "whole pipeline)"
      )
    if settings.stop_after:  # the RL stage does not run: its fields are not checked together
      settings.validate()
      return settings
    # Validates the PPO fields now; the tokenizer's ids come later (an EOS stands in for one).
    hp = settings.ppo(eos_token_id=0, pad_token_id=0)
    settings.validate()
    try:
      hp.minibatch_layout(settings.ppo_run.batch_size)
    except ValueError as e:
      raise ValueError(f"config.{e}") from None
    return settings

  @property
  def own_reward_model(self) -> bool:
    """Whether the run trains, or reuses, a reward model of its own (``WORKDIR/reward_model``)."""
    return self.algo != "dpo" and self.rm_run.enabled and not self.reward.model

  def ppo(self, *, eos_token_id: int | None, pad_token_id: int) -> PPOHparams:
    return _build(
      PPOHparams,
      self.raw.ppo,
      "ppo",
      eos_token_id=eos_token_id,
      pad_token_id=pad_token_id,
      estimator=ALGOS[self.algo],
    )

  def validate(self) -> None:
    """Cross-field checks, each naming the fields involved (``ppo_jax.config_checks``)."""
    from ppo_jax.config_checks import check_settings

    check_settings(self)
