"""Stage folders (``sft/``, ``reward_model/``, ``ppo_base/``, ``policy/``) written whole or not
at all: into a hidden ``.NAME.partial``, then renamed over the old folder, which is renamed aside
first (``.NAME.old``) and put back if a kill came between the two renames."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Any

from ppo_jax import sharding as shd
from ppo_jax.models import save_pretrained

STAGE_FOLDERS = ("sft", "reward_model", "ppo_base", "policy")  # what saved_whole writes


@contextlib.contextmanager
def saved_whole(out: pathlib.Path):
  """Yields the hidden folder ``.NAME.partial`` beside ``out`` to write a model folder into; once
  written it becomes ``out``, and every process waits for it. A kill mid-write leaves the partial
  folder, never an ``out`` with weights but no tokenizer or record, which a resumed run would take
  for finished. An ``out`` already there is renamed aside just before, and deleted after (a run
  rewrites only an unfinished one, or its own result, which it writes again if killed between)."""
  staging = out.with_name(f".{out.name}.partial")
  aside = out.with_name(f".{out.name}.old")
  main = shd.is_main_process()  # the first process writes (save_pretrained) and moves
  if main:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
  yield staging
  if main:
    # Renamed aside, then deleted: ``out`` is missing only between two renames, not for the
    # seconds a large folder takes to delete.
    if out.is_symlink() or out.is_file():
      out.unlink()
    elif out.exists():
      os.replace(out, aside)
    os.replace(staging, out)
    shutil.rmtree(aside, ignore_errors=True)
  shd.sync(f"saved {out.name}")  # no process reads out (its record, say) before it is there


def put_back_aside(workdir: pathlib.Path) -> None:
  """A stage folder renamed aside by ``saved_whole`` and not replaced (a kill between its two
  renames) goes back in place, before anything reads it."""
  if shd.is_main_process():
    for name in STAGE_FOLDERS:
      out, aside = workdir / name, workdir / f".{name}.old"
      if aside.is_dir() and not out.exists():
        os.replace(aside, out)
  shd.sync("stage folders put back")


def save_whole(model, out: pathlib.Path, tokenizer: Any, **kw) -> None:
  """``save_pretrained`` into ``out``, whole or not at all (``saved_whole``)."""
  with saved_whole(out) as staging:
    save_pretrained(model, staging, tokenizer=tokenizer, **kw)
