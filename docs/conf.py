"""Sphinx configuration: the guide (Markdown, read by MyST) and the API reference
(autodoc over the Google-style docstrings). Build with, from the repository root:

    python -m sphinx -W -b html docs docs/_build/html

(warnings are errors; tests/test_docs.py builds it the same way). The guide's code
is executed by tests/test_docs.py, not by the build.
"""

import pathlib
import sys

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
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"bnjax {release}"
