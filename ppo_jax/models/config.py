"""One frozen config for every supported decoder (its Hugging Face mapping: ``hf_config``).

GPT-2 (learned positions, LayerNorm with bias, tanh-GELU MLP, tied embeddings), the Llama
family (Llama 2/3, Qwen2/2.5, Qwen3, Mistral: RoPE, RMSNorm, SwiGLU, grouped-query attention) and
Gemma 2 and 3 (the Llama layout plus an embedding scaled by √d, RMSNorm scaled by 1 + w, GeGLU, a
norm after each sublayer too, a sliding window on some layers; Gemma 2 soft-caps attention scores
and logits, Gemma 3 normalises queries and keys and rotates the windowed layers with a RoPE base of
their own) differ only in the fields below, so one module tree serves them all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED = (
  "gpt2",
  "llama",
  "qwen2",
  "qwen3",
  "mistral",
  "gemma2",
  "gemma3_text",
  "olmo2",
  "olmo3",
)
ACTIVATIONS = {
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "gelu": "gelu",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT = ("none", "block", "dots")
# Attention: ppo_jax's own (XLA), or cuDNN's fused kernel (full forwards and decode steps).
ATTENTION = ("xla", "cudnn")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_problems(rank: int, targets: str) -> list[str]:
  """What is wrong with LoRA settings, each as ``field: ...`` (none: an empty list)."""
  problems = []
  if rank < 0:
    problems.append(f"lora_rank: must be ≥ 0 (0: no LoRA), got {rank}")
  if not set(targets.split(",")) <= set(LORA_TARGETS):  # a typo, even with LoRA off
    problems.append(
      f"lora_targets: {targets!r}; expected a comma-separated subset of {', '.join(LORA_TARGETS)}"
    )
  return problems


def projections(*, gpt2: bool) -> tuple[str, ...]:
  """A block's linear projections, by their LoRA target names (GPT-2's MLP has no gate)."""
  return tuple(t for t in LORA_TARGETS if not (gpt2 and t == "gate"))


DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(value: Any) -> Any:
  """The name of a dtype given as an object (``jnp.bfloat16``, ``np.dtype("float32")``), or the
  value unchanged when it is none (the check then names it)."""
  import numpy as np

  if value is None:  # np.dtype(None) is float64
    return value
  try:
    return np.dtype(value).name
  except TypeError:
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer (hashable: usable as a jit static)."""

  model_type: str  # one of SUPPORTED, Hugging Face's names
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  norm_eps: float
  activation: str = "silu"  # gelu_tanh | gelu | relu | silu
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3 | yarn
  rope_params: tuple[tuple[str, float], ...] = ()  # factor, low/high_freq_factor, original_max...
  sliding_window: int | None = None  # keys within this many positions of the query only
  full_attention_layers: tuple[int, ...] = ()  # layers the window spares (Gemma 2: the odd ones)
  local_rope_theta: float | None = None  # the windowed layers' RoPE base (Gemma 3); None: rope_*
  query_pre_attn_scalar: float | None = None  # scores scaled by 1/√this (Gemma 2); None: 1/√D
  attn_logit_softcap: float | None = None  # scores → c·tanh(scores / c) before the mask (Gemma 2)
  final_logit_softcap: float | None = None  # logits → c·tanh(logits / c) (Gemma 2)
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  extra_eos_token_ids: tuple[int, ...] = ()  # the checkpoint's other stop ids, saved back with it
  pad_token_id: int | None = None
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | block (recompute each block) | dots (save matmul outputs)
  attention: str = "xla"  # xla (attend) | cudnn (fused: full forwards, decoding; NVIDIA, bf16/16)
  lora_rank: int = 0  # > 0: LoRA adapters on the lora_targets projections
  lora_alpha: float = 16.0
  lora_targets: str = "q,k,v,o"  # comma-separated: q, k, v, o, gate, up, down

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):  # jnp.bfloat16, np.float32, …: stored by name
      value = getattr(self, name)
      if not isinstance(value, str):
        object.__setattr__(self, name, _dtype_name(value))
    problems = []
    if self.model_type not in SUPPORTED:
      problems.append(f"model_type {self.model_type!r} (supported: {', '.join(SUPPORTED)})")
    if self.activation not in set(ACTIVATIONS.values()):
      problems.append(f"activation {self.activation!r}")
    sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    problems += [f"{n} {getattr(self, n)} (expected ≥ 1)" for n in sizes if getattr(self, n) < 1]
    if problems:
      raise ValueError("unsupported model config: " + "; ".join(problems))
    if self.is_gpt2 and self.num_heads * self.head_dim != self.hidden_size:
      problems.append(
        f"gpt2's hidden_size {self.hidden_size} is not num_heads {self.num_heads} × head_dim "
        f"{self.head_dim} (a width its head count does not divide)"
      )
    if self.is_gpt2 and self.num_kv_heads != self.num_heads:  # c_attn holds q, k, v alike
      problems.append(f"gpt2 has as many k/v heads as heads, not {self.num_kv_heads}")
    if self.is_gpt2 and not (self.qkv_bias and self.o_bias and self.mlp_bias):
      problems.append("gpt2's projections all have biases (qkv_bias, o_bias, mlp_bias)")
    if self.num_heads % self.num_kv_heads:
      problems.append(
        f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}"
      )
    if self.rope_type not in ROPE_TYPES:
      problems.append(f"rope_type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    problems += lora_problems(self.lora_rank, self.lora_targets)
    if self.remat not in REMAT:
      problems.append(f"remat {self.remat!r} (expected one of {', '.join(REMAT)})")
    if self.attention not in ATTENTION:
      problems.append(f"attention {self.attention!r} (expected one of {', '.join(ATTENTION)})")
    elif self.attention == "cudnn" and self.dtype == "float32":
      problems.append("attention 'cudnn' computes in bfloat16 or float16, not dtype float32")
    elif self.attention == "cudnn" and self.attn_logit_softcap is not None:
      problems.append("attention 'cudnn' cannot soft-cap attention scores: use 'xla'")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        problems.append(f"{name} {getattr(self, name)!r} (expected one of {', '.join(DTYPES)})")
    if problems:
      raise ValueError("unsupported model config: " + "; ".join(problems))

  def lora_kw(self, name: str) -> dict[str, Any]:
    """LoRA arguments of projection ``name`` (none when it is not a target)."""
    if self.lora_rank and name in self.lora_targets.split(","):
      return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}
    return {}

  @property
  def projections(self) -> tuple[str, ...]:
    """Each block's linear projections, by their LoRA target names (GPT-2's MLP has no gate)."""
    return projections(gpt2=self.is_gpt2)

  @property
  def qk_norm(self) -> bool:
    """Qwen3, Gemma 3: an RMSNorm over each head's query and key (``head_dim`` features) before
    RoPE."""
    return self.model_type in ("qwen3", "gemma3_text")

  @property
  def is_olmo(self) -> bool:
    """OLMo 2 and 3 layout (Groeneveld et al. 2024; OLMo et al. 2025, "2 OLMo 2 Furious"): no norm
    before the sublayers, an RMSNorm after each (``x + norm(attn(x))``), the query and key
    RMSNorms over the whole projection (all heads' features together), and every RMSNorm
    weight applied in float32 before the cast."""
    return self.model_type in ("olmo2", "olmo3")

  @property
  def is_gemma(self) -> bool:
    """Gemma layout: embedding × √d, RMSNorm weights ``w`` scaling by ``1 + w`` in float32, and
    each sublayer's output normalised again before the residual add."""
    return self.model_type in ("gemma2", "gemma3_text")

  def sliding(self, layer: int) -> bool:
    """Whether ``layer`` attends only within ``sliding_window`` positions."""
    return self.sliding_window is not None and layer not in self.full_attention_layers

  @property
  def is_gpt2(self) -> bool:
    """GPT-2 layout: learned positions, LayerNorm with bias, plain GELU MLP."""
    return self.model_type == "gpt2"

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id generation stops at: ``eos_token_id`` (if any), then ``extra_eos_token_ids``."""
    ids = (self.eos_token_id, *self.extra_eos_token_ids)
    return tuple(dict.fromkeys(i for i in ids if i is not None))

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def with_special_ids(self, *, eos: int, pad: int | None, bos: int | None) -> ModelConfig:
    """This config with a tokenizer's EOS, pad and BOS ids, the ones training uses.

    The checkpoint's own EOS ids that differ stay as extra stop ids, so a saved model stops at
    either under ``generate``. A ``None`` pad or BOS keeps the config's.
    """
    own = (self.eos_token_id, *self.extra_eos_token_ids)
    return self.replace(
      eos_token_id=eos,
      extra_eos_token_ids=tuple(dict.fromkeys(i for i in own if i is not None and i != eos)),
      pad_token_id=self.pad_token_id if pad is None else pad,
      bos_token_id=self.bos_token_id if bos is None else bos,
    )

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (``from_dict`` inverts it)."""
    d = dataclasses.asdict(self)
    d["rope_params"] = [list(p) for p in self.rope_params]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope_params"] = tuple(tuple(p) for p in d.get("rope_params", ()))
    d["full_attention_layers"] = tuple(d.get("full_attention_layers", ()))
    d["extra_eos_token_ids"] = tuple(d.get("extra_eos_token_ids", ()))
    return cls(**d)

  # ----------------------------------------------------------------------------------------------
  # Small configs for tests, benchmarks and the embedded default experiment.

  @classmethod
  def gpt2(
    cls,
    *,
    vocab_size=512,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    max_position_embeddings=128,
    **kw,
  ) -> ModelConfig:
    defaults = dict(
      num_kv_heads=num_heads,
      head_dim=hidden_size // num_heads,
      intermediate_size=4 * hidden_size,
      norm_eps=1e-5,
      activation="gelu_tanh",
      tie_word_embeddings=True,
      qkv_bias=True,
      o_bias=True,
      mlp_bias=True,
    )
    return cls(
      model_type="gpt2",
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      num_layers=num_layers,
      num_heads=num_heads,
      max_position_embeddings=max_position_embeddings,
      **{**defaults, **kw},  # each default may be given (n_inner, layer_norm_epsilon, …)
    )

  @classmethod
  def llama(
    cls,
    *,
    vocab_size=512,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=None,
    max_position_embeddings=2048,
    **kw,
  ) -> ModelConfig:
    return cls(
      model_type="llama",
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      intermediate_size=intermediate_size or 4 * hidden_size,
      max_position_embeddings=max_position_embeddings,
      **{"head_dim": hidden_size // num_heads, "norm_eps": 1e-5, **kw},
    )

  # ----------------------------------------------------------------------------------------------
  # Hugging Face configs (``ppo_jax.models.hf_config``).

  @classmethod
  def from_hf(cls, hf: Any, **overrides: Any) -> ModelConfig:
    """From a ``transformers`` config object (``AutoConfig.from_pretrained(folder)``)."""
    from ppo_jax.models.hf_config import config_from_hf

    return config_from_hf(hf, **overrides)

  def to_hf(self, *, architecture: str = "causal_lm") -> Any:
    """The ``transformers`` config of this model (``architecture``: causal_lm | sequence_cls)."""
    from ppo_jax.models.hf_config import config_to_hf

    return config_to_hf(self, architecture=architecture)
