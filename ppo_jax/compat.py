"""Whether a model, its tokenizer and the run's lengths fit together: checked before anything
trains (``workdir.preflight``), when a stage builds or loads a model, and by the commands that
sample or score with a folder."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from ppo_jax.models import ModelConfig
from ppo_jax.models.hf import check_one_score, checkpoint_kind, load_hf_config
from ppo_jax.token_edges import turn_end_id
from ppo_jax.tokenizer import has_tokenizer, load_tokenizer, same_ids


def check_compatible(
  cfg: ModelConfig,
  tokenizer: Any,
  max_len: int | None,
  what: str = "model",
  *,
  parts: str = "data.max_prompt_len + max response length",
) -> None:
  """Refuses a tokenizer with more tokens than ``cfg``'s embedding has rows, and sequences of
  ``max_len`` tokens (None: not checked; ``parts``: what adds up to it) past a GPT-2's learned
  positions."""
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(
      f"tokenizer has {len(tokenizer)} tokens but the {what}'s embedding has only "
      f"{cfg.vocab_size} rows"
    )
  if max_len is not None and cfg.is_gpt2:
    check_positions(max_len, cfg.max_position_embeddings, what, parts=parts)


def check_positions(
  max_len: int,
  positions: int,
  what: str = "model",
  *,
  parts: str = "data.max_prompt_len + max response length",
) -> None:
  """Refuses sequences of ``max_len`` tokens (``parts`` added up) past a GPT-2's ``positions``
  learned ones."""
  if max_len > positions:
    raise ValueError(
      f"{parts} = {max_len} exceeds the {what}'s "
      f"{positions} positions (lower ppo.max_new_tokens or data.max_prompt_len)"
    )


def has_model_folder(folder: pathlib.Path) -> bool:
  """Whether ``folder`` holds a Hugging Face model (its config.json and safetensors weights)."""
  return (folder / "config.json").is_file() and any(folder.glob("*.safetensors*"))


def model_folder(path: str | pathlib.Path, flag: str, inside: str) -> str:
  """``path`` as a string, refusing in one line naming ``flag`` a folder that does not exist and
  a ppo_jax workdir, whose models are in folders of their own (``inside``: the one meant)."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ValueError(f"{flag} {path}: no such folder")
  if has_model_folder(folder / inside) and not has_model_folder(folder):
    raise ValueError(f"{flag} {path} is a ppo_jax workdir; its model is {folder / inside}")
  return str(path)


def ordinary_stop_ids(tokenizer: Any, ids: Sequence[int]) -> str | None:
  """A note naming the stop ids among ``ids`` that are ordinary tokens of ``tokenizer`` (not one
  of its special tokens, nor an added token marked special): responses would end at a word (a
  checkpoint's ``eos_token_id`` of another vocabulary, say). None when all are special."""
  special = set(tokenizer.all_special_ids)
  special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
  odd = [i for i in ids if i not in special and 0 <= i < len(tokenizer)]
  if not odd:
    return None
  named = ", ".join(f"{i} ({tokenizer.convert_ids_to_tokens(i)!r})" for i in odd)
  return (
    f"note: stop ids {named} are ordinary tokens of the tokenizer, not special ones: responses "
    "end wherever they appear (config.json's or generation_config.json's eos_token_id)"
  )


def check_reward_model(
  folder: str,
  *,
  what: str = "config.reward.model",
  tokenizer: Any = None,
  tokenizer_folder: str | None = None,
) -> Any:
  """Its config.json, read as transformers does; refuses a folder that is not a Hugging Face
  sequence classifier, and one whose own tokenizer gives other ids to ``tokenizer``'s tokens (the
  one the texts are encoded with, read from ``tokenizer_folder``); errors start with ``what``,
  the setting that named it."""
  model_folder(folder, what, "reward_model")
  try:
    hf_config = load_hf_config(folder)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{what}: {e}") from None
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
  if checkpoint_kind(hf_config) != "reward":
    architectures = getattr(hf_config, "architectures", None) or []
    raise ValueError(
      f"{what}: {folder} is not a reward model (architectures "
      f"{architectures}; expected a *ForSequenceClassification with its score head)"
    )
  try:  # an architecture ppo_jax runs, and one score
    check_one_score(hf_config)
    ModelConfig.from_hf(hf_config)
  except ValueError as e:
    raise ValueError(f"{what} {folder}: {e}") from None
  check_same_ids(
    folder, tokenizer, tokenizer_folder, what=what, why="a reward model reads the ids of its own"
  )
  return hf_config


def check_same_ids(
  folder: str, tokenizer: Any, tokenizer_folder: str | None, *, what: str, why: str
) -> None:
  """Refuses a model ``folder`` with a tokenizer of its own (not ``tokenizer_folder``) that gives
  other ids to ``tokenizer``'s tokens; ``why`` it matters ends the line."""
  own = has_tokenizer(folder) and not _same_folder(folder, tokenizer_folder)
  if tokenizer is not None and own and not same_ids(load_tokenizer(folder), tokenizer):
    raise ValueError(
      f"{what}: {folder}: its tokenizer gives other ids to the tokens the texts are encoded with "
      f"(another vocabulary): {why}"
    )


def _same_folder(a: str, b: str | None) -> bool:
  return b is not None and pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def turn_end_note(tokenizer: Any) -> str | None:
  """A note when the tokenizer's chat template ends an assistant turn with a special token other
  than its EOS (``token_edges.turn_end_id``): SFT, reward-model and DPO responses end with it,
  and sampling stops at it. None otherwise."""
  end = turn_end_id(tokenizer)
  if end is None:
    return None
  return (
    f"note: the chat template ends an assistant turn with {tokenizer.convert_ids_to_tokens(end)} "
    f"(id {end}), not the tokenizer's EOS {tokenizer.eos_token} (id {tokenizer.eos_token_id}): "
    "SFT, reward-model and DPO responses end with it, and sampling stops at it"
  )
