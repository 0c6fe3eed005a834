"""How the commands of files (``ppo-jax sample``, ``ppo-jax rm-eval``) batch their rows and
score them: longest first, each batch cut to its longest row, padded to split over the mesh; and
how they write their output file: checked before any work, whole or kept as ``OUT.partial``."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ppo_jax import sharding as shd
from ppo_jax.actor_critic import response_logprobs, reward_scores
from ppo_jax.models import CausalLM, RewardModel


def trimmed(lengths, width: int, *, floor: int = 16) -> int:
  """The width a batch is cut to whose rows hold ``lengths`` real tokens, out of ``width``: the
  longest rounded up to a power of two, at least ``floor`` and at most ``width``. Left padding
  changes nothing but the cost (positions and attention come from the mask)."""
  longest = max(1, int(np.max(lengths)))
  return min(width, max(floor, 1 << (longest - 1).bit_length()))


def batch_order(lengths_R: np.ndarray) -> np.ndarray:
  """The order rows of these prompt lengths are sampled in: longest first (a stable sort), so a
  batch holds prompts of about one length and ``trimmed`` cuts it narrow; a batch too big for
  the devices fails at once, not at the end."""
  return np.argsort(-np.asarray(lengths_R), kind="stable")


def batch_rows(batch_size: int, rows: int, mesh: Mesh | None) -> tuple[int, int, str]:
  """``(rows per batch, rows per call, what to say)``: a batch holds ``batch_size`` rows (at most
  ``rows``), whatever the devices; a call pads it to a multiple of the mesh's ``data × fsdp``, so
  that the rows split evenly."""
  chunk = min(batch_size, rows)
  split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  width = -(-chunk // split) * split
  said = f"batches of {chunk}"
  if width != chunk:
    said += f" (padded to {width} rows: data × fsdp = {split})"
  return chunk, width, said + (f" on {shd.describe(mesh)}" if mesh is not None else "")


def rm_scorer(rm: RewardModel, mesh: Mesh | None = None):
  """``score(ids, mask) → [B]``: the reward model's scores, jitted (``reward_scores``), the host
  rows split over the mesh's batch devices (``rm`` placed with ``placed``)."""
  return _on_rows(reward_scores, rm, mesh)


def logprob_scorer(model: CausalLM, mesh: Mesh | None = None, *, temperature: float):
  """``logprobs(ids, mask, n) → [B, n]``: ``token_logprobs`` of the last ``n`` tokens under
  ``model`` (a reference policy, say) at ``temperature``, jitted, the host rows split over the
  mesh's batch devices (``model`` placed with ``placed``)."""
  fn = functools.partial(response_logprobs, temperature=temperature)
  return _on_rows(fn, model, mesh, static_argnums=3)


def _on_rows(fn, model, mesh: Mesh | None, **jit_kw):
  """``fn(graphdef, state, ids, mask, *rest)`` of ``model``, jitted, as ``(ids, mask, *rest) →``
  with the host rows split over the mesh's batch devices."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(functools.partial(fn, graphdef), **jit_kw)
  return lambda ids, mask, *rest: jitted(
    state, shd.on_rows(ids, mesh), shd.on_rows(mask, mesh), *rest
  )


def output_file(out: str | os.PathLike) -> pathlib.Path:
  """``--out`` checked before any work: a file that is not there yet, in a folder that can be
  written (made if missing), and no ``OUT.partial`` of an interrupted run, whose rows a new run
  would replace (one line each, ``ValueError``)."""
  text = os.fspath(out)
  out = pathlib.Path(text)
  if text.endswith(os.sep) or out.is_dir():
    raise ValueError(f"--out {text} is a folder; give the file to write")
  if out.exists():
    raise ValueError(f"--out {out} exists; pick another file or delete it")
  partial = out.with_name(out.name + ".partial")
  if partial.exists():
    raise ValueError(
      f"{partial} holds what an interrupted run wrote; move it away (or delete it) to write {out}"
    )
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out {out}: cannot make its folder ({e.strerror})") from None
  if not os.access(out.parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out {out}: cannot write in {out.parent}")
  return out


@contextlib.contextmanager
def written_when_done(out: pathlib.Path, unit: str):
  """A text file to write ``out`` through: lines go to ``out.partial``, renamed ``out`` when the
  block ends. If it raises (an error, Ctrl-C), a partial file holding lines is kept and stderr
  says so in one line (an empty one is deleted): ``out`` itself only ever holds a whole result."""
  partial = out.with_name(out.name + ".partial")
  f = partial.open("w")
  try:
    yield f
  except BaseException:
    f.close()
    if lines := len(partial.read_text().splitlines()):
      print(
        f"kept the {lines} {unit} written before the stop in {partial} (move it away or delete it "
        f"before writing {out} again)",
        file=sys.stderr,
      )
    else:
      partial.unlink(missing_ok=True)
    raise
  f.close()
  partial.replace(out)


def ticker(say, total: int, unit: str):
  """``tick(done)``: says ``done/total unit, seconds`` at most every 10 s, and once all are done
  (the progress of a command over a file)."""
  t0 = shown = time.perf_counter()

  def tick(done: int) -> None:
    nonlocal shown
    now = time.perf_counter()
    if now - shown > 10 or done == total:
      say(f"  {done}/{total} {unit}, {now - t0:.1f} s", flush=True)
      shown = now

  return tick
