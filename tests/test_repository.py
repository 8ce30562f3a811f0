"""The repository: the README's commands are the ones CI and users run, the
library passes the linter, and the wheel holds the library only."""

import os
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


@pytest.mark.slow
def test_the_wheel_holds_the_library_only_and_installs(tmp_path):
  """experiments/ and benchmarks/ run from a clone; installed as top-level
  packages they would clash with other projects' names."""
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
    metadata = archive.read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
  assert {name for name in top_level if not name.endswith(".dist-info")} == {"bnjax"}
  assert "Requires-Python: >=3.11" in metadata.splitlines()  # what jax 0.10 needs
  # Installed alone (its dependencies from this environment), the wheel imports and runs.
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(tmp_path / "installed"), str(wheel)], check=True, capture_output=True, timeout=300)
  result = subprocess.run(
      [sys.executable, "-c", "import bnjax, bnjax.linen; print(bnjax.__file__, bnjax.init(3)[0].bias)"],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "installed"), "XLA_FLAGS": ""},
      capture_output=True, text=True, timeout=300)
  assert result.stdout == f"{tmp_path / 'installed' / 'bnjax' / '__init__.py'} [0. 0. 0.]\n", result.stderr
