"""Sphinx configuration for the pyro_dgm documentation.

Build (as CI does, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The build needs no network access: there are no intersphinx inventories to download.
"""

from __future__ import annotations

import os
import pkgutil
import re
import sys

# Document the checkout this file lives in, even when another copy is installed.
sys.path.insert(0, os.path.abspath(".."))

import pyro_dgm  # noqa: E402

project = "pyro_dgm"
author = "pyro_dgm contributors"
copyright = "pyro_dgm contributors"
version = pyro_dgm.__version__
release = pyro_dgm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# -- autodoc -------------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
# Annotations go into the parameter lists (next to the ``:param:`` text) and a "Return type"
# field, which keeps the signatures short.
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Documenting a class's ``__init__`` docstring would duplicate the class docstring.
autoclass_content = "class"

# The public API re-exports objects from private submodules; cross-references use the public
# paths (``pyro_dgm.distributions.VonMisesFisher``), which exist, so references resolve there.
# Links to torch/pyro objects stay plain text: no intersphinx, so the build works offline.
nitpicky = False

# -- general -------------------------------------------------------------------------------------
templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
pygments_style = "sphinx"

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"pyro_dgm {release}"
html_theme_options = {
    "description": "Deep generative models for Pyro",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []


# -- checks and tweaks ---------------------------------------------------------------------------
def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
    """Leave out the ``Alias for field number N`` entries of ``NamedTuple`` fields that have no
    docstring of their own; the class docstrings describe the fields."""
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    return None


def _check_api_covers_every_subpackage(app):
    """Warn (an error under ``-W``) when a public subpackage or module of :mod:`pyro_dgm` has no
    ``automodule`` in ``api.rst``, so that a new module cannot land undocumented."""
    from sphinx.util import logging

    api = os.path.join(app.srcdir, "api.rst")
    with open(api, encoding="utf-8") as handle:
        documented = set(re.findall(r"^\.\. automodule:: (\S+)", handle.read(), re.MULTILINE))
    for module in pkgutil.iter_modules(pyro_dgm.__path__):
        name = f"pyro_dgm.{module.name}"
        if not module.name.startswith("_") and name not in documented:
            logging.getLogger(__name__).warning(
                "%s is not documented: add '.. automodule:: %s' to docs/api.rst",
                name,
                name,
                location="api",
            )


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
    app.connect("builder-inited", _check_api_covers_every_subpackage)
