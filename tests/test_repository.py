"""The README's commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
  return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_gives_exactly_two_commands():
  assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command():
  test_command = readme_commands()[1]
  assert "pytest" in test_command
  assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
