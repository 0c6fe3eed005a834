"""Whether a workdir holds the finished run of a config (``finished_summary``), and the line a
rerun of it prints instead of training (``nothing_to_do``)."""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

from ppo_jax import checkpoint, resume_rules, stage_checkpoints
from ppo_jax import sharding as shd
from ppo_jax.compat import has_model_folder
from ppo_jax.workdir import PAIR_DATA, SFT_DATA, previous_config, stages_trained

if TYPE_CHECKING:
  from ppo_jax.config import Settings


def _to_give(s: Settings) -> str:
  """`` and give config.data.…``: the files a files-task run stopped before the RL stage needs to
  go on (none: "")."""
  needs = [("prompts", True), ("preferences", s.algo == "dpo" or s.own_reward_model)]
  if s.task.name != "files":
    return ""
  names = [f"config.data.{n}" for n, used in needs if used and not getattr(s.data, n)]
  return f" and give {' and '.join(names)}" if names else ""


def nothing_to_do(s: Settings, workdir: pathlib.Path, done: dict, config: dict) -> str:
  """The line a finished run rerun prints before its summary ``done``: what differs in
  ``config`` (as JSON; only fields that change no result, or with ``stop_after`` none its stages
  read: ``finished_summary`` compared the others), and how to train on."""
  more = (
    "to go on, drop config.stop_after (--config.stop_after=)"
    + _to_give(s)
    + ": the next stages start from its "
    + ("sft/" if s.stop_after == "sft" else "reward_model/")
    if s.stop_after
    else "to train longer, raise dpo.epochs (the run goes on from its last checkpoint, its "
    "decaying learning-rate schedule stretched to the new end), or use a new workdir"
    if s.algo == "dpo"
    else "to train on, raise ppo.iterations, or use a new workdir"
  )
  then, now = (_with_defaults(c) for c in (done["config"], config))
  other = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
  # each process's own; a run that went past stop_after is said below
  other = [k for k in other if not k.startswith(("distributed.", "stop_after"))]
  unread = "change none of its stages up to stop_after" if s.stop_after else "change no result"
  aside = f"it differs only in {', '.join(other[:4])}, which {unread}; " if other else ""
  what = "the finished run of this very config"
  if (went := then.get("stop_after", "")) != s.stop_after:
    what = f"a run of this config that went on past config.stop_after={s.stop_after!r}"
    if went:
      what += f" (to {went!r})"
    more = "its later stages are kept"
  return (
    f"{workdir} holds {what}: nothing to do ({aside}its data files are not read again; {more}). "
    "Its summary:"
  )


def _with_defaults(config: dict) -> dict:
  """``config`` flattened, with the default of each field it lacks (one added to ppo_jax since
  it was written: new fields default to the old behaviour)."""
  from ppo_jax.config import default_values

  return {**resume_rules.flatten(default_values()), **resume_rules.flatten(config)}


def _results_config(config: dict) -> dict:
  """``config`` flattened with defaults, without the fields that change no result
  (``NO_RESULT``) and ``stop_after`` (how far the run went: ``finished_summary`` compares it)."""
  skip = (*resume_rules.NO_RESULT, "stop_after")
  return {k: v for k, v in _with_defaults(config).items() if not k.startswith(skip)}


REACH = {"sft": 1, "rm": 2, "": 3}  # how far a run of each config.stop_after goes


def _compared(config: dict, stop_after: str) -> dict:
  """The fields of ``config`` on which a finished run counts as this one's: those with a result
  (``_results_config``); with ``stop_after``, only those its stages read."""
  flat = _results_config(config)
  if stop_after:  # the stages' fields, and the synthetic task's that draw their rows
    fields = (*stage_checkpoints.stage_fields("sft"), *SFT_DATA)
    if stop_after == "rm":
      fields += (*stage_checkpoints.stage_fields("rm", config), *PAIR_DATA)
    flat = {k: v for k, v in flat.items() if k.startswith(fields)}
  return flat


def finished_summary(s: Settings, workdir: pathlib.Path, config: dict) -> dict[str, Any] | None:
  """The summary of the finished run of ``config`` (as JSON) in ``workdir``, on every process;
  None if anything is missing to call it finished: the config.json and the summary.json of this
  config (written last; removed when a run starts), the stages' folders (deleted ones are
  trained again), ``policy/``, and the last stage's checkpoints (PPO's of the last step); with
  ``stop_after``, the folders of the stages up to it, and configs compared on the fields those
  stages read (``_compared``): a run that went further (a later ``stop_after``, or none; another
  algorithm) counts."""

  def same(then: Any) -> bool:  # what changes no result aside (logging, the devices, …)
    return isinstance(then, dict) and _compared(then, s.stop_after) == _compared(
      config, s.stop_after
    )

  summary = None
  if same(previous_config(workdir)):
    try:
      summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
      summary = None
  will = stages_trained(s, workdir)
  last = workdir / "checkpoints" / str(s.ppo_run.iterations)
  if s.stop_after:  # the stages up to it (config.stop_after) are all the run trains
    outputs = not (will["sft"] or will["rm"])
  else:
    outputs = (
      not (will["sft"] or will["rm"])
      and has_model_folder(workdir / "policy")
      and (
        checkpoint.holds_checkpoints(workdir / "dpo_checkpoints") if will["dpo"] else last.is_dir()
      )
    )
  done = (
    isinstance(summary, dict)
    and same(summary.get("config"))
    # as far as this config's stop_after, or further (a later stop_after is no reason to redo)
    and REACH.get(_with_defaults(summary["config"])["stop_after"], 0) >= REACH[s.stop_after]
    and outputs
  )
  return summary if shd.all_agree(done) else None
