"""Checkpoints (orbax): save, resume checks, damaged ones named (preemption.py stops a run at a
step boundary, export.py exports).

A PPO checkpoint holds the whole resume state, ``PPOState`` (policy and critic parameters,
optimizer states, KL coefficient, running score statistics, step, the PRNG key as key data), and
a JSON record: the config, the model config and tokenizer (for export), the pre-PPO evaluation,
and the data cursor (the step: batches are a pure function of seed and step). A supervised
stage's (SFT, reward model, DPO) holds its parameters and optimizer state. Saves are asynchronous
and atomic: orbax writes into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import pathlib
import re
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from ppo_jax.orbax_noise import NO_SPACE, until_quiet
from ppo_jax.resume_rules import check_same_base, check_same_start, config_differences
from ppo_jax.writers import say

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every: int = 10  # PPO iterations between checkpoints (also saved at the end and on preemption)
  keep: int = 3  # checkpoints kept
  async_save: bool = True  # write in the background while training goes on
  # Steps between checkpoints of a supervised stage (SFT, reward model, DPO), also saved on
  # preemption and at DPO's end; 0: only then. SFT's and the reward model's are deleted once the
  # stage's model folder is written.
  supervised_every: int = 500


# What a checkpoint cut short fails with, at the root of orbax's chain of errors: tensorstore's
# status codes, or a JSON file that ends early.
DAMAGE = re.compile(
  r"DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|Invalid JSON|Error decoding|Expecting|Unterminated"
  r"|Unknown key: |was not found"  # a step folder without its state/ or meta/
)


class IncompleteCheckpoint(Exception):
  """A step folder lacks a file orbax reads without complaint (it returns None instead)."""


def state_metadata(mgr: ocp.CheckpointManager, step: int):
  """The metadata of checkpoint ``step``'s state arrays (names, shapes, dtypes); read through
  ``read``, whose one line a folder without it gets."""
  meta = mgr.item_metadata(step)
  try:
    state = meta["state"]
  except (KeyError, TypeError):
    state = None
  if state is None:
    raise IncompleteCheckpoint("no metadata of its arrays: state/_METADATA is missing")
  return state


_READ_LOCK = threading.Lock()  # sys.stderr is swapped for the whole process while reading


def read(fn: Callable[[], T], folder: pathlib.Path, what_then: str) -> T:
  """``fn()``, which reads the checkpoint ``folder``; a failure that looks like damage (a file cut
  short by a full disk or an interrupted copy) as one ValueError line naming the folder and the
  file, ending ``what_then``. Other failures (out of memory, say) are raised as they are.

  A damaged checkpoint fails inside orbax with a tensorstore error carrying a page of JSON spec;
  its other pending reads then call back into orbax's closed event loop, each printing a
  traceback to ``sys.stderr``, and its abandoned futures and coroutines report themselves when
  collected. That output is held back while reading; after damage, until it stops for 0.3 s and
  the garbage (the failed read's frames, released here) is collected, then dropped. Otherwise it
  is written out.
  """
  held, failure = io.StringIO(), None
  with _READ_LOCK:
    try:
      with contextlib.redirect_stderr(held):
        try:
          value = fn()
        except Exception as e:
          root = e
          while root.__cause__ is not None:  # orbax wraps tensorstore's error, naming the file
            root = root.__cause__
          text = re.split(r" \[tensorstore_spec=| See full TensorStore details", str(root))[0]
          known = isinstance(root, (IncompleteCheckpoint, json.JSONDecodeError, FileNotFoundError))
          if not (known or DAMAGE.search(text)):
            raise
          failure = f"{type(root).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"
          del e, root
        if failure is not None:  # the failed read's frames are released: collect them in here
          asyncio_log = logging.getLogger("asyncio")  # "Future exception was never retrieved"
          asyncio_log.disabled, was = True, asyncio_log.disabled
          try:
            until_quiet(held, quiet_s=0.3, limit_s=5.0)
            gc.collect()
          finally:
            asyncio_log.disabled = was
          held = io.StringIO()
    finally:
      sys.stderr.write(held.getvalue())
  if failure is not None:
    raise ValueError(
      f"{folder} cannot be read, it is damaged or incomplete ({failure}); {what_then}"
    )
  return value


def holds_checkpoints(folder: pathlib.Path) -> bool:
  """Whether ``folder`` exists and holds anything (a checkpoint, or one being written)."""
  folder = pathlib.Path(folder)
  return folder.is_dir() and any(folder.iterdir())


class Checkpointer:
  """Saves and restores a training state (a pytree: ``PPOState`` under ``WORKDIR/checkpoints``, a
  supervised stage's under ``WORKDIR/{stage}_checkpoints``); close it, or use ``with``."""

  def __init__(self, directory: pathlib.Path, settings: CheckpointSettings):
    self.directory = pathlib.Path(directory)
    self.settings = settings
    options = ocp.CheckpointManagerOptions(
      max_to_keep=settings.keep,
      enable_async_checkpointing=settings.async_save,
      cleanup_tmp_directories=True,
    )
    # Handlers named up front: a fresh manager can then read the metadata of a saved state.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(
      self.directory.absolute(), options=options, item_handlers=handlers
    )

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state, record: dict[str, Any]) -> None:
    state = _key_data(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record))
    with self._writing():  # an earlier background save's failure surfaces here too
      self._mgr.save(step, args=args, force=True)

  @contextlib.contextmanager
  def _writing(self):
    """A save that failed for want of disk space as one line (OSError) naming the folder: the
    checkpoint it wrote is incomplete, the ones before are whole. Orbax's threads' own reports
    of it (a traceback each, hundreds of lines) are dropped."""
    failed = False
    try:
      yield
    except Exception as e:
      if not NO_SPACE.search(str(e)):
        raise
      failed = True
    if failed:  # the failed writes' late callbacks, once their frames are released: dropped
      # and at exit, the writes never awaited (orbax's coroutines; a RuntimeWarning each)
      warnings.filterwarnings("ignore", r"coroutine 'async_serialize", RuntimeWarning)
      held = io.StringIO()
      with contextlib.redirect_stderr(held):
        until_quiet(held, quiet_s=0.3, limit_s=5.0)
        gc.collect()
      whole = [s for s in self._mgr.all_steps() if (self.directory / str(s)).is_dir()]
      raise OSError(
        f"no space left on the device of {self.directory} while writing a checkpoint; "
        + (f"the one of step {max(whole)} is whole: " if whole else "")
        + "free some space and run the same command again to resume"
      )

  def restore(self, like_state, step: int | None = None):
    """``(state, record)`` of ``step`` (default: latest), onto ``like_state``'s shapes and
    shardings (so a checkpoint restores onto another mesh)."""
    step = self._mgr.latest_step() if step is None else step
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _key_data(like_state)
    )
    self._check_layout(step, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    out = self._read(step, lambda: self._mgr.restore(step, args=args))
    state = jax.tree.map(
      lambda like, x: (
        jax.random.wrap_key_data(x, impl=jax.random.key_impl(like)) if _is_key(like) else x
      ),
      like_state,
      out.state,
    )
    return state, out.meta

  def resume(
    self,
    like_state,
    record: dict,
    iterations: int,
    defaults: dict | None = None,
    *,
    only: tuple[str, ...] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
    limit: str | None = None,
  ):
    """``(state, saved record)`` of the latest checkpoint, or None when there is none.

    Refuses (one ValueError line) a checkpoint whose config differs from ``record["config"]`` in
    a field that matters (``config_differences``, with ``defaults`` for fields added since the
    save, and ``only`` to compare only some sections), then one that ``check(saved record)``
    raises for, then one past step ``iterations`` (the run would do nothing; ``limit``: what
    gives ``iterations``, as the refusal says it, default ``ppo.iterations=N``). ``like_state``
    may hold arrays or ``jax.ShapeDtypeStruct``s with shardings (nothing allocated before the
    read)."""
    step = self.latest_step()
    if step is None:
      return None
    saved_record = self.check_config(record.get("config", {}), None, defaults, only=only)
    check_same_base(saved_record, record, self.directory)
    check_same_start(saved_record, record, self.directory)
    if check is not None:
      check(saved_record)
    self.check_step(step, iterations, limit)
    out = self.restore(like_state, step)
    say(f"resuming from the checkpoint of step {step} in {self.directory}")
    return out

  def check_config(
    self,
    config: dict,
    iterations: int | None,
    defaults: dict | None = None,
    *,
    only: tuple[str, ...] | None = None,
    start_over: Callable[[list[str]], str] | None = None,
  ) -> dict[str, Any]:
    """The latest checkpoint's record, after refusing (one ValueError line) one whose config
    differs from ``config`` in a field that matters (``config_differences``) and (unless
    ``iterations`` is None) one past step ``iterations`` (the run would do nothing). Reads the
    record only: a run calls it before writing anything, and ``resume`` calls it again.
    ``start_over``: the refusal's last words, from the differing fields' names (what to delete
    to run this config there)."""
    step = self.latest_step()
    saved_record = self.record(step)
    diffs = config_differences(saved_record.get("config", {}), config, defaults=defaults, only=only)
    if diffs:
      fields = [d.split(":")[0] for d in diffs]
      raise ValueError(
        f"{self.directory} holds checkpoints of a different config ({'; '.join(diffs)}); use a"
        f" new workdir or the original config{start_over(fields) if start_over else ''}"
      )
    if iterations is not None:
      self.check_step(step, iterations)
    return saved_record

  def check_step(self, step: int, iterations: int, limit: str | None = None) -> None:
    """Refuses (one line) a checkpoint of ``step``, past the run's last step ``iterations``
    (``limit``: what gives it, as said; default ``ppo.iterations=N``)."""
    if step > iterations:
      raise ValueError(
        f"{self.directory} holds step {step}, past {limit or f'ppo.iterations={iterations}'}; "
        "raise it to go on, or `ppo-jax export --step` an earlier checkpoint"
      )

  def _check_layout(self, step: int, target) -> None:
    """One line naming the first difference when the saved arrays are not the ones ``target``
    has (names and shapes): a checkpoint of another ppo_jax version's state layout, say."""
    saved = _shapes(self._read(step, lambda: state_metadata(self._mgr, step)))
    wanted = _shapes(target)
    only_saved, only_here = sorted(saved.keys() - wanted), sorted(wanted.keys() - saved)
    reshaped = [k for k in sorted(saved.keys() & wanted) if saved[k] != wanted[k]]
    if not (only_saved or only_here or reshaped):
      return
    if reshaped:
      what = f"{reshaped[0]} is {saved[reshaped[0]]} there, {wanted[reshaped[0]]} here"
    else:
      what = (
        f"{len(only_saved)} arrays only in the checkpoint (e.g. {(only_saved or ['-'])[0]}), "
        f"{len(only_here)} only in this run (e.g. {(only_here or ['-'])[0]})"
      )
    raise ValueError(
      f"{self.directory} step {step} holds a state of another layout ({what}); it was written by"
      " another ppo_jax version or model: use a new workdir"
    )

  def record(self, step: int | None = None) -> dict[str, Any]:
    step = self._mgr.latest_step() if step is None else step
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    return self._read(step, lambda: self._mgr.restore(step, args=args)).meta

  def _read(self, step: int, fn: Callable[[], T]) -> T:
    """``read`` of step ``step``: a damaged one is to be deleted, resuming from the one before."""
    earlier = [s for s in self._mgr.all_steps() if s < step]
    where = f"from step {max(earlier)}" if earlier else "from the start"
    return read(
      fn,
      self.directory / str(step),
      f"delete that folder to resume {where} (nothing else is touched)",
    )

  def wait(self) -> None:
    with self._writing():
      self._mgr.wait_until_finished()

  def close(self) -> None:
    with self._writing():
      self._mgr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _key_data(tree):
  """``tree`` with its typed PRNG keys as their raw ``uint32`` data (what orbax can write)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"a.b.0": shape}`` of a state or of orbax's metadata of one (whose named tuples are
  dicts): the keys' names only, so the two compare."""

  def name(k) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  return {
    ".".join(name(k) for k in path): tuple(x.shape)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }
