"""Sampling a trained policy on a prompts file, scored: ``ppo-jax sample`` and ``sample_file``.

Each prompt gets ``n`` responses from the jitted KV-cache sampler (``sampling.generate``), scored
by a reward model (a ``*ForSequenceClassification`` folder, on device) or a reward function (on
the host), and written to a JSONL file as they come. With ``n > 1`` the summary also gives the
best-of-n score, the mean over prompts of the best of their ``n`` scores: how far rejection
sampling against the scorer would get (Nakano et al., 2021, "WebGPT"; Gao et al., 2023, "Scaling
Laws for Reward Model Overoptimization"), the usual yardstick beside a PPO policy's mean score.

Batches all have ``batch_size`` rows (the last one padded with copies of a row whose samples are
dropped), and each is as wide as its longest prompt rounded up to a power of two (``trimmed``),
so a file of short prompts and a few long ones compiles a handful of programs and pads only the
batches that hold a long one. The ``j``-th response to prompt ``i`` samples with the key
``fold_in(fold_in(key(seed), i), j)`` whatever batch it falls in: the same seed writes the same
file, with any batch size or devices (up to the rounding of other shapes).

On several devices (``mesh``, by default all of them on the ``data`` axis) the weights are placed
by ``sharding.RULES`` (replicated on ``data``, sharded on ``fsdp`` and ``tensor``), as the training
step places them, and each batch's rows are handed over split on ``('data', 'fsdp')`` (GSPMD keeps
them split on ``data``; on ``fsdp`` it splits the products' contractions instead:
docs/scaling.md). Batches hold the rows one device's would; a call whose rows do not split evenly
is padded at the end. Random bits depend on neither (``jax_threefry_partitionable``: a row's bits
are those of its place in the batch), so a mesh samples what one device samples, up to the
rounding of sums split differently.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ppo_jax import data, file_batches, preemption, token_edges, writers
from ppo_jax import sharding as shd
from ppo_jax.compat import (
  check_compatible,
  check_reward_model,
  check_same_ids,
  model_folder,
  ordinary_stop_ids,
)
from ppo_jax.evaluation import Prompts, decode_responses, padded_batches
from ppo_jax.file_batches import batch_order, batch_rows, logprob_scorer, rm_scorer, trimmed
from ppo_jax.models import CausalLM, RewardModel, from_pretrained
from ppo_jax.models.hf_config import read_generation_config
from ppo_jax.rewards import (
  RewardSum,
  call_reward_fn,
  call_reward_parts,
  components,
  fields_taken,
  load_reward_fn,
  load_reward_fns,
  split_paths,
  summed,
)
from ppo_jax.sampler_settings import sampling_settings
from ppo_jax.sampling import generate, row_keys
from ppo_jax.tokenizer import load_tokenizer, tokenizer_folder


def load_reward_model(
  folder: str, dtype: str, tokenizer: Any, tokenizer_folder: str | None = None
) -> RewardModel:
  """A reward-model folder that reads ``tokenizer``'s ids (``compat.check_reward_model``,
  ``compat.check_compatible``)."""
  check_reward_model(
    folder, what="--reward-model", tokenizer=tokenizer, tokenizer_folder=tokenizer_folder
  )
  rm = from_pretrained(folder, dtype=dtype, kind="reward")
  check_compatible(rm.cfg, tokenizer, None, what=f"reward model {folder}")
  return rm


def sample_file(
  model: str | pathlib.Path,
  prompts: str | pathlib.Path,
  out: str | pathlib.Path,
  *,
  n: int = 1,
  max_new_tokens: int | None = None,
  reward_model: str | pathlib.Path | None = None,
  reward_fn: str | None = None,
  reward_weights: str | None = None,
  gold_fn: str | None = None,
  ref_model: str | pathlib.Path | None = None,
  tokenizer: str | pathlib.Path | None = None,
  temperature: float | None = None,
  top_p: float | None = None,
  top_k: int | None = None,
  greedy: bool = False,
  batch_size: int = 16,
  max_prompt_len: int | None = None,
  prompt_overflow: str = "error",
  chat_template: bool = False,
  system_prompt: str | None = None,
  chat_template_kwargs: str | None = None,
  seed: int = 0,
  dtype: str = "float32",
  mesh: Sequence[int] | None = None,
  progress: bool = True,
) -> dict[str, float]:
  """Writes ``n`` sampled responses to each prompt of ``prompts`` (a prompts, SFT or preference
  JSONL file, read as ``data.load_prompts`` reads it) to ``out`` (JSONL, one row per response:
  ``prompt``, ``response``, ``index`` of the prompt, ``sample``, ``tokens``, ``stopped`` at a stop
  id, ``score`` with a scorer and ``gold`` with ``gold_fn``) and returns the summary it prints.
  ``reward_fn`` may name several functions, ``"a:f,b:g"``, scoring with their sum weighted by
  ``reward_weights`` (``"1,0.5"``; default 1 each).

  ``gold_fn`` is a second function, the one that judges (a held-out reward, a human proxy): with
  ``n > 1`` and a scorer, ``best_of_{n}_gold`` is the mean gold score of the responses the scorer
  picked, the proxy-against-gold reading of rejection sampling (Gao et al., 2023).

  ``ref_model`` (a causal LM of the same vocabulary: the SFT policy, say) adds each response's
  ``kl``, Σₜ log π(yₜ) − log π_ref(yₜ) over its tokens (k1, EOS included, both at the sampling
  temperature: PPO's ``objective/kl``), and their mean: an estimate of KL(π ‖ π_ref), to compare
  policies at equal KL.

  ``model`` is a Hugging Face causal-LM folder (a ppo_jax policy or export, or any supported
  checkpoint); its tokenizer comes from ``tokenizer`` or the same folder. Responses stop at the
  tokenizer's EOS and the checkpoint's stop ids (config.json's and generation_config.json's).
  Unset sampling settings come from its ``generation_config.json`` (``sampling_settings``).
  Responses are at most ``max_new_tokens`` tokens (default: ``generation_config.json``'s
  ``max_new_tokens``, else 64; at most half the positions of model and reward model).
  Prompts are at most ``max_prompt_len`` tokens (default: what the model's positions leave beside
  ``max_new_tokens``; ``prompt_overflow``: error | truncate). Rows are sampled longest prompt
  first (``batch_order``), each batch left-padded to its longest rounded up to a power of two
  (``trimmed``), and written in prompt order.
  ``mesh``: the devices' ``(data, fsdp, tensor)`` shape (``sharding.command_mesh``; default all on
  ``data``).

  Raises:
    ValueError: bad arguments, an existing ``out``, a model or reward model that does not fit
      (one line each); ``data.DataError`` for bad prompt rows; ``RewardError`` for a reward
      function that fails.
  """
  out = file_batches.output_file(out)
  for flag, value in (
    ("--n", n),
    ("--batch-size", batch_size),
    ("--max-new-tokens", max_new_tokens),
    ("--max-prompt-len", max_prompt_len),
  ):
    if value is not None and value < 1:
      raise ValueError(f"{flag} must be ≥ 1, got {value}")
  if reward_model and reward_fn:
    raise ValueError("give a reward model or a reward function, not both")
  settings = sampling_settings(
    model, temperature, top_p, top_k, greedy=greedy, max_new_tokens=max_new_tokens
  )
  if settings["greedy"] and n > 1:
    why = f" ({settings['greedy_from']} says so)" if settings["greedy_from"] else ""
    raise ValueError(
      f"greedy decoding{why} gives one response per prompt, not --n {n}: sample "
      "(--temperature), or --n 1"
    )
  fn = (
    load_reward_fns(reward_fn, reward_weights, prefix="--reward-")
    if reward_fn or reward_weights
    else None
  )
  gold = load_reward_fn(gold_fn, what="--gold-fn") if gold_fn else None
  mesh = shd.command_mesh(mesh)
  model = model_folder(model, "--model", "policy")
  if reward_model:
    reward_model = model_folder(reward_model, "--reward-model", "reward_model")
  if ref_model:
    ref_model = model_folder(ref_model, "--ref-model", "sft")
  tok_dir = tokenizer_folder(tokenizer, "--tokenizer") if tokenizer else model
  tok = load_tokenizer(tok_dir)
  with shd.staged_on_host(mesh):
    policy = from_pretrained(model, dtype=dtype, kind="causal_lm")
    check_compatible(policy.cfg, tok, None, what=f"model {model}")
    rm = load_reward_model(str(reward_model), dtype, tok, tok_dir) if reward_model else None
    ref = load_reference(str(ref_model), dtype, tok, tok_dir) if ref_model else None
  cfg = policy.cfg
  others = [m.cfg for m in (rm, ref) if m is not None]
  positions = min(c.max_position_embeddings for c in [cfg, *others])
  if max_new_tokens is None:  # the checkpoint's own cap, else 64; within half the positions
    own = (read_generation_config(model) or {}).get("max_new_tokens")
    own = own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else 64
    max_new_tokens = max(1, min(own, positions // 2))
  cap = positions - max_new_tokens if max_prompt_len is None else max_prompt_len
  if cap < 1:
    raise ValueError(
      f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {positions} positions "
      "of the model" + (" and reward model" if rm else "") + " (lower --max-new-tokens)"
    )
  models = " and ".join(
    w for w, m in (("model", policy), ("reward model", rm), ("reference", ref)) if m is not None
  )
  used = (max_new_tokens, "new tokens", "--max-new-tokens")
  left = {} if max_prompt_len else {"limit": positions_left(positions, *used, models)}
  layout = data.Layout.of(
    tok,
    cap,
    max_new_tokens,
    prompt_overflow,
    chat_template,
    system_prompt,
    chat_template_kwargs,
    **left,
  )
  file = Prompts(*data.load_prompts_and_columns(prompts, tok, layout, fit=True))
  for flag, scorer, spec in (("--reward-fn", fn, reward_fn), ("--gold-fn", gold, gold_fn)):
    for one, path in zip(components(scorer), split_paths(spec), strict=True) if scorer else ():
      fields_taken(one, file.columns, f"{flag} {path}", every_row=True)  # as training refuses
  ids = file.ids
  parts = f"the longest prompt's {ids.shape[1]} tokens + --max-new-tokens {max_new_tokens}"
  for m, what in ((policy, "model"), (rm, "reward model"), (ref, "reference")):  # the longest
    if m is not None:
      check_compatible(m.cfg, tok, ids.shape[1] + max_new_tokens, what=what, parts=parts)
  end = token_edges.turn_end_id(tok) if chat_template else None  # where training ends responses
  stops = tuple(dict.fromkeys(i for i in (tok.eos_token_id, *cfg.stop_ids, end) if i is not None))
  if progress and (note := ordinary_stop_ids(tok, stops)):
    print(note)
  lengths = file.mask.sum(1)
  # The file is written in prompt-major order (prompt 0's n samples first) at the end.
  major = np.repeat(np.arange(len(file)), n)
  order = batch_order(lengths[major])
  rows, samples = major[order], np.tile(np.arange(n), len(file))[order]
  chunk, B, batches = batch_rows(batch_size, len(rows), mesh)
  say = print if progress else (lambda *a, **k: None)
  say(
    f"sampling {_count(len(file), 'prompt')} × {n} from {model} "
    f"({_count(len(rows), 'response')} of at most {_count(max_new_tokens, 'token')}, {batches}; "
    + (
      "greedy"
      if settings["greedy"]
      else ", ".join(f"{k} {settings[k]}" for k in ("temperature", "top_p", "top_k"))
    )
    + f"; stop ids {list(stops)})",
    flush=True,
  )
  policy, rm = shd.placed(policy, mesh), (shd.placed(rm, mesh) if rm is not None else None)
  score = rm_scorer(rm, mesh) if rm is not None else None
  ref_logprobs = None
  if ref is not None:  # at the temperature of the sampler's log-probs (1 when greedy)
    ref_logprobs = logprob_scorer(shd.placed(ref, mesh), mesh, temperature=settings["temperature"])
  # Several reward functions: each one's score too, before its weight.
  parts = [f"scores/{name}" for name in (fn.names if isinstance(fn, RewardSum) else ())]
  results = {
    k: np.full(len(rows), np.nan) for k in ("tokens", "stopped", "score", *parts, "gold", "kl")
  }
  key = jax.random.key(seed)
  lines: list[str] = [""] * len(rows)  # by prompt-major position
  tick = file_batches.ticker(say, len(rows), "responses")
  with file_batches.written_when_done(out, "responses") as f:
    for start, real, picked in padded_batches(len(rows), chunk, B):
      preemption.raise_pending()  # a Ctrl-C that Python discarded (preemption.command_stop)
      take = rows[picked]
      # Each response's own key, of its prompt and sample number: not of the batch it falls in.
      keys = row_keys(key, take, samples[picked])
      batch = file.take(take)
      W = trimmed(lengths[take], ids.shape[1])  # the prompts' last W columns: left padding
      prompt_ids, prompt_mask = batch.ids[:, -W:], batch.mask[:, -W:]
      gen = generate(
        policy,
        shd.on_rows(prompt_ids, mesh),
        shd.on_rows(prompt_mask, mesh),
        key=shd.on_rows(keys, mesh),
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
        **{k: settings[k] for k in ("temperature", "top_p", "top_k", "greedy")},
      )
      all_tokens, all_mask = np.asarray(gen.tokens), np.asarray(gen.mask, np.int32)
      tokens, gen_mask = all_tokens[:real], all_mask[:real]
      full_ids = np.concatenate([prompt_ids, all_tokens], 1)
      full_mask = np.concatenate([prompt_mask, all_mask], 1)
      kls = None
      if ref_logprobs is not None:
        ref_logp = np.asarray(ref_logprobs(full_ids, full_mask, max_new_tokens))
        own = np.asarray(gen.logprobs)
        kls = ((own - ref_logp) * all_mask).sum(1, dtype=np.float64)[:real]
      responses = decode_responses(tok, tokens, gen_mask)
      prompt_texts, batch_columns = batch.texts[:real], batch.head(real)
      per_fn = {}
      if fn is not None:
        label = f"--reward-fn {reward_fn}"
        each = call_reward_parts(fn, prompt_texts, responses, columns=batch_columns, name=label)
        scores = summed(fn, each, name=label)
        per_fn = dict(zip(parts, each.T, strict=False))  # none for a plain function
      elif score is not None:
        scores = np.asarray(score(full_ids, full_mask))[:real]
      else:
        scores = None
      golds = None
      if gold is not None:
        golds = call_reward_fn(
          gold, prompt_texts, responses, columns=batch_columns, name=f"--gold-fn {gold_fn}"
        )
      for j in range(real):
        length = int(gen_mask[j].sum())
        stopped = bool(length and int(tokens[j, length - 1]) in stops)
        row = {
          "index": int(take[j]),
          "sample": int(samples[start + j]),
          "prompt": prompt_texts[j],
          "response": responses[j],
          "tokens": length,
          "stopped": stopped,
        }
        pos = order[start + j]
        results["tokens"][pos], results["stopped"][pos] = length, stopped
        for name, values in (("score", scores), *per_fn.items(), ("gold", golds), ("kl", kls)):
          if values is not None:
            row[name] = results[name][pos] = float(values[j])
        lines[pos] = writers.json_line(row)
        f.write(lines[pos])
      f.flush()
      tick(start + real)
    f.seek(0)  # the rows as they came (kept should this stop), now in prompt-major order
    f.truncate()
    f.writelines(lines)
  summary = _summary(results, n, scored=fn is not None or rm is not None, judged=gold is not None)
  if ref is not None:
    summary["kl_mean"] = float(np.mean(results["kl"]))
  say(
    f"wrote {len(rows)} responses to {out}: " + ", ".join(_shown(k, v) for k, v in summary.items())
  )
  return summary


def load_reference(folder: str, dtype: str, tokenizer: Any, tokenizer_folder: str) -> CausalLM:
  """A causal LM to measure the KL to, refused in one line if its own tokenizer gives other ids
  to ``tokenizer``'s tokens or its vocabulary does not hold them."""
  check_same_ids(
    folder, tokenizer, tokenizer_folder, what="--ref-model", why="the KL would compare other tokens"
  )
  ref = from_pretrained(folder, dtype=dtype, kind="causal_lm")
  check_compatible(ref.cfg, tokenizer, None, what=f"reference {folder}")
  return ref


def _count(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


def positions_left(positions: int, tokens: int, what: str, flag: str, models: str) -> str:
  """``data.Layout.limit`` when --max-prompt-len is not given: the positions that ``tokens``
  response tokens (``what``, set by ``flag``) leave of the ``models``' ``positions``."""
  return (
    f"the {{P}} positions {tokens} {what} ({flag}) leave of the {models}'s {positions} (lower "
    f"{flag}, or set --prompt-overflow=truncate)"
  )


def _summary(
  results: dict[str, np.ndarray], n: int, *, scored: bool, judged: bool
) -> dict[str, float]:
  """What ``sample_file`` prints of its rows, in prompt-major order (``scored``: with a scorer,
  ``judged``: with a gold function; ``scores/<name>``: each of several reward functions')."""
  summary = {
    "mean_tokens": float(np.mean(results["tokens"])),
    "stopped": float(np.mean(results["stopped"])),
  }
  scores, golds = (
    np.asarray(results[k], np.float64).reshape(-1, n) if has else np.zeros((0, n))
    for k, has in (("score", scored), ("gold", judged))
  )
  if scores.size:
    summary["score_mean"] = float(scores.mean())
    summary["score_std"] = float(scores.std())
    if n > 1:
      summary[f"best_of_{n}"] = float(scores.max(1).mean())
    # each reward function's mean, with several
    summary |= {k: float(np.mean(v)) for k, v in results.items() if k.startswith("scores/")}
  if golds.size:
    summary["gold_mean"] = float(golds.mean())
    if n > 1 and scores.size:  # the gold score of each prompt's pick by the scorer
      picked = np.take_along_axis(golds, scores.argmax(1)[:, None], 1)
      summary[f"best_of_{n}_gold"] = float(picked.mean())
  return summary


def _shown(key: str, value: float) -> str:
  if key == "stopped":
    return f"{value:.0%} stopped at a stop id"
  return f"{key} {value:.4g}" if math.isfinite(value) else f"{key} {value}"
