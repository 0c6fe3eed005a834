"""Hugging Face checkpoints in and out: ``config.json`` + safetensors, never pickle.

A name map (``hf_maps.tensor_maps``) ties each Hugging Face tensor to one or more ppo_jax
parameters with the layout change between them. Loading checks every tensor against the map and
reports all that are missing, unexpected or misshaped in one error; saving writes the folder
``transformers``' ``AutoModelForCausalLM`` (or ``AutoModelForSequenceClassification`` for reward
and value models) loads back.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.hf_config import GENERATION_CONFIG, with_generation_stop_ids
from ppo_jax.models.hf_maps import Path, tensor_maps
from ppo_jax.models.transformer import CausalLM, RewardModel, ScalarHead, ValueModel
from ppo_jax.sharding import to_host

KINDS = {"causal_lm": CausalLM, "value": ValueModel, "reward": RewardModel}
# Non-parameter buffers some checkpoints carry; loading skips them.
_BUFFERS = re.compile(r"(attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

# --------------------------------------------------------------------------------------------------
# Loading.


def checkpoint_kind(hf_config: Any) -> str:
  """ "reward" for a saved *ForSequenceClassification, else "causal_lm"."""
  archs = getattr(hf_config, "architectures", None) or []
  return "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


INDEX = "model.safetensors.index.json"


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The folder's safetensors files: ``model.safetensors`` if there is one (transformers reads it
  before an index too), else the shards the index names."""
  index, single = folder / INDEX, folder / "model.safetensors"
  if single.exists():
    if index.exists():
      warnings.warn(
        f"{folder}: both model.safetensors and {INDEX}; loading model.safetensors, as transformers "
        "does (the index and its shards are ignored)",
        stacklevel=3,
      )
    return [single]
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted({folder / f for f in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      why = e if isinstance(e, ValueError) else "no 'weight_map' object of tensor → file"
      raise ValueError(f"{index}: not a valid safetensors index ({why})") from None
    missing = [f.name for f in files if not f.exists()]
    if missing:
      raise FileNotFoundError(f"{folder}: shard(s) named in {index.name} are missing: {missing}")
    return files
  pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
  hint = (
    f" (found {pickles}: ppo_jax never unpickles; convert them to safetensors)" if pickles else ""
  )
  raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def read_safetensors(folder: str | os.PathLike) -> dict[str, jax.Array]:
  """Every tensor of a checkpoint folder (single file or sharded), bf16/fp16/fp32 alike."""
  from safetensors import SafetensorError, safe_open

  tensors: dict[str, jax.Array] = {}
  for file in _weight_files(pathlib.Path(folder)):
    try:
      with safe_open(str(file), framework="flax") as f:
        for name in f.keys():
          tensors[name] = f.get_tensor(name)
    except SafetensorError as e:  # a truncated or foreign file
      raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
  return tensors


def _strip_prefix(names: list[str], prefix: str) -> dict[str, str]:
  """Maps checkpoint names to canonical ``prefix``-ed names (original GPT-2 files lack it)."""
  out = {}
  for n in names:
    bare = n[len(prefix) :] if n.startswith(prefix) else n
    out[n] = n if n in ("lm_head.weight", "score.weight") else prefix + bare
  return out


def _first(names: list[str], n: int = 5) -> str:
  """The first ``n`` names, and how many more."""
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def load_hf_config(folder: str | os.PathLike) -> Any:
  """``transformers.AutoConfig`` of a local folder, with a clear error for anything else."""
  from transformers import AutoConfig

  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(
      f"{folder}: not a Hugging Face model folder (no config.json); ppo_jax loads local folders "
      "only, never from the hub"
    )
  try:
    return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
  except (OSError, ValueError) as e:  # an unknown model_type, say: transformers' own line
    raise ValueError(f"{folder}/config.json: {e}") from None
  except Exception as e:  # its validators' (a field of the wrong type): not a ValueError
    raise ValueError(f"{folder}/config.json: {type(e).__name__}: {e}") from None


def check_one_score(hf_config: Any) -> None:
  """Refuses a sequence classifier of several labels: a reward model gives one score."""
  labels = getattr(hf_config, "num_labels", 1)
  if labels != 1:
    raise ValueError(f"a classifier of num_labels={labels}; a reward model gives one score")


def from_pretrained(
  path: str | os.PathLike,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
  kind: str | None = None,
  zero_init_head: bool = False,
  **config_overrides: Any,
) -> CausalLM | ValueModel | RewardModel:
  """Loads a Hugging Face folder (``config.json`` + ``*.safetensors``) as a ppo_jax model.

  Args:
    path: a local folder; sharded checkpoints need ``model.safetensors.index.json``.
    dtype: compute dtype, ``"float32"`` (default) or ``"bfloat16"``.
    param_dtype: parameter dtype; defaults to ``dtype``.
    kind: ``"causal_lm"``, ``"value"`` or ``"reward"``; default from the checkpoint's
      ``architectures`` (``*ForSequenceClassification`` → reward, else causal_lm). A causal LM
      checkpoint loaded as value or reward model keeps its trunk and gets a fresh scalar head
      (zero-initialised with ``zero_init_head``).
    **config_overrides: other ``ModelConfig`` fields, e.g. ``remat="block"``.

  Raises:
    FileNotFoundError: not a folder with config.json and safetensors weights.
    ValueError: unsupported architecture; missing, unexpected or misshaped tensors (all named).
  """
  if config_overrides.get("lora_rank"):
    raise ValueError(
      "from_pretrained loads plain weights: load the model, then add adapters with "
      "ppo_jax.models.lora.add_lora"
    )
  folder = pathlib.Path(path)
  hf_config = load_hf_config(folder)
  dtype = dtype or "float32"
  try:
    cfg = ModelConfig.from_hf(
      hf_config, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides
    )
  except ValueError as e:  # sizes that do not fit together: config.json's
    raise ValueError(f"{folder}/config.json: {e}") from None
  stored_kind = checkpoint_kind(hf_config)
  kind = kind or stored_kind
  if kind == "causal_lm":  # reward and value models never generate
    cfg = with_generation_stop_ids(cfg, folder)
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
  if stored_kind == "reward" and kind == "causal_lm":
    raise ValueError(f"{folder}: holds a sequence-classification model; it has no LM head")
  if stored_kind == "reward":
    try:
      check_one_score(hf_config)
    except ValueError as e:
      raise ValueError(f"{folder}: {e}") from None
    if cfg.pad_token_id is not None and cfg.pad_token_id in cfg.stop_ids:
      warnings.warn(
        f"{folder}: pad and EOS share id {cfg.pad_token_id}; transformers' sequence classifier "
        "reads the score at the last non-pad token (before a final EOS), ppo_jax at the last "
        "real one (the EOS): scores of responses that end with EOS differ from transformers'",
        stacklevel=2,
      )
  fresh_head = stored_kind == "causal_lm" and kind != "causal_lm"

  tensors = read_safetensors(folder)
  maps = tensor_maps(cfg, kind)
  expected = {m.hf_name: m for m in maps}
  canonical = _strip_prefix(list(tensors), "transformer." if cfg.is_gpt2 else "model.")
  found = {canonical[n]: n for n in tensors}
  optional = {"score.weight"} if fresh_head else set()
  ignorable = {"lm_head.weight"} if (cfg.tie_word_embeddings or fresh_head) else set()

  missing = sorted(set(expected) - set(found) - optional)
  unexpected = sorted(
    n for n in set(found) - set(expected) if n not in ignorable and not _BUFFERS.search(n)
  )
  misshaped = [
    f"{found[n]} {list(tensors[found[n]].shape)} (expected {list(expected[n].hf_shape)})"
    for n in sorted(set(found) & set(expected))
    if tuple(tensors[found[n]].shape) != expected[n].hf_shape
  ]
  not_float = [  # an integer checkpoint would be converted, silently, and trained
    f"{found[n]} {tensors[found[n]].dtype}"
    for n in sorted(set(found) & set(expected))
    if not jnp.issubdtype(tensors[found[n]].dtype, jnp.floating)
  ]
  nonfinite = [  # a damaged file, or a run that diverged before it saved: say so before use
    f"{found[n]} ({bad} of {tensors[found[n]].size} values NaN or inf)"
    for n in sorted(set(found) & set(expected))
    if jnp.issubdtype(tensors[found[n]].dtype, jnp.floating)
    and (bad := int(tensors[found[n]].size - jnp.count_nonzero(jnp.isfinite(tensors[found[n]]))))
  ]
  problems = [
    f"{label} tensors: {_first(names)}"
    for label, names in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("misshaped", misshaped),
      ("non-float", not_float),
      ("non-finite", nonfinite),
    )
    if names
  ]
  if problems:
    sizes = ""
    if missing or misshaped:  # a key config.json lacks takes transformers' default, silently
      sizes = (
        f" (its config.json gives {cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"{cfg.num_heads} heads, vocabulary {cfg.vocab_size}: a key it lacks takes "
        "transformers' default)"
      )
    raise ValueError(
      f"{folder}: cannot load as {cfg.model_type} {kind}: " + "; ".join(problems) + sizes
    )

  model = nnx.eval_shape(
    lambda: KINDS[kind](cfg, rngs=nnx.Rngs(0), **_head_kw(kind, zero_init_head))
  )  # shapes only: nothing is allocated until the checkpoint's arrays fill it
  graphdef, abstract = nnx.split(model)
  params = nnx.to_pure_dict(abstract)
  for name, m in expected.items():
    if name not in found:
      continue
    for p, value in zip(m.paths, m.to_ours(tensors[found[name]]), strict=True):
      _set(params, p, jnp.asarray(value, cfg.param_dtype))
  if fresh_head:
    head = ScalarHead(
      cfg.hidden_size,
      zero_init=zero_init_head,
      std=cfg.initializer_range,
      param_dtype=cfg.param_dtype,
      rngs=nnx.Rngs(0),
    )
    params["head"] = nnx.to_pure_dict(nnx.state(head))
  leftover = [
    jax.tree_util.keystr(p)
    for p, x in jax.tree_util.tree_leaves_with_path(params)
    if isinstance(x, jax.ShapeDtypeStruct)
  ]
  if leftover:  # a map that misses a parameter is a bug here, not in the checkpoint
    raise AssertionError(f"parameters with no Hugging Face tensor: {leftover}")
  return nnx.merge(graphdef, params)


def _head_kw(kind: str, zero_init_head: bool) -> dict:
  return {} if kind == "causal_lm" else {"zero_init_head": zero_init_head}


def _set(tree: dict, path: Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _get(tree: dict, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# --------------------------------------------------------------------------------------------------
# Saving.


def kind_of(model: nnx.Module) -> str:
  for kind, cls in reversed(KINDS.items()):  # RewardModel before its base ValueModel
    if isinstance(model, cls):
      return kind
  raise TypeError(f"not a ppo_jax model: {type(model).__name__}")


def _drop_sharded_weights(folder: pathlib.Path) -> None:
  """Deletes a sharded checkpoint's index and the shards it names from ``folder``, about to get
  one ``model.safetensors``: stale weights beside the new ones (transformers and ppo_jax read
  ``model.safetensors`` first; a loader that globs ``*.safetensors`` would mix them)."""
  index = folder / INDEX
  if not index.is_file():
    return
  try:
    shards = set(json.loads(index.read_text())["weight_map"].values())
  except (ValueError, KeyError, TypeError, AttributeError):
    shards = set()
  index.unlink()  # first: a kill before the new weights are written leaves no stale checkpoint
  for name in shards:
    shard = folder / str(name)
    if shard.parent == folder and shard.suffix == ".safetensors":
      shard.unlink(missing_ok=True)


def save_pretrained(
  model: nnx.Module,
  path: str | os.PathLike,
  *,
  tokenizer: Any = None,
  generation_config: dict[str, Any] | None = None,
) -> None:
  """Writes ``model`` as a Hugging Face folder: config.json, model.safetensors (+ tokenizer).

  A sharded checkpoint already in ``path`` (its index and the shards it names) is deleted: stale
  weights beside the new ``model.safetensors``.

  Causal LMs load with ``AutoModelForCausalLM``, and get a ``generation_config.json`` with the
  model's stop ids (``eos_token_id`` and ``extra_eos_token_ids``), BOS and pad over the
  ``generation_config`` given (e.g. ``read_generation_config`` of the checkpoint it came from,
  whose sampling defaults are kept). Value and reward models load with
  ``AutoModelForSequenceClassification`` (``num_labels=1``, the head as ``score.weight``).
  """
  from safetensors.flax import save_file

  kind = kind_of(model)
  cfg: ModelConfig = model.cfg
  if cfg.lora_rank:  # Hugging Face has no place for the adapters: they would be left out
    raise ValueError(
      "save_pretrained: the model has LoRA adapters; merge them first "
      "(ppo_jax.models.lora.merge_lora) to write a plain model"
    )
  folder = pathlib.Path(path)
  if tokenizer is not None:  # ids the config lacks (a model built from scratch): the tokenizer's
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("eos", "pad", "bos")}
    cfg = cfg.replace(
      **{
        f"{k}_token_id": v
        for k, v in ids.items()
        if v is not None and getattr(cfg, f"{k}_token_id") is None
      }
    )
  if kind != "causal_lm" and cfg.pad_token_id is None:
    warnings.warn(
      f"{folder}: no pad id; transformers' sequence classifier finds each row's last token by "
      "its pad id, and without one scores a single sequence at a time (a batch raises): give the "
      "tokenizer a pad token of its own",
      stacklevel=2,
    )
  if kind != "causal_lm" and cfg.pad_token_id in cfg.stop_ids:  # any EOS, as on load
    warnings.warn(
      f"{folder}: pad and EOS share id {cfg.pad_token_id}; transformers' sequence classifier "
      "reads the score at the last non-pad token (before a final EOS), ppo_jax at the last real "
      "one (the EOS): give the tokenizer a pad token of its own for scores that agree",
      stacklevel=2,
    )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {}
  for m in tensor_maps(cfg, kind):  # whole arrays on this host, however they are sharded
    tensors[m.hf_name] = jnp.asarray(m.to_hf([to_host(_get(params, p)) for p in m.paths]))
  if jax.process_index() != 0:  # every process gathers; the first writes
    return
  folder.mkdir(parents=True, exist_ok=True)
  _drop_sharded_weights(folder)  # before the new config.json: never beside the old weights
  hf_config = cfg.to_hf(architecture="causal_lm" if kind == "causal_lm" else "sequence_cls")
  hf_config.dtype = cfg.param_dtype
  hf_config.save_pretrained(str(folder))
  if kind == "causal_lm":
    stops = list(cfg.stop_ids)
    ids = dict(
      bos_token_id=cfg.bos_token_id,
      eos_token_id=stops if len(stops) > 1 else (stops or [None])[0],
      pad_token_id=cfg.pad_token_id,
    )
    gen = {**(generation_config or {}), **{k: v for k, v in ids.items() if v is not None}}
    (folder / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
  weights = folder / "model.safetensors"
  save_file(tensors, str(weights), metadata={"format": "pt"})
  # safetensors writes through a private temporary file (mode 0600): readable as config.json is.
  weights.chmod((folder / "config.json").stat().st_mode & 0o777)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
