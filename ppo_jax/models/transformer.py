"""The decoder trunk and the models built on it: causal LM, value model, reward model.

All three share one trunk (embeddings, blocks, final norm) so a critic can start from the reward
model's weights and a value head can sit on the policy's own trunk. Positions come from the
attention mask (``cumsum(mask) − 1``), as Hugging Face computes them in ``generate``, so
left-padded prompts get the same positions as unpadded ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.masking import check_ids
from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import FUSED, Block, Dense, Embed, KVCache, Norm
from ppo_jax.models.rope import rope_inv_freq

_REMAT_POLICY = {
  "block": None,  # save nothing inside a block: recompute it all in the backward pass
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from_mask(attention_mask_BxT: jax.Array) -> jax.Array:
  """``cumsum(mask) − 1``, clipped at 0 (padding gets position 0; its output is never used)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(attention_mask_BxT: jax.Array) -> jax.Array:
  """Index of the last real token of each row ``[B]`` (0 for an empty row)."""
  T = attention_mask_BxT.shape[-1]
  idx = jnp.where(attention_mask_BxT > 0, jnp.arange(T), -1)
  return jnp.maximum(jnp.max(idx, axis=-1), 0)


class Transformer(nnx.Module):
  """Embeddings → blocks → final norm: hidden states ``[B, T, D]`` in the compute dtype."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.pos_embed = (
      Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw) if cfg.is_gpt2 else None
    )
    self.layers = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.num_layers)])
    self.final_norm = Norm(
      cfg.hidden_size,
      eps=cfg.norm_eps,
      rms=not cfg.is_gpt2,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      offset=cfg.is_gemma,
      f32_scale=cfg.is_olmo,
    )
    self.cfg = cfg

  def __call__(
    self,
    input_ids_BxT: jax.Array,
    *,
    positions_BxT: jax.Array,
    kv_mask_BxS: jax.Array,
    cache: list[KVCache] | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, list[KVCache] | None]:
    """Runs the trunk over ``input_ids`` placed at slots ``[cache_index, cache_index + T)``.

    Args:
      input_ids_BxT: token ids.
      positions_BxT: position of each token (see ``positions_from_mask``).
      kv_mask_BxS: 1 on the key slots that hold real tokens; ``S = T`` without a cache, else the
        cache length.
      cache: per-layer ``KVCache`` (``init_cache``), or None for a full forward.
      cache_index: the slot of the first token of this call.

    Returns:
      ``(hidden_BxTxD, cache)``; the cache holds this call's keys and values too.
    """
    cfg = self.cfg
    T = input_ids_BxT.shape[1]
    S = kv_mask_BxS.shape[1]
    if cfg.is_gpt2 and S > cfg.max_position_embeddings:  # past them the embedding reads nan
      raise ValueError(
        f"{S} tokens exceed the model's {cfg.max_position_embeddings} learned positions"
      )
    # Eager calls, or ids a jitted function closes over (traced ids go unchecked).
    check_ids(input_ids_BxT, cfg.vocab_size, what="input ids outside the vocabulary")
    q_slot = cache_index + jnp.arange(T)
    k_slot = jnp.arange(S)
    # A query sees the real keys up to its slot, and its own: a padding query would otherwise see
    # none and average over every key (the last slot of an empty prompt, which predicts the first
    # response token, would read the response itself).
    own = (k_slot[None, :] == q_slot[:, None])[None]
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & ((kv_mask_BxS[:, None, :] > 0) | own)
    local = allowed  # what a layer with a sliding window sees
    if cfg.sliding_window is not None:
      local = allowed & (q_slot[:, None] - k_slot[None, :] < cfg.sliding_window)[None]

    x = self.embed(input_ids_BxT)
    if cfg.is_gemma:  # √d in the compute dtype, as Gemma rounds it
      x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions_BxT)
    inv_freq = None if cfg.is_gpt2 else rope_inv_freq(cfg)
    # The windowed layers' (Gemma 3: a base of their own, no scaling).
    local_freq = None if cfg.is_gpt2 else rope_inv_freq(cfg, local=True)
    new_cache = []
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      mask, freq = (local, local_freq) if cfg.sliding(i) else (allowed, inv_freq)
      if cfg.remat != "none" and cache is None:
        run = nnx.remat(lambda b, *a: b(*a), policy=_REMAT_POLICY[cfg.remat])
        x, layer_cache = run(block, x, positions_BxT, mask, None, cache_index, freq)
      else:
        x, layer_cache = block(x, positions_BxT, mask, layer_cache, cache_index, freq)
      new_cache.append(layer_cache)
    return self.final_norm(x), (None if cache is None else new_cache)

  def init_cache(self, batch: int, length: int) -> list[KVCache]:
    """An empty cache of ``length`` slots for ``batch`` rows."""
    cfg = self.cfg
    if cfg.attention in FUSED:  # what cuDNN reads: sequence-major
      shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    else:  # what ``attend`` reads in place: heads-major
      shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return [
      KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
      for _ in range(cfg.num_layers)
    ]

  def hidden(self, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array | None) -> jax.Array:
    """Hidden states of a full forward, positions from the attention mask."""
    if jnp.ndim(input_ids_BxT) != 2:
      raise ValueError(f"expected input_ids [B, T], got shape {list(jnp.shape(input_ids_BxT))}")
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
    if jnp.shape(attention_mask_BxT) != jnp.shape(input_ids_BxT):  # [B, 1] broadcast silently
      raise ValueError(
        f"attention_mask shape {list(jnp.shape(attention_mask_BxT))} does not match "
        f"input_ids {list(jnp.shape(input_ids_BxT))}"
      )
    h, _ = self(
      input_ids_BxT,
      positions_BxT=positions_from_mask(attention_mask_BxT),
      kv_mask_BxS=attention_mask_BxT,
    )
    return h


class CausalLM(nnx.Module):
  """Decoder-only language model: ``model(ids, mask) → logits [B, T, V]`` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.trunk = Transformer(cfg, rngs=rngs)
    self.lm_head = (
      None
      if cfg.tie_word_embeddings
      else Dense(
        cfg.hidden_size,
        cfg.vocab_size,
        bias=False,
        std=cfg.initializer_range,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
      )
    )
    self.cfg = cfg

  def __call__(
    self, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array | None = None
  ) -> jax.Array:
    return self.unembed(self.trunk.hidden(input_ids_BxT, attention_mask_BxT))

  def unembed(self, hidden: jax.Array) -> jax.Array:
    """Hidden states → float32 logits (tied: ``h Eᵀ``), soft-capped to ``c·tanh(logits / c)``
    with ``cfg.final_logit_softcap`` c (Gemma 2)."""
    if self.lm_head is None:
      logits = self.trunk.embed.attend(hidden)
    else:
      logits = jnp.einsum(
        "...d,dv->...v",
        hidden,
        jnp.asarray(self.lm_head.kernel[...], hidden.dtype),
        preferred_element_type=jnp.float32,
      )
    cap = self.cfg.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


class ScalarHead(nnx.Module):
  """A linear map from hidden states to one scalar per position (HF's ``score``, no bias)."""

  def __init__(
    self,
    features: int,
    *,
    zero_init: bool = False,
    std: float = 0.02,
    param_dtype="float32",
    rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(
      jnp.zeros((features, 1), param_dtype)
      if zero_init
      else jax.nn.initializers.normal(std)(rngs.params(), (features, 1), param_dtype)
    )

  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(jnp.float32)
    return jnp.einsum("btd,do->bto", hidden_BxTxD.astype(jnp.float32), w)[..., 0]


class ValueModel(nnx.Module):
  """Critic: trunk + scalar head, one value per token ``[B, T]`` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, zero_init_head: bool = False):
    self.trunk = Transformer(cfg, rngs=rngs)
    self.head = ScalarHead(
      cfg.hidden_size,
      zero_init=zero_init_head,
      std=cfg.initializer_range,
      param_dtype=cfg.param_dtype,
      rngs=rngs,
    )
    self.cfg = cfg

  def __call__(
    self, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array | None = None
  ) -> jax.Array:
    return self.head(self.trunk.hidden(input_ids_BxT, attention_mask_BxT))


class RewardModel(ValueModel):
  """Reward model: the value model's layout, read at the last real token ``[B]`` (float32)."""

  def __call__(
    self, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array | None = None
  ) -> jax.Array:
    values = super().__call__(input_ids_BxT, attention_mask_BxT)
    if attention_mask_BxT is None:
      return values[:, -1]
    idx = last_token_index(attention_mask_BxT)
    return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]
