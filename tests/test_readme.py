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
  (example,) = [b for b in _fenced("python") if "import ppo_jax" in b]
  exec(compile(example, "README.md", "exec"), {})
  printed = capsys.readouterr().out.split()
  assert len(printed) == 3 and all(float(x) == float(x) for x in printed)  # three finite floats
