"""The repository: the README's commands are the ones CI and users run, the
library passes the linter, and the wheel holds the library only."""

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
  return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_gives_exactly_two_commands():
  assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command():
  test_command = readme_commands()[1]
  assert "pytest" in test_command
  assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_library_passes_ruff():
  """pyproject.toml's ``[tool.ruff]`` rules (line length 100, 2-space indent,
  E/F/W/I/B/UP) hold for what it checks (``bnjax/``)."""
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def test_no_function_of_the_experiments_is_too_complex():
  """Cyclomatic complexity at most 10 (ruff's C901) in experiments/ and benchmarks/:
  functions a reader can follow; the train loops are split into named steps."""
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "C901",
                           "--config", "lint.mccabe.max-complexity=10", "experiments", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_wheel_holds_the_library_only(tmp_path):
  """experiments/ and benchmarks/ run from the repository root; installed as
  top-level packages they would clash with other projects' names."""
  pytest.importorskip("setuptools")
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for name in ("bnjax", "experiments", "benchmarks"):
    shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(tmp_path / "wheel"), str(source)],
                 check=True, capture_output=True, timeout=300)
  (wheel,) = (tmp_path / "wheel").glob("bnjax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    top_level = {name.split("/")[0] for name in archive.namelist()}
  assert {name for name in top_level if not name.endswith(".dist-info")} == {"bnjax"}
