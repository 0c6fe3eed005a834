"""Shared test inputs: the named mask cases and garbage filling."""

import numpy as np

B, T = 4, 7


def _mask_cases() -> dict[str, np.ndarray]:
  """Named [B, T] masks: the shapes real rollouts take, and the corner cases."""
  lengths = lambda ls: np.array([[1.0] * n + [0.0] * (T - n) for n in ls])
  holes = np.ones((B, T))
  holes[0, 2] = holes[1, [0, 5]] = holes[3, 3:5] = 0.0
  left = np.zeros((B, T))
  for b, (start, end) in enumerate([(2, 7), (3, 5), (0, 4), (5, 6)]):
    left[b, start:end] = 1.0
  single = np.zeros((B, T))
  single[2, 4] = 1.0
  return {
    "full": np.ones((B, T)),
    "ragged": lengths([7, 3, 5, 1]),
    "empty_row": lengths([4, 0, 7, 2]),
    "prompt_and_pad": left,
    "holes": holes,
    "single_token": single,
    "all_masked": np.zeros((B, T)),
  }


MASKS = _mask_cases()


def with_garbage(x: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
  """x with ±1e3 written where the mask is 0."""
  rng = np.random.default_rng(seed)
  junk = rng.choice([-1e3, 1e3], size=x.shape)
  return np.where(mask > 0, x, junk)
