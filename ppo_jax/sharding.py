"""Meshes, partition rules and shardings: how parameters, optimizer states and batches spread
over devices.

The mesh has three axes: ``data`` (batch), ``fsdp`` (batch, and parameters sharded ZeRO-3 style)
and ``tensor`` (attention heads, MLP width, vocabulary: Megatron-style). Parameters get a
``PartitionSpec`` from the first rule of ``RULES`` whose regex matches their path
(``policy/trunk/layers/3/attn/q/kernel``); a parameter no rule matches is an error, not a silent
replication. Batches are split over ``('data', 'fsdp')``. Everything else (scalars, keys) is
replicated. The compiled programs then follow GSPMD from these input shardings; ``jax.jit`` with
``NamedSharding`` is what ``pjit`` is today.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Ordered (regex on the "/"-joined parameter path, spec). Kernels are [in, out].
RULES: tuple[tuple[str, P], ...] = (
  (r"(^|/)embed/embedding$", P("tensor", "fsdp")),  # [V, D]
  (r"(^|/)pos_embed/embedding$", P(None, "fsdp")),  # [positions, D]
  (r"/attn/[qkv]/kernel$", P("fsdp", "tensor")),  # [D, heads·hd]: columns over tensor
  (r"/attn/[qkv]/bias$", P("tensor")),
  (r"/attn/o/kernel$", P("tensor", "fsdp")),  # [heads·hd, D]
  (r"/mlp/(gate|up)/kernel$", P("fsdp", "tensor")),  # [D, F]
  (r"/mlp/(gate|up)/bias$", P("tensor")),
  (r"/mlp/down/kernel$", P("tensor", "fsdp")),  # [F, D]
  (r"/(attn/o|mlp/down)/bias$", P()),
  (
    r"(^|/)(attn_norm|mlp_norm|attn_post_norm|mlp_post_norm|final_norm|q_norm|k_norm)/(scale|bias)$",
    P(),
  ),
  (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
  (r"(^|/)(head/)?kernel$", P("fsdp", None)),  # scalar heads [D, 1]
  # LoRA adapters: A [in, r], B [r, out] split like the kernel they adapt: its rows and columns.
  # Every rule keeps the model width D on fsdp and inner widths on tensor: where a producer and
  # its consumer split a dimension over different axes, XLA miscompiles the backward pass of the
  # log-prob gather (row blocks swapped on data × fsdp > 1; bench/xla_partitioner_bug.py). With
  # the adapters of o and down split as the column-parallel ones, PPO's LoRA update on a 2×2×2
  # mesh came out wrong (2026-12-05, tests/multidevice).
  (r"/(attn/o|mlp/down)/lora_a$", P("tensor", None)),
  (r"/(attn/o|mlp/down)/lora_b$", P(None, "fsdp")),
  (r"/lora_a$", P("fsdp", None)),
  (r"/lora_b$", P(None, "tensor")),
)


def resolve_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int, int]:
  """``(data, fsdp, tensor)`` sizes; one −1 takes the devices the others leave."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ValueError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape {shape}: sizes must be ≥ 1, with at most one −1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"mesh.shape {shape} does not divide the {n_devices} devices")
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ValueError(
      f"mesh.shape {shape} needs {math.prod(shape)} devices, but there are "
      f"{n_devices} (use -1 for 'the rest')"
    )
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ``('data', 'fsdp', 'tensor')`` mesh with Auto axes (GSPMD propagates the shardings)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def path_string(path) -> str:
  parts = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(key))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
  """The first matching rule's spec, with an axis dropped where it does not divide the dim."""
  return _fitted(path, shape, mesh, rules)[0]


def _fitted(path: str, shape: Sequence[int], mesh: Mesh, rules) -> tuple[P, list[tuple]]:
  """``spec_for``'s spec, and the ``(axis, dim)`` pairs it dropped."""
  match = next(((pat, spec) for pat, spec in rules if re.search(pat, path)), None)
  if match is None:
    raise ValueError(
      f"no partition rule matches parameter {path!r} (shape {list(shape)}); "
      "add one to ppo_jax.sharding.RULES"
    )
  pattern, spec = match
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {pattern!r} gives {spec} to {path!r} of rank {len(shape)}")
  fitted, dropped = [], []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    size = mesh.shape[axis] if axis is not None else 1
    fitted.append(axis if size == 1 or dim % size == 0 else None)
    if fitted[-1] is None and axis is not None:
      dropped.append((axis, dim))
  while (
    fitted and fitted[-1] is None
  ):  # canonical: P() for replicated, P('fsdp') not P('fsdp', None)
    fitted.pop()
  return P(*fitted), dropped


def param_shardings(params, mesh: Mesh, rules=RULES):
  """A NamedSharding for every parameter (a pytree of arrays or ShapeDtypeStructs).

  Custom ``rules`` must keep each dimension on one mesh axis from the layer that makes it to the
  one that reads it (see ``RULES``): XLA miscompiles some backward passes otherwise.
  """
  if mesh.size > 1 and not jax.config.jax_use_shardy_partitioner:
    warnings.warn(
      "jax_use_shardy_partitioner is off: XLA's GSPMD partitioner computed wrong LoRA gradients "
      "on a data × fsdp × tensor mesh with these rules (bench/xla_partitioner_bug.py); keep Shardy",
      stacklevel=2,
    )
  dropped: dict[str, list[str]] = {}

  def one(path, x):
    spec, lost = _fitted(path_string(path), x.shape, mesh, rules)
    for axis, dim in lost:
      dropped.setdefault(axis, []).append(f"{path_string(path)}: {dim}")
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, params)
  for axis, where in dropped.items():  # once per model and mesh: the memory is not divided
    note = (
      f"note: {len(where)} of {len(jax.tree.leaves(params))} parameters stay whole on mesh axis "
      f"{axis} ({mesh.shape[axis]}): a dimension of theirs does not divide it (e.g. {where[0]})"
    )
    if note not in _NOTED and is_main_process():
      _NOTED.add(note)
      print(note)
  return shardings


_NOTED: set[str] = set()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over ``('data', 'fsdp')``; the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def optimizer_shardings(tx: optax.GradientTransformation, params, param_sh, mesh: Mesh):
  """Optimizer-state shardings that follow the parameters: a state leaf whose path ends with a
  parameter's path, at its shape, gets that parameter's sharding (Adam's moments, also inside
  ``optax.masked`` / ``multi_transform`` states); counts and scalars are replicated."""
  by_path = {
    tuple(path): (x.shape, sh)
    for (path, x), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sh), strict=True
    )
  }

  def one(path, x):
    for start in range(len(path)):  # the longest suffix first
      shape, sh = by_path.get(tuple(path[start:]), (None, None))
      if shape == x.shape:
        return sh
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def staged_on_host(mesh: Mesh | None):
  """A context in which models are built or loaded before ``place`` puts them on ``mesh``: the
  host's memory, so that a model to be sharded never lands whole on the mesh's first device (a
  policy, reference, reward model and critic of 8 B parameters in fp32 are 128 GB). Without a mesh
  (one device), or where ``JAX_PLATFORMS`` leaves the CPU out, the default device as before.
  Arrays made inside are uncommitted: a computation that reads them before they are placed moves
  them where it runs."""
  try:
    host = jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    host = None
  if mesh is None or mesh.size == 1 or host is None:
    return contextlib.nullcontext()
  return jax.default_device(host)


def check_batch(batch_size: int, mesh: Mesh, what: str = "ppo.batch_size") -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by the mesh's data × fsdp = {n}")


def device_of(tree) -> jax.sharding.SingleDeviceSharding:
  """Without a mesh: the device holding ``tree``'s first array (``jax_default_device``'s, say).
  Inputs put there are committed, as restored ones are, so a fresh run and its resume lower (and
  find cached) the same programs; an array already there is aliased, not copied."""
  first = jax.tree.leaves(tree)[0]
  return jax.sharding.SingleDeviceSharding(next(iter(first.devices())))


def describe(mesh: Mesh) -> str:
  return " × ".join(f"{a} {mesh.shape[a]}" for a in AXES) + f" ({mesh.size} devices)"


# --------------------------------------------------------------------------------------------------
# Host ↔ devices, single- or multi-process.


def is_main_process() -> bool:
  """Only process 0 writes logs, plots, sample tables and Hugging Face folders."""
  return jax.process_index() == 0


def place(tree, shardings):
  """``device_put`` of host or device arrays onto ``shardings`` (a matching pytree).

  With several processes each needs the full value on its host (parameters, small batches); the
  global array is assembled from each process's addressable part.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sh):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # A typed PRNG key has no NumPy form: its key data placed, then wrapped again.
      data = one(jax.random.key_data(x), sh)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else x
    if isinstance(x, jax.Array):
      return jax.device_put(x, sh)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def abstract(tree, shardings):
  """``tree``'s shapes and dtypes as ``jax.ShapeDtypeStruct``s on ``shardings`` (a matching
  pytree): what a checkpoint restores onto without allocating a state first."""
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings
  )


def place_batch(batch, shardings):
  """Global batch arrays from the full batch's host rows (a pytree, with a matching pytree of
  shardings or one sharding): each process fills only its own devices' blocks of rows
  (``jax.make_array_from_callback``), so no batch data crosses hosts, in whatever order the mesh
  lists the devices (a TPU pod's mesh may give a host blocks that are not contiguous)."""
  if isinstance(shardings, NamedSharding):
    shardings = jax.tree.map(lambda _: shardings, batch)
  if jax.process_count() == 1:
    return jax.device_put(jax.tree.map(np.asarray, batch), shardings)

  def one(rows, sharding):
    rows = np.asarray(rows)
    return jax.make_array_from_callback(rows.shape, sharding, lambda idx: rows[idx])

  return jax.tree.map(one, batch, shardings)


def pin_rows(tree, mesh: Mesh | None, *, leading: int = 0):
  """Pins the row axis (after ``leading`` axes) of every array in ``tree`` to ``('data',
  'fsdp')`` inside a jitted program: without it GSPMD may replicate a gathered or reshaped batch,
  and every device would compute every row. Rows that do not split evenly over those axes are
  left to GSPMD; ``mesh=None`` (one device) returns ``tree``."""
  if mesh is None:
    return tree
  spec = P(*([None] * leading), BATCH)
  n = mesh.shape["data"] * mesh.shape["fsdp"]

  def pin(x):
    if x.shape[leading] % n:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(pin, tree)


def split_rows(tree, parts: int, mesh: Mesh | None = None):
  """``[B, ...]`` → ``[parts, B / parts, ...]`` (rows stay split over the mesh's batch axes)."""
  split = jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), tree)
  return pin_rows(split, mesh, leading=1)


# --------------------------------------------------------------------------------------------------
# The commands of files (ppo-jax sample, rm-eval): one process, any number of devices.


def command_mesh(shape: Sequence[int] | None = None) -> Mesh | None:
  """The ``(data, fsdp, tensor)`` mesh of a command on this process's devices: ``shape`` as
  ``mesh.shape`` reads (one −1 takes the devices left), a shape that asks for fewer devices than
  there are runs on the first ones (``1,1,1``: one device); None: all devices on ``data``. One
  device gives None (nothing to place).

  Raises:
    ValueError: a shape that does not fit, or several processes (these commands run in one).
  """
  if jax.process_count() > 1:
    raise ValueError(
      f"this command runs in one process (of any number of devices), not {jax.process_count()}"
    )
  devices = jax.devices()
  shape = (-1, 1, 1) if shape is None else tuple(int(s) for s in shape)
  if len(shape) == 3 and -1 not in shape and 0 < math.prod(shape) < len(devices):
    devices = devices[: math.prod(shape)]
  mesh = make_mesh(shape, devices)
  return None if mesh.size == 1 else mesh


def placed(module, mesh: Mesh | None):
  """``module`` with its parameters on ``mesh`` by ``sharding.RULES`` (as is without a mesh)."""
  if mesh is None:
    return module
  graphdef, state = nnx.split(module)
  pure = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, place(pure, param_shardings(pure, mesh)))
  return nnx.merge(graphdef, state)


def on_rows(x, mesh: Mesh | None) -> jax.Array:
  """Host rows onto the devices, split over ``('data', 'fsdp')`` on a mesh."""
  return jnp.asarray(x) if mesh is None else place_batch(x, batch_sharding(mesh, x.ndim))


def to_host(x) -> np.ndarray:
  """A device array's full value as NumPy, whatever its sharding and however many processes."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def all_agree(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (``flag`` itself with one process): a decision each
  process makes from files, made the same everywhere (one host's failed read must not split
  them)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(multihost_utils.process_allgather(np.int32(flag)).all())


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
