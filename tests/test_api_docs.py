"""The API reference stays complete, checked from the code itself.

Every public name (``bnjax/__init__.py``'s, and the classes and functions
``bnjax.linen`` and ``bnjax.nnx`` define) is in docs/api.md, and has a Google-style
docstring that napoleon renders: a summary, an ``Args:`` (or, for a class,
``Args:``/``Attributes:``) section naming every parameter, ``Returns:`` where
something is returned, ``Raises:``, and a doctest. The doctests themselves run
with the suite (``--doctest-modules`` in pyproject.toml, ``bnjax`` in testpaths).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import bnjax
import bnjax.equinox
import bnjax.haiku
import bnjax.linen
import bnjax.nnx
from tests import ROOT

MODULES = (bnjax, bnjax.linen, bnjax.nnx, bnjax.equinox, bnjax.haiku, bnjax.convert)
# Flax's own module fields, not the layer's (every linen Module has them).
_LINEN_FIELDS = {"parent", "name"}


def public_names(module) -> list[str]:
  """The names ``module`` exports: for ``bnjax``, what it imports from its own
  modules; for a submodule, the public classes and functions it defines."""
  names = [
    name
    for name, value in vars(module).items()
    if not name.startswith("_") and getattr(value, "__module__", "").startswith("bnjax")
  ]
  if module is not bnjax:  # the submodules' own definitions, not what they import
    names = [name for name in names if vars(module)[name].__module__ == module.__name__]
  return names


PUBLIC = [
  (f"{module.__name__}.{name}", getattr(module, name))
  for module in MODULES
  for name in public_names(module)
]
FUNCTIONS = [(name, value) for name, value in PUBLIC if inspect.isfunction(value)]
CLASSES = [(name, value) for name, value in PUBLIC if inspect.isclass(value)]


def _methods(cls) -> list[tuple[str, object]]:
  """The public methods and properties a bnjax class defines (or inherits from a
  bnjax base), and ``__call__``."""
  found = {}
  for base in reversed(cls.__mro__):
    if not base.__module__.startswith("bnjax"):
      continue
    for name, value in vars(base).items():
      if (name == "__call__" or not name.startswith("_")) and (
        inspect.isfunction(value) or isinstance(value, property)
      ):
        found[name] = value
  return sorted(found.items())


METHODS = [(f"{name}.{method}", value) for name, cls in CLASSES for method, value in _methods(cls)]


def sections(doc: str) -> dict[str, str]:
  """The Google-style sections of a docstring (``Args:``, ``Returns:``, ...), each
  the dedented text under its header; the text before the first is ``""``.

  >>> sections("Summary.\\n\\nArgs:\\n  x: input.\\n\\nReturns:\\n  y.\\n\\nMore prose.")
  {'': 'Summary.\\n\\nMore prose.', 'Args': 'x: input.', 'Returns': 'y.'}
  """
  found, header, lines = {}, "", []
  text = {"": []}
  for line in inspect.cleandoc(doc).splitlines():
    match = re.fullmatch(r"([A-Z][a-z]+):", line)
    if match:
      header = match.group(1)
      text[header] = []
    elif line and not line[0].isspace() and header:  # back to prose at the left margin
      header = ""
      text[header].append(line)
    else:
      text[header].append(line)
  for header, lines in text.items():
    found[header] = textwrap.dedent("\n".join(lines)).strip()
  return found


def documented_names(section: str) -> set[str]:
  """The names an ``Args:``/``Attributes:`` section documents: its entries are
  ``name: ...``, ``name (type): ...`` or ``a, b, c: ...`` at the left margin.

  >>> section = "x: input.\\n  more.\\nmomentum, epsilon: as batch_norm.\\nrngs (Rngs): keys."
  >>> sorted(documented_names(section))
  ['epsilon', 'momentum', 'rngs', 'x']
  """
  names = set()
  for line in section.splitlines():
    match = re.match(r"([\w*, ]+?)(\s*\([^)]*\))?:(\s|$)", line)
    if match and not line[0].isspace():
      names.update(name.strip().lstrip("*") for name in match.group(1).split(","))
  return names


def returns_a_value(function) -> bool:
  """Whether the function's own body (not a nested one) returns something."""
  tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(function))))
  body = tree.body[0]
  stack = list(body.body)
  while stack:
    node = stack.pop()
    if isinstance(node, ast.Return) and node.value is not None:
      return True
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      stack.extend(ast.iter_child_nodes(node))
  return False


def _parameters(function, skip=("self",)) -> list[str]:
  return [name for name in inspect.signature(function).parameters if name not in skip]


def _check_function(name: str, function, *, needs_doctest: bool) -> list[str]:
  doc = inspect.getdoc(function)
  if not doc:
    return [f"{name} has no docstring"]
  found, problems = sections(doc), []
  if not found[""]:
    problems.append(f"{name}: no summary before the first section")
  parameters = _parameters(function)
  missing = [p for p in parameters if p not in documented_names(found.get("Args", ""))]
  if missing:
    problems.append(f"{name}: the Args section does not document {missing}")
  if returns_a_value(function) and "Returns" not in found:
    problems.append(f"{name}: no Returns section")
  if "Raises" not in found:
    problems.append(f"{name}: no Raises section (the errors a bad call gets)")
  if needs_doctest and ">>>" not in doc:
    problems.append(f"{name}: no doctest")
  return problems


def _constructor_parameters(cls) -> list[str]:
  if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # a NamedTuple
    return list(cls._fields)
  if dataclasses.is_dataclass(cls):  # a flax.linen Module
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in _LINEN_FIELDS]
  return _parameters(cls.__init__)


def _field_comments(cls) -> dict[str, str]:
  """A NamedTuple's ``field: type  #: doc`` comments, which Sphinx shows as the
  fields' documentation (instead of 'Alias for field number 0')."""
  source = textwrap.dedent(inspect.getsource(cls))
  lines = source.splitlines()
  comments = {}
  for node in ast.parse(source).body[0].body:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      _, _, comment = lines[node.lineno - 1].partition("#:")
      comments[node.target.id] = comment.strip()
  return comments


@pytest.mark.parametrize("name, function", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_public_function_is_documented(name, function):
  assert not _check_function(name, function, needs_doctest=True)


@pytest.mark.parametrize("name, cls", CLASSES, ids=[name for name, _ in CLASSES])
def test_public_class_is_documented(name, cls):
  doc = inspect.getdoc(cls)
  assert doc and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), (
    f"{name} has no docstring of its own"
  )
  found = sections(doc)
  assert found[""], f"{name}: no summary before the first section"
  assert ">>>" in doc, f"{name}: no doctest"
  parameters = _constructor_parameters(cls)
  if hasattr(cls, "_fields"):
    comments = _field_comments(cls)
    missing = [p for p in parameters if not comments.get(p)]
    assert not missing, f"{name}: the fields {missing} have no '#: shape, dtype, meaning' comment"
  else:
    listed = documented_names(found.get("Args", "")) | documented_names(found.get("Attributes", ""))
    missing = [p for p in parameters if p not in listed and f"``{p}``" not in doc]
    assert not missing, f"{name}: the Args/Attributes section does not document {missing}"


@pytest.mark.parametrize("name, method", METHODS, ids=[name for name, _ in METHODS])
def test_public_method_is_documented(name, method):
  if isinstance(method, property):
    assert inspect.getdoc(method.fget), f"{name} has no docstring"
  elif name.endswith(".__call__"):  # the layer's API; the class's doctest calls it
    assert not _check_function(name, method, needs_doctest=False)
  else:
    assert inspect.getdoc(method), f"{name} has no docstring"


def test_the_checks_catch_what_they_should():
  def undocumented(x, *, axis=0):
    return x

  def documented(x, *, axis=0):
    """Identity.

    Args:
      x: input.

    Returns:
      ``x``.

    Raises:
      Nothing.

    >>> documented(1)
    1
    """
    return x

  def returns_nothing(x):
    """Nothing.

    Args:
      x: ignored.

    Raises:
      Nothing.

    >>> returns_nothing(1)
    """

    def inner():
      return x

  assert _check_function("f", undocumented, needs_doctest=True) == ["f has no docstring"]
  assert _check_function("f", documented, needs_doctest=True) == [
    "f: the Args section does not document ['axis']"
  ]
  assert _check_function("f", returns_nothing, needs_doctest=True) == []
  assert not returns_a_value(returns_nothing) and returns_a_value(documented)


def _api_page(module) -> pathlib.Path:
  """A module's page of the reference: docs/api/bnjax.md, docs/api/linen.md, ..."""
  return ROOT / "docs" / "api" / f"{module.__name__.rpartition('.')[2]}.md"


def _listed(text: str, directive: str) -> set[str]:
  """The names a page's ``.. autosummary::`` table lists, or its ``.. autofunction::``
  and ``.. autoclass::`` entries document (``directive="auto"``)."""
  if directive == "autosummary":
    tables = re.findall(r"\.\. autosummary::\n\n((?:   \S+\n)+)", text)
    return {line.strip() for table in tables for line in table.splitlines()}
  return set(re.findall(r"\.\. auto(?:function|class):: (\S+)", text))


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_each_module_has_a_page_with_a_summary_table_and_an_entry_per_name(module):
  page = _api_page(module)
  assert page.exists(), f"{module.__name__} has no page {page.relative_to(ROOT)}"
  text = page.read_text()
  names = set(public_names(module))
  assert _listed(text, "autosummary") == names, f"{page.name}: the summary table lists other names"
  assert _listed(text, "auto") == names, f"{page.name}: the entries document other names"
  assert f"api/{page.stem}\n" in (ROOT / "docs" / "api.md").read_text(), (
    f"docs/api.md's toctree does not list {page.stem}"
  )


def test_the_listings_are_read_as_written():
  text = ".. autosummary::\n\n   init\n   fold\n\n.. autofunction:: init\n.. autoclass:: Moments\n"
  assert _listed(text, "autosummary") == {"init", "fold"}
  assert _listed(text, "auto") == {"init", "Moments"}


# What the rendered reference must not show (found in the site before it had these
# settings): private paths, reprs of defaults, Flax's internals, nnx's metaclass.
UNREADABLE = [
  "~collections",
  "collections.abc.",
  "jax._src",
  "&lt;class",
  "&lt;function",
  "_Sentinel",
  "&lt;flax",
  " object at 0x",
  "*args: Any",
  "Alias for field number",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  out = tmp_path_factory.mktemp("site")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      str(ROOT / "docs"),
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return result, out


def _text(html: str) -> str:
  return " ".join(re.sub(r"<[^>]+>", "", html).split())


@pytest.mark.slow  # a Sphinx build of the site: 10 to 30 s
def test_site_builds_without_warnings(site):
  result, out = site
  assert result.returncode == 0, result.stdout + result.stderr
  assert (out / "api.html").exists()


@pytest.mark.slow
def test_signatures_read_as_a_user_writes_them(site):
  _, out = site
  pages = {path.name: path.read_text() for path in (out / "api").glob("*.html")}
  assert set(pages) == {_api_page(m).stem + ".html" for m in MODULES}
  found = [(name, bad) for name, html in pages.items() for bad in UNREADABLE if bad in html]
  assert not found, found
  signatures = {
    name: [
      _text(s) for s in re.findall(r'<dt class="sig sig-object py"[^>]*>(.*?)</dt>', html, re.S)
    ]
    for name, html in pages.items()
  }
  expected = {
    "bnjax.html": ["bnjax.init(num_features, *, dtype=jnp.float32)"],
    "linen.html": [
      "class bnjax.linen.BatchNorm(use_running_average=None, axis=-1, momentum=0.99,",
      "bias_init=nn.initializers.zeros, scale_init=nn.initializers.ones,",
    ],
    "nnx.html": [
      "class bnjax.nnx.BatchNorm(num_features, *, use_running_average=False,",
      "rngs, bias_metadata=MappingProxyType({})",
    ],
  }
  for name, parts in expected.items():
    for part in parts:
      assert any(part in signature for signature in signatures[name]), (
        name,
        part,
        signatures[name],
      )
  assert all(
    "parent=" not in s and "name=" not in s.replace("_name=", "") for s in signatures["linen.html"]
  ), "linen signatures show Flax's parent/name fields"


@pytest.mark.slow
def test_pages_have_summary_tables_math_copy_buttons_and_the_landing_page(site):
  _, out = site
  for module in MODULES:
    assert 'class="autosummary' in (out / "api" / f"{_api_page(module).stem}.html").read_text()
  guide = " ".join(path.read_text() for path in (out / "guide").glob("*.html"))
  assert guide.count('class="math notranslate') >= 10  # the formulas, as MathJax
  assert "**t" not in _text(guide) and "E[x²]" not in _text(guide), "a formula left as code"
  assert "copybutton.js" in (out / "index.html").read_text()
  landing = (out / "index.html").read_text()
  for part in (
    'src="_images/figure1.png"',
    'src="_images/figure3.png"',
    'href="experiments/imagenet.html"',
  ):
    assert part in landing, part
  for part in ('pip install -e ".[flax]"', "0.0 1.0 [0.051 0.058]"):  # the install; the output
    assert part in _text(landing).replace("&quot;", '"'), part


def test_api_reference_lists_every_public_name():
  reference = "".join(_api_page(module).read_text() for module in MODULES)
  missing = [
    name.rpartition(".")[2]
    for name, _ in PUBLIC
    if f":: {name.rpartition('.')[2]}\n" not in reference
  ]
  assert not missing, f"docs/api/ does not document {missing}"
