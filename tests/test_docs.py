"""Every ```python block of the guide (docs/**/*.md) and of README.md runs, and
prints what the page shows.

Each block of README.md (and of the site's landing page, docs/index.md) runs alone
in a fresh interpreter, as a reader pastes it, and must print something. Each guide
page's blocks run in order in one namespace, as a reader pasting them into one
Python session would: with JAX's default promotion rules (not the suite's strict
ones), eight CPU devices (tests/conftest.py), in a fresh temporary working
directory (the figures a page saves land there). Wherever a ```text block follows a
python block, that is the block's output: what it prints must match it word for
word and symbol for symbol (spacing aside), each number within a relative
tolerance (``same_output``). The course's pages (``COURSE``) show at least two
outputs each, show every output a block prints, put no printed value in a comment
(``# about ...``), start with the eight-device cell, end with exercises whose
solutions run, and open as notebooks (jupytext; docs/conf.py writes them for the
site). Three markers, HTML comments on the last non-blank lines before a block,
change how a block runs:

* ``<!-- raises: ValueError -->``: the block must raise that exception (a builtin
  name, or a dotted name the page has imported, e.g. ``flax.errors.ScopeCollectionNotFound``).
* ``<!-- requires: haiku -->``: the block needs an optional package (``pip install
  -e ".[docs]"``); without it the block is skipped, and so is every later block
  marked with the same package, and the page's test reports the skip.
* ``<!-- tolerance: 0.05 -->``: the numbers of the block's output agree within 5%
  (default ``OUTPUT_TOLERANCE``), for values that move with round-off or platform;
  before the block or before its ```text output.

A figure a page saves (``*.png`` in the working directory) must be committed beside
the page under the same name; ``BNJAX_UPDATE_DOC_FIGURES=1`` copies the new ones
there. The pages are slow tests: end to end, seconds each. The Sphinx build of the
site (warnings as errors) and its rendered pages are tested in tests/test_api_docs.py.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from tests import ROOT

DOCS = ROOT / "docs"
# Pages whose blocks each stand alone (a reader pastes one of them), and must print.
STANDALONE = [ROOT / "README.md", DOCS / "index.md"]
# The guide's pages must have code to run; other pages, if they have any.
PAGES = sorted(
  p
  for p in DOCS.rglob("*.md")
  if "_build" not in p.parts
  and p not in STANDALONE
  and (p.parent.name == "guide" or "```python" in p.read_text())
)

GUIDE = DOCS / "guide"
# The course, in the order of docs/index.md's Guide toctree: the pages held to the
# course's rules (pages added after it only to the rules every page follows).
COURSE = [
  GUIDE / name
  for name in (
    "primer.md",
    "01_pure_function.md",
    "02_across_devices.md",
    "lifting.md",
    "03_state_models.md",
    "04_pitfalls.md",
    "05_checkpointing.md",
    "one_batch.md",
    "06_cost.md",
  )
]
# Every course page's first cell: eight simulated CPU devices, before JAX starts.
SETUP_CELL = (
  'import os\nos.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")\n'
)
# How far a printed number may be from the shown one: this fraction of the shown
# number's magnitude (of 1 for magnitudes below 1).
OUTPUT_TOLERANCE = 1e-3

_FENCE = re.compile(r"^(`{3,})\s*(\S*)")
_MARKER = re.compile(r"^<!--\s*(raises|requires|tolerance):\s*([\w.]+)\s*-->$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(rf"{_NUMBER}|\S")
# A value in a comment instead of an output block: "# about 11", "# prints ...", "# ~ 0.1".
_VALUE_IN_COMMENT = re.compile(r"#\s*(?:~|about\b|prints?\b)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Block:
  line: int  # 1-based line of the block's first code line
  code: str
  raises: str | None
  requires: str | None
  output: str | None = None  # the ```text block right after it: what it prints
  tolerance: float = OUTPUT_TOLERANCE  # for the output's numbers


@dataclasses.dataclass(frozen=True)
class _Fence:
  start: int  # 0-based index of the opening fence's line
  end: int  # 0-based index of the closing fence's line
  language: str
  body: str


def _fence_at(lines: list[str], i: int, where: str) -> _Fence | None:
  """The code fence that opens at line ``i``, if one does."""
  fence = _FENCE.match(lines[i].strip())
  if not fence:
    return None
  ticks, language = fence.groups()
  end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
  if end is None:
    raise ValueError(f"{where}:{i + 1}: unclosed code fence")
  return _Fence(i, end, language, "\n".join(lines[i + 1 : end]) + "\n")


def python_blocks(text: str, where: str = "page") -> list[Block]:
  """The ```python blocks of a Markdown text, with the markers just before them.

  >>> python_blocks("<!-- raises: KeyError -->\\n```python\\n{}[1]\\n```\\n```bash\\nls\\n```\\n")
  [Block(line=3, code='{}[1]\\n', raises='KeyError', requires=None, output=None, tolerance=0.001)]
  """
  lines = text.splitlines()
  blocks, markers, previous, i = [], {}, None, 0
  while i < len(lines):
    stripped = lines[i].strip()
    if marker := _MARKER.match(stripped):
      if marker.group(1) in markers:
        raise ValueError(f"{where}:{i + 1}: two '{marker.group(1)}' markers before one block")
      markers[marker.group(1)] = marker.group(2)
    elif fence := _fence_at(lines, i, where):
      _take(fence, blocks, markers, previous, lines, f"{where}:{i + 1}")
      previous, markers, i = fence, {}, fence.end
    elif stripped and markers:
      raise ValueError(f"{where}:{i + 1}: a marker must be followed by its python block")
    i += 1
  if markers:
    raise ValueError(f"{where}: a marker at the end of the page, before no block")
  return blocks


def _take(
  fence: _Fence,
  blocks: list[Block],
  markers: dict[str, str],
  previous: _Fence | None,
  lines: list[str],
  where: str,
) -> None:
  """Appends a python fence to ``blocks`` (with its markers); a text fence right
  after a python one, with nothing between them but a tolerance marker, becomes
  that block's output."""
  if fence.language == "python":
    blocks.append(
      Block(
        line=fence.start + 2,
        code=fence.body,
        raises=markers.get("raises"),
        requires=markers.get("requires"),
        tolerance=float(markers.get("tolerance", OUTPUT_TOLERANCE)),
      )
    )
  elif (
    fence.language == "text"
    and set(markers) <= {"tolerance"}
    and previous is not None
    and previous.language == "python"
    and all(
      not line.strip() or _MARKER.match(line.strip())
      for line in lines[previous.end + 1 : fence.start]
    )
  ):
    tolerance = float(markers.get("tolerance", blocks[-1].tolerance))
    blocks[-1] = dataclasses.replace(blocks[-1], output=fence.body, tolerance=tolerance)
  elif markers:
    raise ValueError(f"{where}: a marker before a '{fence.language}' block, not a python one")


def _is_number(token: str) -> bool:
  return re.fullmatch(_NUMBER, token) is not None


def same_output(printed: str, shown: str, tolerance: float = OUTPUT_TOLERANCE) -> bool:
  """Whether ``printed`` is what ``shown`` shows: the same words and symbols,
  spacing aside, and each number within ``tolerance`` times the shown one's
  magnitude (times 1 below 1).

  >>> same_output("[0.15832   0.188]\\n", "[0.158 0.188]")
  True
  >>> same_output("[9.72 10.38]", "[11. 11.]"), same_output("4 all-reduces", "5 all-reduces")
  (False, False)
  """
  printed_tokens, shown_tokens = _TOKEN.findall(printed), _TOKEN.findall(shown)
  if len(printed_tokens) != len(shown_tokens):
    return False
  for got, want in zip(printed_tokens, shown_tokens, strict=True):
    if _is_number(got) and _is_number(want):
      if not math.isclose(float(got), float(want), rel_tol=tolerance, abs_tol=tolerance):
        return False
    elif got != want:
      return False
  return True


def _exception_type(name: str, namespace: dict) -> type[BaseException]:
  head, *rest = name.split(".")
  value = namespace[head] if head in namespace else getattr(builtins, head)
  for part in rest:
    value = getattr(value, part)
  if not (isinstance(value, type) and issubclass(value, BaseException)):
    raise TypeError(f"the raises marker names {name}, which is not an exception type")
  return value


def _missing(module: str) -> bool:
  return importlib.util.find_spec(module) is None


def _run_block(block: Block, namespace: dict, where: str) -> str:
  """Runs one block in ``namespace``; returns what it printed. A block marked to
  raise must raise that exception (what it printed then is not returned)."""
  # Blank lines in front, so that tracebacks point at the page's own lines.
  code = compile("\n" * (block.line - 1) + block.code, where, "exec")
  printed = io.StringIO()
  if block.raises is None:
    with contextlib.redirect_stdout(printed):
      exec(code, namespace)
    return printed.getvalue()
  try:
    with contextlib.redirect_stdout(printed):
      exec(code, namespace)
  except BaseException as error:  # any exception: its type is compared with the marker below
    if not isinstance(error, _exception_type(block.raises, namespace)):
      raise AssertionError(
        f"{where}:{block.line}: the block is marked to raise {block.raises} but raised "
        f"{type(error).__name__}: {error}"
      ) from error
    return ""
  raise AssertionError(
    f"{where}:{block.line}: the block is marked to raise {block.raises} but ran without an error"
  )


def run_blocks(blocks: list[Block], where: str) -> tuple[list[str], list[Block]]:
  """Runs the blocks in order in one namespace, checking each shown output.

  Returns the skipped blocks' reasons, and the blocks that printed something the
  page does not show."""
  namespace = {"__name__": "__main__"}
  skipped, missing, unshown = [], set(), []
  for block in blocks:
    if block.requires and (block.requires in missing or _missing(block.requires)):
      missing.add(block.requires)
      skipped.append(f"{where}:{block.line} needs {block.requires}")
      continue
    printed = _run_block(block, namespace, where)
    if block.output is None:
      unshown += [block] if printed.strip() else []
    elif not same_output(printed, block.output, block.tolerance):
      raise AssertionError(
        f"{where}:{block.line}: the block printed\n{printed}but the page shows\n{block.output}"
      )
  return skipped, unshown


@pytest.mark.slow  # end to end: 4 to 30 s a page (each compiles its own models)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  relative = str(page.relative_to(ROOT))
  blocks = python_blocks(page.read_text(), relative)
  assert blocks, f"{relative} has no ```python block: nothing to run"
  try:
    # A reader's session has JAX's defaults, not the suite's strict promotion.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
      skipped, unshown = run_blocks(blocks, relative)
  finally:
    if "matplotlib.pyplot" in sys.modules:
      sys.modules["matplotlib.pyplot"].close("all")
  for figure in sorted(tmp_path.glob("*.png")):
    committed = page.parent / figure.name
    if os.environ.get("BNJAX_UPDATE_DOC_FIGURES") == "1":
      shutil.copyfile(figure, committed)
    assert committed.exists(), (
      f"{relative} saves {figure.name}, which is not committed beside it: "
      "run with BNJAX_UPDATE_DOC_FIGURES=1 to copy it there"
    )
    assert f"]({figure.name})" in page.read_text(), (
      f"{page.name} saves {figure.name} but does not show it"
    )
  if page in COURSE:
    assert not unshown, "".join(
      f"{relative}:{b.line}: the block prints, but no ```text block after it shows what\n"
      for b in unshown
    )
  if skipped:
    pytest.skip("; ".join(skipped) + ' (pip install -e ".[docs]")')


def _run_alone(blocks: list[Block], where: str, cwd: pathlib.Path) -> list[str]:
  """Runs each block in its own fresh interpreter, all at once; returns the failures.

  A reader's interpreter: one CPU device (no XLA_FLAGS), JAX's default promotion
  rules, the working directory a fresh folder; the checkout first on the path."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
  env.pop("XLA_FLAGS", None)
  running = [
    (
      block,
      subprocess.Popen(
        [sys.executable, "-c", "\n" * (block.line - 1) + block.code],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
      ),
    )
    for block in blocks
  ]
  failures = []
  for block, process in running:
    try:
      stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      process.kill()
      stdout, stderr = process.communicate()
    if process.returncode != 0:
      failures.append(f"{where}:{block.line}: run alone, the block failed:\n{stderr[-3000:]}")
    elif not stdout.strip():
      failures.append(f"{where}:{block.line}: the block prints nothing that shows it worked")
    elif block.output is not None and not same_output(stdout, block.output, block.tolerance):
      failures.append(
        f"{where}:{block.line}: the block printed\n{stdout}but the page shows\n{block.output}"
      )
  return failures


@pytest.mark.slow  # fresh interpreters, one per block, all at once: 10 to 20 s a page
@pytest.mark.parametrize("page", STANDALONE, ids=[str(p.relative_to(ROOT)) for p in STANDALONE])
def test_each_block_runs_alone_and_prints_what_the_page_shows(page, tmp_path):
  relative = str(page.relative_to(ROOT))
  blocks = python_blocks(page.read_text(), relative)
  assert blocks, f"{relative} has no ```python block: nothing to run"
  assert not [b for b in blocks if b.raises or b.requires], f"{relative}: no markers on this page"
  failures = _run_alone(blocks, relative, tmp_path)
  assert not failures, "\n\n".join(failures)


def test_the_sites_quickstart_is_the_readmes():
  readme, landing = (python_blocks(page.read_text()) for page in STANDALONE)
  assert (landing[0].code, landing[0].output) == (readme[0].code, readme[0].output)


def test_a_block_that_leans_on_another_fails_alone(tmp_path):
  """What the README had: a block using a name an earlier block defined."""
  page = (
    "```python\nimport math\nprint(math.pi)\n```\n\n```text\n3.2\n```\n\n"
    "```python\nprint(math.e)\n```\n\n```python\nx = 1\n```\n"
  )
  blocks = python_blocks(page)
  assert [b.output for b in blocks] == ["3.2\n", None, None]
  failures = _run_alone(blocks, "page", tmp_path)
  assert len(failures) == 3
  assert "printed\n3.141592653589793\nbut the page shows\n3.2" in failures[0]
  assert "NameError: name 'math' is not defined" in failures[1]
  assert "prints nothing" in failures[2]


def test_markers_are_checked():
  blocks = python_blocks(
    "<!-- requires: haiku -->\n```python\nimport haiku\n```\n\n```python\nx = 1\n```\n"
  )
  assert [(b.line, b.requires) for b in blocks] == [(3, "haiku"), (7, None)]
  with pytest.raises(ValueError, match="followed by its python block"):
    python_blocks("<!-- raises: KeyError -->\nsome prose\n```python\npass\n```\n")
  with pytest.raises(ValueError, match="not a python one"):
    python_blocks("<!-- raises: KeyError -->\n```bash\nls\n```\n")
  with pytest.raises(AssertionError, match="ran without an error"):
    run_blocks(python_blocks("<!-- raises: KeyError -->\n```python\nx = {}\n```\n"), "page")
  with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
    run_blocks(python_blocks("<!-- raises: KeyError -->\n```python\n1 / 0\n```\n"), "page")
  # A marked block that raises what it says passes, and the namespace carries on.
  assert run_blocks(
    python_blocks(
      "```python\nd = {}\n```\n<!-- raises: KeyError -->\n```python\nd[1]\n```\n"
      "<!-- requires: no_such_module_here -->\n```python\nimport no_such_module_here\n```\n"
    ),
    "page",
  ) == (["page:10 needs no_such_module_here"], [])


def test_outputs_are_compared_with_a_tolerance():
  page = "<!-- tolerance: 0.1 -->\n```python\nprint(1.05)\n```\n```text\n1.0\n```\n"
  assert run_blocks(python_blocks(page), "page") == ([], [])
  # The marker may stand before the output instead.
  before_output = "```python\nprint(1.05)\n```\n<!-- tolerance: 0.1 -->\n```text\n1.0\n```\n"
  assert [b.tolerance for b in python_blocks(before_output)] == [0.1]
  with pytest.raises(AssertionError, match="printed\n1.05\nbut the page shows\n1.0"):
    run_blocks(python_blocks(page.replace("0.1", "0.01")), "page")
  # A block that prints with no output shown is reported; one that shows it is not.
  _, unshown = run_blocks(python_blocks("```python\nprint('hi')\n```\n"), "page")
  assert [b.line for b in unshown] == [2]


# The site's build (warnings as errors) and its rendered pages: tests/test_api_docs.py.


def _exercises(text: str) -> str:
  """The page's last section, if it is its exercises ("## Exercises" to the end)."""
  sections = re.split(r"^## ", text, flags=re.MULTILINE)
  return sections[-1] if sections[-1].startswith("Exercises\n") else ""


@pytest.mark.parametrize("page", COURSE, ids=[p.name for p in COURSE])
def test_course_page_shows_its_outputs_and_ends_with_exercises(page):
  """The course's rules that can be read without running the page (tests that run
  it: test_page_runs)."""
  text = page.read_text()
  blocks = python_blocks(text, page.name)
  assert blocks[0].code.startswith(SETUP_CELL), f"{page.name}: the first cell is not the setup cell"
  assert sum(b.output is not None for b in blocks) >= 2, f"{page.name}: fewer than two outputs"
  for block in blocks:
    assert not _VALUE_IN_COMMENT.search(block.code), (
      f"{page.name}:{block.line}: a printed value in a comment; show it in a ```text block"
    )
  exercises = _exercises(text)
  assert exercises, f"{page.name}: no '## Exercises' section at the end"
  solutions = re.findall(
    r"<details><summary>Solution</summary>\n\n(?:<!--.*-->\n)?```python\n", exercises
  )
  assert len(solutions) >= 2, f"{page.name}: fewer than two exercises with a solution to run"


def _conf():
  spec = importlib.util.spec_from_file_location("bnjax_docs_conf", DOCS / "conf.py")
  conf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(conf)
  return conf


@pytest.mark.parametrize("page", COURSE, ids=[p.name for p in COURSE])
def test_course_page_opens_as_a_notebook_that_runs_its_blocks(page):
  """The notebook the site links (docs/conf.py's page_notebook, through jupytext):
  the page's python blocks as its code cells, in order, the ones that raise
  tagged so that running all cells goes on; and the page links it."""
  pytest.importorskip("jupytext")
  conf = _conf()
  assert page in conf.paired_pages(), f"{page.name} declares no jupytext pairing"
  notebook = conf.page_notebook(page)
  cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  blocks = python_blocks(page.read_text(), page.name)
  assert [cell.source for cell in cells] == [block.code.rstrip("\n") for block in blocks]
  tagged = ["raises-exception" in cell.metadata.get("tags", []) for cell in cells]
  assert tagged == [block.raises is not None for block in blocks]
  notebook_name = page.with_suffix(".ipynb").name
  assert f"]({notebook_name})" in page.read_text(), f"{page.name} does not link {notebook_name}"


def test_the_guide_toctree_starts_with_the_course_in_order():
  """Pages added later go after the course (docs/index.md's Guide toctree)."""
  index = (DOCS / "index.md").read_text()
  toctree = re.search(r"```\{toctree\}\n:hidden:\n:caption: Guide\n\n(.*?)```", index, re.DOTALL)
  entries = toctree.group(1).split()
  assert entries[: len(COURSE)] == [f"guide/{page.stem}" for page in COURSE]
