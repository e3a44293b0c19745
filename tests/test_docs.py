"""The documentation builds with every warning an error, renders the docstrings' math, the
README's tables and the notebooks' plots, and documents every public name of ``adaopt``."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import types
import zlib

import adaopt

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def sphinx_build(source: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """What ``make docs`` runs (warnings are errors), into ``out`` rather than the source tree."""
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(source), str(out / "html")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def inventory(path: pathlib.Path) -> dict[str, str]:
    """Sphinx's objects.inv (four header lines, then zlib): each object's name -> its page."""
    body = zlib.decompress(path.read_bytes().split(b"\n", 4)[4]).decode()
    entries = (re.match(r"(.+?)\s+\S+:\S+\s+-?\d+\s+(\S+)", line) for line in body.splitlines())
    return {m.group(1): m.group(2).split("#")[0] for m in entries if m}


def public_names() -> list[str]:
    if hasattr(adaopt, "__all__"):
        return list(adaopt.__all__)
    return [
        name
        for name, value in vars(adaopt).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and value.__name__.startswith("adaopt."))
    ]


def test_docs_build(tmp_path: pathlib.Path) -> None:
    # One test, one build: split into several, xdist workers would each build the docs.
    result = sphinx_build(DOCS, tmp_path)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-8000:]}"
    html = tmp_path / "html"

    documented = inventory(html / "objects.inv")
    missing = [name for name in public_names() if f"adaopt.{name}" not in documented]
    assert not missing, f"public names missing from the API reference: {missing}"

    # The docstrings' math is rendered by MathJax, never shown as raw reST.
    adam_page = (html / documented["adaopt.adam"]).read_text()
    assert "mathjax" in adam_page.lower()
    assert r"\[" in adam_page and r"\beta_1" in adam_page
    for path in html.rglob("*.html"):
        text = path.read_text()
        for raw in (":math:", ".. math::", ":func:", ":class:", "Args:"):
            assert raw not in text, f"{raw!r} left unrendered in {path.relative_to(html)}"

    # The README is the front page, with every one of its tables.
    readme_tables = len(re.findall(r"^\|[ :]*-{3,}", (ROOT / "README.md").read_text(), flags=re.MULTILINE))
    assert readme_tables
    assert (html / "index.html").read_text().count("<table") == readme_tables

    # The benchmarks' README and results are pages, the results with their plots, linked from the front page.
    plots = re.findall(r"^!\[", (ROOT / "benchmarks" / "RESULTS.md").read_text(), flags=re.MULTILINE)
    assert plots and (html / "benchmarks" / "RESULTS.html").read_text().count('<img alt="') == len(plots)
    assert (html / "benchmarks" / "README.html").exists()
    assert 'href="benchmarks/RESULTS.html#' in (html / "index.html").read_text()

    # Each notebook is a page with its stored plots.
    for path in NOTEBOOKS:
        page = (html / "notebooks" / f"{path.stem}.html").read_text()
        cells = json.loads(path.read_text())["cells"]
        plots = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
        assert plots and page.count('<img alt="../_images/') == plots, path.name


def test_a_public_name_left_out_fails_the_build(tmp_path: pathlib.Path) -> None:
    """The check behind the reference's completeness: a page set that misses names does not build."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        "extensions = ['sphinx.ext.autodoc', 'sphinx.ext.napoleon', 'adaopt_api']\n"
    )
    (source / "index.rst").write_text("Registry\n========\n\n.. adaopt-api:: adaopt._src.registry\n")
    result = sphinx_build(source, tmp_path)
    assert result.returncode != 0
    assert "the public name adaopt.adam (from adaopt._src.optimizers.adam) is on no page" in result.stderr
    assert "adaopt.REGISTRY" not in result.stderr  # documented by the one page


def test_readme_links_to_repository_files_fit_the_docs() -> None:
    """The README links files for a code-hosting site; the docs' front page keeps those it can."""
    spec = importlib.util.spec_from_file_location("adaopt_api", DOCS / "_ext" / "adaopt_api.py")
    assert spec is not None and spec.loader is not None
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    readme = (
        "[the parity test](tests/test_parity.py), [quickstart](notebooks/quickstart.ipynb), "
        "[below](#optimizers), [optax](https://github.com/google-deepmind/optax), ![plot](notebooks/speed.py), "
        "[results](benchmarks/RESULTS.md#summary)"
    )
    assert extension.readme_links(readme, ROOT, DOCS) == (
        "the parity test, [quickstart](notebooks/quickstart.ipynb), "
        "[below](#optimizers), [optax](https://github.com/google-deepmind/optax), ![plot](../notebooks/speed.py), "
        "[results](benchmarks/RESULTS.md#summary)"
    )
    # benchmarks/README.md, included by docs/benchmarks/README.md: its neighbour RESULTS.md is a page there too.
    text = "[results](RESULTS.md), [the script](speed.py), ![curves](light_states.png)"
    assert extension.readme_links(text, ROOT / "benchmarks", DOCS / "benchmarks") == (
        "[results](RESULTS.md), the script, ![curves](../../benchmarks/light_states.png)"
    )
