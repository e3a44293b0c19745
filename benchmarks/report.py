"""What the benchmark scripts share in their reports: the machine, Markdown tables, sections of a file."""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import optax

from adaopt import cpu_backend_elides_copies, cpu_multi_output_fusion_enabled, enable_cpu_copy_elision

TITLE = "# adaopt benchmark results"
T = TypeVar("T")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other processes sharing the cores make timings noisy."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return "unknown"


def machine() -> dict[str, str]:
    """The machine, the library versions and the XLA options that change how steps compile."""
    mem = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "CPU": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": f"{usable_cores()} usable ({os.cpu_count()} logical)",
        "memory": f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem else "unknown",
        "Python": platform.python_version(),
        "jax / jaxlib": f"{jax.__version__} / {version('jaxlib')}",
        "optax": optax.__version__,
        "JAX device": str(jax.devices()[0]),
        "XLA:CPU multi-output fusion": "on" if cpu_multi_output_fusion_enabled() else "off (the default)",
        "XLA:CPU copy elision": "on" if cpu_backend_elides_copies() else "off (the default)",
        "torch": version("torch"),
    }


def cell(x: float | None, fmt: str = ".4g") -> str:
    """A number as a table cell: ``fmt``, or "—" for none, "n/a" for NaN, "diverged" for an infinity."""
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return format(x, fmt)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, section: str, begin: str, end: str, after: str | None = None) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path``, keeping the rest of the file.

    Without those markers, the section goes right after the marker ``after`` when the file has it,
    else at the end; a missing file is created.
    """
    section = section.rstrip("\n")
    if path.exists():
        text = path.read_text()
        start, stop = text.find(begin), text.find(end)
        anchor = text.find(after) if after else -1
        if start >= 0 and stop > start:
            text = text[:start] + section + text[stop + len(end) :]
        elif anchor >= 0:
            cut = anchor + len(after or "")
            text = text[:cut] + "\n\n" + section + text[cut:]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = f"{TITLE}\n\n{section}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def portable(argument: str) -> str:
    """A command-line argument for the report: an absolute path made relative to the working
    directory (or cut to its name), so no machine's paths end up in the results."""
    path = Path(argument)
    if not path.is_absolute():
        return argument
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


# Where a run writes its results: not part of what a reader reruns to get them.
OUTPUT_OPTIONS = ("--out", "--plots", "--json")


def invocation(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran ``module`` (``argv``, default this process's), for the report: its paths
    :func:`portable`, and the options naming where the results went left out."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in OUTPUT_OPTIONS:
            skip = True
        elif not argument.startswith(tuple(f"{option}=" for option in OUTPUT_OPTIONS)):
            kept.append(portable(argument))
    return shlex.join(["python", "-m", module, *kept])


# ---------------------------------------------------------------------------------------------
# Measuring with XLA's defaults and with XLA:CPU's copy elision, side by side. The elision is an
# option read when JAX starts: a child process of the same benchmark measures that column.

ELIDED = "copy elision"  # the suffix of the columns measured with it


def add_copy_elision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--copy-elision both|off|on`` and the child's hidden ``--rows-json``."""
    parser.add_argument(
        "--copy-elision",
        choices=("both", "off", "on"),
        default="both",
        help="measure with XLA's defaults, with adaopt.enable_cpu_copy_elision(), or both side by side (default)",
    )
    parser.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)  # a child's measurements


def start_copy_elision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With ``--copy-elision on``, turn it on (before JAX starts), or stop with the reason."""
    if args.copy_elision == "on" and not enable_cpu_copy_elision():
        parser.error("the copy elision could not be turned on (see the warning)")


def measured_in_child(module: str, argv: Sequence[str]) -> Any:
    """What ``python -m module --copy-elision on *argv`` measures, read back from the ``--rows-json`` it writes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, "-m", module, "--copy-elision", "on", *argv, "--rows-json", str(out)]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


def copy_elision_runs(choice: str, here: Callable[[], T], in_child: Callable[[], T]) -> list[tuple[str, T]]:
    """The measurements ``--copy-elision choice`` asks for, each with its columns' suffix: XLA's defaults measured
    here, and the elided ones in a child process (``both``) or here (``on``: :func:`start_copy_elision` turned it on)."""
    if choice == "off":
        return [("", here())]
    if choice == "on":
        return [(ELIDED, here())]
    return [("", here()), (ELIDED, in_child())]


def copy_elision_state(choice: str) -> str:
    """The machine table's line for ``--copy-elision choice``."""
    if choice == "both":
        return f"off here; on in the columns marked *{ELIDED}* (a child process)"
    return "on" if choice == "on" else "off (XLA's default)"


def side_by_side(
    labels: list[str], header: list[str], columns: list[tuple[str, list[list[str]]]], repeated: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """One table of ``columns`` (a suffix, the rows of one measurement): the rows matched by their label, the later
    measurements giving only the columns named in ``repeated`` (default: all)."""
    keep = [header.index(h) for h in (repeated or header)]
    full = ["optimizer", *header]
    by_label = [{row[0]: row[1:] for row in rows} for _, rows in columns]
    for suffix, _ in columns[1:]:
        full += [f"{header[i]}, {suffix}" for i in keep]
    table = []
    for label in labels:
        row = [label, *by_label[0][label]]
        for rows in by_label[1:]:
            row += [rows[label][i] for i in keep]
        table.append(row)
    return full, table


# ---------------------------------------------------------------------------------------------
# Where a compiled step's time goes, kernel by kernel.


def kernel_times(run: Callable[[], Any], calls: int = 5) -> list[tuple[str, float, int]]:
    """The kernels of ``calls`` calls of ``run`` (which runs a compiled step and returns its outputs), from a
    ``jax.profiler`` trace: each kernel's name (XLA's, without its numeric suffix), milliseconds and launches
    per call, the slowest first.

    Kernels that run side by side on several threads each count in full (their sum can exceed the
    wall time), and a loop's row (``while``) spans its body's kernels, listed too. The runtime's own
    steps that XLA names the same way (``ParseArguments``) come out as rows too.
    """
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        try:
            for _ in range(calls):
                jax.block_until_ready(run())
        finally:
            jax.profiler.stop_trace()
        trace = max(Path(folder).rglob("*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
        events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    micros: collections.Counter[str] = collections.Counter()
    launches: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # The runtime's and Python's own events have qualified names, arguments or a "$"; kernels do not.
        if event.get("ph") != "X" or re.search(r"[:$( ]", name):
            continue
        kernel = re.sub(r"\.\d+$", "", name)
        micros[kernel] += event.get("dur", 0)
        launches[kernel] += 1
    return [(name, total / 1e3 / calls, launches[name] // calls) for name, total in micros.most_common()]
