"""What a run reads before any stage trains: the tokenizer and data files (the embedded synthetic
task's, or the user's), and the prompts the RL stage samples on, held-out ones first, with the
fingerprint its checkpoints record of them (a resume on other prompts is refused)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from ppo_jax import data, evaluation, synthetic
from ppo_jax import sharding as shd
from ppo_jax.rewards import fields_taken, load_reward_fn, split_paths
from ppo_jax.stage_checkpoints import fingerprint
from ppo_jax.tokenizer import load_tokenizer

if TYPE_CHECKING:  # config imports dpo, which imports rl, which imports this module
  from ppo_jax.config import Settings


@dataclasses.dataclass
class Inputs:
  tokenizer: Any
  tokenizer_path: str
  prompts: str | None
  sft: str | None
  preferences: str | None
  gold: str | None
  notes: dict[str, float]
  # The SFT sequences and preference pairs, read and tokenized before any stage trains (so a bad
  # row or a prompt over P fails first) and taken by the stage that trains on them.
  loaded: dict[str, Any] = dataclasses.field(default_factory=dict)


def prepare_inputs(s: Settings, workdir: pathlib.Path) -> Inputs:
  """The data files and tokenizer: the embedded synthetic task, or the user's files."""
  if s.task.name == "synthetic":
    paths = synthetic.write_task(
      workdir / "data",
      seed=s.seed,
      num_prompts=s.task.num_prompts,
      num_sft=s.task.num_sft,
      num_pairs=s.task.num_pairs,
      label_noise=s.task.label_noise,
      write_files=shd.is_main_process(),
    )
    shd.sync("synthetic task written")
    tok = s.model.tokenizer or paths["tokenizer"]
    gold = s.task.gold or "ppo_jax.synthetic:gold_score"
    return Inputs(
      load_tokenizer(tok),
      tok,
      paths["prompts"],
      paths["sft"],
      paths["preferences"],
      gold,
      {"label_accuracy": paths["label_accuracy"]},
    )
  tok = s.model.tokenizer or (None if s.model.init == "scratch" else s.model.init)
  if tok is None:
    raise ValueError("config.model.tokenizer is required when config.model.init='scratch'")
  return Inputs(
    load_tokenizer(tok), tok, s.data.prompts, s.data.sft, s.data.preferences, s.task.gold, {}
  )


def rl_prompts(
  s: Settings, inputs: Inputs, layout: data.Layout
) -> tuple[evaluation.Prompts, evaluation.Prompts]:
  """``(training prompts, held-out prompts)`` of the prompts file: its first
  ``data.eval_prompts`` rows held out, at most a quarter of the file (said; for DPO, which samples
  prompts only to evaluate, at most all of it). The reward functions and the gold scorer are
  checked against the rows' fields now, not after SFT and the reward model."""
  tok = inputs.tokenizer
  texts, ids, mask, columns = data.load_prompts_and_columns(inputs.prompts, tok, layout)
  # DPO trains on the pairs and only samples these: all may be held out; PPO keeps 3/4 to train on
  cap = len(texts) if s.algo == "dpo" else len(texts) // 4
  n_eval = min(s.data.eval_prompts, cap)
  if n_eval < s.data.eval_prompts:
    print(
      f"data.eval_prompts={s.data.eval_prompts} but {len(texts)} prompts: holding out {n_eval} "
      + ("(all)" if s.algo == "dpo" else "(at most a quarter)")
    )
  paths = split_paths(s.reward.fn) if s.reward.source == "function" else []
  named = [(f"config.reward.fn {p!r}" if len(paths) > 1 else "config.reward.fn", p) for p in paths]
  for field, path in [*named, *([("config.task.gold", inputs.gold)] if inputs.gold else [])]:
    # A field it takes that the rows lack
    fields_taken(load_reward_fn(path, what=field), columns, field, every_row=True)

  def part(rows: slice) -> evaluation.Prompts:
    return evaluation.Prompts(
      texts[rows], ids[rows], mask[rows], {k: v[rows] for k, v in columns.items()}
    )

  prompts, eval_prompts = part(slice(n_eval, None)), part(slice(None, n_eval))
  print(
    f"{len(prompts)} training and {len(eval_prompts)} evaluation prompts from "
    f"{inputs.prompts}; vocabulary {len(tok)}"
  )
  return prompts, eval_prompts


def prompts_fingerprint(prompts: evaluation.Prompts, eval_prompts: evaluation.Prompts) -> str:
  """A fingerprint of the prompt file's rows: their tokens and their other fields (the held-out
  rows first: it is the file's whatever ``data.eval_prompts`` holds out, whose count
  ``check_same_prompts`` compares on its own)."""
  ids, mask = (
    np.concatenate([getattr(eval_prompts, a), getattr(prompts, a)]) for a in ("ids", "mask")
  )
  names = sorted({*prompts.columns, *eval_prompts.columns})
  fields = {k: [*eval_prompts.columns.get(k, []), *prompts.columns.get(k, [])] for k in names}
  text = json.dumps(fields, sort_keys=True, default=repr).encode()
  return fingerprint(ids, mask, np.frombuffer(text, np.uint8))


def check_same_prompts(prompts: str, held_out: int, directory, saved: dict[str, Any]) -> None:
  """Refuses to resume the checkpoints in ``directory`` (latest record ``saved``) on prompts of
  another ``prompts_fingerprint`` (records from before the fingerprint pass), or holding out
  another number of them: the held-out prompts are the file's first rows, so another count
  trains on other prompts."""
  if "held_out_rows" in saved:
    was = saved["held_out_rows"]
    other, fix = was != held_out, f"data.eval_prompts={was}"
  else:  # a record from before the count: whether it held out any (its before is empty if not)
    was = "some" if saved.get("before") else "no"
    other, fix = bool(saved.get("before")) != bool(held_out), "its data.eval_prompts"
  if other:
    raise ValueError(
      f"data.eval_prompts: {directory} holds checkpoints of a run that held out {was} prompts, "
      f"this one {held_out}: the held-out prompts are the file's first rows, so another count "
      f"trains on other prompts; resume with {fix}, or use a new workdir"
    )
  if saved.get("prompts") not in (None, prompts):
    raise ValueError(
      f"{directory} holds checkpoints trained on other prompts (their tokens or fields differ: "
      "the prompts file, the tokenizer or the chat template changed since, or ppo_jax's encoding: "
      "since 2026-12-06 a BOS written in the text counts once); use a new workdir, or the "
      "original prompts"
    )
