"""Prints a pip constraints file that pins every dependency pyproject.toml declares
to its lower bound (``name>=X`` becomes ``name==X``, environment markers kept), so
that CI can install and test the oldest versions the project says it supports:

    python3 .ci/oldest_constraints.py > oldest.txt
    pip install -e ".[test]" -c oldest.txt

The dependencies' own dependencies are left to pip. Standard library only (tomllib).
"""

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
_LOWER_BOUND = re.compile(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*(;.*)?$")


def oldest_pins(pyproject: dict) -> list[str]:
  """``name==lower_bound[; marker]`` for each requirement with a ``>=`` bound.

  Raises:
    ValueError: a third-party requirement without a ``>=`` lower bound (then
      there is no oldest version to test), or with an upper bound as well.
  """
  project = pyproject["project"]
  requirements = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    requirements += extra
  pins = []
  for requirement in requirements:
    requirement = requirement.strip()
    if requirement.startswith(project["name"] + "["):  # one extra naming another
      continue
    match = _LOWER_BOUND.match(requirement)
    if not match:
      raise ValueError(
        f"{requirement!r}: give each dependency one lower bound, name>=X "
        "(the oldest version the tests were run against)"
      )
    name, version, marker = match.groups()
    pin = f"{name}=={version}" + (f"; {marker[1:].strip()}" if marker else "")
    if pin not in pins:
      pins.append(pin)
  return pins


if __name__ == "__main__":
  pins = oldest_pins(tomllib.loads(PYPROJECT.read_text()))
  sys.stdout.write("".join(pin + "\n" for pin in pins))
