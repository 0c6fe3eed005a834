"""Reward functions imported by path in the tests ("reward_fns:...")."""


def superlatives(prompts, responses):
  """+1 for each "superb" or "wonderful", −0.5 for each "terrible" or "awful"."""
  del prompts
  score = {"superb": 1.0, "wonderful": 1.0, "terrible": -0.5, "awful": -0.5}
  return [sum(score.get(w, 0.0) for w in r.split()) for r in responses]


def raises(prompts, responses):
  raise RuntimeError("reward server unreachable")
