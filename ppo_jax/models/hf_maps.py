"""The name map between Hugging Face tensors and ppo_jax parameters, with the layout change
between them: Llama's Linear weights are ``[out, in]``, ours ``[in, out]``; GPT-2's Conv1D
weights are already ``[in, out]`` and its fused ``c_attn`` splits into q, k and v; Gemma has a
norm after each sublayer too, OLMo only there. ``hf.from_pretrained`` and ``hf.save_pretrained``
read it both ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from ppo_jax.models.config import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One Hugging Face tensor ↔ ppo_jax parameter(s)."""

  hf_name: str
  paths: tuple[Path, ...]
  hf_shape: tuple[int, ...]
  to_ours: Callable[[Any], list[Any]]  # HF tensor → our arrays, in ``paths`` order
  to_hf: Callable[[list[Any]], Any]


def _same(path: Path, shape) -> Callable[..., TensorMap]:
  return lambda name: TensorMap(name, (path,), tuple(shape), lambda x: [x], lambda xs: xs[0])


def _transposed(path: Path, hf_shape) -> Callable[..., TensorMap]:
  return lambda name: TensorMap(name, (path,), tuple(hf_shape), lambda x: [x.T], lambda xs: xs[0].T)


def _split(paths: tuple[Path, ...], hf_shape, sizes: list[int]) -> Callable[..., TensorMap]:
  cuts = list(np.cumsum(sizes)[:-1])
  return lambda name: TensorMap(
    name,
    paths,
    tuple(hf_shape),
    lambda x: list(jnp.split(x, cuts, axis=-1)),
    lambda xs: jnp.concatenate(xs, axis=-1),
  )


def tensor_maps(cfg: ModelConfig, kind: str) -> list[TensorMap]:
  """The Hugging Face tensors of a ``kind`` model (causal_lm | value | reward) and their maps."""
  d, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  hd = cfg.head_dim
  q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
  T = ("trunk",)
  maps: dict[str, Callable[..., TensorMap]] = {}
  if cfg.is_gpt2:
    pre = "transformer."
    maps["wte.weight"] = _same(T + ("embed", "embedding"), (V, d))
    maps["wpe.weight"] = _same(T + ("pos_embed", "embedding"), (cfg.max_position_embeddings, d))
    for i in range(cfg.num_layers):
      L, h = T + ("layers", i), f"h.{i}."
      for ours, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        maps[h + hf + ".weight"] = _same(L + (ours, "scale"), (d,))
        maps[h + hf + ".bias"] = _same(L + (ours, "bias"), (d,))
      qkv = tuple(L + ("attn", n) for n in "qkv")
      maps[h + "attn.c_attn.weight"] = _split(
        tuple(p + ("kernel",) for p in qkv), (d, 3 * d), [d, d, d]
      )
      maps[h + "attn.c_attn.bias"] = _split(tuple(p + ("bias",) for p in qkv), (3 * d,), [d, d, d])
      for mod, hf, shape in (
        (("attn", "o"), "attn.c_proj", (d, d)),
        (("mlp", "up"), "mlp.c_fc", (d, f)),
        (("mlp", "down"), "mlp.c_proj", (f, d)),
      ):
        maps[h + hf + ".weight"] = _same(L + mod + ("kernel",), shape)  # Conv1D: [in, out]
        maps[h + hf + ".bias"] = _same(L + mod + ("bias",), shape[1:])
    maps["ln_f.weight"] = _same(T + ("final_norm", "scale"), (d,))
    maps["ln_f.bias"] = _same(T + ("final_norm", "bias"), (d,))
  else:
    pre = "model."
    maps["embed_tokens.weight"] = _same(T + ("embed", "embedding"), (V, d))
    # Each block's norms, ours ← Hugging Face's ``{name}_layernorm``: "post_attention" is the
    # MLP's input norm in Llama, the attention output's in Gemma and OLMo.
    if cfg.is_olmo:  # after each sublayer, none before
      norms = {"attn_post_norm": "post_attention", "mlp_post_norm": "post_feedforward"}
    elif cfg.is_gemma:  # before and after each
      norms = {
        "attn_norm": "input",
        "attn_post_norm": "post_attention",
        "mlp_norm": "pre_feedforward",
        "mlp_post_norm": "post_feedforward",
      }
    else:
      norms = {"attn_norm": "input", "mlp_norm": "post_attention"}
    for i in range(cfg.num_layers):
      L, h = T + ("layers", i), f"layers.{i}."
      for ours, hf in norms.items():
        maps[h + f"{hf}_layernorm.weight"] = _same(L + (ours, "scale"), (d,))
      for n, out, bias in (
        ("q", q_dim, cfg.qkv_bias),
        ("k", kv_dim, cfg.qkv_bias),
        ("v", kv_dim, cfg.qkv_bias),
        ("o", d, cfg.o_bias),
      ):
        d_in = q_dim if n == "o" else d
        maps[h + f"self_attn.{n}_proj.weight"] = _transposed(L + ("attn", n, "kernel"), (out, d_in))
        if bias:
          maps[h + f"self_attn.{n}_proj.bias"] = _same(L + ("attn", n, "bias"), (out,))
      if cfg.qk_norm or cfg.is_olmo:  # OLMo's span all heads
        for n, width in (("q", q_dim), ("k", kv_dim)):
          maps[h + f"self_attn.{n}_norm.weight"] = _same(
            L + ("attn", f"{n}_norm", "scale"), (width if cfg.is_olmo else hd,)
          )
      for n, out, d_in in (("gate", f, d), ("up", f, d), ("down", d, f)):
        maps[h + f"mlp.{n}_proj.weight"] = _transposed(L + ("mlp", n, "kernel"), (out, d_in))
        if cfg.mlp_bias:
          maps[h + f"mlp.{n}_proj.bias"] = _same(L + ("mlp", n, "bias"), (out,))
    maps["norm.weight"] = _same(T + ("final_norm", "scale"), (d,))
  result = [make(pre + name) for name, make in maps.items()]
  if kind == "causal_lm" and not cfg.tie_word_embeddings:
    result.append(_transposed(("lm_head", "kernel"), (V, d))("lm_head.weight"))
  if kind in ("value", "reward"):
    result.append(_transposed(("head", "kernel"), (1, d))("score.weight"))
  return result
