"""The sample command's sampler settings: the flags given, else the checkpoint's
``generation_config.json``, else sampling at temperature 1 with no filter; and the file's fields
that ppo_jax's sampler does not apply, said in one warning."""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

from ppo_jax.models.hf_config import read_generation_config


def sampling_settings(
  folder: str | pathlib.Path,
  temperature=None,
  top_p=None,
  top_k=None,
  *,
  greedy: bool = False,
  max_new_tokens: int | None = None,
) -> dict[str, Any]:
  """``temperature``, ``top_p``, ``top_k`` and ``greedy`` as given, else as the folder's
  ``generation_config.json`` sets them, else sampling at 1.0, 1.0 and 0 (no filter;
  transformers' own default is 50, vLLM's none). The file's ``do_sample: false``, or its
  temperature of 0, mean greedy unless a sampling flag is given; a file without ``do_sample``
  samples (transformers would take the argmax).

  Raises:
    ValueError: a value of the wrong type or out of range, naming the flag or the file.
  """
  file = read_generation_config(folder) or {}
  where = f"{pathlib.Path(folder) / 'generation_config.json'}"
  chosen = {}
  for name, given, default, ok, expected in (
    ("temperature", temperature, 1.0, lambda t: t >= 0, "≥ 0 (0: greedy)"),
    ("top_p", top_p, 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
    ("top_k", top_k, 0, lambda k: k >= 0, "≥ 0"),
  ):
    flag = "--" + name.replace("_", "-")
    value, source = given, flag
    if value is None and file.get(name) is not None:
      value, source = file[name], f"{where}'s {name} ({flag} to override)"
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{source}: {value!r} is not a number")
    if not ok(value) or (source == "--temperature" and value == 0):
      raise ValueError(
        f"{source}: {value} must be {'> 0 (--greedy)' if source == '--temperature' else expected}"
      )
    chosen[name] = type(default)(value)
  asked = any(v is not None for v in (temperature, top_p, top_k))
  greedy_from = None
  if not greedy and not asked and (file.get("do_sample") is False or chosen["temperature"] == 0):
    greedy, greedy_from = True, where  # the file's own choice
  if not greedy and chosen["temperature"] == 0:
    raise ValueError(f"{where}'s temperature 0 means greedy decoding: give --temperature to sample")
  if greedy:
    chosen["temperature"] = 1.0  # for the log-probs only: the argmax does not read it
  unapplied = {k: v for k, v in file.items() if k in UNAPPLIED and v not in UNAPPLIED[k]}
  if "max_new_tokens" in file or max_new_tokens:  # transformers too reads max_new_tokens first
    unapplied.pop("max_length", None)
  if unapplied:
    said = ", ".join(f"{k}={v!r}" for k, v in unapplied.items())
    warnings.warn(
      f"{where}: ppo_jax's sampler does not apply {said} (transformers' generate does): its "
      "responses follow another rule than transformers'",
      stacklevel=2,
    )
  return {**chosen, "greedy": greedy, "greedy_from": greedy_from}


# generation_config.json fields that change transformers' choice of tokens, which ppo_jax's
# sampler does not apply, with the values that change nothing.
UNAPPLIED = {
  "repetition_penalty": (1.0,),
  "no_repeat_ngram_size": (0,),
  "num_beams": (1,),
  "min_new_tokens": (None, 0),
  "min_length": (0,),
  "max_length": (None,),
  "typical_p": (1.0,),
  "min_p": (None,),
  "epsilon_cutoff": (0.0,),
  "eta_cutoff": (0.0,),
  "bad_words_ids": (None,),
  "sequence_bias": (None,),
  "suppress_tokens": (None,),
  "begin_suppress_tokens": (None,),
  "forced_bos_token_id": (None,),
  "forced_eos_token_id": (None,),
  "penalty_alpha": (None,),
}
