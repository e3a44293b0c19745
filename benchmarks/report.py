"""What the benchmark scripts share in their reports: the machine, Markdown tables, sections of a file."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import jax
import optax

from adaopt import cpu_backend_elides_copies, cpu_multi_output_fusion_enabled

TITLE = "# adaopt benchmark results"


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
