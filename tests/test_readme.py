"""The README's commands and example are the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _fenced(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
  blocks = _fenced("bash")
  test_commands = [b.strip() for b in blocks if "-m pytest" in b and "pip install" in b]
  assert len(test_commands) == 1, "the README's quickstart has exactly one test command"
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_commands[0] in ci.splitlines()


def test_readme_python_example_runs(capsys):
  """The functions example prints the loss, clip fraction and approximate KL that the float64
  references compute from its own arrays."""
  import numpy as np
  import pytest
  import references as ref

  (example,) = [b for b in _fenced("python") if "import ppo_jax" in b]
  names = {}
  exec(compile(example, "README.md", "exec"), names)
  printed = [float(x) for x in capsys.readouterr().out.split()]
  f64 = lambda name: np.asarray(names[name], np.float64)
  mask = f64("mask")
  adv, _ = ref.gae(f64("rewards"), f64("values"), mask, gamma=1.0, lam=0.95)
  adv = ref.masked_whiten(adv, mask)
  loss, metrics = ref.policy_loss(f64("logp"), f64("old_logp"), adv, mask, clip_eps=0.2)
  expected = [loss, metrics["clipfrac"], metrics["approx_kl"]]
  assert metrics["clipfrac"] > 0  # the example clips some tokens: the clipped branch is in it
  assert printed == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_readme_ppo_loop_learns(capsys):
  """The hand-written PPO loop runs as printed and its policy learns the toy reward."""
  (example,) = [b for b in _fenced("python") if "make_step_fns(" in b]
  exec(compile(example, "README.md", "exec"), {})
  rows = [list(map(float, line.split())) for line in capsys.readouterr().out.splitlines()]
  assert [int(r[0]) for r in rows] == list(range(20))
  scores = [r[1] for r in rows]
  assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3, scores  # from ~1/16 of tokens up
  assert rows[0][2] == 0.0 and rows[-1][2] > 0  # the first rollout is the reference's own


def config_fields() -> list[str]:
  from ppo_jax.config import base_config

  out = []

  def walk(node, prefix):
    for key in node.keys():
      if hasattr(node[key], "keys"):
        walk(node[key], f"{prefix}{key}.")
      else:
        out.append(prefix + key)

  walk(base_config(), "")
  return out


def test_the_documented_defaults_are_the_configs():
  """docs/config.md's default of each field is base_config()'s: a row of several fields gives
  one value each (``0, 1.0``) or one for all (``a / b``); an optimizer field gives its value per
  stage (``1e-3 (SFT), 5e-4 (RM)``) or one for every stage."""
  import ast

  from ppo_jax.config import base_config

  config = base_config()
  doc = (ROOT / "docs" / "config.md").read_text()
  documented = {}
  for cell, default in re.findall(r"^\| (`[^|]+`) \| ([^|]+?) \|", doc, flags=re.M):
    names = re.findall(r"`([\w.*]+)`", cell)
    each = len(names) > 1 and "/" not in cell
    for name, text in zip(
      names, default.split(", ") if each else [default] * len(names), strict=True
    ):
      stages = re.findall(r"(\S+) \(([^)]+)\)", text)
      if name.startswith("*."):
        per_stage = {s.lower(): v for v, group in stages for s in group.split(", ")}
        for stage in ("sft", "rm", "dpo", "ppo"):
          documented[name.replace("*", stage)] = per_stage.get(stage, text)
      else:
        documented[name] = text
  wrong = []
  for name, text in documented.items():
    value = config
    for key in name.split("."):
      value = value[key]
    text = text.strip("`")
    if isinstance(value, str):
      said = text.strip("'")
    else:
      said = None if text == "none" else ast.literal_eval(text)
    if said != value:
      wrong.append(f"{name}: {text} documented, {value!r} in base_config()")
  assert len(documented) > 100 and not wrong, wrong


def test_every_config_field_is_documented():
  """docs/config.md names each field: `section.field`, or `*.optim.x` for the optimizers."""
  doc = (ROOT / "docs" / "config.md").read_text()
  names = config_fields()
  assert len(names) > 90
  shared = lambda n: ".optim." in n and f"`*.optim.{n.rsplit('.', 1)[1]}`" in doc
  missing = [n for n in names if f"`{n}`" not in doc and not shared(n)]
  assert not missing, f"fields missing from docs/config.md: {missing}"
