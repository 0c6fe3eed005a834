"""What a resumed run may change: the config fields a checkpoint or a finished stage is compared
on (``config_differences``), the paths compared as the files they name, and the records of
where a run started (the SFT policy, LoRA's base weights)."""

from __future__ import annotations

import pathlib
from typing import Any

# Config fields that change no trained weight or metric (model.remat and the micro-batch sizes:
# memory, not maths; model.attention: the same maths by another kernel; mesh and distributed: the
# devices and processes, whose checkpoints restore onto another mesh; all with the rounding of
# other sums): a finished run rerun with other values of them has nothing to do.
MICRO_BATCHES = tuple(f"{s}.micro_batch_size" for s in ("sft", "rm", "dpo", "ppo"))
NO_RESULT = (
  "log.",
  "checkpoint.",
  "model.remat",
  "model.attention",
  *MICRO_BATCHES,
  "mesh.",
  "distributed.",
)
# Config fields that may change between a run and its resumption: those, and what extends or
# evaluates the run otherwise (stop_after: a run that stopped after its reward model goes on to
# the policy; ppo.iterations and dpo.epochs: a decaying schedule is stretched to
# the new end; data.eval_prompts: DPO's; PPO's checkpoints refuse another number of held-out
# rows, run_inputs.check_same_prompts, since they are the prompt file's first rows).
RESUMABLE_CHANGES = (
  "stop_after",
  "ppo.iterations",
  "dpo.epochs",
  "data.eval_prompts",
  "dpo.eval_every",
  *NO_RESULT,
)
# Fields a run never read, by algorithm, task and reward source: a run saved with them set
# resumes with them unset (they are refused for it now, and were ignored then).
UNREAD_BY = {"grpo": ("ppo.whiten_rewards",), "rloo": ("ppo.whiten_rewards",)}
# Paths compared as the files they name: a relative path from another folder, or the absolute
# one, is the same field (the data's digests and fingerprints compare the contents).
PATH_FIELDS = (
  "data.prompts",
  "data.sft",
  "data.preferences",
  "model.init",
  "model.tokenizer",
  "reward.model",
)
UNREAD_UNLESS = {
  ("task.name", "files"): ("data.prompts", "data.sft", "data.preferences"),
  ("reward.source", "function"): ("reward.fn", "reward.weights"),
}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config as ``{dotted field: value}``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(
  saved: dict,
  current: dict,
  *,
  defaults: dict | None = None,
  only: tuple[str, ...] | None = None,
) -> list[str]:
  """``field: saved → current`` for every field that matters to a resumed run: all but
  ``RESUMABLE_CHANGES``, or, with ``only``, the fields whose dotted names start with one of those
  prefixes (what a supervised stage reads).

  A field the saved config lacks (one added to ppo_jax after the run was saved) is a difference
  only if its current value is not its value in ``defaults``: new fields default to the old
  behaviour, so upgrading ppo_jax does not lock a run out of its checkpoints.
  """
  a, b, d = flatten(saved), flatten(current), flatten(defaults or {})
  unread = set(UNREAD_BY.get(b.get("algo"), ()) if a.get("algo") == b.get("algo") else ())
  for (field, value), names in UNREAD_UNLESS.items():
    if a.get(field, d.get(field)) != value:
      unread.update(name for name in names if b.get(name) is None)
  if not a.get("ppo.lora_rank") and not b.get("ppo.lora_rank"):  # no adapters: targets unread
    unread.add("ppo.lora_targets")
  diffs = []
  for name in sorted(set(a) | set(b)):
    if name.startswith(RESUMABLE_CHANGES) or a.get(name) == b.get(name) or name in unread:
      continue
    if name in PATH_FIELDS and same_path(a.get(name), b.get(name)):
      continue
    if name in ("reward.fn", "reward.weights") and _meaning(a, name) == _meaning(b, name):
      continue
    if only is not None and not name.startswith(only):
      continue
    if name not in a and name in d and b.get(name) == d[name]:
      continue
    diffs.append(f"{name}: {a.get(name, '(absent)')!r} → {b.get(name, '(absent)')!r}")
  return diffs


def with_paths_resolved(config: dict[str, Any]) -> dict[str, Any]:
  """``config`` (as JSON) with its ``PATH_FIELDS`` resolved, for a record: a relative path means
  the file it named from the folder the run started in, whichever folder a resume starts in."""
  config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
  for section, key in (name.split(".") for name in PATH_FIELDS):
    value = config.get(section, {}).get(key)
    if isinstance(value, str) and value != "scratch":
      config[section][key] = str(pathlib.Path(value).expanduser().resolve())
  return config


def _meaning(flat: dict[str, Any], name: str) -> object:
  """``reward.fn`` or ``reward.weights`` as the run reads them: ``"a:f, b:g"`` is
  ``"a:f,b:g"``, ``"1, 2"`` is ``"1,2"``, and no weights are 1 each."""
  from ppo_jax.rewards import parse_weights, split_paths

  fn, weights = flat.get("reward.fn"), flat.get("reward.weights")
  paths = split_paths(fn) if isinstance(fn, str) else []
  if name == "reward.fn":
    return tuple(paths) if paths else fn
  try:
    return parse_weights(weights) if weights is not None else (1.0,) * len(paths)
  except ValueError:
    return weights


def same_path(a: object, b: object) -> bool:
  """Whether ``a`` and ``b`` are paths (strings) naming the same file from this folder."""
  return (
    isinstance(a, str)
    and isinstance(b, str)
    and pathlib.Path(a).expanduser().resolve() == pathlib.Path(b).expanduser().resolve()
  )


def check_same_base(saved: dict, now: dict, where: pathlib.Path) -> None:
  """Refuses LoRA adapters saved in ``where`` over other base weights than the record ``now``
  names (``export_record``'s ``base_digest``; records from before digests pass)."""
  then, current = saved.get("base_digest"), now.get("base_digest")
  if then and current and then != current:
    raise ValueError(
      f"{where} holds LoRA adapters trained over other base weights than {now['base_policy']} "
      f"holds now (sha256 {then[:12]}… then, {current[:12]}… now); use a new workdir or restore "
      "those weights"
    )


def check_same_start(saved: dict, now: dict, where: pathlib.Path) -> None:
  """Refuses checkpoints in ``where`` of a run that started from another SFT policy than the
  record ``now`` names (``sft_id``, the id of the training that wrote ``WORKDIR/sft``; records
  from before ids pass)."""
  if "sft_id" in saved and "sft_id" in now and saved["sft_id"] != now["sft_id"]:
    raise ValueError(
      f"{where} holds checkpoints of a run that started from another SFT policy than the workdir's "
      "sft/ holds now (trained again, replaced or removed since); use a new workdir, or delete "
      f"{where} to start this stage over"
    )
