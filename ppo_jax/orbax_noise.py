"""Orbax's noise after a failed write or read: its threads' reports of a full disk (absl ERROR
records, a traceback each), tensorstore's callbacks into its closed event loop, and the quiet to
wait for before dropping what a failed read printed. ``checkpoint`` says each failure in one
line instead; importing this module installs the filters (once)."""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Callable

NO_SPACE = re.compile(r"No space left on device|os_error_code='28'|ENOSPC")


class NoSpaceReports(logging.Filter):
  """Drops orbax's thread reports (absl ERROR records, a traceback each) of a write that failed
  for want of disk space: ``Checkpointer`` says it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    chain = _chain(record)
    texts = (record.getMessage(), *map(str, chain))
    no_space = any(NO_SPACE.search(t) for t in texts)
    return not (no_space and _from_orbax(record, chain))


def _from_orbax(record: logging.LogRecord, chain: list[BaseException]) -> bool:
  """Whether a log record reports orbax's (or tensorstore's) own work: logged from its code, or
  about a coroutine or a traceback of it. A user's program's reports of a full disk stay."""
  places = [record.pathname, record.getMessage()]
  for e in chain:
    tb = e.__traceback__
    while tb is not None:
      places.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
  return any(("orbax" in p or "tensorstore" in p) for p in places)


def _chain(record: logging.LogRecord) -> list[BaseException]:
  """The exception a log record carries and its causes."""
  e, out = record.exc_info[1] if record.exc_info else None, []
  while e is not None and len(out) < 20:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is a native thread's (tensorstore's) callback into orbax's
  event loop after it closed: ``RuntimeError('Event loop is closed')`` raised in
  ``call_soon_threadsafe`` with no Python caller. A failed save leaves hundreds of them."""
  tb = unraisable.exc_traceback
  return (
    isinstance(unraisable.exc_value, RuntimeError)
    and str(unraisable.exc_value) == "Event loop is closed"
    and tb is not None
    and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
  )


def quiet_closed_loop_callbacks(previous: Callable) -> Callable:
  def hook(unraisable) -> None:
    if not _closed_loop_callback(unraisable):
      previous(unraisable)

  hook.ppo_jax = True
  return hook


logging.getLogger("absl").addFilter(NoSpaceReports())  # orbax's thread reports
logging.getLogger("asyncio").addFilter(NoSpaceReports())  # "Task exception was never retrieved"
if not getattr(sys.unraisablehook, "ppo_jax", False):
  sys.unraisablehook = quiet_closed_loop_callbacks(sys.unraisablehook)


def until_quiet(stream: io.StringIO, *, quiet_s: float, limit_s: float) -> None:
  """Returns once nothing was written to ``stream`` for ``quiet_s`` (at most ``limit_s``)."""
  start = last_change = time.monotonic()
  size = stream.tell()
  while time.monotonic() - last_change < quiet_s and time.monotonic() - start < limit_s:
    time.sleep(0.05)
    if stream.tell() != size:
      size, last_change = stream.tell(), time.monotonic()
