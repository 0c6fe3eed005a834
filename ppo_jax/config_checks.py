"""The config's cross-field checks: every value a run needs is checked before any work, and each
problem is one line naming its fields."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ppo_jax.config import ARCHS, CRITIC_INITS, TASKS
from ppo_jax.data import OVERFLOW, template_kwargs
from ppo_jax.models.config import ATTENTION, DTYPES, REMAT, lora_problems
from ppo_jax.resume_rules import flatten
from ppo_jax.rewards import reward_problems

if TYPE_CHECKING:
  from ppo_jax.config import Settings

# Fields taking one of a few values.
CHOICES = {
  "task.name": TASKS,
  "model.arch": ARCHS,
  "model.dtype": DTYPES,
  "model.param_dtype": (None, *DTYPES),
  "model.remat": REMAT,
  "model.attention": ATTENTION,
  "data.prompt_overflow": OVERFLOW,
  "rm.init": ("policy", "scratch"),
  "reward.source": ("model", "function"),
  "ppo.critic_init": CRITIC_INITS,
  "ppo.group_std_scope": ("group", "batch"),
}

# Counts and sizes: field → smallest value.
AT_LEAST = {
  "task.num_prompts": 1,
  "task.num_sft": 1,
  "task.num_pairs": 1,
  "data.eval_prompts": 0,
  "model.hidden_size": 1,
  "model.num_layers": 1,
  "model.num_heads": 1,
  "model.max_position_embeddings": 1,
  "ppo.iterations": 1,
  "ppo.max_nonfinite": 1,
  "log.num_samples": 0,
  "rm.center_coef": 0,
}


def check_settings(s: Settings) -> None:
  """Raises ValueError for the first problem, named by its config field(s)."""
  for field, value in flatten(s.raw.to_dict()).items():  # a NaN passes every range check
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"config.{field}: must be a finite number, got {value}")
  for field, allowed in CHOICES.items():
    section, name = field.split(".")
    if (value := s.raw[section][name]) not in allowed:
      raise ValueError(
        f"config.{field}: unknown {value!r}; expected one of {', '.join(str(a) for a in allowed)}"
      )
  for field, low in AT_LEAST.items():
    section, name = field.split(".")
    if (value := s.raw[section][name]) < low:
      raise ValueError(f"config.{field}: must be ≥ {low}, got {value}")
  shape = tuple(s.raw.mesh.shape)
  if len(shape) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
    raise ValueError(
      f"config.mesh.shape: expected three integers (data, fsdp, tensor), e.g. '(1,-1,1)', got "
      f"{','.join(map(str, shape))!r}"
    )
  if shape.count(-1) > 1 or any(x == 0 or x < -1 for x in shape):  # what no devices fit
    raise ValueError(
      f"config.mesh.shape: sizes must be ≥ 1, with at most one -1 (the devices left), got "
      f"{','.join(map(str, shape))!r}"
    )
  if s.raw.seed < 0:  # NumPy's generators take none
    raise ValueError(f"config.seed: must be ≥ 0, got {s.raw.seed}")
  if (kv := s.raw.model.num_kv_heads) is not None and kv < 1:
    raise ValueError(f"config.model.num_kv_heads: must be ≥ 1 (none: num_heads), got {kv}")
  if kv is not None and s.model.arch == "gpt2" and s.model.init == "scratch":
    raise ValueError(
      "config.model.num_kv_heads: GPT-2 has as many key/value heads as heads (model.num_heads); "
      "leave it unset, or use model.arch='llama'"
    )
  try:
    template_kwargs(s.data.chat_template_kwargs)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  # What the run trains: config.stop_after leaves the later stages out, and their checks with them.
  rl = not s.stop_after
  trains_rm = s.own_reward_model and s.stop_after != "sft"
  needs_pairs = (s.algo == "dpo" and rl) or trains_rm
  checks = [
    (
      s.task.label_noise > 0,
      f"config.task.label_noise: must be > 0 (the labeller's temperature), got "
      f"{s.task.label_noise}",
    ),
    (
      s.data.max_prompt_len >= 1 and s.data.max_response_len >= 1,
      "config.data.max_prompt_len and .max_response_len: must be ≥ 1, got "
      f"{s.data.max_prompt_len} and {s.data.max_response_len}",
    ),
    (
      not (s.data.chat_template and s.task.name == "synthetic"),
      "config.data.chat_template: the synthetic task's word tokenizer has no chat template",
    ),
    (
      not (s.data.chat_template and s.data.prompt_overflow == "truncate"),
      "config.data.prompt_overflow='truncate' would cut the chat template's start with "
      "config.data.chat_template: raise config.data.max_prompt_len or shorten the prompts",
    ),
    (
      s.data.system_prompt is None or s.data.chat_template,
      "config.data.system_prompt: needs config.data.chat_template=True (only a chat template has "
      "a system turn)",
    ),
    (
      s.data.chat_template_kwargs is None or s.data.chat_template,
      "config.data.chat_template_kwargs: needs config.data.chat_template=True",
    ),
    (
      s.log.samples_every >= 0,
      f"config.log.samples_every: must be ≥ 0 (0: never), got {s.log.samples_every}",
    ),
    (
      s.model.init != "scratch" or s.model.hidden_size % s.model.num_heads == 0,
      f"config.model.hidden_size {s.model.hidden_size} is not divisible by "
      f"config.model.num_heads {s.model.num_heads}",
    ),
    (
      s.model.attention != "cudnn" or s.model.dtype != "float32",
      "config.model.attention='cudnn' computes in bfloat16 or float16: set config.model.dtype",
    ),
    (
      s.checkpoint.every >= 1 and s.checkpoint.keep >= 1,
      "config.checkpoint.every and .keep: must be ≥ 1, got "
      f"{s.checkpoint.every} and {s.checkpoint.keep}",
    ),
    (
      s.checkpoint.supervised_every >= 0,
      f"config.checkpoint.supervised_every: must be ≥ 0, got {s.checkpoint.supervised_every}",
    ),
    (
      s.rm.epochs > 0 or not trains_rm,
      "config.rm.epochs: must be > 0 (config.rm.enabled=False skips the reward model)",
    ),
    (
      s.task.name != "files" or s.data.prompts or s.stop_after,
      "config.task.name='files' needs config.data.prompts=FILE.jsonl (or config.stop_after='rm' "
      "or 'sft', which train no policy on prompts)",
    ),
    (
      s.stop_after != "rm" or s.own_reward_model,
      "config.stop_after='rm': this run trains no reward model ("
      + (
        "DPO learns from the pairs"
        if s.algo == "dpo"
        else "config.rm.enabled=False"
        if not s.rm_run.enabled
        else "config.reward.model gives one"
      )
      + ")",
    ),
    (
      s.stop_after != "sft" or (s.sft.epochs > 0 and (s.task.name != "files" or s.data.sft)),
      "config.stop_after='sft': this run trains no SFT policy ("
      + ("config.sft.epochs=0" if s.sft.epochs <= 0 else "no config.data.sft=FILE.jsonl")
      + ")",
    ),
    *(
      (
        s.task.name == "files" or not getattr(s.data, name),
        f"config.data.{name} is set, but config.task.name='{s.task.name}' makes its own data: "
        f"add config.task.name=files to train on the file (or drop config.data.{name})",
      )
      for name in ("prompts", "sft", "preferences")
    ),
    (
      s.task.name != "files" or s.data.preferences or not needs_pairs,
      "config.task.name='files' needs config.data.preferences=FILE.jsonl to train "
      + (
        "a reward model"
        if s.stop_after == "rm"
        else "DPO"
        if s.algo == "dpo"
        else "a reward model (config.reward.source='function' scores without one: add "
        "config.rm.enabled=False)"
        if s.reward.source == "function"
        else "a reward model (or give one, config.reward.model=FOLDER, or use a reward "
        "function with config.rm.enabled=False)"
      ),
    ),
    (
      s.task.name != "files" or s.model.init != "scratch" or s.model.tokenizer,
      "config.task.name='files' with config.model.init='scratch' needs config.model.tokenizer",
    ),
  ]
  if rl:  # the RL stage's own fields
    checks += [
      (
        s.ppo_run.critic_lr_scale > 0,
        f"config.ppo.critic_lr_scale: must be > 0, got {s.ppo_run.critic_lr_scale}",
      ),
      (
        s.ppo_run.batch_size >= 1,
        f"config.ppo.batch_size: must be ≥ 1, got {s.ppo_run.batch_size}",
      ),
      *(
        (False, f"config.ppo.{problem}")
        for problem in lora_problems(s.ppo_run.lora_rank, s.ppo_run.lora_targets)
      ),
      *((False, problem) for problem in reward_problems(s.reward.fn, s.reward.weights)),
      (
        not s.raw.ppo.critic_warmup or s.raw.ppo.critic_warmup < s.ppo_run.iterations,
        f"config.ppo.critic_warmup {s.raw.ppo.critic_warmup} ≥ config.ppo.iterations "
        f"{s.ppo_run.iterations}: the policy would never train",
      ),
      (
        s.dpo.epochs > 0 or s.algo != "dpo",
        f"config.dpo.epochs: must be > 0, got {s.dpo.epochs}",
      ),
      (
        s.reward.source != "function" or s.reward.fn,
        "config.reward.source='function' needs config.reward.fn='package.module:function'",
      ),
      (
        s.reward.source == "function" or not s.reward.fn,
        (
          "config.reward.fn is set, but DPO uses no reward: drop it"
          if s.algo == "dpo"
          else "config.reward.fn is set, but config.reward.source='model' scores with a "
          "reward model: add config.reward.source=function (and config.rm.enabled=False) to use "
          "the function"
        ),
      ),
      (
        s.algo == "dpo" or s.reward.source != "model" or s.rm_run.enabled or s.reward.model,
        "config.reward.source='model' needs config.rm.enabled=True or config.reward.model=FOLDER",
      ),
      (
        s.algo != "ppo"
        or s.ppo_run.value_head_on_policy
        or s.ppo_run.critic_init == "policy"
        or s.rm_run.enabled
        or s.reward.model,
        "config.ppo.critic_init='reward_model' needs a reward model (config.rm.enabled or "
        "config.reward.model); use critic_init='policy' with a reward function",
      ),
      (
        s.algo != "dpo" or not (s.reward.fn or s.reward.model),
        f"config.reward.{'fn' if s.reward.fn else 'model'} is set, but DPO uses no reward: drop it",
      ),
      (
        s.algo in ("ppo", "dpo") or not s.ppo_run.value_head_on_policy,
        f"config.ppo.value_head_on_policy: {s.algo} has no critic to put a head on; leave it off",
      ),
      (
        not s.ppo_run.fuse or s.reward.source == "model",
        "config.ppo.fuse=True needs reward.source='model' (a Python reward runs on the host)",
      ),
      (
        not s.raw.ppo.kl_adaptive or s.raw.ppo.kl_horizon > 0.2 * s.ppo_run.batch_size,
        f"config.ppo.kl_horizon {s.raw.ppo.kl_horizon:g} must exceed 0.2 × config.ppo.batch_size "
        f"({0.2 * s.ppo_run.batch_size:g}): below its target KL the adaptive controller would make "
        "the KL coefficient zero or negative",
      ),
      (
        s.ppo_run.batch_size % s.raw.ppo.group_size == 0,
        f"config.ppo.batch_size {s.ppo_run.batch_size} is not divisible by "
        f"config.ppo.group_size {s.raw.ppo.group_size} (responses per prompt)",
      ),
    ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
