"""The edges of tokenized texts: the BOS a tokenizer puts before a prompt, the EOS after a
response, the space a SentencePiece tokenizer puts before a text, and a prompt's trailing space,
each checked against what the text already holds.

Data prepared for another library often carries its special tokens as text (a prompt that
starts with ``<s>`` or ``<|begin_of_text|>``, a response that ends with ``</s>`` or
``<|im_end|>``): Hugging Face tokenizers read them as the special tokens, and adding ours again
would train on two BOS or two EOS. They are kept once, and said.

A response is tokenized apart from its prompt. Responses of datasets that continue their prompt's
text begin with a space (Anthropic HH-RLHF's `` I think…`` after ``Assistant:``): byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen) read it as the first word's (``ĠI``), as in the whole text, but
SentencePiece tokenizers that put a space before every text (Llama 2, Mistral: ``▁I`` for
``I``) would read it as a token of its own (``▁``, ``▁I``); for them one leading space is the one
they put, and before a response that begins with no word (a newline) the lone
``▁`` they put is dropped (``response_tokens``). A response that begins with a word still gets the
space they put (``▁Paris``), as the policy's own samples decode and re-encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def added_head(tokenizer: Any) -> int:
  """How many tokens the tokenizer puts before a text of its own (a BOS): 0 for GPT-2's."""
  plain = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a", add_special_tokens=True)["input_ids"]
  return next((h for h in range(len(full)) if full[h : h + len(plain)] == plain), 0)


def head_once(encoded: list[list[int]], head: int, tokenizer: Any, source: str) -> list[list[int]]:
  """``encoded`` (texts tokenized with the tokenizer's special tokens, ``head`` of them put
  first) without the added head where the text itself began with it (a prompt written with its
  BOS): one BOS, not two. Says how many."""
  if not head:
    return encoded
  twice = [h for h, toks in enumerate(encoded) if toks[head : 2 * head] == toks[:head]]
  if twice:
    bos = tokenizer.convert_ids_to_tokens(encoded[twice[0]][:head])
    print(
      f"{source}: {len(twice)} of {len(encoded)} prompts begin with {''.join(bos)} in their "
      "text, which the tokenizer adds itself: it is kept once"
    )
    for h in twice:
      encoded[h] = encoded[h][head:]
  return encoded


def turn_end_id(tokenizer: Any) -> int | None:
  """The special token the tokenizer's chat template ends an assistant turn with, where it is
  not the EOS (Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``): with ``data.chat_template``
  responses end with it, as the template's turns do, and sampling stops at it. None when the
  turn ends with EOS (Llama 3's and Qwen's instruct tokenizers), with no special token, or when
  the template cannot say (no template, or it refuses a two-turn conversation)."""
  mark = "ppo_jax_response_end"
  turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": mark}]
  try:
    text = tokenizer.apply_chat_template(turns, tokenize=False)
  except Exception:  # no template, or one of its own rules: nothing to compare
    return None
  if not isinstance(text, str) or mark not in text:
    return None
  after = tokenizer(text[text.index(mark) + len(mark) :], add_special_tokens=False)["input_ids"]
  special = set(getattr(tokenizer, "all_special_ids", ()))  # and tokens added as special:
  decoder = getattr(tokenizer, "added_tokens_decoder", {})  # Llama 3's <|eot_id|>, Phi-3's <|end|>
  special |= {i for i, t in decoder.items() if getattr(t, "special", False)}
  special -= {tokenizer.unk_token_id, tokenizer.pad_token_id}  # no turn's end
  end = next((i for i in after if i in special), None)
  return None if end is None or end == tokenizer.eos_token_id else end


def puts_space_first(tokenizer: Any) -> bool:
  """Whether the tokenizer reads a text's first word as if a space came before it (SentencePiece
  with a dummy prefix: ``a`` is ``▁a``, as in ``b a``); byte-level BPE does not (``a``, ``Ġa``)."""
  one = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  first = one("b")
  both = one("b a")
  return both[: len(first)] == first and both[len(first) :] == one("a")


def _space_once(tokenizer: Any, texts: list[str], source: str) -> list[str]:
  """``texts`` with one leading space dropped where it would otherwise become a token of its own
  (for a tokenizer that ``puts_space_first``); says how many."""
  starts = [i for i, t in enumerate(texts) if t.startswith(" ") and t.strip()]
  if not starts:
    return texts
  one = lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]
  spaced, trimmed = one([texts[i] for i in starts]), one([texts[i][1:] for i in starts])
  changed = {i for i, a, b in zip(starts, spaced, trimmed, strict=True) if a != b}
  if changed:
    print(
      f"{source}: {len(changed)} of {len(texts)} responses begin with a space, which this "
      "tokenizer puts before a text itself: read as their first word's, not a token of its own"
    )
  return [t[1:] if i in changed else t for i, t in enumerate(texts)]


def response_tokens(tokenizer: Any, texts: Sequence[str], source: str) -> list[list[int]]:
  """Responses' tokens as they read after their prompts. For a tokenizer that puts a space
  before every text (``puts_space_first``), a leading space is that one (``_space_once``), and
  before a text that begins with no word (a newline) the lone ``▁`` it makes is dropped (the
  whole text has none); each said."""
  texts = list(texts)
  if not puts_space_first(tokenizer):
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
  tokens = tokenizer(_space_once(tokenizer, texts, source), add_special_tokens=False)["input_ids"]
  lone = tokenizer.get_vocab().get("▁")  # SentencePiece's space as a token of its own
  dropped = {
    i
    for i, (t, toks) in enumerate(zip(texts, tokens, strict=True))
    if lone is not None and len(toks) > 1 and toks[0] == lone and not t.startswith(" ")
  }
  if dropped:
    print(
      f"{source}: {len(dropped)} of {len(texts)} responses begin with no word (a newline, say): "
      "the space this tokenizer puts before a text is dropped, as in the whole text"
    )
  return [toks[1:] if i in dropped else toks for i, toks in enumerate(tokens)]


def with_eos(tokens: list[list[int]], end_id: int, tokenizer: Any, source: str) -> list[list[int]]:
  """Each response's tokens ending with one ``end_id`` (the EOS, or a chat template's turn end
  where it has its own): appended, unless the text already ended with it, or with the
  tokenizer's EOS in its place (data written for another library); says how many did."""
  eos = tokenizer.eos_token_id
  ended = [bool(toks) and toks[-1] in (end_id, eos) for toks in tokens]
  if any(ended):
    names = dict.fromkeys(
      tokenizer.convert_ids_to_tokens(t[-1]) for t, e in zip(tokens, ended, strict=True) if e
    )
    instead = f", the end ppo_jax appends ({tokenizer.convert_ids_to_tokens(end_id)})"
    print(
      f"{source}: {sum(ended)} of {len(tokens)} responses end with {' or '.join(names)} in their "
      f"text{instead if end_id != eos else ', the EOS ppo_jax appends'}: it is kept once"
    )
  return [[*t[:-1], end_id] if e else [*t, end_id] for t, e in zip(tokens, ended, strict=True)]


def trailing_space_note(
  tokenizer: Any, texts: Sequence[str], encoded: list[list[int]], source: str
) -> None:
  """Says how many prompts end in a space the tokenizer keeps as a token of its own (BPE and
  SentencePiece tokenizers put a word's space before it: in the whole text the response's first
  word would carry that space; after the prompt it follows a lone space token instead)."""
  ends = [i for i, t in enumerate(texts) if t.endswith(" ") and t.strip()]
  if not ends:
    return
  stripped = tokenizer([texts[i].rstrip(" ") for i in ends], add_special_tokens=True)["input_ids"]
  kept = [(i, toks) for i, toks in zip(ends, stripped, strict=True) if toks != encoded[i]]
  if kept:
    i, toks = kept[0]
    first = next(
      (k for k, (a, b) in enumerate(zip(encoded[i], toks, strict=False)) if a != b), len(toks)
    )
    space = tokenizer.convert_ids_to_tokens(encoded[i][first])
    print(
      f"{source}: {len(kept)} of {len(texts)} prompts end in a space, a token of its own "
      f"({space!r}): the response's first word then follows it, unlike in the whole text (where "
      "the word carries its space); strip it unless meant"
    )
