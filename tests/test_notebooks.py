"""The notebooks: each a jupytext percent script (the source, which reviews as plain text) paired
with an executed ``.ipynb`` (what a code-hosting site and the docs show, outputs and plots
included). The pair agrees, the stored outputs come from one clean run, and the notebook still
executes without error.

``make notebooks`` (``python -m tests.test_notebooks``) executes every script and writes its
``.ipynb``.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

import jupytext
import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
SCRIPTS = sorted(NOTEBOOK_DIR.glob("*.py"))


def execute(script: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook of ``script``, executed top to bottom in a fresh kernel, in its folder."""
    notebook = jupytext.read(script)
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(script.parent)}},
    ).execute()
    # Stable cell ids and no interpreter version, so that a rerun changes only what it must.
    seen: set[str] = set()
    for i, cell in enumerate(notebook.cells):
        cell.id = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        cell.id = cell.id if cell.id not in seen else f"{cell.id}-{i}"
        seen.add(cell.id)
    notebook.metadata.get("language_info", {}).pop("version", None)
    return notebook


def errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def output_kinds(notebook: nbformat.NotebookNode) -> list[set[str]]:
    """Per code cell, what it shows: printed text and the types of its displays (stderr aside)."""
    kinds = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            shown = set()
            for o in cell.get("outputs", []):
                if o.get("output_type") == "stream":
                    shown |= {f"stream:{o['name']}"} - {"stream:stderr"}
                else:
                    shown |= {f"{o['output_type']}:{mime}" for mime in o.get("data", {})}
            kinds.append(shown)
    return kinds


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_there_are_notebooks() -> None:
    assert SCRIPTS
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == [p.stem for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_pair_agrees(script: pathlib.Path) -> None:
    """The script and its .ipynb hold the same cells (``make notebooks`` rewrites the .ipynb)."""
    assert jupytext.read(script).metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert cells(jupytext.read(script.with_suffix(".ipynb"))) == cells(jupytext.read(script)), (
        f"{script.name} and its .ipynb differ: run `make notebooks` (or, for an edit made in the "
        f".ipynb, `jupytext --sync {script.with_suffix('.ipynb').name}` first)"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_stored_outputs_are_one_clean_run(script: pathlib.Path) -> None:
    stored = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not errors(stored)
    plots = sum("plt.show()" in cell.source for cell in code)
    assert sum("display_data:image/png" in kinds for kinds in output_kinds(stored)) == plots


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_notebook_executes(script: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits the environment: a notebook that times large models may run them smaller
    # here (the stored outputs come from `make notebooks`, at full size; the kinds of output agree).
    monkeypatch.setenv("ADAOPT_NOTEBOOK_QUICK", "1")
    notebook = execute(script)
    assert not errors(notebook)
    stored = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    assert output_kinds(notebook) == output_kinds(stored), "the stored outputs are stale: run `make notebooks`"


if __name__ == "__main__":
    for script in SCRIPTS if len(sys.argv) < 2 else [pathlib.Path(a) for a in sys.argv[1:]]:
        notebook = execute(script)
        jupytext.write(notebook, script.with_suffix(".ipynb"))
        print(f"executed {script.name} -> {script.with_suffix('.ipynb').name}", *errors(notebook), sep="\n  ")
