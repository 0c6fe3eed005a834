"""Rows in the conversational form of chat datasets: lists of ``{"role", "content"}`` messages,
as TRL's dataset formats and most instruction and preference sets on the Hugging Face hub write
them, turned into what ``ppo_jax.data`` encodes: a prompt (a text, or a conversation ending where
the response starts) and response texts.

Accepted rows (a text field may be a string anywhere a conversation is shown; a response given
as a conversation is one assistant message):

- prompts: ``{"prompt": [...]}`` or ``{"messages": [...]}``, ending on a turn that is not the
  assistant's;
- SFT: ``{"messages": [..., assistant]}`` (the last message is the response, the rest the
  prompt), or ``{"prompt": [...], "completion": [assistant]}`` (``"response"`` also reads);
- preferences: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``, or
  ``{"chosen": [..., assistant], "rejected": [..., assistant]}`` whose messages before the last
  are the same (the shared prompt).

Every error is a ``DataError`` naming the file and line (``where``).
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]
Prompt = str | list[Message]  # a text, or the conversation the response continues


class DataError(ValueError):
  """Bad input data; the message names the file and line."""


def is_conversation(value: Any) -> bool:
  return isinstance(value, list)


def messages(value: Any, where: str, field: str) -> list[Message]:
  """``value`` checked as a non-empty list of messages with string ``role`` and ``content``
  (other keys, a tool call's say, go to the chat template as they are)."""
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of messages")
  for i, m in enumerate(value, 1):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise DataError(f"{where}: {field}[{i}] must be an object with a string 'role'")
    if not isinstance(m.get("content"), str):
      raise DataError(f"{where}: {field}[{i}] ({m['role']}) must have a string 'content'")
  return value


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
  return turns[0]["content"]


def split_last(value: Any, where: str, field: str) -> tuple[list[Message], str]:
  """``(the messages before the last, the last one's content)`` of a conversation that ends
  with the assistant's response to at least one earlier message."""
  turns = messages(value, where, field)
  if turns[-1]["role"] != "assistant" or len(turns) < 2:
    raise DataError(
      f"{where}: {field} must end with an assistant message after the prompt's messages, got "
      f"roles {[m['role'] for m in turns]}"
    )
  return turns[:-1], turns[-1]["content"]


def _get(row: dict, field: str, where: str, expected: str) -> Any:
  if field not in row:
    raise DataError(f"{where}: missing field {field!r} (expected {expected})")
  return row[field]


PROMPT_FORMS = "'prompt', or 'messages'"
SFT_FORMS = "'prompt' and 'response' (or 'completion'), or 'messages'"
PAIR_FORMS = "'prompt', 'chosen' and 'rejected', or conversations in 'chosen' and 'rejected'"


def prompt_row(row: dict, where: str) -> Prompt:
  if "prompt" not in row and "messages" in row:
    return prompt(row["messages"], where, "messages")
  return prompt(_get(row, "prompt", where, PROMPT_FORMS), where)


def sft_row(row: dict, where: str) -> tuple[Prompt, str]:
  if "prompt" not in row and "messages" in row:
    return split_last(row["messages"], where, "messages")
  head = prompt(_get(row, "prompt", where, SFT_FORMS), where)
  field = "response" if "response" in row or "completion" not in row else "completion"
  return head, response(_get(row, field, where, SFT_FORMS), where, field)


def preference_row(row: dict, where: str) -> tuple[Prompt, str, str]:
  chosen, rejected = (_get(row, f, where, PAIR_FORMS) for f in ("chosen", "rejected"))
  if "prompt" in row:
    head = prompt(row["prompt"], where)
    return head, response(chosen, where, "chosen"), response(rejected, where, "rejected")
  if not (is_conversation(chosen) and is_conversation(rejected)):
    raise DataError(f"{where}: missing field 'prompt' (expected {PAIR_FORMS})")
  head, good = split_last(chosen, where, "chosen")
  other, bad = split_last(rejected, where, "rejected")
  if other != head:
    raise DataError(
      f"{where}: 'chosen' and 'rejected' differ before their last message; without a 'prompt' "
      "field the messages before it are the shared prompt"
    )
  return head, good, bad
