"""Jitted autoregressive sampling with a KV cache: ``generate`` and its pure core ``sample``.

Prompts are left-padded ``[B, P]``; positions come from the attention mask as in Hugging Face's
``generate``. The prompt is run once (prefill, attending over its own ``P`` keys) into a cache of
``P + N`` slots, then one token per step in a loop; the whole loop is a single XLA program over
plain-dict parameters. Without a stop token the loop runs exactly ``N − 1`` steps
(``lax.fori_loop``), a trip count XLA knows, so XLA:GPU queues the steps back to back without
copying a loop predicate to the host after each one. With a stop token it ends once every row has
emitted EOS, checked every ``eos_check_every`` steps: a ``lax.while_loop`` over fixed-length
chunks, one predicate read per chunk, not per step.

The weight matrices (kernels, embedding tables, adapters: every parameter of two or more dims) are
cast to a narrower compute dtype once, before the loop: with float32 master weights and bfloat16
compute each decode step then reads 2 bytes per weight, not 4, whatever the compiler decides about
hoisting the casts. The values are those the model casts to itself, so the samples are unchanged.
LoRA adapters are folded into their kernels first, ``W + (α/r)·A B`` in float32 (``merge_lora``,
what the saved policy holds): a decode step then reads each weight once and runs no adapter
products (two small matmuls per adapted projection per layer, each a kernel launch on a GPU).
The folded kernel rounds differently from ``x W + (α/r)·(x A) B``: ~1e-7 relative in float32.

The log-probability returned for each sampled token is ``token_logprobs`` of the model's logits at
the sampling temperature, the very function the trainer applies, so PPO's ratio is 1 on its
first minibatch (to rounding in float32; in bfloat16 the cached decode and the full forward differ
by up to ~0.1 nats, which is why ``ppo.recompute_logprobs`` recomputes them). With ``top_k`` /
``top_p`` the token is drawn from the truncated distribution but its log-probability is still
that of the full tempered softmax (what the trainer recomputes).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.logprobs import token_logprobs
from ppo_jax.masking import check_ids, check_value, concrete
from ppo_jax.models.lora import merge, merge_lora
from ppo_jax.models.transformer import CausalLM, positions_from_mask


@flax.struct.dataclass
class Generation:
  """Sampled responses. Positions after EOS hold ``pad_token_id``, log-prob 0 and mask 0."""

  tokens: jax.Array  # [B, N] int32
  logprobs: jax.Array  # [B, N] float32: token_logprobs at the sampling temperature
  mask: jax.Array  # [B, N] float32: 1 up to and including the first EOS

  @property
  def lengths(self) -> jax.Array:
    """Response lengths ``[B]`` (EOS included)."""
    return jnp.sum(self.mask, axis=-1).astype(jnp.int32)


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets the logits outside the top-k and the top-p nucleus to −inf.

  Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
  (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751); the most likely token always stays.
  """
  V = logits_BxV.shape[-1]
  neg_inf = jnp.full_like(logits_BxV, -jnp.inf)
  if 0 < top_k < V:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][..., -1:]
    logits_BxV = jnp.where(logits_BxV < kth, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold, neg_inf, logits_BxV)
  return logits_BxV


def _pick(logits_BxV, key, *, temperature, top_k, top_p, greedy):
  """Next token ``[B]`` and its log-prob under the full tempered softmax ``[B]``."""
  if greedy:
    tokens = jnp.argmax(logits_BxV, axis=-1)
  else:
    z = filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p)
    draw = lambda k, z_V: jax.random.categorical(k, z_V, axis=-1)
    tokens = draw(key, z) if key.ndim == 0 else jax.vmap(draw)(key, z)
  tokens = tokens.astype(jnp.int32)
  logp = token_logprobs(logits_BxV[:, None], tokens[:, None], temperature=temperature)[:, 0]
  return tokens, logp


def _folded(key: jax.Array, i) -> jax.Array:
  """``fold_in(key, i)`` of one key, or of each row's."""
  if key.ndim == 0:
    return jax.random.fold_in(key, i)
  return jax.vmap(jax.random.fold_in, (0, None))(key, i)


def typed_keys(key: jax.Array) -> jax.Array:
  """A typed key ``[]`` or ``[B]`` from a typed key or raw key data (``[2]`` or ``[B, 2]`` of
  ``jax.random.PRNGKey``)."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def row_keys(key: jax.Array, prompts: np.ndarray, samples: np.ndarray) -> np.ndarray:
  """Raw key data ``[B, 2]``: ``fold_in(fold_in(key, prompt), sample)`` of each row."""
  fold = lambda i, j: jax.random.fold_in(jax.random.fold_in(key, i), j)
  return np.asarray(jax.random.key_data(jax.vmap(fold)(prompts, samples)))


def sample(
  graphdef: nnx.GraphDef,
  params: Any,
  prompt_ids_BxP: jax.Array,
  prompt_mask_BxP: jax.Array,
  key: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float | jax.Array = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  greedy: bool = False,
  eos_token_ids: tuple[int, ...] = (),
  pad_token_id: int = 0,
  eos_check_every: int = 8,
) -> Generation:
  """The pure sampling program (trace it inside a larger jit, or call ``generate``)."""
  model = merge(graphdef, params)  # one state, or a tuple (LoRA adapters, base weights)
  key = typed_keys(key)
  if model.cfg.lora_rank:
    model = merge_lora(model)  # in full precision, before the cast
  plain, weights = nnx.split(model)
  dtype = jnp.dtype(model.cfg.dtype)
  model = nnx.merge(plain, jax.tree.map(lambda x: _matrix_as(x, dtype), weights))
  B, P = prompt_ids_BxP.shape
  N = max_new_tokens
  prompt_mask = prompt_mask_BxP.astype(jnp.int32)
  kv_mask = jnp.concatenate([prompt_mask, jnp.ones((B, N), jnp.int32)], axis=1)
  next_pos = jnp.sum(prompt_mask, axis=-1)  # position of the first new token
  pick = lambda logits, k: _pick(
    logits, k, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
  )
  eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

  # Prefill: the prompt into slots [0, P); the logits of its last slot give the first token.
  hidden, cache = model.trunk(
    prompt_ids_BxP,
    positions_BxT=positions_from_mask(prompt_mask),
    kv_mask_BxS=kv_mask,
    cache=model.trunk.init_cache(B, P + N),
    cache_index=0,
  )
  tok, logp = pick(model.unembed(hidden[:, -1]), _folded(key, 0))
  tokens = jnp.full((B, N), pad_token_id, jnp.int32).at[:, 0].set(tok)
  logps = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logp)
  mask = jnp.zeros((B, N), jnp.float32).at[:, 0].set(1.0)
  done = jnp.isin(tok, eos)

  def step(i, carry):  # the token at response slot i, from the one at i − 1
    cache, tokens, logps, mask, done, prev = carry
    hidden, cache = model.trunk(
      prev[:, None],
      positions_BxT=(next_pos + i - 1)[:, None],
      kv_mask_BxS=kv_mask,
      cache=cache,
      cache_index=P + i - 1,
    )
    tok, logp = pick(model.unembed(hidden[:, 0]), _folded(key, i))
    tok = jnp.where(done, pad_token_id, tok)
    tokens = tokens.at[:, i].set(tok)
    logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
    mask = mask.at[:, i].set(jnp.where(done, 0.0, 1.0))
    return cache, tokens, logps, mask, done | jnp.isin(tok, eos), tok

  carry = (cache, tokens, logps, mask, done, tok)
  # Steps lo, …, lo + n − 1 as a loop of n iterations (static n: a trip count XLA knows).
  steps = lambda lo, n, carry: jax.lax.fori_loop(0, n, lambda j, c: step(lo + j, c), carry)
  # Without a stop token all N − 1 steps in one loop; with one the (N − 1) mod k odd steps first,
  # unchecked, then chunks of k until slot N − 1 or until every row is done.
  k = eos_check_every if eos_token_ids else N
  n_chunks, rest = divmod(N - 1, k)
  if rest:
    carry = steps(1, rest, carry)
  if n_chunks:

    def cond(c_carry):
      c, (*_, done, _) = c_carry
      return (c < n_chunks) & ~jnp.all(done)

    def chunk(c_carry):
      c, carry = c_carry
      return c + 1, steps(1 + rest + c * k, k, carry)

    _, carry = jax.lax.while_loop(cond, chunk, (jnp.int32(0), carry))
  _, tokens, logps, mask, _, _ = carry
  return Generation(tokens=tokens, logprobs=logps, mask=mask)


def _matrix_as(x, dtype):
  """A floating parameter of two or more dims narrowed to ``dtype``; vectors (norm scales, biases,
  which the layers may read in float32), weights already as narrow, and the rest unchanged."""
  floating = jnp.issubdtype(x.dtype, jnp.floating)
  if jnp.ndim(x) >= 2 and floating and jnp.dtype(dtype).itemsize < x.dtype.itemsize:
    return x.astype(dtype)
  return x


_sample_jit = jax.jit(
  sample,
  static_argnames=(
    "graphdef",
    "max_new_tokens",
    "top_k",
    "top_p",
    "greedy",
    "eos_token_ids",
    "pad_token_id",
    "eos_check_every",
  ),
)


def _int(name: str, value: Any) -> int:
  """``value`` as a Python int (NumPy's and JAX's integer scalars too), or one line naming it."""
  try:
    return operator.index(value if not isinstance(value, np.ndarray | jax.Array) else value.item())
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def generate(
  model: CausalLM,
  input_ids: jax.Array,
  attention_mask: jax.Array | None,
  *,
  key: jax.Array | None = None,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  greedy: bool = False,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = 0,
  eos_check_every: int = 8,
) -> Generation:
  """Samples ``max_new_tokens`` continuations of left-padded prompts.

  Args:
    model: a ``ppo_jax.models.CausalLM``.
    input_ids: ``[B, P]`` prompt ids, left-padded.
    attention_mask: ``[B, P]``, 1 on prompt tokens (None: all real).
    key: a JAX PRNG key; the same key gives the same sample. Or one key per row (``[B]``, or
      raw ``[B, 2]`` key data): a row's sample then depends on its key alone, not on the other
      rows nor its place in the batch (up to the rounding of different shapes). None: only
      with ``greedy``, which draws nothing.
    max_new_tokens: N, the response length (static).
    temperature: τ > 0; ignored for the choice when ``greedy`` but used for the log-probs.
    top_k: keep the k most likely tokens (0: all).
    top_p: nucleus mass in (0, 1] (1: all).
    greedy: take the argmax instead of sampling.
    eos_token_id: the stop token(s); a row's mask is 0 after its first one. None: no stop
      (a checkpoint's own are ``(model.cfg.eos_token_id, *model.cfg.extra_eos_token_ids)``).
    pad_token_id: written after EOS; None: the first stop token (0 without one).
    eos_check_every: with a stop token, check whether every row is done after each k steps
      (runs at most k − 1 steps past the last EOS; their tokens are padding, so the result does
      not depend on k).

  Returns:
    ``Generation(tokens, logprobs, mask)``, each ``[B, N]``.
  """
  input_ids = jnp.asarray(input_ids)
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
  input_ids = input_ids.astype(jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"expected input_ids [B, P], got shape {list(input_ids.shape)}")
  if 0 in input_ids.shape:
    raise ValueError(
      f"input_ids {list(input_ids.shape)} needs at least one row and one column (an empty prompt "
      "is one padding column, mask 0)"
    )
  attention_mask = (
    jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  )
  if tuple(jnp.shape(attention_mask)) != input_ids.shape:
    raise ValueError(
      f"attention_mask shape {list(jnp.shape(attention_mask))} does not match "
      f"input_ids {list(input_ids.shape)}"
    )
  mask_now = concrete(attention_mask)
  if mask_now is not None:  # a real token after a padded slot: right padding, whose continuation
    # would start from a padding slot's logits
    real = mask_now > 0
    padded_after = np.any(real[:, :-1] & ~real[:, 1:], axis=1)
    if padded_after.any():
      raise ValueError(
        f"attention_mask row {int(np.argmax(padded_after))} has padding after a real token: "
        "generate needs left-padded prompts (a tokenizer's padding_side='left')"
      )
  max_new_tokens, top_k = _int("max_new_tokens", max_new_tokens), _int("top_k", top_k)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
  if top_k < 0:
    raise ValueError(f"top_k must be ≥ 0 (0: no top-k filter), got {top_k}")
  if temperature is None:
    raise ValueError("temperature must be a number > 0, got None")
  check_value(
    "temperature", temperature, lambda t: t > 0, "> 0 (with greedy too: the log-probs use it)"
  )
  if eos_check_every < 1:
    raise ValueError(f"eos_check_every must be ≥ 1, got {eos_check_every}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not hasattr(model, "unembed"):  # a reward or value model: no LM head to sample from
    raise ValueError(
      f"model: a {type(model).__name__} has no LM head to sample from; pass a CausalLM"
    )
  cfg = model.cfg
  # A NaN embedded at a masked (padding) position still reaches every query of its row (0 · NaN).
  check_ids(
    input_ids,
    cfg.vocab_size,
    what="input_ids hold ids outside the vocabulary",
    hint="; padding is embedded too: pad with a real id",
  )
  if cfg.is_gpt2 and input_ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(
      f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
      f"{cfg.max_position_embeddings} positions"
    )
  if eos_token_id is None:
    eos = ()
  elif np.ndim(eos_token_id) == 0:  # NumPy's and JAX's scalars too
    eos = (_int("eos_token_id", eos_token_id),)
  else:
    eos = tuple(_int("eos_token_id", e) for e in np.ravel(eos_token_id))
  # None (a tokenizer without a pad token): the stop token, as transformers pads then.
  pad_token_id = _int("pad_token_id", eos[0] if pad_token_id is None and eos else pad_token_id or 0)
  if not 0 <= pad_token_id < cfg.vocab_size:  # written after EOS, and read back as a token
    raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
  if key is None:
    if not greedy:
      raise ValueError("key is None: sampling needs a PRNG key (jax.random.key(seed)); or greedy")
    key = jax.random.key(0)  # never drawn from
  if isinstance(key, int | np.integer):
    raise ValueError(f"key must be a PRNG key (jax.random.key({key})), not the integer {key}")
  key = typed_keys(key)
  if key.shape not in ((), input_ids.shape[:1]):
    raise ValueError(
      f"key must be one PRNG key or one per row ([{input_ids.shape[0]}]), got shape "
      f"{list(key.shape)}"
    )
  graphdef, params = nnx.split(model)
  return _sample_jit(
    graphdef,
    nnx.to_pure_dict(params),
    input_ids,
    jnp.asarray(attention_mask),
    key,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=float(top_p),
    greedy=greedy,
    eos_token_ids=eos,
    pad_token_id=pad_token_id,
    eos_check_every=eos_check_every,
  )
