"""Tokenizers: Hugging Face ``AutoTokenizer`` from a local folder, or a tiny one built offline."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3
# The files a tokenizer is read from; a folder with none of them has no tokenizer (transformers
# then blames a missing package).
TOKENIZER_FILES = (
  "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
  "merges.txt", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def has_tokenizer(folder: str | os.PathLike) -> bool:
  """Whether ``folder`` holds any tokenizer file."""
  return any((pathlib.Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_folder(path: str | os.PathLike, flag: str | None = None) -> str:
  """``path`` as a string, refusing in one line (naming ``flag``, the setting that gave it) a
  folder that does not exist or holds no tokenizer files (a ppo_jax workdir's tokenizer is in its
  ``policy/`` or ``sft/``: named)."""
  folder = pathlib.Path(path)
  name = f"{flag} {path}" if flag else str(path)
  if not folder.is_dir():
    raise FileNotFoundError(
      f"{name}: no such folder"
      if flag
      else f"tokenizer folder {path} does not exist (ppo_jax loads local folders only)"
    )
  if not has_tokenizer(folder):
    inside = next((folder / n for n in ("policy", "sft") if has_tokenizer(folder / n)), None)
    hint = f"it is a ppo_jax workdir, its tokenizer is in {inside}" if inside else None
    raise FileNotFoundError(
      f"{name}: no tokenizer files; {hint}"
      if hint
      else f"{name}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
    )
  return str(path)


def load_tokenizer(folder: str | os.PathLike, *, padding_side: str = "left") -> Any:
  """``transformers.AutoTokenizer`` from a local folder, never the hub, never remote code.

  Prompts are left-padded for generation, so ``padding_side`` defaults to ``"left"``. A tokenizer
  without a pad token gets its EOS token as pad (the usual choice for decoder-only models); one
  without an EOS token is refused.
  """
  from transformers import AutoTokenizer

  # Checked first: from a folder of a config.json alone, transformers builds an empty tokenizer
  # (one token), which would sample nothing but empty responses.
  folder = pathlib.Path(tokenizer_folder(folder))
  config = folder / "config.json"  # transformers reads it too; its error would blame the tokenizer
  try:
    json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{config}: not valid JSON ({e})") from None
  try:
    tok = AutoTokenizer.from_pretrained(
      str(folder), local_files_only=True, trust_remote_code=False, padding_side=padding_side
    )
    tok("a")  # a vocabulary without its unknown token fails at the first text, not here
  except Exception as e:  # a damaged tokenizer.json, say: transformers' error names no file
    raise ValueError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
  if tok.eos_token is None:  # SFT targets end with it, and sampled responses stop at it
    raise ValueError(f"{folder}: the tokenizer has no EOS token; responses need one to end")
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def same_ids(own: Any, texts: Any) -> bool:
  """Whether every token of ``texts`` (the tokenizer the texts are encoded with) has the same id
  in ``own`` (a reward model's, say, which may add tokens of its own, a pad)."""
  vocab = own.get_vocab()
  return all(vocab.get(token) == i for token, i in texts.get_vocab().items())


def build_word_tokenizer(words: Iterable[str], *, padding_side: str = "left") -> Any:
  """A word-level tokenizer over ``words``, built offline (tests, the embedded default task).

  Ids: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, then the words in order (duplicates
  dropped). Text splits on whitespace; unknown words map to ``<unk>``. Returns a
  ``transformers.PreTrainedTokenizerFast`` that ``save_pretrained``/``AutoTokenizer`` round-trip.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for w in words:
    if any(c.isspace() for c in w) or not w:
      raise ValueError(f"word {w!r} is empty or contains whitespace")
    if w.startswith("##"):  # the decoder's continuation mark: it would decode glued to the last
      raise ValueError(f"word {w!r} starts with '##', which decodes as part of the word before")
    vocab.setdefault(w, len(vocab))
  core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  return PreTrainedTokenizerFast(
    tokenizer_object=core,
    pad_token="<pad>",
    eos_token="<eos>",
    bos_token="<bos>",
    unk_token="<unk>",
    padding_side=padding_side,
  )
