"""Reward functions imported by path in the tests ("reward_fns:...")."""

import os
import signal


def superlatives(prompts, responses):
  """+1 for each "superb" or "wonderful", −0.5 for each "terrible" or "awful"."""
  del prompts
  score = {"superb": 1.0, "wonderful": 1.0, "terrible": -0.5, "awful": -0.5}
  return [sum(score.get(w, 0.0) for w in r.split()) for r in responses]


def raises(prompts, responses):
  raise RuntimeError("reward server unreachable")


def words_minus_prompt(prompts, responses):
  """The response's word count less a tenth of the prompt's: depends on both arguments."""
  return [len(r.split()) - 0.1 * len(p.split()) for p, r in zip(prompts, responses, strict=True)]


def keyed(prompts, responses, key):
  """The prompt row's ``key`` field must be its prompt text (the two stay aligned through
  batching, groups and held-out evaluation); the score is the response's length in words."""
  for p, k in zip(prompts, key, strict=True):
    if p != k:
      raise AssertionError(f"key {k!r} arrived with prompt {p!r}")
  return [float(len(r.split())) for r in responses]


def shortness(prompts, responses):
  """Minus the response's word count: a judge that disagrees with ``keyed``'s length reward."""
  del prompts
  return [-float(len(r.split())) for r in responses]


def fails_at_w10(prompts, responses):
  """0 for each response, but raises for a batch holding a prompt that starts with w10."""
  if any(p.startswith("w10") for p in prompts):
    raise RuntimeError("judge crashed")
  return [0.0] * len(responses)


def terminated_at_w10(prompts, responses):
  """As ``fails_at_w10``, with the SIGTERM of a scheduler that stops the command there."""
  if any(p.startswith("w10") for p in prompts):
    os.kill(os.getpid(), signal.SIGTERM)
  return [0.0] * len(responses)


def interrupted_at_w10(prompts, responses):
  """As ``fails_at_w10``, with the Ctrl-C of a user who stops the command there."""
  if any(p.startswith("w10") for p in prompts):
    raise KeyboardInterrupt
  return [0.0] * len(responses)


def ctrl_c_discarded_at_w10(prompts, responses):
  """As ``interrupted_at_w10``, with the Ctrl-C raised where Python discards it (as it does in
  JAX's garbage-collection callback): the command must still stop, at its next batch."""
  if any(p.startswith("w10") for p in prompts):
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pass
  return [0.0] * len(responses)


def superlatives_twice(prompts, responses):
  """``superlatives``, doubled: a second function for a weighted sum."""
  return [2.0 * s for s in superlatives(prompts, responses)]


CALLS = [0]  # calls of fails_on_third_call; a test sets it


def fails_on_third_call(prompts, responses):
  """The response's length in words, but a judge that times out on its third call."""
  CALLS[0] += 1
  if CALLS[0] == 3:
    raise RuntimeError("judge timed out")
  return [float(len(r.split())) for r in responses]
