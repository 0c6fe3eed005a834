"""A reward model's accuracy on a preference file: ``ppo-jax rm-eval`` and ``evaluate_pairs``.

Each pair's chosen and rejected sequences (prompt, response and EOS, as reward-model training
encodes them) are scored at their last token; the summary is Bradley–Terry's held-out metrics
(``preference.bradley_terry_loss``: the loss, the likelihood's alone, the accuracy, the fraction
with ``s_c > s_r``, and the mean margin), what a reward model trained by the pipeline prints for
its held-out split (its ``nll``: with ``rm.center_coef`` the run's ``loss`` adds the centering
term; the file's ``margin`` fields enter the loss as in training), encoded with that run's
``data.*`` lengths, prompt overflow and chat settings (``run_data_settings``) where no flag
gives them. A tie (equal scores) counts as an error in the accuracy, as in training; ``ties``
says how many there were.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from ppo_jax import data, file_batches, preemption, writers
from ppo_jax import sharding as shd
from ppo_jax.compat import model_folder
from ppo_jax.evaluation import padded_batches
from ppo_jax.file_batches import batch_order, batch_rows, rm_scorer, trimmed
from ppo_jax.inference import load_reward_model, positions_left
from ppo_jax.preference import bradley_terry_loss
from ppo_jax.stage_checkpoints import STAGE_RECORD
from ppo_jax.tokenizer import load_tokenizer, tokenizer_folder


def run_data_settings(folder: pathlib.Path) -> dict:
  """The ``data.*`` settings (lengths, prompt overflow, chat template) of the run that trained
  the reward model in ``folder``, from its ``ppo_jax_stage.json``; none for a folder no run
  wrote."""
  try:
    settings = json.loads((pathlib.Path(folder) / STAGE_RECORD).read_text())["config"]["data"]
  except (OSError, ValueError, KeyError, TypeError):
    return {}
  fields = ("max_prompt_len", "max_response_len", "prompt_overflow", "chat_template")
  return {k: settings.get(k) for k in (*fields, "system_prompt", "chat_template_kwargs")}


def evaluate_pairs(
  reward_model: str | pathlib.Path,
  pairs: str | pathlib.Path,
  *,
  out: str | pathlib.Path | None = None,
  tokenizer: str | pathlib.Path | None = None,
  batch_size: int = 16,
  max_prompt_len: int | None = None,
  max_response_len: int | None = None,
  prompt_overflow: str | None = None,
  chat_template: bool | None = None,
  system_prompt: str | None = None,
  chat_template_kwargs: str | None = None,
  dtype: str = "float32",
  mesh: Sequence[int] | None = None,
  progress: bool = True,
) -> dict[str, float]:
  """Scores every pair of ``pairs`` (a preference JSONL file, in any form
  ``data.load_preferences`` reads) with ``reward_model`` (a ``*ForSequenceClassification``
  folder; its tokenizer from ``tokenizer`` or the same folder) and returns the summary it
  prints: ``pairs``, ``loss``, ``accuracy``, ``margin``, ``ties``, ``cut`` (responses cut at
  ``max_response_len`` tokens, EOS included; they are scored as cut). With ``out``, writes one
  JSONL row per pair: ``index``, ``chosen``, ``rejected`` (scores) and ``margin``.

  Prompts are cut at ``max_prompt_len`` tokens (default: what the model's positions leave beside
  ``max_response_len``), responses at ``max_response_len`` (default: half the positions); each
  batch is as wide as its longest prompt and response, each rounded up to a power of two
  (``file_batches.trimmed``). ``mesh``: the devices' ``(data, fsdp, tensor)`` shape
  (``sharding.command_mesh``; default all on ``data``); a batch holds ``batch_size`` pairs
  whatever the devices, each forward padded to split evenly over the batch devices.

  The settings left unset (None; the lengths, ``prompt_overflow``, the chat template and its
  system prompt and arguments) are those of the run that trained the model, where its
  ``ppo_jax_stage.json`` says; ``chat_template=False`` reads plain text whatever the run did.
  """
  out = file_batches.output_file(out) if out else None
  reward_model = model_folder(reward_model, "--reward-model", "reward_model")
  say = print if progress else (lambda *a, **k: None)
  run = run_data_settings(reward_model)  # the flags left unset, as the run that trained it had
  given = {  # None: not given
    "max_prompt_len": max_prompt_len,
    "max_response_len": max_response_len,
    "prompt_overflow": prompt_overflow,
    "chat_template": chat_template,
    "system_prompt": system_prompt,
    "chat_template_kwargs": chat_template_kwargs,
  }
  taken = {k: v for k, v in run.items() if given[k] is None and v not in (None, False, "error")}
  if chat_template is False:  # plain text: the run's chat settings do not apply either
    taken = {k: v for k, v in taken.items() if k not in ("system_prompt", "chat_template_kwargs")}
  settings = {**given, **taken}
  max_prompt_len, max_response_len = settings["max_prompt_len"], settings["max_response_len"]
  prompt_overflow = settings["prompt_overflow"] or "error"
  chat_template = bool(settings["chat_template"])
  system_prompt, chat_template_kwargs = settings["system_prompt"], settings["chat_template_kwargs"]
  if taken:
    said = ", ".join(f"{k} {v!r}" for k, v in taken.items())
    record = pathlib.Path(reward_model) / STAGE_RECORD
    say(f"as the run that trained it ({record}): {said} (flags override)")
  for name, value in (
    ("system_prompt", system_prompt),
    ("chat_template_kwargs", chat_template_kwargs),
  ):
    if value is not None and not chat_template:  # given, where neither flag nor run sets one
      raise ValueError(
        f"--{name.replace('_', '-')} needs --chat-template (neither given nor the run's: the "
        "pairs are read as plain text)"
      )
  tok_dir = tokenizer_folder(tokenizer, "--tokenizer") if tokenizer else reward_model
  mesh = shd.command_mesh(mesh)
  tok = load_tokenizer(tok_dir)
  with shd.staged_on_host(mesh):
    rm = load_reward_model(str(reward_model), dtype, tok)
  positions = rm.cfg.max_position_embeddings
  R = positions // 2 if max_response_len is None else max_response_len
  P = positions - R if max_prompt_len is None else max_prompt_len
  for flag, value in (("--batch-size", batch_size), ("--max-response-len", R)):
    if value < 1:
      raise ValueError(f"{flag} must be ≥ 1, got {value}")
  if P < 1:
    raise ValueError(
      f"--max-prompt-len must be ≥ 1, got {P}"
      if max_prompt_len is not None
      else f"--max-response-len {R} leaves no room for a prompt in the reward model's "
      f"{positions} positions"
    )
  if rm.cfg.is_gpt2 and P + R > positions:  # learned positions end there
    raise ValueError(
      f"--max-prompt-len {P} + --max-response-len {R} exceed the reward model's {positions} "
      "positions"
    )
  used = (R, "response tokens", "--max-response-len")
  left = {} if max_prompt_len else {"limit": positions_left(positions, *used, "reward model")}
  layout = data.Layout.of(
    tok, P, R, prompt_overflow, chat_template, system_prompt, chat_template_kwargs, **left
  )
  chosen, rejected = data.load_preferences(pairs, tok, layout, fit=True)
  n = len(chosen)
  # Both sides of B pairs in one forward: 2·B rows over the batch devices.
  chunk, B, batches = batch_rows(batch_size, n, mesh)
  say(f"scoring {n} pairs from {pairs} with {reward_model} ({batches})", flush=True)
  score = rm_scorer(shd.placed(rm, mesh), mesh)
  tick = file_batches.ticker(say, n, "pairs")
  good, bad = np.zeros(n), np.zeros(n)
  r_width = chosen.response_mask.shape[1]
  p_width = chosen.ids.shape[1] - r_width  # [left-padded prompt | right-padded response]
  # Longest pairs first, so that a batch holds pairs of about one length (batch_order).
  order = batch_order(np.maximum(chosen.mask.sum(1), rejected.mask.sum(1)))
  for start, real, picked in padded_batches(n, chunk, B):
    preemption.raise_pending()  # a Ctrl-C that Python discarded (preemption.command_stop)
    # One forward of both sides, as training scores them, at one width: the batch's longest
    # prompt and response, each rounded up to a power of two (inference.trimmed).
    take = order[picked]
    sides = [(x.ids[take], x.mask[take], x.response_mask[take]) for x in (chosen, rejected)]
    Wp = trimmed([m[:, :p_width].sum(1).max() for _, m, _ in sides], p_width)
    Wr = trimmed([r.sum(1).max() for _, _, r in sides], r_width)
    cols = slice(p_width - Wp, p_width + Wr)
    ids = np.concatenate([i[:, cols] for i, _, _ in sides])
    both = np.asarray(score(ids, np.concatenate([m[:, cols] for _, m, _ in sides])))
    good[take[:real]], bad[take[:real]] = both[:real], both[B : B + real]
    tick(start + real)
  loss, metrics = bradley_terry_loss(good, bad, chosen.margin)  # the file's margins, if any
  summary = {
    "pairs": n,
    "loss": float(loss),
    "accuracy": float(metrics["accuracy"]),
    "margin": float(metrics["margin"]),
    "ties": int(np.sum(good == bad)),
    "cut": chosen.truncated + rejected.truncated,
  }
  if out is not None:
    with file_batches.written_when_done(out, "pairs' scores") as f:
      for i, (g, b) in enumerate(zip(good, bad, strict=True)):
        row = {"index": i, "chosen": g, "rejected": b, "margin": g - b}
        f.write(writers.json_line(row))
  say(
    f"{n} pairs: accuracy {summary['accuracy']:.4f}, margin {summary['margin']:.4f}, "
    f"loss {summary['loss']:.4f}, {summary['ties']} ties"
    + (f", {summary['cut']} responses cut at {R} tokens" if summary["cut"] else "")
    + (f"; per-pair scores in {out}" if out else ""),
    flush=True,
  )
  return summary
