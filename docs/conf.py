"""Sphinx configuration: the guide (Markdown, read by MyST) and the API reference
(autodoc over the Google-style docstrings, a page per module with an autosummary
table on top). Build with, from the repository root:

    python -m sphinx -W -b html docs docs/_build/html

(warnings are errors; tests/test_api_docs.py builds it the same way and reads the
rendered pages). The guide's code is executed by tests/test_docs.py, not by the
build. The build writes each guide page that declares a jupytext pairing as the
notebook beside it (``docs/guide/NAME.ipynb``, not committed), which the page links.
"""

import ast
import dataclasses
import inspect
import itertools
import pathlib
import re
import sys
import textwrap

# Document the checkout this file belongs to, not another installed copy.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import bnjax  # noqa: E402

project = "bnjax"
author = "the bnjax authors"
copyright = "the bnjax authors"  # noqa: A001
release = bnjax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
# $...$ and $$...$$ are math (MathJax), and so are \begin{align}... environments;
# "term\n: definition" is a definition list (the glossary).
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]

# Signatures as a user reads them: names as imported (Sequence, not
# ~collections.abc.Sequence), defaults as written in the source (jnp.float32, not
# <class 'jax.numpy.float32'>), the types in the parameter list below.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True
autodoc_type_aliases = {
  "Dtype": "Dtype",
  "Initializer": "Initializer",
  "PromoteDtypeFn": "PromoteDtypeFn",
  "DTypeLike": "DTypeLike",
  "ArrayLike": "ArrayLike",
  "Hashable": "Hashable",
  "Sequence": "Sequence",
  "Iterable": "Iterable",
  "Callable": "Callable",
}
autodoc_default_options = {"exclude-members": "__init__, __new__"}
autosummary_generate = False  # the pages in docs/api/ are written by hand
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # a class's Attributes: one compact list, not an entry each

# The copy button leaves out the prompts of doctests and shell sessions.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

html_theme = "furo"
html_title = f"bnjax {release}"
html_static_path = ["_static"]
html_css_files = ["bnjax.css"]

# flax.linen Modules' own dataclass fields, in every Module's constructor.
_LINEN_INTERNAL_FIELDS = ("parent", "name")


def _class_defaults(cls) -> dict[str, str]:
  """The defaults of a dataclass's fields as written in its source (and its bases'),
  e.g. ``nn.initializers.zeros`` rather than ``<function zeros>``."""
  defaults = {}
  for base in reversed(cls.__mro__):
    if not getattr(base, "__module__", "").startswith("bnjax"):
      continue
    source = textwrap.dedent(inspect.getsource(base))
    for node in ast.parse(source).body[0].body:
      if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
        defaults[node.target.id] = ast.get_source_segment(source, node.value)
  return defaults


def _init_signature(init) -> str:
  """``init``'s parameters (without ``self``), each default as written in its source."""
  source = textwrap.dedent(inspect.getsource(init))
  arguments = ast.parse(source).body[0].args
  positional = arguments.posonlyargs + arguments.args
  defaults = list(
    zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults, strict=True)
  )
  defaults += [
    (a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True) if d
  ]
  written = {
    argument.arg: ast.get_source_segment(source, default) for argument, default in defaults
  }
  parameters, star_done = [], False
  for parameter in list(inspect.signature(init).parameters.values())[1:]:  # without self
    if parameter.kind is parameter.KEYWORD_ONLY and not star_done:
      parameters.append("*")
      star_done = True
    if parameter.kind is parameter.VAR_POSITIONAL:
      star_done = True
      parameters.append(f"*{parameter.name}")
    elif parameter.kind is parameter.VAR_KEYWORD:
      parameters.append(f"**{parameter.name}")
    elif parameter.default is parameter.empty:
      parameters.append(parameter.name)
    else:
      parameters.append(f"{parameter.name}={written[parameter.name]}")
  return "(" + ", ".join(parameters) + ")"


def _constructor_signature(cls) -> str | None:
  """What a user calls: a linen Module's fields without Flax's ``parent`` and
  ``name``; for other framework modules (nnx, Haiku, Equinox) the ``__init__`` a bnjax
  class defines, not a metaclass's ``(*args, **kwargs)``; each parameter with its
  default as written, without its type (the parameter list below gives it)."""
  if not isinstance(cls, type):
    return None
  if dataclasses.is_dataclass(cls) and any(
    base.__module__.startswith("flax.linen") for base in cls.__mro__
  ):
    written = _class_defaults(cls)
    parameters = []
    for field in dataclasses.fields(cls):
      if not field.init or field.name in _LINEN_INTERNAL_FIELDS:
        continue
      has_default = (
        field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
      )
      parameters.append(
        f"{field.name}={written.get(field.name, '...')}" if has_default else field.name
      )
    return "(" + ", ".join(parameters) + ")"
  init = next(
    (
      vars(base)["__init__"]
      for base in cls.__mro__
      if base.__module__.startswith("bnjax") and "__init__" in vars(base)
    ),
    None,
  )
  if init is None or issubclass(cls, tuple):  # NamedTuples: Sphinx shows their fields
    return None
  return _init_signature(init)


def _process_signature(app, what, name, obj, options, signature, return_annotation):
  del app, options
  if what == "class" and name.startswith("bnjax."):
    constructor = _constructor_signature(obj)
    if constructor is not None:
      return constructor, None
  return signature, return_annotation


GUIDE = pathlib.Path(__file__).resolve().parent / "guide"
_RAISES_MARKER = re.compile(r"<!--\s*raises:\s*[\w.]+\s*-->\s*$")


def page_notebook(page: pathlib.Path):
  """A guide page as a notebook, read by jupytext (its Markdown format): the
  ```python blocks become the code cells, in order, everything else Markdown. A
  block marked ``<!-- raises: ... -->`` is tagged ``raises-exception``, so that
  running all cells goes on past it."""
  import jupytext

  notebook = jupytext.read(page, fmt="md")
  for previous, cell in itertools.pairwise(notebook.cells):
    if cell.cell_type == "code" and _RAISES_MARKER.search(previous.source):
      cell.metadata.setdefault("tags", []).append("raises-exception")
  return notebook


def paired_pages() -> list[pathlib.Path]:
  """The guide pages that declare a jupytext pairing with a notebook."""
  pages = sorted(GUIDE.glob("*.md"))
  return [page for page in pages if "\n  jupytext:\n" in page.read_text()[:400]]


def _write_notebooks(app):
  """Writes each paired page's notebook beside it, before the pages are read: the
  page's link to it then becomes a download."""
  import jupytext

  for page in paired_pages():
    jupytext.write(page_notebook(page), page.with_suffix(".ipynb"), fmt="ipynb")


def setup(app):
  app.connect("autodoc-process-signature", _process_signature)
  app.connect("builder-inited", _write_notebooks)
