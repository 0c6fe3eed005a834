"""``ModelConfig`` to and from a Hugging Face ``transformers`` config: which fields each family
(GPT-2; Llama, Qwen2/3, Mistral; Gemma 2 and 3; OLMo 2 and 3) names how, and the options ppo_jax
refuses; and a folder's ``generation_config.json`` (sampling defaults, more stop ids)."""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any

from ppo_jax.models.config import ACTIVATIONS, ROPE_TYPES, SUPPORTED, ModelConfig


def config_from_hf(hf: Any, **overrides: Any) -> ModelConfig:
  """From a ``transformers`` config object (``AutoConfig.from_pretrained(folder)``); ``overrides``
  replace fields."""
  model_type = getattr(hf, "model_type", None)
  if model_type not in SUPPORTED:
    hint = (
      " (a vision-language Gemma 3: use a text-only Gemma3ForCausalLM checkpoint, model_type "
      "gemma3_text)"
      if model_type == "gemma3"
      else ""
    )
    raise ValueError(
      f"unsupported architecture {model_type!r} ({getattr(hf, 'architectures', None)}); "
      f"ppo_jax supports {', '.join(SUPPORTED)}{hint}"
    )
  ids = dict(
    bos_token_id=_int_or_none(hf.bos_token_id),
    eos_token_id=_int_or_none(hf.eos_token_id),
    extra_eos_token_ids=tuple(int(x) for x in _listed(hf.eos_token_id)[1:]),
    pad_token_id=_int_or_none(getattr(hf, "pad_token_id", None)),
  )
  if model_type == "gpt2":
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
      raise ValueError("unsupported GPT-2 option scale_attn_by_inverse_layer_idx=True")
    if not getattr(hf, "scale_attn_weights", True):
      raise ValueError("unsupported GPT-2 option scale_attn_weights=False")
    fields = dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.n_embd,
      num_layers=hf.n_layer,
      num_heads=hf.n_head,
      num_kv_heads=hf.n_head,
      head_dim=hf.n_embd // hf.n_head,
      intermediate_size=hf.n_inner or 4 * hf.n_embd,
      max_position_embeddings=hf.n_positions,
      norm_eps=hf.layer_norm_epsilon,
      activation=_activation(hf.activation_function),
      initializer_range=hf.initializer_range,
      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
      qkv_bias=True,
      o_bias=True,
      mlp_bias=True,
    )
  else:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    local_theta = None
    if model_type in ("gemma3_text", "olmo3"):  # a RoPE per kind of layer
      local = dict(rope.get("sliding_attention") or {})
      if local.get("rope_type", "default") != "default":
        raise ValueError(
          f"unsupported rope_type {local['rope_type']!r} on {model_type}'s windowed layers"
        )
      local_theta = float(local["rope_theta"])
      rope = dict(rope.get("full_attention") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("unsupported RoPE option partial_rotary_factor != 1")
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qwen = model_type == "qwen2"  # q, k, v biases always, none on o
    window, gemma, full = None, {}, ()
    if model_type == "mistral":
      window = getattr(hf, "sliding_window", None)
    elif model_type == "olmo3":  # a window on the layers layer_types names
      window = hf.sliding_window
      full = tuple(i for i, kind in enumerate(hf.layer_types) if kind == "full_attention")
    elif model_type in ("gemma2", "gemma3_text"):
      if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError(f"unsupported {model_type} option use_bidirectional_attention=True")
      # The window is kept even when no layer uses it: transformers' Gemma models need one.
      window = hf.sliding_window
      full = tuple(i for i, kind in enumerate(hf.layer_types) if kind == "full_attention")
      gemma = dict(
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        # Gemma 3's attention ignores attn_logit_softcapping (transformers 5): so do we.
        attn_logit_softcap=_float_or_none(hf.attn_logit_softcapping)
        if model_type == "gemma2"
        else None,
        final_logit_softcap=_float_or_none(hf.final_logit_softcapping),
      )
    elif getattr(hf, "use_sliding_window", False):  # Qwen2/3: a window on some layers only
      kinds = getattr(hf, "layer_types", None) or [
        "sliding_attention" if i >= getattr(hf, "max_window_layers", 0) else "full_attention"
        for i in range(hf.num_hidden_layers)
      ]
      if "sliding_attention" in kinds:
        raise ValueError(
          f"unsupported {hf.__class__.__name__} option use_sliding_window=True (a window on "
          f"layers {[i for i, k in enumerate(kinds) if k == 'sliding_attention']})"
        )
    fields = dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
      head_dim=head_dim,
      intermediate_size=hf.intermediate_size,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=hf.rms_norm_eps,
      activation=_activation(getattr(hf, "hidden_activation", None) or hf.hidden_act),
      initializer_range=hf.initializer_range,
      tie_word_embeddings=bool(hf.tie_word_embeddings),
      qkv_bias=qwen or attention_bias,
      o_bias=attention_bias and not qwen,
      mlp_bias=bool(getattr(hf, "mlp_bias", False)),
      rope_theta=float(theta),
      rope_type=rope_type,
      rope_params=tuple(sorted((k, float(v)) for k, v in rope.items() if v is not None)),
      sliding_window=window,
      full_attention_layers=full,
      local_rope_theta=local_theta,
      **gemma,
    )
  return ModelConfig(model_type=model_type, **fields, **ids, **overrides)


def config_to_hf(cfg: ModelConfig, *, architecture: str = "causal_lm") -> Any:
  """The ``transformers`` config of ``cfg`` (``architecture``: causal_lm | sequence_cls)."""
  import transformers

  names = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": (
      "Gemma3TextConfig",
      "Gemma3ForCausalLM",
      "Gemma3TextForSequenceClassification",
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "Olmo2ForSequenceClassification"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", "Olmo3ForSequenceClassification"),
  }[cfg.model_type]
  hf_act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
  common = dict(
    vocab_size=cfg.vocab_size,
    bos_token_id=cfg.bos_token_id,
    eos_token_id=[cfg.eos_token_id, *cfg.extra_eos_token_ids]
    if cfg.extra_eos_token_ids
    else cfg.eos_token_id,
    pad_token_id=cfg.pad_token_id,
    initializer_range=cfg.initializer_range,
    architectures=[names[1] if architecture == "causal_lm" else names[2]],
  )
  if architecture == "sequence_cls":
    common["num_labels"] = 1
  if cfg.is_gpt2:
    fields = dict(
      n_embd=cfg.hidden_size,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.intermediate_size,
      n_positions=cfg.max_position_embeddings,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function=hf_act[cfg.activation],
      tie_word_embeddings=cfg.tie_word_embeddings,
    )
  else:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_params)}
    if "original_max_position_embeddings" in rope:
      rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if "truncate" in rope:  # YaRN's switch, stored as a number with the other parameters
      rope["truncate"] = bool(rope["truncate"])
    fields = dict(
      hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.norm_eps,
      hidden_act=hf_act[cfg.activation],
      tie_word_embeddings=cfg.tie_word_embeddings,
      rope_parameters=rope,
    )
    layer_types = [
      "sliding_attention" if cfg.sliding(i) else "full_attention" for i in range(cfg.num_layers)
    ]
    if cfg.model_type == "llama":
      fields.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "qwen3":
      fields.update(attention_bias=cfg.qkv_bias)
    if cfg.model_type == "mistral":
      fields.update(sliding_window=cfg.sliding_window)
    if cfg.is_gemma:
      fields["hidden_activation"] = fields.pop("hidden_act").replace(
        "gelu_new", "gelu_pytorch_tanh"
      )
      fields.update(
        attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types,
      )
    if cfg.is_olmo:
      fields.update(attention_bias=cfg.qkv_bias)
    if cfg.model_type == "olmo3":
      fields.update(sliding_window=cfg.sliding_window, layer_types=layer_types)
    if cfg.model_type in ("gemma3_text", "olmo3"):
      local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
      fields["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  return getattr(transformers, names[0])(**fields, **common)


def _activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def _listed(x: Any) -> list:
  return list(x) if isinstance(x, (list, tuple)) else ([] if x is None else [x])


def _int_if_whole(x: float | None) -> float | int | None:
  """``x`` as an int when it is whole (transformers types Gemma's ``query_pre_attn_scalar`` so)."""
  return int(x) if x is not None and float(x).is_integer() else x


def _float_or_none(x: Any) -> float | None:
  return None if x is None else float(x)


def _int_or_none(x: Any) -> int | None:
  """The id, or the first of several (``extra_eos_token_ids`` keeps the others)."""
  x = _listed(x)
  return int(x[0]) if x else None


# --------------------------------------------------------------------------------------------------
# generation_config.json: sampling defaults and the stop ids beside config.json's.

GENERATION_CONFIG = "generation_config.json"


def read_generation_config(folder: str | os.PathLike) -> dict[str, Any] | None:
  """A folder's ``generation_config.json`` (transformers' sampling defaults and stop ids) as a
  dict, or None when it has none. One that does not parse, or whose ``eos_token_id`` is not ids,
  is skipped with a warning, as transformers skips it."""
  path = pathlib.Path(folder) / GENERATION_CONFIG
  if not path.is_file():
    return None
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problem = f"not valid JSON ({e})"
  else:
    if not isinstance(d, dict):
      problem = f"expected a JSON object, got {type(d).__name__}"
    elif any(type(i) is not int for i in _listed(d.get("eos_token_id"))):
      problem = f"eos_token_id {d['eos_token_id']!r} is not token ids"
    else:
      return d
  warnings.warn(f"{path}: {problem}; ignored (config.json's ids only)", stacklevel=2)
  return None


def with_generation_stop_ids(cfg: ModelConfig, folder: pathlib.Path) -> ModelConfig:
  """``cfg`` with the stop ids ``generation_config.json`` adds to config.json's (Instruct models
  list their end-of-turn token there) as ``extra_eos_token_ids``."""
  ids = _listed((read_generation_config(folder) or {}).get("eos_token_id"))
  own = (cfg.eos_token_id, *cfg.extra_eos_token_ids)
  new = list(dict.fromkeys(i for i in ids if i not in own))
  if not new:
    return cfg
  if cfg.eos_token_id is None:
    return cfg.replace(eos_token_id=new[0], extra_eos_token_ids=tuple(new[1:]))
  return cfg.replace(extra_eos_token_ids=(*cfg.extra_eos_token_ids, *new))
