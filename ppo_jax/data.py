"""Data: JSONL files → fixed-shape token arrays, and a deterministic batch order.

Formats (one JSON object per line; other fields are ignored):

- prompts: ``{"prompt": str}``
- SFT pairs: ``{"prompt": str, "response": str}``
- preference pairs: ``{"prompt": str, "chosen": str, "rejected": str}``

or, with ``Layout.chat``, the conversational forms of chat datasets (lists of ``{"role",
"content"}`` messages: ``{"messages": [...]}``, ``{"prompt": [...], "completion": [...]}``,
implicit-prompt preference pairs; ``ppo_jax.conversations``).

Every sequence has one layout: the prompt left-padded to ``P`` tokens, then the response
right-padded to ``R`` tokens (EOS appended), ``[B, P + R]`` with an attention mask; positions come
from the mask. Prompts get the tokenizer's special tokens (e.g. BOS), responses do not; a BOS
or EOS the text already holds is kept once (``ppo_jax.token_edges``). With
``Layout.chat``, each prompt is first put in the tokenizer's chat template as one user turn
(after an optional system turn), ending with the assistant's header: the response follows it,
and the template's turn end closes it (the EOS, or a special token of the template's own:
``token_edges.turn_end_id``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ppo_jax import conversations, token_edges
from ppo_jax.conversations import DataError, Prompt, chat_prompts, template_kwargs

OVERFLOW = ("error", "truncate")


def read_jsonl(path: str | os.PathLike, fields: Sequence[str]) -> list[dict[str, str]]:
  """Rows of a JSONL file; each must be an object with string ``fields``.

  Raises:
    DataError: naming the file and line of the first malformed row.
  """
  rows = []
  for where, row in read_objects(path):
    for name in fields:
      if name not in row:
        raise DataError(f"{where}: missing field {name!r} (expected {list(fields)})")
      if not isinstance(row[name], str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    rows.append({name: row[name] for name in fields})
  return rows


def read_objects(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
  """``("FILE:LINE", object)`` of each non-blank line of a JSONL file.

  Raises:
    DataError: naming the file and line of the first line that is not a JSON object, or the
      file when it has none.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise DataError(f"{path}: is a folder; expected a JSONL file")
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  rows = []
  with path.open("rb") as f:
    lines = (line for chunk in f for line in chunk.splitlines())  # \n, \r\n, or a bare \r
    for lineno, raw in enumerate(lines, 1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is dropped
      except UnicodeDecodeError as e:
        byte = e.object[e.start]
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {byte:#04x})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      if "\\ud" in line.lower():  # a \uXXXX escape of half an emoji (a UTF-16 surrogate)?
        try:
          json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
          half = f"\\u{ord(e.object[e.start]):04x} is half a character (a lone surrogate)"
          raise DataError(f"{path}:{lineno}: {half}") from None
      rows.append((f"{path}:{lineno}", row))
  if not rows:
    raise DataError(f"{path}: no rows")
  return rows


@dataclasses.dataclass(frozen=True)
class Layout:
  """How texts become sequences: ``P`` prompt tokens (left-padded) then ``R`` response tokens."""

  prompt_len: int
  response_len: int
  pad_id: int
  eos_id: int
  overflow: str = "error"  # prompts longer than P: error | truncate (keep the last P tokens)
  chat: bool = False  # prompts as a user turn of the tokenizer's chat template
  system: str | None = None  # with ``chat``: a system turn before each prompt
  chat_kwargs: str | None = None  # with ``chat``: the template's variables, a JSON object
  # What sets P and how to give a longer prompt room, for the error (default: the config's).
  limit: str = "data.max_prompt_len={P} (raise it, or set data.prompt_overflow='truncate')"

  @classmethod
  def of(
    cls,
    tokenizer: Any,
    prompt_len: int,
    response_len: int,
    overflow: str = "error",
    chat: bool = False,
    system: str | None = None,
    chat_kwargs: str | None = None,
    **limit: str,
  ) -> Layout:
    """The layout with ``tokenizer``'s pad and EOS ids (with ``chat``, the template's turn end
    where it has its own: ``token_edges.turn_end_id``)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if chat and (end := token_edges.turn_end_id(tokenizer)) is not None:
      eos = end
    return cls(prompt_len, response_len, pad, eos, overflow, chat, system, chat_kwargs, **limit)

  def __post_init__(self):
    if self.overflow not in OVERFLOW:
      raise ValueError(
        f"prompt overflow: unknown {self.overflow!r}; expected one of {', '.join(OVERFLOW)}"
      )
    if self.chat and self.overflow == "truncate":  # its last tokens would drop the turn's start
      raise ValueError(
        "data.prompt_overflow='truncate' would cut the chat template's start (BOS, the turn "
        "headers) with data.chat_template: raise data.max_prompt_len or shorten the prompts"
      )
    template_kwargs(self.chat_kwargs)


def encode_prompts(
  tokenizer: Any,
  prompts: Sequence[Prompt],
  layout: Layout,
  *,
  source: str = "prompts",
  fit: bool = False,
  places: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt ids and mask ``[N, P]`` (int32) of texts, or (with ``layout.chat``) of
  texts and conversations. ``fit``: ``P`` is the longest prompt's length (at least 1), at most
  ``layout.prompt_len`` (beyond which ``layout.overflow`` applies). ``places``: each row's
  ``FILE:LINE`` for errors (else ``source: row N``)."""
  texts = _render(tokenizer, prompts, layout, source, places)
  return _encode_rendered(tokenizer, texts, layout, source, fit=fit, places=places)


def _render(
  tokenizer: Any, prompts: Sequence[Prompt], layout: Layout, source: str, places=None
) -> list[str]:
  """The texts the prompts are tokenized from: with ``layout.chat``, as the template writes them."""
  if layout.chat:
    kwargs = template_kwargs(layout.chat_kwargs)
    return chat_prompts(tokenizer, prompts, layout.system, kwargs, source=source, places=places)
  if any(conversations.is_conversation(p) for p in prompts):
    raise DataError(f"{source}: conversations (lists of messages) need data.chat_template=True")
  return list(prompts)


def _encode_rendered(
  tokenizer: Any,
  texts: list[str],
  layout: Layout,
  source: str,
  *,
  fit: bool = False,
  places: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  # The chat template writes the special tokens it wants (BOS, turn headers).
  encoded = tokenizer(texts, add_special_tokens=not layout.chat)["input_ids"]
  head = 0 if layout.chat else token_edges.added_head(tokenizer)  # a BOS it puts first
  if not layout.chat:
    token_edges.trailing_space_note(tokenizer, texts, encoded, source)
    encoded = token_edges.head_once(encoded, head, tokenizer, source)
  P = layout.prompt_len
  if fit:
    P = min(P, max(1, max(map(len, encoded), default=0)))  # a column even for empty prompts
  ids = np.full((len(texts), P), layout.pad_id, np.int32)
  mask = np.zeros((len(texts), P), np.int32)
  cut = 0
  for i, toks in enumerate(encoded):
    if len(toks) > P:
      if layout.overflow == "error":
        raise DataError(
          f"{conversations.place(places, i, source)}: prompt of {len(toks)} tokens "
          f"is longer than {layout.limit.format(P=P)}"
        )
      keep = head if head < P else 0  # the BOS stays, the text keeps its end
      toks, cut = toks[:keep] + toks[len(toks) - (P - keep) :], cut + 1
    if toks:
      ids[i, P - len(toks) :] = toks
      mask[i, P - len(toks) :] = 1
  if cut:
    keep = head if head < P else 0
    kept = (
      f"their first {keep} (the tokenizer's BOS) and last {P - keep}" if keep else f"their last {P}"
    )
    print(f"{source}: {cut} of {len(texts)} prompts longer than {P} tokens keep {kept}")
  if empty := sum(not toks for toks in encoded):
    print(
      f"note: {source}: {empty} of {len(texts)} prompts have no tokens (empty, and the tokenizer "
      "adds no BOS): the model reads only padding before their responses"
    )
  note_unknown(tokenizer, encoded, source, "prompts")
  return ids, mask


def note_unknown(tokenizer: Any, encoded: Sequence[Sequence[int]], source: str, what: str):
  """Prints how many of the ``encoded`` texts hold the tokenizer's unknown token (text it does
  not know: an emoji for a word-level vocabulary), if any."""
  unk = getattr(tokenizer, "unk_token_id", None)
  special = {getattr(tokenizer, f"{k}_token_id", None) for k in ("eos", "bos", "pad")}
  if unk in special:  # GPT-2's unknown token is its EOS: an id a template may write
    return
  if unknown := 0 if unk is None else sum(unk in toks for toks in encoded):
    print(
      f"{source}: {unknown} of {len(encoded)} {what} hold text the tokenizer does not know (read "
      f"as {tokenizer.unk_token})"
    )


def encode_responses(
  tokenizer: Any, texts: Sequence[str], layout: Layout, *, source: str = "responses"
) -> tuple[np.ndarray, np.ndarray, int]:
  """Right-padded response ids and mask ``[N, R]`` ending with EOS (appended, or the text's own:
  ``token_edges.with_eos``); also how many were cut."""
  tokens = _response_tokens(tokenizer, texts, layout, source)
  return _right_padded(tokens, layout, layout.response_len)


def _response_tokens(tokenizer: Any, texts: Sequence[str], layout: Layout, source: str):
  tokens = token_edges.response_tokens(tokenizer, texts, source)
  note_unknown(tokenizer, tokens, source, "responses")
  return token_edges.with_eos(tokens, layout.eos_id, tokenizer, source)


def _width(tokens: list[list[int]], layout: Layout, fit: bool) -> int:
  """``R``: ``layout.response_len``, or with ``fit`` the longest response (with its EOS)."""
  R = layout.response_len
  return min(R, max(map(len, tokens), default=1)) if fit else R


def _right_padded(
  tokens: list[list[int]], layout: Layout, R: int
) -> tuple[np.ndarray, np.ndarray, int]:
  ids = np.full((len(tokens), R), layout.pad_id, np.int32)
  mask = np.zeros((len(tokens), R), np.int32)
  cut = 0
  for i, toks in enumerate(tokens):
    if len(toks) > R:
      toks, cut = toks[:R], cut + 1
    ids[i, : len(toks)] = toks
    mask[i, : len(toks)] = 1
  return ids, mask, cut


@dataclasses.dataclass
class Sequences:
  """Prompt + response token arrays. ids/mask: [N, P + R]; response_mask: [N, R]."""

  ids: np.ndarray
  mask: np.ndarray
  response_mask: np.ndarray
  truncated: int = 0  # responses cut at R
  margin: np.ndarray | None = None  # preference pairs: each row's "margin" field [N], if given

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx: np.ndarray) -> Sequences:
    margin = None if self.margin is None else self.margin[idx]
    return Sequences(self.ids[idx], self.mask[idx], self.response_mask[idx], self.truncated, margin)

  def prompt_groups(self) -> np.ndarray:
    """A group id per row: rows of the same prompt tokens share one (``rows.split_holdout``
    holds out whole prompts)."""
    width = self.ids.shape[1] - self.response_mask.shape[1]
    mask = self.mask[:, :width]
    prompts = np.concatenate([self.ids[:, :width] * mask, mask], 1)  # padding of any value alike
    rows = np.ascontiguousarray(prompts).view(np.dtype((np.void, prompts.itemsize * 2 * width)))
    return np.unique(rows.reshape(-1), return_inverse=True)[1].reshape(-1)  # whole rows compared


def encode_pairs(
  tokenizer: Any,
  prompts: Sequence[Prompt],
  responses: Sequence[str],
  layout: Layout,
  *,
  source: str,
  places: Sequence[str] | None = None,
) -> Sequences:
  """Prompt/response pairs in the sequence layout (``places``: as ``encode_prompts``)."""
  prompt_arrays = encode_prompts(tokenizer, prompts, layout, source=source, places=places)
  return _joined(prompt_arrays, encode_responses(tokenizer, responses, layout, source=source))


def _joined(prompt_arrays, response_arrays) -> Sequences:
  (p_ids, p_mask), (r_ids, r_mask, cut) = prompt_arrays, response_arrays
  return Sequences(
    np.concatenate([p_ids, r_ids], 1),
    np.concatenate([p_mask, r_mask], 1),
    r_mask.astype(np.float32),
    cut,
  )


def _read(
  path, layout: Layout, parse, *, rows: list | None = None, places: list | None = None
) -> list[tuple]:
  """``parse(row, where)`` of each row, refusing conversations without ``layout.chat``; the rows
  as read, and their ``FILE:LINE``, are appended to ``rows`` and ``places`` when given."""
  out = []
  for where, row in read_objects(path):
    if rows is not None:
      rows.append(row)
    if places is not None:
      places.append(where)
    parsed = parse(row, where)
    if not layout.chat and conversations.is_conversation(parsed[0]):
      raise DataError(f"{where}: a conversation (a list of messages) needs data.chat_template=True")
    out.append(parsed)
  return out


def load_prompts(
  path, tokenizer, layout: Layout, *, fit: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
  """``(texts, ids, mask)``: the prompts as reward functions and sample tables see them (as
  written; a conversation as the chat template writes it out, the text the policy reads) and
  their ``encode_prompts`` arrays. ``fit``: as wide as the longest prompt, at most
  ``layout.prompt_len`` (beyond which ``layout.overflow`` applies)."""
  return load_prompts_and_columns(path, tokenizer, layout, fit=fit)[:3]


PROMPT_FIELDS = ("prompt", "messages", "conversations")  # what a prompt is read from


def load_prompts_and_columns(
  path, tokenizer, layout: Layout, *, fit: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, list]]:
  """``load_prompts`` and, from the same reading of the file, the rows' other fields (a
  reference answer, say): one list per field in row order, None where a row lacks it, what
  reward functions may take besides the texts."""
  rows: list[dict] = []
  places: list[str] = []
  parse = lambda r, w: (conversations.prompt_row(r, w),)
  prompts = [p for (p,) in _read(path, layout, parse, rows=rows, places=places)]
  rendered = _render(tokenizer, prompts, layout, str(path), places)
  ids, mask = _encode_rendered(tokenizer, rendered, layout, str(path), fit=fit, places=places)
  texts = [p if isinstance(p, str) else r for p, r in zip(prompts, rendered, strict=True)]
  names = dict.fromkeys(k for row in rows for k in row if k not in PROMPT_FIELDS)
  return texts, ids, mask, {k: [row.get(k) for row in rows] for k in names}


def load_sft(path, tokenizer, layout: Layout) -> Sequences:
  places: list[str] = []
  prompts, responses = zip(*_read(path, layout, conversations.sft_row, places=places), strict=True)
  return encode_pairs(tokenizer, prompts, responses, layout, source=str(path), places=places)


def load_preferences(
  path, tokenizer, layout: Layout, *, fit: bool = False, rows: list | None = None
) -> tuple[Sequences, Sequences]:
  """(chosen, rejected) sequences, row-aligned, sharing their prompt arrays (``fit``: the prompts
  as wide as the longest, the responses as the longest of both sides, within the layout's); the
  rows as read are appended to ``rows`` when given."""
  places: list[str] = []
  rows = [] if rows is None else rows
  first = len(rows)
  prompts, good, bad = zip(
    *_read(path, layout, conversations.preference_row, rows=rows, places=places), strict=True
  )
  margin = conversations.pair_margins(rows[first:], places)
  if good == bad:
    raise DataError(f"{path}: every pair has chosen == rejected: no pair prefers one response")
  if ties := sum(g == b for g, b in zip(good, bad, strict=True)):
    print(f"note: {path}: {ties} of {len(good)} pairs have chosen == rejected (no preference)")
  prompt_arrays = encode_prompts(
    tokenizer, prompts, layout, source=str(path), fit=fit, places=places
  )
  both = _response_tokens(tokenizer, [*good, *bad], layout, str(path))  # one note for both
  tokens = [both[: len(good)], both[len(good) :]]
  # One width for both sides: an equal pair then makes equal sequences (a tie).
  R = _width([*tokens[0], *tokens[1]], layout, fit)
  chosen, rejected = (_joined(prompt_arrays, _right_padded(t, layout, R)) for t in tokens)
  chosen.margin = rejected.margin = margin
  return chosen, rejected
