"""Sphinx configuration for the bnarray documentation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import bnarray

project = "bnarray"
author = "The bnarray developers"
copyright = "2026, The bnarray developers"
version = release = bnarray.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Equations: labelled equations get numbers. The math pages sit in a
# numbered toctree, so their numbers carry the page number, e.g. (1.23), and
# references between pages stay unambiguous.
math_number_all = False
numfig = True
math_numfig = True
numfig_secnum_depth = 1
math_eqref_format = "({number})"

# MathJax 3 served from this site (no CDN): the sphinx-mathjax-offline package
# ships the files; we only borrow its static folder. Loading it as an extension
# would override `mathjax_path` and is not parallel-safe.
_mathjax_spec = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax_spec is None or not _mathjax_spec.submodule_search_locations:
    msg = (
        "the docs need `sphinx-mathjax-offline` (pip install -r docs/requirements.txt)"
    )
    raise RuntimeError(msg)
_mathjax_static = Path(next(iter(_mathjax_spec.submodule_search_locations))) / "static"
html_static_path = [str(_mathjax_static)]
mathjax_path = "mathjax/tex-chtml.js"

# API reference: one generated page per public name, numpydoc docstrings.
autosummary_generate = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# Figures are drawn at build time from the code in the pages.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.figsize": (6.4, 3.6), "figure.dpi": 110}
plot_pre_code = (
    "import numpy as np\nimport matplotlib.pyplot as plt\nimport bnarray as bn"
)

myst_enable_extensions = ["dollarmath", "deflist"]
myst_heading_anchors = 2

html_theme = "furo"
html_title = f"bnarray {release}"
html_theme_options = {"navigation_with_keys": True}
html_show_sourcelink = False
html_copy_source = False


def _describe_version(app, what, name, obj, options, lines):
    """`__version__` is a plain str: document it instead of str's docstring."""
    if what == "data" and name.endswith("__version__"):
        lines[:] = [
            "The version of bnarray, a string such as ``'0.1.0'``.",
            "",
            "These pages document version |release|.",
        ]


def setup(app):
    app.connect("autodoc-process-docstring", _describe_version)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
