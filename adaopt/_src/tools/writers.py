"""Writers that take a monitor's records to TensorBoard, CSV and Weights & Biases, and a plot of them.

Only the glue: the writer libraries do the writing. TensorBoard and Weights & Biases are optional
extras (``pip install adaopt[tensorboard]``, ``adaopt[wandb]``), imported when a writer is
built, so the core needs only jax and optax; matplotlib only when plotting. Every writer has the
same small interface: ``write(step, records)`` with ``records`` a ``dict[str, float]`` (what
:func:`adaopt.read_records` returns), ``close()``, and use as a context manager.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any

from adaopt._src import base

# What tensorboardX's summaries replace by "_" in a tag (its _INVALID_TAG_CHARACTERS).
_INVALID_TAG = re.compile(r"[^-/\w.]")


def _check_path(name: str, value: Any) -> str:
    """``value`` as a ``str`` path, or a :class:`HyperparameterError` naming ``name``: a path is a ``str`` or an
    ``os.PathLike`` (``open`` would take an int as a file descriptor, and close it)."""
    if not isinstance(value, (str, os.PathLike)):
        raise base.HyperparameterError(
            f"{name} must be a path (a str or an os.PathLike such as pathlib.Path), got {value!r} of type "
            f"{type(value).__name__}."
        )
    path = os.fspath(value)
    if not isinstance(path, str):  # an os.PathLike of bytes
        raise base.HyperparameterError(f"{name} must be a path of str, got {value!r}, a path of bytes.")
    return path


def _require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"This writer needs {module}, which is not installed: pip install adaopt[{extra}]") from error


class Writer:
    """The interface every writer shares: ``write(step, records)``, ``close()``, and ``with writer: ...``."""

    def write(self, step: int, records: Mapping[str, float]) -> None:
        """Write the records of one step: ``{name: value}``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the writer holds (files, a run). Idempotent."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class TensorBoardWriter(Writer):
    """Each record as a TensorBoard scalar (tag = its name), through ``tensorboardX.SummaryWriter``.

    Names such as ``"effective_lr/layers/0/kernel"`` group in TensorBoard by their first part. A tag
    takes letters, digits and ``_ - / .`` only: other characters (a space, Haiku's ``~``) become ``_``
    and leading slashes go, as tensorboardX does, and names that would then share a tag (``"a b"``
    and ``"a_b"``) are told apart by a suffix, ``_2``, ``_3``..., in the order first written, so
    that no two records share one.

    Args:
      logdir: the directory of the event files (``tensorboard --logdir`` it).
      **kwargs: passed to ``tensorboardX.SummaryWriter`` (``flush_secs``, ``filename_suffix``...).

    Raises:
      ImportError: tensorboardX is not installed (``pip install adaopt[tensorboard]``).

    Example:
      >>> import tempfile, adaopt
      >>> with adaopt.TensorBoardWriter(tempfile.mkdtemp()) as writer:
      ...     writer.write(0, {"grad_norm": 1.5, "effective_lr": 1e-3})
    """

    def __init__(self, logdir: str | os.PathLike[str], **kwargs: Any) -> None:
        self.logdir = _check_path("logdir", logdir)
        tensorboardx = _require("tensorboardX", "tensorboard")
        self._writer: Any = tensorboardx.SummaryWriter(self.logdir, **kwargs)
        self._tags: dict[str, str] = {}  # record name -> tag
        self._taken: set[str] = set()  # the tags given

    def tag(self, name: str) -> str:
        """The TensorBoard tag of the record ``name`` (the same for the writer's life)."""
        if name not in self._tags:
            tag = _INVALID_TAG.sub("_", name).lstrip("/") or "_"
            candidate, n = tag, 1
            while candidate in self._taken:
                n += 1
                candidate = f"{tag}_{n}"
            self._tags[name] = candidate
            self._taken.add(candidate)
        return self._tags[name]

    def write(self, step: int, records: Mapping[str, float]) -> None:
        for name, value in records.items():
            self._writer.add_scalar(self.tag(name), float(value), global_step=int(step))

    def close(self) -> None:
        self._writer.close()


class CsvWriter(Writer):
    """One row per step: ``step`` and then the records, in the columns of the first write.

    Args:
      path: the CSV file; created, or overwritten.

    Raises:
      ValueError: a later write has other names than the first (the columns are fixed), or a record is named
        ``"step"`` (the first column's name).

    Example:
      >>> import os, tempfile, adaopt
      >>> path = os.path.join(tempfile.mkdtemp(), "records.csv")
      >>> with adaopt.CsvWriter(path) as writer:
      ...     writer.write(0, {"grad_norm": 1.5})
      ...     writer.write(10, {"grad_norm": 0.5})
      >>> adaopt.load_records(path)
      [(0, {'grad_norm': 1.5}), (10, {'grad_norm': 0.5})]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _check_path("path", path)
        self._file = open(self.path, "w", newline="")  # noqa: SIM115  # held open across writes; closed by close()
        self._writer: csv.DictWriter[str] | None = None

    def write(self, step: int, records: Mapping[str, float]) -> None:
        if "step" in records:
            raise ValueError(
                "A record is named 'step', the name of the CSV's first column (the step of each row): its values "
                "would overwrite the steps. Give the record another name (record_norm('...'), a monitor group)."
            )
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=["step", *records])
            self._writer.writeheader()
        columns = list(self._writer.fieldnames)[1:]
        if set(records) != set(columns):  # in any order: the row is written in the columns' order
            raise ValueError(
                f"The records of step {step} have other names than the CSV's columns: missing "
                f"{sorted(set(columns) - set(records))}, new {sorted(set(records) - set(columns))}. Write the same "
                "records at every step (those of one monitor), or one CSV file per set of records."
            )
        # repr keeps every digit of a float: the file reads back exactly.
        self._writer.writerow({"step": int(step), **{name: repr(float(v)) for name, v in records.items()}})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def load_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, float]]]:
    """The rows of a :class:`CsvWriter`'s file: ``[(step, {name: value}), ...]``.

    Raises:
      HyperparameterError: ``path`` is not a path (a ``str`` or an ``os.PathLike``).
    """
    with open(_check_path("path", path), newline="") as file:
        return [
            (int(row.pop("step")), {name: float(value) for name, value in row.items()}) for row in csv.DictReader(file)
        ]


class WandbWriter(Writer):
    """The records of each step as one ``wandb`` log call, in a run this writer starts and finishes.

    Args:
      **init_kwargs: passed to ``wandb.init`` (``project``, ``name``, ``config``, ``dir``,
        ``mode="offline"``...); the environment (``WANDB_MODE``, ``WANDB_DIR``) applies as usual.

    ``close()`` finishes the run (``run.finish()``) and, when no other run of this process is
    active, stops wandb's background service (``wandb.teardown()``), so no process is left behind.
    wandb keeps a run's steps increasing: it drops a write at a step below one already written (with
    a warning of its own), where :class:`TensorBoardWriter` and :class:`CsvWriter` keep it.

    Raises:
      ImportError: wandb is not installed (``pip install adaopt[wandb]``).
    """

    def __init__(self, **init_kwargs: Any) -> None:
        self._wandb = _require("wandb", "wandb")
        self.run: Any = self._wandb.init(**init_kwargs)
        self._closed = False

    def write(self, step: int, records: Mapping[str, float]) -> None:
        self.run.log({name: float(value) for name, value in records.items()}, step=int(step))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.run.finish()
        if self._wandb.run is None:
            self._wandb.teardown()


def _rows(source: Any) -> list[tuple[Any, dict[str, float]]]:
    """``plot_records``'s source as ``(step, records)`` pairs, or an error naming ``source``."""
    if isinstance(source, (str, os.PathLike)):
        return load_records(source)
    what = "source must be a CSV file's path or an iterable of (step, {name: value}) pairs"
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        hint = " (one step's records: pass [(step, records)])" if isinstance(source, Mapping) else ""
        raise base.HyperparameterError(f"{what}, got {source!r} of type {type(source).__name__}{hint}.")
    rows = []
    for pair in source:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], Mapping)):
            raise base.HyperparameterError(f"{what}, got {pair!r} among them.")
        rows.append((pair[0], dict(pair[1])))
    return rows


def plot_records(
    source: str | os.PathLike[str] | Iterable[tuple[int, Mapping[str, float]]],
    names: str | Sequence[str],
    *,
    ax: Any = None,
    logy: bool = False,
) -> Any:
    """Plot records over the steps: from a :class:`CsvWriter`'s file or from ``(step, records)`` pairs.

    Args:
      source: a CSV file path, or an iterable of ``(step, {name: value})`` pairs.
      names: one record's name, or several (one line each); a name may end with ``*`` to plot
        every record it starts (``"effective_lr/*"``: one line per leaf or group).
      ax: the matplotlib ``Axes`` to draw on (default: a new figure's).
      logy: a logarithmic y axis (non-positive values are left out of it).

    Returns:
      The matplotlib ``Axes``.

    Raises:
      ImportError: matplotlib is not installed.
      KeyError: a name matches no record (the message lists the records).
      HyperparameterError: ``source``, ``names``, ``ax`` or ``logy`` is not what it must be.
    """
    rows = _rows(source)
    is_names = isinstance(names, str) or (isinstance(names, Iterable) and not isinstance(names, Mapping))
    wanted = [names] if isinstance(names, str) else list(names) if is_names else []
    if not wanted or not all(isinstance(n, str) for n in wanted):
        raise base.HyperparameterError(
            f"names must be a record's name (a str) or a non-empty list of them, got {names!r}."
        )
    if ax is not None and not callable(getattr(ax, "plot", None)):
        raise base.HyperparameterError(
            f"ax must be a matplotlib Axes (or None: a new figure's), got {ax!r} of type {type(ax).__name__}."
        )
    base.check_flag("logy", logy)
    plt = _require("matplotlib.pyplot", "demo")
    available = list(dict.fromkeys(name for _, records in rows for name in records))  # every row's, in order
    chosen: list[str] = []
    for name in wanted:
        if name.endswith("*"):
            match = [n for n in available if n.startswith(name[:-1])]
        else:
            match = [name] if name in available else []
        if not match:
            raise KeyError(f"No record is named {name!r}; the records are {available}.")
        chosen += [n for n in match if n not in chosen]
    if ax is None:
        _, ax = plt.subplots()
    steps = [step for step, _ in rows]
    for name in chosen:
        values = [records.get(name, math.nan) for _, records in rows]
        ax.plot(steps, values, label=name)
    if logy:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step")
    if len(chosen) == 1:
        ax.set_ylabel(chosen[0])
    else:
        ax.legend(fontsize="small")
    return ax


__all__ = ["CsvWriter", "TensorBoardWriter", "WandbWriter", "Writer", "load_records", "plot_records"]
