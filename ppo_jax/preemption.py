"""Preemption: SIGTERM or SIGINT (a scheduler's notice, Ctrl-C) becomes a flag that the training
loops read between steps; they save a checkpoint where they can and raise ``Preempted``, and the
same command resumes. With several processes the stop is agreed by all of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

# JAX and NumPy are imported where used: ``ppo-jax`` takes this module's start-up handler before
# their seconds of imports.


class Preempted(Exception):
  """A SIGTERM/SIGINT stopped the run at a step boundary (after saving where possible)."""


class NonFiniteError(RuntimeError):
  """Too many consecutive updates skipped for non-finite values (``ppo.max_nonfinite``), in PPO
  or a supervised stage."""


def nonfinite_streak(
  streak: int,
  what: str | None,
  *,
  step: int,
  limit: int,
  stage: str,
  see: str,
  skipped: str = "update skipped",
  hint: str = "",
) -> int:
  """The count of consecutive skipped updates after ``step`` (``what``: the quantity that was not
  finite, None when all were). Each skip is said in one line; the ``limit``-th in a row raises
  ``NonFiniteError`` naming the quantity, the step, the stage and where its metrics are."""
  if what is None:
    return 0
  from ppo_jax.writers import say  # writers reads jax's process index: not at import

  streak += 1
  say(
    f"{stage} step {step}: non-finite {what}; {skipped} ({streak} in a row; {limit} stop the run)"
  )
  if streak >= limit:
    raise NonFiniteError(
      f"non-finite {what} at step {step} of the {stage} stage: {streak} consecutive updates "
      f"skipped (ppo.max_nonfinite; see {see}){hint}"
    )
  return streak


def stop_requested() -> bool:
  """Whether SIGTERM/SIGINT asked the run to stop, agreed by every process: each checks at its
  own step boundary, and one that saved while another stepped on would hang both."""
  import jax
  import numpy as np

  if jax.process_count() == 1:
    return GUARD.requested
  from jax.experimental import multihost_utils

  stop = bool(multihost_utils.process_allgather(np.int32(GUARD.requested)).any())
  GUARD.elsewhere = stop and not GUARD.requested
  return stop


STOPPED_AT_ONCE = (
  "ppo-jax: stopped at once by Ctrl-C; a save in progress is dropped, the checkpoints and stage "
  "folders saved before stay: run the same command again to resume"
)


def stop_at_once() -> None:
  """Exits with status 130 now, saying so in one line (the CLI's second Ctrl-C). Not an
  exception: raised inside a checkpoint save, it left orbax's threads mid-save (tracebacks, and
  an exit that waited minutes for their timeouts). What a save was writing stays in its
  temporary folder, which resuming ignores; a stage folder being written stays in its
  ``.NAME.partial`` (``stage_folders.saved_whole``). Written straight to the file descriptor: a
  signal handler that interrupted a write to ``sys.stderr``'s buffer would fail to flush it."""
  try:
    os.write(2, ("\n" + STOPPED_AT_ONCE + "\n").encode())
  finally:
    os._exit(130)


def _say(line: str) -> None:
  """``print`` from a signal handler, which may have interrupted a print (a progress line) whose
  buffer is locked: then straight to the file descriptor."""
  try:
    print(line, flush=True)
  except RuntimeError:  # "reentrant call inside <_io.BufferedWriter>"
    os.write(1, (line + "\n").encode())


def install(handler) -> dict[int, Any]:
  """Sets ``handler`` on SIGINT and SIGTERM, except one the process was started ignoring (a
  script's ``cmd &`` ignores SIGINT: a Ctrl-C meant for the script is not the run's); the handlers
  it replaced (none off the main thread, where Python sets no handler)."""
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(sig) is signal.SIG_IGN:
      continue
    with contextlib.suppress(ValueError):
      previous[sig] = signal.signal(sig, handler)
  return previous


def restore(previous: dict[int, Any]) -> None:
  """Puts back the handlers ``install`` replaced (None: one set from C, as the default)."""
  for sig, handler in previous.items():
    signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class PreemptionGuard:
  """Turns SIGTERM and SIGINT into a flag that the training loops check between steps."""

  def __init__(self):
    self.signal: int | None = None
    self.elsewhere = False  # another process was signalled (``stop_requested``)
    # The CLI's second Ctrl-C exits the process at once; in Python (a notebook's kernel, which
    # an exit would take down) it raises KeyboardInterrupt wherever the run is.
    self.exit_at_once = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionGuard:
    # A stop requested in an earlier run of this process is done with; one that came as the
    # command started, after its last look (``raise_at_start``), is this run's.
    self.signal = EARLY.pop() if EARLY else None
    self.elsewhere = False
    self._previous = install(self._handle)  # not the main thread: no handlers, no flag
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      if self.exit_at_once:
        stop_at_once()
      raise KeyboardInterrupt
    self.signal = signum
    again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
    _say(
      f"\nppo_jax: received {signal.Signals(signum).name}; stopping at the next step boundary"
      + again
    )

  @property
  def requested(self) -> bool:
    return self.signal is not None

  @property
  def signal_name(self) -> str:
    if self.signal is not None:
      return signal.Signals(self.signal).name
    return "a signal to another process" if self.elsewhere else "request"

  def __exit__(self, *exc):
    restore(self._previous)
    self._previous = {}


GUARD = PreemptionGuard()  # the pipeline enters it; the loops read it


# --------------------------------------------------------------------------------------------------
# The command's start (imports, the config load): a stop is remembered and acted on where the
# start looks, a second or so later. Raised where it came, inside an import, it broke that import
# (NumPy's: an ImportError, then a segfault) or was discarded (inside JAX's garbage-collection
# callback, printed as "ignored", and the whole run went on).

EARLY: list[int] = []  # a stop signal received while the command was starting


def early_stop(signum, frame) -> None:
  """The start-up handler of SIGINT/SIGTERM: remembers the signal; a second one raises at once."""
  del frame
  if EARLY:
    raise KeyboardInterrupt
  EARLY[:] = [signum]


def raise_at_start() -> None:
  """Raises KeyboardInterrupt if a stop came while the command was starting (kept in ``EARLY``
  for the message)."""
  if EARLY:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# The commands of files (ppo-jax sample, rm-eval, export): a stop is an exception where they are.


class Terminated(KeyboardInterrupt):
  """SIGTERM to a command, raised where it is, so its partial output is kept and said."""


_PENDING: list[int] = []  # the signal of a command's stop not yet seen by the command


def command_stop(signum, frame) -> None:
  """A command's SIGINT/SIGTERM handler: raises ``KeyboardInterrupt`` (``Terminated``) where the
  command is, and remembers it: Python discards an exception raised inside some callbacks (JAX's
  garbage-collection callback prints "Exception ignored in ... KeyboardInterrupt" and goes on),
  so the command's loops raise it again at their next batch (``raise_pending``)."""
  del frame
  _PENDING[:] = [signum]
  raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def raise_pending() -> None:
  """Raises the stop a command received and did not stop at (``command_stop``); nothing
  otherwise. The commands' loops call it between batches."""
  if _PENDING:
    raise Terminated if _PENDING[0] == signal.SIGTERM else KeyboardInterrupt


def pending_stop() -> int | None:
  """The signal of a command's stop, if one came; cleared (``run_command`` reads it once)."""
  signum = _PENDING[0] if _PENDING else None
  _PENDING.clear()
  return signum
