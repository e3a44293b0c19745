"""Sphinx extension: the API pages list adaopt's public names from ``adaopt/__init__.py`` itself.

``.. adaopt-api:: PATTERN ...`` documents every public name re-exported from a module that
matches a pattern (``adaopt._src.optimizers.*`` for a package and everything under it, or one
module's exact name), in the order: factories, building blocks (``scale_by_*``), other
functions, classes, data. With ``:sections:``, each source module gets a section titled and
introduced by its own docstring. After reading every page, a public name that no page
documents is a warning (an error under ``-W``) that says which page to add it to, so a new
public name cannot be left out of the reference.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import pathlib
import re
import types
from collections.abc import Iterable
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

PACKAGE = "adaopt"
logger = logging.getLogger(__name__)


@functools.cache
def public_names(package: str = PACKAGE) -> dict[str, str]:
    """Each public name of ``package`` -> the module it is imported from in ``__init__.py``.

    The public names are ``__all__`` where the package defines it, else every name of the
    namespace without a leading underscore (submodules of the package excepted). A name
    defined in ``__init__.py`` itself maps to the package.
    """
    module = importlib.import_module(package)
    source: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                source[alias.asname or alias.name] = node.module
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and not (isinstance(value, types.ModuleType) and value.__name__.startswith(package + "."))
        ]
    return {name: source.get(name, package) for name in names}


def _matches(module: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            prefix = pattern[:-2]
            if module == prefix or module.startswith(prefix + "."):
                return True
        elif module == pattern:
            return True
    return False


def _order(name: str, obj: Any) -> tuple[int, int, str]:
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        kind = 1 if name.startswith("scale_by_") else 0
    elif inspect.isclass(obj):
        kind = 2
    else:
        kind = 3
    try:
        line = inspect.getsourcelines(inspect.unwrap(obj))[1] if kind < 3 else 0
    except (OSError, TypeError):
        line = 0
    return kind, line, name


def _data_doc(module: str, name: str) -> tuple[list[str], str | None]:
    """A module-level name's docstring (the string literal or ``#:`` comment by its assignment) and annotation."""
    try:
        analyzer = ModuleAnalyzer.for_module(module)
        analyzer.analyze()
    except PycodeError:
        return [], None
    return list(analyzer.attr_docs.get(("", name), [])), analyzer.annotations.get(("", name))


def _summary(name: str, obj: Any, module: str) -> str:
    """The first paragraph of the docstring, with a class's bare ``:meth:`x``` made absolute for the table."""
    if inspect.isclass(obj) or callable(obj):
        doc = inspect.getdoc(obj) or ""
    elif isinstance(obj, types.ModuleType):
        doc = f"The module ``{obj.__name__}``, re-exported."
    else:
        doc = "\n".join(_data_doc(module, name)[0])
    summary = " ".join(doc.strip().split("\n\n")[0].split())
    if inspect.isclass(obj):
        summary = re.sub(r":(meth|attr):`~?(\w+)`", rf":\1:`~{PACKAGE}.{name}.\2`", summary)
    return summary


def _entry(name: str, obj: Any, module: str) -> list[str]:
    target = f"{PACKAGE}.{name}"
    if isinstance(obj, types.ModuleType):
        return [
            f".. py:data:: {name}",
            "",
            f"   The module ``{obj.__name__}``, re-exported: see its own documentation.",
            "",
        ]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return [f".. autoexception:: {target}", ""]
    if inspect.isclass(obj) and issubclass(obj, tuple):
        # A NamedTuple's fields are in its docstring's Attributes section: list only its own methods.
        methods = [n for n, v in vars(obj).items() if not n.startswith("_") and inspect.isfunction(v)]
        return [f".. autoclass:: {target}", *([f"   :members: {', '.join(methods)}"] if methods else []), ""]
    if inspect.isclass(obj):
        return [f".. autoclass:: {target}", "   :members:", ""]
    if callable(obj):
        return [f".. autofunction:: {target}", ""]
    # autodoc would read the docstring from adaopt/__init__.py, where the name is only imported.
    doc, annotation = _data_doc(module, name)
    value = repr(obj) if isinstance(obj, (str, int, float)) and len(repr(obj)) < 80 else None
    return [
        f".. py:data:: {name}",
        *([f"   :type: {annotation}"] if annotation else []),
        *([f"   :value: {value}"] if value else []),
        "",
        *(f"   {line}" for line in doc),
        "",
    ]


def _title(module: types.ModuleType) -> tuple[str, list[str]]:
    """A section title (the docstring's first line, before any ': ') and the docstring."""
    doc = inspect.getdoc(module) or module.__name__
    first = doc.splitlines()[0].rstrip(".")
    return first.split(": ")[0], doc.splitlines()


class AdaoptApi(SphinxDirective):
    """``.. adaopt-api:: PATTERN ...``: document the public names re-exported from these modules."""

    required_arguments = 1
    optional_arguments = 20
    option_spec = {"sections": directives.flag}  # noqa: RUF012  (docutils' own attribute)

    def run(self) -> list[nodes.Node]:
        names = {name: module for name, module in public_names().items() if _matches(module, self.arguments)}
        by_module: dict[str, list[str]] = {}
        for name, module in names.items():
            by_module.setdefault(module, []).append(name)
        package = importlib.import_module(PACKAGE)
        lines: list[str] = [f".. currentmodule:: {PACKAGE}", ""]
        for module_name, members in by_module.items():
            objects = {name: getattr(package, name) for name in members}
            ordered = sorted(members, key=lambda n: _order(n, objects[n]))
            if "sections" in self.options:
                title, doc = _title(importlib.import_module(module_name))
                lines += [title, "-" * len(title), "", *doc, ""]
            lines += [".. list-table::", "   :class: adaopt-summary", ""]
            for name in ordered:
                lines += [f"   * - :py:obj:`~{PACKAGE}.{name}`", f"     - {_summary(name, objects[name], module_name)}"]
            lines.append("")
            for name in ordered:
                lines += _entry(name, objects[name], module_name)
        self.env.adaopt_api_documented.setdefault(self.env.docname, set()).update(names)  # type: ignore[attr-defined]
        node = nodes.section() if "sections" in self.options else nodes.container()
        content = StringList(lines, source=f"<adaopt-api {' '.join(self.arguments)}>")
        if "sections" in self.options:
            nested_parse_with_titles(self.state, content, node)
        else:
            self.state.nested_parse(content, self.content_offset, node)
        return list(node.children)


def _init_env(app: Sphinx, env: BuildEnvironment, docnames: list[str]) -> None:
    if not hasattr(env, "adaopt_api_documented"):
        env.adaopt_api_documented = {}  # type: ignore[attr-defined]


def _purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    getattr(env, "adaopt_api_documented", {}).pop(docname, None)


def _merge(app: Sphinx, env: BuildEnvironment, docnames: set[str], other: BuildEnvironment) -> None:
    env.adaopt_api_documented.update(  # type: ignore[attr-defined]
        {d: names for d, names in other.adaopt_api_documented.items() if d in docnames}  # type: ignore[attr-defined]
    )


def _check_complete(app: Sphinx, env: BuildEnvironment) -> None:
    documented: dict[str, set[str]] = getattr(env, "adaopt_api_documented", {})
    seen: dict[str, str] = {}
    for docname, names in sorted(documented.items()):
        for name in names:
            if name in seen:
                logger.warning(
                    "adaopt-api: %s.%s is documented twice, in %s and %s", PACKAGE, name, seen[name], docname
                )
            seen[name] = docname
    for name, module in sorted(public_names().items()):
        if name not in seen:
            logger.warning(
                "adaopt-api: the public name %s.%s (from %s) is on no page of the API reference: "
                "add its module to an `.. adaopt-api::` directive under docs/api/",
                PACKAGE,
                name,
                module,
            )


_ATTRIBUTE_DOCS: dict[str, list[str]] = {}


def _keep_attribute_doc(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Before napoleon: remember an attribute's docstring as written."""
    if what == "attribute":
        _ATTRIBUTE_DOCS[name] = list(lines)


def _restore_attribute_doc(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """After napoleon: put it back. napoleon reads a first line ``A: B`` as the type ``A``, but
    adaopt annotates attributes in code, never in their docstrings, so a colon there is
    punctuation (``"One step size from whole-tree statistics: ..."``)."""
    if what == "attribute" and name in _ATTRIBUTE_DOCS:
        lines[:] = _ATTRIBUTE_DOCS.pop(name)


def _public_target(target: str) -> str | None:
    """``adaopt._src.registry.Range`` (where a type annotation names it) -> ``adaopt.Range``."""
    names = public_names()
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if names.get(parts[cut]) == ".".join(parts[:cut]):
            return ".".join([PACKAGE, *parts[cut:]])
    return None


def _resolve_private_path(app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.Element) -> Any:
    """Link a reference to a public object by its private path (as annotations name it) to its entry."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith(f"{PACKAGE}._src."):
        return None
    public = _public_target(target)
    if public is None:
        return None
    domain = env.domains["py"]
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], public, node, contnode)


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def readme_links(text: str, repo: pathlib.Path, docs: pathlib.Path) -> str:
    """A README's Markdown (in ``repo``), with its links to repository files fitted to the page in ``docs`` that includes it.

    A link or image relative to the README (``tests/test_parity.py``, ``notebooks/x.ipynb``)
    works on a code-hosting site but not from the docs' page: a page of the docs at the same
    relative path (``notebooks/x.ipynb`` through the docs/notebooks link, ``benchmarks/RESULTS.md``)
    stays a link, an image is pointed at the file, and any other file keeps its text without the
    link (the docs have no page for it).
    """

    def fit(match: re.Match[str]) -> str:
        bang, label, target = match.groups()
        if "://" in target or target.startswith(("#", "mailto:")):
            return match.group(0)
        path = target.split("#")[0]
        if bang:
            return (
                f"{bang}[{label}]({os.path.relpath(repo / path, docs)})" if (repo / path).exists() else match.group(0)
            )
        if pathlib.Path(path).suffix in {".md", ".ipynb", ".rst"} and (docs / path).exists():
            return match.group(0)
        return label

    return _LINK.sub(fit, text)


def _fit_readme(app: Sphinx, relative_path: pathlib.Path, parent_docname: str, content: list[str]) -> None:
    if relative_path.name == "README.md":  # the front page's, and benchmarks/README.md's page
        srcdir = pathlib.Path(app.srcdir)
        content[0] = readme_links(
            content[0], (srcdir / relative_path).resolve().parent, (srcdir / parent_docname).parent
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("include-read", _fit_readme)
    app.connect("missing-reference", _resolve_private_path)
    app.add_directive("adaopt-api", AdaoptApi)
    app.connect("autodoc-process-docstring", _keep_attribute_doc, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_doc, priority=600)
    app.connect("env-before-read-docs", _init_env)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_complete)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
