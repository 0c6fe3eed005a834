"""What a compiled program's loops do, read from its optimised HLO text.

For the decode loop two facts decide whether a step can run at the memory roofline on a GPU:

- the trip count: with ``known_trip_count`` in the while loop's backend config XLA:GPU runs the
  body N times back to back; without it, it copies the loop predicate to the host after every
  step and waits for it before launching the next;
- the weight casts: a ``convert`` from float32 inside the loop body re-reads the float32 master
  weights on every step (4 bytes per weight instead of 2).

``loop_report(compiled.as_text(), shapes=...)`` gives both for every while loop, given the
weights' shapes (a cast of another array, say a cache that XLA:CPU widens to float32 around its
bf16 updates, is not counted).
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_CALLEE = re.compile(r"\b(?:calls|body|condition|to_apply)=%(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")
_OP = re.compile(r"\s(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)")
_OPERAND = re.compile(r"\s*(?:(?P<shape>[a-z]+\d*\[[\d,]*\])\S*\s+)?%(?P<name>[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Convert:
  computation: str
  dims: tuple[int, ...]
  target_dtype: str  # "bf16" or "f16"; the source is float32

  @property
  def source_bytes(self) -> int:
    return 4 * math.prod(self.dims)


@dataclasses.dataclass(frozen=True)
class Loop:
  name: str
  trip_count: int | None  # None: XLA does not know it (a data-dependent exit)
  converts: tuple[Convert, ...]  # float32 → narrower casts of weight-shaped arrays in the body

  @property
  def convert_bytes(self) -> int:
    """Bytes of float32 the casts read on each trip."""
    return sum(c.source_bytes for c in self.converts)


def _parse(hlo_text: str):
  """computation → {instruction: rest of its line}, and computation → callees."""
  comps: dict[str, dict[str, str]] = {}
  callees: dict[str, set[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(", 1)[0]:
      current = header["name"]
      comps[current], callees[current] = {}, set()
      continue
    instr = _INSTR.match(line) if current else None
    if instr:
      comps[current][instr["name"]] = instr["rest"]
      callees[current].update(m["name"] for m in _CALLEE.finditer(line))
      for m in _BRANCHES.finditer(line):
        callees[current].update(n.strip().lstrip("%") for n in m["names"].split(","))
  return comps, callees


def _array(shape_text: str) -> tuple[str, tuple[int, ...]] | None:
  """(dtype, dims) of the array shape an instruction's text starts with."""
  m = _ARRAY.match(shape_text.strip())
  return (m["dtype"], _dims(m)) if m else None


def _dims(m: re.Match) -> tuple[int, ...]:
  return tuple(int(d) for d in m["dims"].split(",") if d)


def _key(dims) -> tuple[int, ...]:
  return tuple(sorted(dims))  # a weight may appear transposed


def _reachable(comps, callees, root: str) -> set[str]:
  inside, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c not in inside and c in comps:
      inside.add(c)
      todo.extend(callees[c])
  return inside


def _weight_casts(comps, computations, wanted) -> list[Convert]:
  """The float32 → bf16/f16 converts of weight-shaped arrays in ``computations``."""
  found = []
  for c in sorted(computations):
    for rest in comps[c].values():
      op = _OP.search(rest)
      if not op or op["op"] != "convert":
        continue
      target = _array(rest)
      # The operand prints as "%x" or, in older dumps, as "f32[..]{..} %x".
      operand = _OPERAND.match(op["args"])
      if not target or not operand:
        continue
      source = _array(operand["shape"] or comps[c].get(operand["name"], ""))
      if (
        source and source[0] == "f32" and target[0] in ("bf16", "f16") and _key(source[1]) in wanted
      ):
        found.append(Convert(computation=c, dims=source[1], target_dtype=target[0]))
  return found


def loop_report(hlo_text: str, *, shapes) -> list[Loop]:
  """The while loops of an optimised HLO module that carry a weight (an array of one of
  ``shapes``, in any order of its dims): the trip count if XLA knows it, and the casts of
  weight-shaped arrays from float32 to a narrower float anywhere inside the body (fusions and
  nested loops included)."""
  wanted = {_key(s) for s in shapes}
  comps, callees = _parse(hlo_text)
  loops = []
  for instrs in comps.values():
    for name, rest in instrs.items():
      op = _OP.search(rest)
      if not op or op["op"] != "while":
        continue
      carried = {_key(_dims(m)) for m in _ARRAY.finditer(rest[: op.start()])}
      body = re.search(r"\bbody=%(?P<b>[\w.\-]+)", rest)
      if not body or not carried & wanted:  # e.g. XLA:CPU's random-bit generator, a loop of its own
        continue
      trip = _TRIP.search(rest)
      loops.append(
        Loop(
          name=name,
          trip_count=int(trip["n"]) if trip else None,
          converts=tuple(_weight_casts(comps, _reachable(comps, callees, body["b"]), wanted)),
        )
      )
  return loops


def describe(loops: list[Loop]) -> str:
  """One line per loop, for a benchmark's output."""
  if not loops:
    return "no while loop over the weights in the program"
  lines = []
  for loop in loops:
    trips = (
      f"{loop.trip_count} trips known to XLA"
      if loop.trip_count is not None
      else "trip count unknown (predicate read back each step)"
    )
    casts = (
      f"{len(loop.converts)} float32 weight casts inside ({loop.convert_bytes / 1e9:.3g} GB read "
      "per trip)"
      if loop.converts
      else "no float32 cast of a weight-sized array inside"
    )
    lines.append(f"loop {loop.name}: {trips}; {casts}")
  return "\n".join(lines)
