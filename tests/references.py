"""Float64 NumPy references, written as plain loops straight from the definitions
(the equations in each production function's docstring, and ../shared/DESIGN.md).

They share no code with ppo_jax: each test compares a production function with one of these.
Masked positions are skipped (never read), so garbage there cannot reach a reference result.
"""

from __future__ import annotations

import math

import numpy as np


def softplus(x: float) -> float:
  return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def masked_mean(x, m):
  total, n = 0.0, 0.0
  for xi, mi in zip(np.ravel(x), np.ravel(m), strict=True):
    if mi:
      total += float(xi)
      n += 1
  return total / n if n else 0.0


def masked_whiten(x, m, shift_mean=True):
  vals = [float(v) for v, mi in zip(np.ravel(x), np.ravel(m), strict=True) if mi]
  n = len(vals)
  mean = sum(vals) / n if n else 0.0
  var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
  out = np.zeros(np.shape(x))
  for idx in np.ndindex(np.shape(x)):
    if m[idx]:
      out[idx] = (x[idx] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  return out


def log_softmax_at(logits_row, token, temperature=1.0):
  z = [float(v) / temperature for v in logits_row]
  mx = max(z)
  lse = mx + math.log(sum(math.exp(v - mx) for v in z))
  return z[token] - lse


def entropy(logits_row, temperature=1.0):
  z = [float(v) / temperature for v in logits_row]
  mx = max(z)
  ps = [math.exp(v - mx) for v in z]
  s = sum(ps)
  return -sum((p / s) * math.log(p / s) for p in ps if p > 0)


def kl(logp, ref_logp, kind):
  d = float(logp) - float(ref_logp)
  return {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[kind]


def gae(rewards, values, mask, gamma, lam):
  B, T = np.shape(rewards)
  adv = np.zeros((B, T))
  for b in range(B):
    next_adv = 0.0
    for t in reversed(range(T)):
      if not mask[b, t]:
        next_adv = 0.0
        continue
      has_next = t + 1 < T and mask[b, t + 1]
      next_value = values[b, t + 1] if has_next else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      adv[b, t] = delta + gamma * lam * (next_adv if has_next else 0.0)
      next_adv = adv[b, t]
  returns = np.where(mask > 0, adv + np.where(mask > 0, values, 0.0), 0.0)
  return adv, returns


def aggregate(loss, mask, agg):
  """loss: dict {(b, t): value} over real tokens only."""
  B, T = np.shape(mask)
  if agg == "token-mean":
    vals = [loss[b, t] for b in range(B) for t in range(T) if mask[b, t]]
    return sum(vals) / len(vals) if vals else 0.0
  rows = []
  for b in range(B):
    vals = [loss[b, t] for t in range(T) if mask[b, t]]
    if vals:
      rows.append(sum(vals) / len(vals) if agg == "seq-mean-token-mean" else sum(vals))
  return sum(rows) / len(rows) if rows else 0.0


def policy_loss(
  logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None, agg="token-mean"
):
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  B, T = np.shape(mask)
  loss, clipped_n, kl_sum, n = {}, 0, 0.0, 0
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      r = math.exp(float(logp[b, t]) - float(old_logp[b, t]))
      a = float(adv[b, t])
      unclipped = -a * r
      clipped = -a * min(max(r, 1 - clip_eps), 1 + eps_high)
      value = max(unclipped, clipped)
      if dual_clip is not None and a < 0:
        value = min(value, -a * dual_clip)
      loss[b, t] = value
      clipped_n += clipped > unclipped
      kl_sum += r - 1 - math.log(r)
      n += 1
  metrics = {"clipfrac": clipped_n / n if n else 0.0, "approx_kl": kl_sum / n if n else 0.0}
  return aggregate(loss, mask, agg), metrics


def value_loss(values, old_values, returns, mask, clip_eps=0.2, agg="token-mean"):
  B, T = np.shape(mask)
  loss, clipped_n, n = {}, 0, 0
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
      unclipped = (v - ret) ** 2
      if clip_eps is None:
        clipped = unclipped
      else:
        clipped = (min(max(v, v_old - clip_eps), v_old + clip_eps) - ret) ** 2
      loss[b, t] = 0.5 * max(unclipped, clipped)
      clipped_n += clipped > unclipped
      n += 1
  return aggregate(loss, mask, agg), {"clipfrac": clipped_n / n if n else 0.0}


def adaptive_kl(kl_coef, observed_kl, n_steps, target, horizon):
  e = min(max(observed_kl / target - 1, -0.2), 0.2)
  return kl_coef * (1 + e * n_steps / horizon)


def bradley_terry(chosen, rejected, margins=None):
  margins = [0.0] * len(chosen) if margins is None else margins
  pairs = zip(chosen, rejected, margins, strict=True)
  terms = [softplus(-(float(c) - float(r) - float(m))) for c, r, m in pairs]
  acc = [float(c) > float(r) for c, r in zip(chosen, rejected, strict=True)]
  return sum(terms) / len(terms), sum(acc) / len(acc)


def dpo(pc, pr, rc, rr, beta, label_smoothing, kind="sigmoid"):
  """DPO (conservative with ε), IPO (Azar et al. eq. 17: (h − 1/(2τ))²) or SLiC's hinge."""
  terms = []
  for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
    h = (float(a) - float(c)) - (float(b) - float(d))  # the log-ratio difference
    if kind == "ipo":
      terms.append((h - 1 / (2 * beta)) ** 2)
    elif kind == "hinge":
      terms.append(max(0.0, 1 - beta * h))
    else:
      terms.append(
        (1 - label_smoothing) * softplus(-beta * h) + label_smoothing * softplus(beta * h)
      )
  return sum(terms) / len(terms)


def group_advantages(scores, group_size, normalize_std=True, std_scope="group"):
  everything = [float(s) for s in scores]
  mean_all = sum(everything) / len(everything)
  var_all = sum((s - mean_all) ** 2 for s in everything) / max(len(everything) - 1, 1)
  out = []
  for start in range(0, len(scores), group_size):
    g = [float(s) for s in scores[start : start + group_size]]
    mean = sum(g) / len(g)
    std = math.sqrt(sum((s - mean) ** 2 for s in g) / (len(g) - 1)) if len(g) > 1 else 0.0
    std = math.sqrt(var_all) if std_scope == "batch" else std
    out += [(s - mean) / (std + 1e-6) if normalize_std else s - mean for s in g]
  return np.array(out)


def rloo_advantages(scores, group_size):
  out = []
  for start in range(0, len(scores), group_size):
    g = [float(s) for s in scores[start : start + group_size]]
    for i, s in enumerate(g):
      others = [x for j, x in enumerate(g) if j != i]
      out.append(s - sum(others) / len(others))
  return np.array(out)
