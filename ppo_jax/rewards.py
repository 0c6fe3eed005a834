"""Reward functions given by import path, and the checks on what they return.

``"package.module:function"`` names ``fn(prompts: list[str], responses: list[str], **fields) ->
Sequence[float]``. Only that module is imported (the one the user named), from the installed
packages, ``PYTHONPATH`` or the current folder; nothing is fetched.

The prompt rows' other fields reach the function as keyword arguments, one list per field aligned
with ``prompts``, as TRL passes a dataset's columns: ``def score(prompts, responses, answer)`` for
rows ``{"prompt": ..., "answer": ...}`` (a verifiable reward), or ``**fields`` for all of them. A
function that names no field gets none.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import reprlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class RewardError(ValueError):
  """A reward function that cannot be imported, raises, or returns something unusable."""


def load_reward_fn(path: str, *, what: str = "reward function") -> RewardFn:
  """Imports ``"package.module:function"``; errors name it as ``what`` (a config field, say)."""
  if not isinstance(path, str) or path.count(":") != 1:
    raise RewardError(f"{what} {path!r}: expected 'package.module:function'")
  module_name, attr = path.split(":")
  try:
    module = _import(module_name)
  except Exception as e:  # ImportError, or the module's own code failing (SyntaxError, ...)
    # Where it looked, when the module itself was not found (not a package it imports).
    unfound = isinstance(e, ModuleNotFoundError) and f"{module_name}.".startswith(f"{e.name}.")
    where = "; looked in the installed packages, PYTHONPATH and the current folder"
    raise RewardError(
      f"{what} {path!r}: cannot import {module_name!r} ({type(e).__name__}: {e}"
      f"{where if unfound else ''})"
    ) from None
  if not hasattr(module, attr):
    raise RewardError(f"{what} {path!r}: {module_name} has no function {attr!r}")
  fn = getattr(module, attr)
  if not callable(fn):
    raise RewardError(
      f"{what} {path!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function"
    )
  return fn


@dataclasses.dataclass(frozen=True)
class RewardSum:
  """Several reward functions as one score, ``r = Σₖ wₖ·fₖ(prompts, responses, **fields)``: a
  format reward beside a correctness reward, say. Each ``fₖ`` gets the fields its own signature
  takes, and its errors name its path; training logs each one's mean as ``scores/<name>``."""

  fns: tuple[RewardFn, ...]
  paths: tuple[str, ...]
  weights: tuple[float, ...]

  def __post_init__(self):
    if not len(self.fns) == len(self.paths) == len(self.weights) > 0:
      raise ValueError(
        f"RewardSum: {len(self.fns)} functions, {len(self.paths)} paths and "
        f"{len(self.weights)} weights; expected one of each, at least one"
      )

  @property
  def names(self) -> tuple[str, ...]:
    """Each function's name, or ``module.function`` where two share a name (a name TensorBoard
    keeps as it is: it rewrites a ``:``)."""
    short = [p.split(":")[1] for p in self.paths]
    whole = [p.replace(":", ".") for p in self.paths]
    return tuple(n if short.count(n) == 1 else w for n, w in zip(short, whole, strict=True))


def split_paths(spec: str | Sequence[str]) -> list[str]:
  """``"a:f, b:g"`` (or a list of paths) as ``["a:f", "b:g"]`` (empty entries kept, for
  ``reward_problems``)."""
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  return [str(p).strip() for p in parts]


def reward_problems(
  spec: str | None, weights: str | None, *, prefix: str = "config.reward."
) -> list[str]:
  """What is wrong with ``reward.fn`` (one path, or several joined by commas) and
  ``reward.weights`` (one number per function, joined by commas), each a line naming the field:
  ``prefix`` + ``fn`` or ``weights`` (``"--reward-"`` for the command line's flags)."""
  fn_field, weights_field = f"{prefix}fn", f"{prefix}weights"
  if callable(spec) or not (spec is None or isinstance(spec, str | list | tuple)):
    return [f"{fn_field}: expected 'package.module:function' paths, got {type(spec).__name__}"]
  if spec is None:
    return [f"{weights_field} is set, but no {fn_field} to weigh"] if weights is not None else []
  paths = split_paths(spec)
  if "" in paths:
    return [f"{fn_field} {spec!r}: an empty entry; expected 'package.module:function[,...]'"]
  if twice := sorted({p for p in paths if paths.count(p) > 1}):
    return [f"{fn_field} {spec!r}: {twice[0]!r} is named twice"]
  if weights is None:
    return []
  try:
    values = parse_weights(weights)
  except ValueError as e:
    return [f"{weights_field} {weights!r}: {e}"]
  if len(values) != len(paths):
    plural = lambda n, word: f"{n} {word}" + ("s" if n != 1 else "")
    return [
      f"{weights_field} {weights!r}: {plural(len(values), 'weight')} for "
      f"{plural(len(paths), 'function')}"
    ]
  if not any(values):
    return [f"{weights_field} {weights!r}: every weight is 0, so every score would be 0"]
  return []


def parse_weights(weights: str | Sequence[float]) -> tuple[float, ...]:
  """``"1, 0.5"`` (or ``[1, 0.5]``) as ``(1.0, 0.5)``; ValueError naming an entry that is not a
  finite number."""
  values = []
  entries = weights if isinstance(weights, list | tuple) else str(weights).split(",")
  for w in (str(x).strip() for x in entries):
    try:
      value = float(w)
    except ValueError:
      raise ValueError(f"{w!r} is not a number") from None
    if not math.isfinite(value):
      raise ValueError(f"{w!r} is not a finite number")
    values.append(value)
  return tuple(values)


def load_reward_fns(
  spec: str, weights: str | None = None, *, prefix: str = "config.reward."
) -> RewardFn | RewardSum:
  """``load_reward_fn`` for one path and no weights; a ``RewardSum`` for several paths joined by
  commas (weights: one per path, default 1) or given weights. Errors name ``prefix`` + ``fn`` or
  ``weights`` (``reward_problems``)."""
  if problems := reward_problems(spec, weights, prefix=prefix):
    raise RewardError(problems[0])
  paths = split_paths(spec)
  fns = tuple(load_reward_fn(p, what=f"{prefix}fn") for p in paths)
  if len(paths) == 1 and weights is None:
    return fns[0]
  ws = parse_weights(weights) if weights is not None else (1.0,) * len(paths)
  return RewardSum(fns, tuple(paths), ws)


def components(fn: RewardFn | RewardSum) -> tuple[RewardFn, ...]:
  """The functions a scorer calls: a ``RewardSum``'s, or ``fn`` itself."""
  return fn.fns if isinstance(fn, RewardSum) else (fn,)


def _import(module_name: str):
  """``importlib.import_module``, also from the current folder, which ``python -m`` puts on
  ``sys.path`` but a console script (``ppo-jax``) does not; it goes last, so an installed
  package of the same name wins, and stays there for the rest of the process."""
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    here = os.getcwd()
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    if e.name != module_name.split(".")[0] or here in on_path:
      raise
    sys.path.append(here)
    return importlib.import_module(module_name)


def call_reward_fn(
  fn: RewardFn | RewardSum,
  prompts: Sequence[str],
  responses: Sequence[str],
  *,
  columns: dict[str, Sequence] | None = None,
  name: str = "reward function",
  step: int | None = None,
  first: int = 0,
  total: int | None = None,
) -> np.ndarray:
  """``fn(prompts, responses, **fields)`` as float32 ``[B]``, ``fields`` the ``columns`` (the
  prompt rows' other fields, aligned with ``prompts``) its signature takes (a ``RewardSum``: its
  weighted sum); raises RewardError naming what went wrong (the responses by index: ``first`` +
  their index, of ``total``, for rows ``first:first + B`` of a bigger batch)."""
  parts = call_reward_parts(
    fn, prompts, responses, columns=columns, name=name, step=step, first=first, total=total
  )
  return summed(fn, parts, name=name, step=step)


def call_reward_parts(fn: RewardFn | RewardSum, prompts, responses, *, name, step=None, **kw):
  """Each of ``fn``'s components' float32 scores, ``[B, K]`` (``K = 1`` for a plain function),
  each called and checked by ``call_reward_fn``'s rules, errors naming the component's path."""
  fns, names = (fn.fns, fn.paths) if isinstance(fn, RewardSum) else ((fn,), (name,))
  return np.stack(
    [
      _call_one(f, prompts, responses, name=path, step=step, **kw)
      for f, path in zip(fns, names, strict=True)
    ],
    axis=1,
  )


def summed(fn: RewardFn | RewardSum, parts_BxK: np.ndarray, *, name: str, step=None) -> np.ndarray:
  """The score ``[B]`` of ``call_reward_parts``' columns: a ``RewardSum``'s weighted sum (in
  float64; RewardError when it leaves float32's range), a plain function's one column."""
  if not isinstance(fn, RewardSum):
    return parts_BxK[:, 0]
  total = parts_BxK.astype(np.float64) @ np.asarray(fn.weights, np.float64)
  if big := np.flatnonzero(np.abs(total) > np.finfo(np.float32).max).tolist():
    raise RewardError(
      f"{reward_fn_where(name, step)}: the weighted sum is beyond float32's range (±3.4e38) "
      f"{_which(big, len(total))}"
    )
  return total.astype(np.float32)


def _call_one(
  fn: RewardFn,
  prompts: Sequence[str],
  responses: Sequence[str],
  *,
  columns: dict[str, Sequence] | None = None,
  name: str = "reward function",
  step: int | None = None,
  first: int = 0,
  total: int | None = None,
) -> np.ndarray:
  """One plain function's call for ``call_reward_fn``."""
  where = reward_fn_where(name, step)
  fields = fields_taken(fn, columns or {}, where)
  try:
    out = fn(list(prompts), list(responses), **fields)
  except (Exception, SystemExit) as e:  # the user's code (sys.exit too): one line, cause chained
    raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
  n = len(responses)
  which = lambda bad: _which([first + i for i in bad], n if total is None else total)
  if out is None or np.isscalar(out):  # forgot `return`, or one number for the whole batch
    raise RewardError(
      f"{where} returned {reprlib.repr(out)}, not a sequence of {n} scores (one per response)"
    )
  if nones := [i for i, x in enumerate(out) if x is None] if isinstance(out, list | tuple) else []:
    raise RewardError(f"{where} returned None {which(nones)}, not a score")
  if isinstance(out, str | bytes) or any(isinstance(x, str | bytes) for x in out):
    raise RewardError(f"{where} returned text ({reprlib.repr(out)}), not numbers")
  try:
    scores = np.asarray(out, dtype=np.float64)
  except (TypeError, ValueError):  # text, or ragged nesting
    raise RewardError(f"{where} returned {type(out).__name__}, not a sequence of numbers") from None
  if scores.shape != (n,):
    raise RewardError(f"{where} returned an array of shape {scores.shape}; expected ({n},)")
  bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
  if bad:
    raise RewardError(f"{where} returned non-finite scores (NaN or inf) {which(bad)}")
  big = np.flatnonzero(np.abs(scores) > np.finfo(np.float32).max).tolist()
  if big:
    raise RewardError(f"{where} returned scores beyond float32's range (±3.4e38) {which(big)}")
  return scores.astype(np.float32)


def reward_fn_where(name: str, step: int | None) -> str:
  """How errors name a reward function's call: ``name`` and, in training, the step."""
  return name + (f" at step {step}" if step is not None else "")


def _which(indices: list[int], n: int) -> str:
  """``for k of n responses (indices i, j, …)``, the first 8 named."""
  named = ", ".join(map(str, indices[:8])) + (", …" if len(indices) > 8 else "")
  return f"for {len(indices)} of {n} responses (indices {named})"


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def fields_taken(
  fn: RewardFn, columns: dict[str, Sequence], where: str, *, every_row: bool = False
) -> dict[str, list]:
  """The ``columns`` ``fn`` takes as keyword arguments, after its two positional ones (all of
  them with ``**kwargs``); RewardError when it requires one the rows do not have (``every_row``:
  that some row lacks, None in its column)."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):  # a builtin without a signature: the two texts only
    return {}
  positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY][:2]
  rest = [p for p in params if p not in positional]
  names = {p.name for p in rest if p.kind in _NAMED}
  required = [p.name for p in rest if p.kind in _NAMED and p.default is p.empty]
  if missing := [name for name in required if name not in columns]:
    have = ", ".join(sorted(columns)) or "none besides the prompt"
    raise RewardError(
      f"{where} takes {missing[0]!r}, a field the prompt rows do not have (theirs: {have})"
    )
  for name in required if every_row else ():
    if lacking := [i for i, v in enumerate(columns[name]) if v is None]:
      raise RewardError(
        f"{where} takes {name!r}, a field {len(lacking)} of the {len(columns[name])} prompt rows "
        f"lack (the first: prompt row {lacking[0] + 1}); give every row one"
      )
  everything = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in rest)
  taken = {p.name for p in positional}
  return {k: list(v) for k, v in columns.items() if k not in taken and (everything or k in names)}
