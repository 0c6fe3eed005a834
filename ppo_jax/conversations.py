"""Rows in the conversational form of chat datasets: lists of ``{"role", "content"}`` messages,
as TRL's dataset formats and most instruction and preference sets on the Hugging Face hub write
them, turned into what ``ppo_jax.data`` encodes: a prompt (a text, or a conversation ending where
the response starts) and response texts.

Accepted rows (a text field may be a string anywhere a conversation is shown; a response given
as a conversation is one assistant message):

- prompts: ``{"prompt": [...]}`` or ``{"messages": [...]}``, ending on a turn that is not the
  assistant's; an SFT or preference row also reads as its prompt (``messages`` ending on the
  assistant's turn without it; a ``"prompt"`` field, where a row has one, first), so the SFT or
  preference file can serve as the prompts file;
- SFT: ``{"messages": [..., assistant]}`` (the last message is the response, the rest the
  prompt; also beside a ``"prompt"`` string, as ultrachat_200k has it), or ``{"prompt": [...],
  "completion": [assistant]}`` (``"response"`` also reads);
- preferences: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``, or
  ``{"chosen": [..., assistant], "rejected": [..., assistant]}`` whose messages before the last
  are the same (the shared prompt; a ``"prompt"`` beside them, as ultrafeedback_binarized has
  it, is then not read), or ``{"chosen": str, "rejected": str}`` with no prompt field
  (Anthropic's HH-RLHF, for base models: with a chat template the whole transcript would be one
  user turn): the prompt is the texts' common start, up to the last ``Assistant:`` turn marker
  or else the last whitespace before they differ (``shared_start``).

ShareGPT's ``{"conversations": [{"from", "value"}]}`` reads as ``"messages"`` (``human`` is the
user, ``gpt`` the assistant). A message's content is a string, or a list of text parts
(``{"type": "text", "text": ...}``, joined); an earlier assistant turn that calls tools may have
no content. A response is the text of one assistant message, which may hold nothing else (no
tool calls, no separate reasoning): those would not be trained on.

Prompts are put in the tokenizer's chat template by ``chat_prompts`` (its variables from
``data.chat_template_kwargs``: ``template_kwargs``).

Every error is a ``DataError`` naming the file and line (``where``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Message = dict[str, Any]
Prompt = str | list[Message]  # a text, or the conversation the response continues


class DataError(ValueError):
  """Bad input data; the message names the file and line."""


def is_conversation(value: Any) -> bool:
  return isinstance(value, list)


def messages(value: Any, where: str, field: str) -> list[Message]:
  """``value`` checked as a non-empty list of messages with a string ``role`` and a string
  ``content`` (text parts joined; none where an assistant turn calls tools). Other keys, a tool
  call's say, go to the chat template as they are."""
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of messages")
  out = []
  for i, m in enumerate(value):  # [i]: 0-based, as JSON's and Python's readers count
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise DataError(f"{where}: {field}[{i}] must be an object with a string 'role'")
    content = m.get("content")
    if isinstance(content, list):
      m = {**m, "content": _text_parts(content, where, f"{field}[{i}]")}
    elif not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
      raise DataError(
        f"{where}: {field}[{i}] ({m['role']}) must have a string 'content' (or a list of text "
        "parts)"
      )
    out.append(m)
  return out


def _text_parts(parts: list, where: str, field: str) -> str:
  """The text of ``[{"type": "text", "text": ...}, ...]`` content, joined."""
  for j, part in enumerate(parts):
    if not (isinstance(part, dict) and part.get("type") == "text"):
      kind = part.get("type") if isinstance(part, dict) else type(part).__name__
      raise DataError(f"{where}: {field}.content[{j}] is {kind!r}; only text parts are read")
    if not isinstance(part.get("text"), str):
      raise DataError(f"{where}: {field}.content[{j}] must have a string 'text'")
  return "".join(part["text"] for part in parts)


# ShareGPT dumps name the assistant after the chatbot that wrote the turn.
SHAREGPT_ROLES = {
  "human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
  "bard": "assistant", "model": "assistant",
}  # fmt: skip


def sharegpt(value: Any, where: str) -> list[Message]:
  """ShareGPT's ``[{"from", "value"}]`` as messages (human → user; gpt, chatgpt, bing, bard and
  model → assistant; other names, system for one, as they are)."""
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
  turns = []
  for i, turn in enumerate(value):
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)):
      raise DataError(f"{where}: conversations[{i}] must be an object with a string 'from'")
    role = SHAREGPT_ROLES.get(turn["from"], turn["from"])
    turns.append({"role": role, "content": turn.get("value")})
  return messages(turns, where, "conversations")


def prompt(value: Any, where: str, field: str = "prompt") -> Prompt:
  """A prompt field: a string, or a conversation that does not end on the assistant's turn."""
  if isinstance(value, str):
    return value
  turns = messages(value, where, field)
  if turns[-1]["role"] == "assistant":
    raise DataError(
      f"{where}: {field} ends with an assistant message; a prompt ends where the response starts "
      "(an SFT row in 'messages' form goes in data.sft)"
    )
  return turns


def response(value: Any, where: str, field: str) -> str:
  """A response field: a string, or a list of one assistant message (its content)."""
  if isinstance(value, str):
    return value
  turns = messages(value, where, field)
  if len(turns) != 1 or turns[0]["role"] != "assistant":
    roles = [m["role"] for m in turns]
    raise DataError(f"{where}: {field} must be one assistant message, got roles {roles}")
  return _response_text(turns[0], where, field)


def _response_text(m: Message, where: str, field: str) -> str:
  """The content of the assistant message ``m``, which must hold nothing else a template would
  write out (and training would then miss)."""
  if m["role"] != "assistant":
    raise DataError(f"{where}: {field} must end with an assistant message, got {m['role']!r}")
  extra = sorted(set(m) - {"role", "content"})
  if extra or m["content"] is None:
    raise DataError(
      f"{where}: {field}: the assistant message carries {extra or 'no content'}; a response is "
      "the text of its 'content' alone"
    )
  return m["content"]


def split_last(value: Any, where: str, field: str) -> tuple[list[Message], str]:
  """``(the messages before the last, the last one's content)`` of a conversation that ends
  with the assistant's response to at least one earlier message."""
  turns = messages(value, where, field)
  if len(turns) < 2:
    raise DataError(
      f"{where}: {field} must end with an assistant message after the prompt's messages, got "
      f"roles {[m['role'] for m in turns]}"
    )
  return turns[:-1], _response_text(turns[-1], where, field)


def _get(row: dict, field: str, where: str, expected: str) -> Any:
  if field not in row:
    raise DataError(f"{where}: missing field {field!r} (expected {expected})")
  return row[field]


PROMPT_FORMS = "'prompt', 'messages' or 'conversations', or an SFT or preference row"
SFT_FORMS = "'prompt' and 'response' (or 'completion'), 'messages' or 'conversations'"
PAIR_FORMS = "'prompt', 'chosen' and 'rejected', or 'chosen' and 'rejected' alone"


def prompt_row(row: dict, where: str) -> Prompt:
  """A prompts-file row's prompt; an SFT or preference row gives the prompt its response
  continues."""
  if "prompt" in row:
    return prompt(row["prompt"], where)
  if isinstance(row.get("messages"), str):
    return row["messages"]
  for field in ("messages", "conversations"):
    if field in row:
      turns = row[field]
      turns = sharegpt(turns, where) if field == "conversations" else messages(turns, where, field)
      if turns[-1]["role"] != "assistant":
        return turns
      # An SFT row: the prompt is what comes before the response.
      if len(turns) == 1 or turns[-2]["role"] == "assistant":
        raise DataError(
          f"{where}: {field} {'holds only' if len(turns) == 1 else 'ends with two'} assistant "
          "messages; a prompt is the turns before one assistant response"
        )
      return turns[:-1]
  if "chosen" in row and "rejected" in row:
    return preference_row(row, where)[0]
  raise DataError(f"{where}: missing field 'prompt' (expected {PROMPT_FORMS})")


def sft_row(row: dict, where: str) -> tuple[Prompt, str]:
  if "response" not in row and "completion" not in row:
    if "messages" in row:
      return split_last(row["messages"], where, "messages")
    if "conversations" in row:
      return split_last(sharegpt(row["conversations"], where), where, "conversations")
  head = prompt(_get(row, "prompt", where, SFT_FORMS), where)
  field = "response" if "response" in row or "completion" not in row else "completion"
  return head, response(_get(row, field, where, SFT_FORMS), where, field)


def preference_row(row: dict, where: str) -> tuple[Prompt, str, str]:
  chosen, rejected = (_get(row, f, where, PAIR_FORMS) for f in ("chosen", "rejected"))
  if not all(isinstance(v, (str, list)) for v in (chosen, rejected)):
    kinds = f"{type(chosen).__name__} and {type(rejected).__name__}"
    raise DataError(f"{where}: 'chosen' and 'rejected' must be texts or conversations, got {kinds}")
  for field, v in (("chosen", chosen), ("rejected", rejected)):
    if v == []:
      raise DataError(f"{where}: '{field}' is an empty list; expected a text or messages")
  # A whole conversation, not one assistant message: the prompt is the pair's shared start.
  whole = lambda v: is_conversation(v) and (len(v) > 1 or _role(v[0]) != "assistant")
  sides = {"chosen": chosen, "rejected": rejected}
  # Both lists of messages with roles (other problems are named where the messages are read),
  # one a whole conversation, the other its last message alone.
  with_roles = lambda v: is_conversation(v) and all(isinstance(_role(m), str) for m in v)
  if whole(chosen) != whole(rejected) and all(map(with_roles, sides.values())):
    full, lone = ("chosen", "rejected") if whole(chosen) else ("rejected", "chosen")
    raise DataError(
      f"{where}: '{full}' is a conversation (roles {[_role(m) for m in sides[full]]}), '{lone}' "
      "one assistant message: give both as whole conversations, or each as the assistant's "
      "message after 'prompt'"
    )
  if whole(chosen) or whole(rejected):
    if not (is_conversation(chosen) and is_conversation(rejected)):
      raise DataError(f"{where}: one of 'chosen' and 'rejected' is a conversation, the other not")
    head, good = split_last(chosen, where, "chosen")
    other, bad = split_last(rejected, where, "rejected")
    if other != head:
      raise DataError(
        f"{where}: 'chosen' and 'rejected' differ before their last message; without a 'prompt' "
        "field the messages before it are the shared prompt"
      )
    return head, good, bad
  if "prompt" not in row:
    if isinstance(chosen, str) and isinstance(rejected, str):
      return shared_start(chosen, rejected, where)
    raise DataError(f"{where}: missing field 'prompt' (expected {PAIR_FORMS})")
  head = prompt(row["prompt"], where)
  return head, response(chosen, where, "chosen"), response(rejected, where, "rejected")


# Where the assistant's turn starts in an HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...").
ASSISTANT = "\nAssistant:"


def shared_start(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
  """``(prompt, chosen response, rejected response)`` of two whole texts that share their start:
  the prompt ends after the last ``Assistant:`` opening a line (HH-RLHF's turn marker) before the
  first character where they differ or, with none there, before the last whitespace there, so
  that a word is never cut in two. Each response is the rest.

  Texts that differ before their last turn (an earlier human turn) cut at an earlier
  ``Assistant:``: the responses then hold the turns after it. Without a marker, answers that
  begin alike leave their common first words in the prompt. Either way the two sequences hold
  the same tokens before the cut, which the Bradley–Terry and DPO losses see alike. Two equal
  texts (a tie) split the same way at their end.
  """
  n = _common_length(chosen, rejected)
  marker = ("\n" + chosen[:n]).rfind(ASSISTANT)  # "\n" first: a text may open with the marker
  if marker >= 0:
    cut = marker + len(ASSISTANT) - 1
  else:  # back to the start of the last whitespace run at or before the first difference
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():
      cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
      cut -= 1
  if cut == 0:
    raise DataError(
      f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must start with the same "
      "prompt, ending in whitespace or 'Assistant:' before their answers; these share none"
    )
  return chosen[:cut], chosen[cut:], rejected[cut:]


def _common_length(a: str, b: str) -> int:
  """The length of the longest common start of ``a`` and ``b``, by bisection over slices compared
  in C (a Python loop over characters takes seconds over HH-RLHF's 160k pairs)."""
  lo, hi = 0, min(len(a), len(b))
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _role(m: Any) -> Any:
  return m.get("role") if isinstance(m, dict) else None


def template_kwargs(text: str | None) -> dict[str, Any]:
  """``data.chat_template_kwargs`` (a JSON object, or None) as keyword arguments of the template.

  Raises:
    ValueError: naming the field, when ``text`` is not a JSON object.
  """
  if text is None:
    return {}
  try:
    kwargs = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"data.chat_template_kwargs: not valid JSON ({e.msg}): {text!r}") from None
  if not isinstance(kwargs, dict):
    raise ValueError(
      f'data.chat_template_kwargs: expected a JSON object such as \'{{"enable_thinking": '
      f"false}}', got {text!r}"
    )
  return kwargs


def place(places: Sequence[str] | None, i: int, source: str) -> str:
  """How errors name row ``i``: its ``FILE:LINE`` in ``places``, else ``source: row N``."""
  return places[i] if places else f"{source}: row {i + 1}"


def chat_prompts(
  tokenizer: Any,
  prompts: Sequence[Prompt],
  system: str | None = None,
  kwargs: dict[str, Any] | None = None,
  *,
  source: str = "prompts",
  places: Sequence[str] | None = None,
) -> list[str]:
  """Each prompt in the tokenizer's chat template, ending with the assistant's header
  (``add_generation_prompt``): a text as a user turn, a conversation as it is; a ``system``
  turn goes first where the conversation has none of its own. ``kwargs`` are the template's
  own variables (Qwen3's ``enable_thinking``, say). A template that refuses a prompt is named
  with the prompt's ``places`` entry (its ``FILE:LINE``), else ``source`` and its row."""
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(
      "data.chat_template: the tokenizer has no chat template (tokenizer_config.json or "
      "chat_template.jinja of its folder sets none)"
    )
  head = [{"role": "system", "content": system}] if system is not None else []
  out = []
  for i, p in enumerate(prompts):
    turns = [{"role": "user", "content": p}] if isinstance(p, str) else p
    if not any(m["role"] == "system" for m in turns):
      turns = [*head, *turns]
    try:
      out.append(
        tokenizer.apply_chat_template(
          turns, tokenize=False, add_generation_prompt=True, **(kwargs or {})
        )
      )
    except Exception as e:  # jinja2's TemplateError, or what the template raises itself
      what = "data.system_prompt: " if head and turns[0] is head[0] else ""
      broken = type(e).__name__ == "TemplateSyntaxError"  # the template, not this row
      raise DataError(
        f"data.chat_template: the tokenizer's chat template does not parse: {e}"
        if broken
        else f"{place(places, i, source)}: data.chat_template: "
        f"{what}the tokenizer's template "
        f"refused: {e}"
      ) from None
  return out


def pair_margins(rows: Sequence[dict], places: Sequence[str]) -> np.ndarray | None:
  """The rows' ``margin`` fields (how much the chosen response is preferred: Llama 2's graded
  labels) as float32 ``[N]``; None when no row has one. A row without one, or one that is not a
  finite number, is a DataError naming it."""
  if not any("margin" in r for r in rows):
    return None
  out = np.zeros(len(rows), np.float32)
  for i, (row, where) in enumerate(zip(rows, places, strict=True)):
    m = row.get("margin")
    number = isinstance(m, int | float) and not isinstance(m, bool)
    if not number or not math.isfinite(m) or abs(m) > float(np.finfo(np.float32).max):
      got = "none" if "margin" not in row else repr(m)
      raise DataError(
        f"{where}: 'margin' must be a finite float32 number on every row (or on none), got {got}"
      )
    out[i] = m
  return out
