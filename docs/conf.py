"""Sphinx configuration of adaopt's documentation: ``make docs`` builds it into docs/_build/html.

The API reference is generated from the docstrings (autodoc + napoleon, Google style; math by
MathJax in the browser); the notebooks are rendered with their stored outputs and never
executed here (``make notebooks`` executes them); the overview is the README itself.
Nothing here reaches the network at build time.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "_ext"))

import sphinx.util.inspect

import adaopt

project = "adaopt"
author = "the adaopt authors"
copyright = "the adaopt authors"
version = release = adaopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "adaopt_api",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks/*.py"]
# Every cross-reference must resolve (-n): a renamed function breaks the build, not a link.
# Names outside adaopt's public API render as code without a link: other packages (there is no
# intersphinx, the build is offline) and adaopt's private modules.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|numpy|optax|chex|collections\.abc|typing|enum|types|os|re)\..*"),
    (r"py:.*", r"adaopt\._src\..*"),
    (r"py:class", r"(Array|ArrayTree|Params|Updates|OptState|InjectHyperparamsState)"),  # in optax's docstrings
    (r"py:.*", r"(base\.)?(Factory|MaskOrFn|LearningRateFactor|Params|Updates)"),  # adaopt's private type aliases
]

# Docstrings: Google style, type hints in the signature, members in source order.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_type_aliases = {  # shown as optax names rather than expanded into their unions
    "ScalarOrSchedule": "optax.ScalarOrSchedule",
    "Schedule": "optax.Schedule",
    "Params": "optax.Params",
    "Updates": "optax.Updates",
    "MaskOrFn": "MaskOrFn",
    "Factory": "Factory",
    "LearningRateFactor": "LearningRateFactor",
}
# Sphinx shows an alias inside a union (``Updates | None``) by its repr,
# ``TypeAliasForwardRef('optax.Updates')``: show its name, as it does outside a union.
sphinx.util.inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name  # type: ignore[method-assign]
add_module_names = False
python_use_unqualified_type_names = True

# Notebooks: rendered with the outputs stored in them (`make notebooks` regenerates those).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"adaopt {release}"
html_show_sourcelink = False
