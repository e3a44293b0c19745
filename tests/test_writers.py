"""The writers: a monitor's records written to TensorBoard event files, CSV and an offline
Weights & Biases run, and read back from each with the libraries' own formats; the plot; the
error for a missing extra."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import psutil
import pytest

import adaopt

matplotlib.use("Agg")


def _steps() -> list[tuple[int, dict[str, float]]]:
    """Three recordings of a monitored Adam, as a training loop would write them."""
    tx = adaopt.monitor(adaopt.adam(1e-2), every=1)
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for step in range(3):
        grads = {"w": jnp.arange(4.0) - step, "b": jnp.full(2, 0.5 + step)}
        _, state = update(grads, state, params)
        out.append((step * 10, adaopt.read_records(state)))
    return out


STEPS = _steps()


def _events(folder: Path) -> list[tuple[str, int, float]]:
    """The scalars of the one event file in ``folder``: (tag, step, value), as written."""
    from tensorboardX.proto import event_pb2

    (event_file,) = folder.glob("events.out.tfevents.*")
    found = []
    data = event_file.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord framing: length, its CRC, the event, its CRC
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 16 + length
        found += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return found


def test_tensorboard_event_files_hold_the_records(tmp_path: Path) -> None:
    with adaopt.TensorBoardWriter(tmp_path) as writer:
        for step, records in STEPS:
            writer.write(step, records)
    found: dict[str, dict[int, float]] = {}
    for tag, step, value in _events(tmp_path):
        found.setdefault(tag, {})[step] = value
    for step, records in STEPS:
        for name, value in records.items():
            assert found[name][step] == pytest.approx(value, rel=1e-6), (name, step)
    assert set(found) == set(STEPS[0][1])


def test_names_tensorboard_would_merge_keep_tags_of_their_own(tmp_path: Path) -> None:
    """tensorboardX replaces a tag's characters outside [-/\\w.] by "_": "emb table" and "emb_table" were written
    as one tag, two values at one step, of which TensorBoard shows one."""
    names = ["grad_norm/emb table", "grad_norm/emb_table", "grad_norm/emb~table", "/lead", "lead"]
    with adaopt.TensorBoardWriter(tmp_path) as writer:
        writer.write(0, {name: float(i) for i, name in enumerate(names)})
        writer.write(1, {name: 10.0 + i for i, name in enumerate(reversed(names))})  # the tags stay
        tags = [writer.tag(name) for name in names]
    assert tags == ["grad_norm/emb_table", "grad_norm/emb_table_2", "grad_norm/emb_table_3", "lead", "lead_2"]
    events = _events(tmp_path)
    assert len({(tag, step) for tag, step, _ in events}) == len(events) == 2 * len(names)
    values = {(tag, step): value for tag, step, value in events}
    assert [values[tag, 0] for tag in tags] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [values[tag, 1] for tag in tags] == [14.0, 13.0, 12.0, 11.0, 10.0]


def test_csv_round_trip_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    with adaopt.CsvWriter(path) as writer:
        for step, records in STEPS:
            writer.write(step, records)
    assert adaopt.load_records(path) == STEPS  # every digit
    with adaopt.CsvWriter(tmp_path / "other.csv") as writer:
        writer.write(0, {"a": 1.0})
        with pytest.raises(ValueError, match=r"missing \['a'\], new \['b'\]"):
            writer.write(1, {"b": 1.0})
    step_named = pytest.raises(ValueError, match=r"A record is named 'step', the name of the CSV's first column")
    with adaopt.CsvWriter(tmp_path / "step.csv") as writer, step_named:  # record_norm("step") overwrote the steps
        writer.write(7, {"step": 4.2})

    ax = adaopt.plot_records(path, ["effective_lr/*", "grad_norm"])
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"effective_lr/b", "effective_lr/w", "grad_norm"}
    np.testing.assert_allclose(lines["grad_norm"].get_ydata(), [r["grad_norm"] for _, r in STEPS])
    np.testing.assert_array_equal(lines["grad_norm"].get_xdata(), [0, 10, 20])
    single = adaopt.plot_records(STEPS, "rate_rms")  # from the records themselves
    assert single.get_ylabel() == "rate_rms"
    with pytest.raises(KeyError, match=r"No record is named 'nope'; the records are"):
        adaopt.plot_records(STEPS, "nope")
    names = (name for name in ["grad_norm", "rate_rms"])  # any iterable of names
    assert len(adaopt.plot_records(STEPS, names).get_lines()) == 2


def test_csv_takes_the_names_in_any_order_and_plots_take_names_of_later_rows(tmp_path: Path) -> None:
    """A dict's order is not a record's identity: the same names in another order were refused ("missing [], new
    []"); a record first written at a later step (a validation loss every 10 steps) was "no record" to plot."""
    path = tmp_path / "records.csv"
    with adaopt.CsvWriter(path) as writer:
        writer.write(0, {"loss": 1.0, "grad_norm": 2.0})
        writer.write(1, {"grad_norm": 2.5, "loss": 0.5})
    assert adaopt.load_records(path) == [(0, {"loss": 1.0, "grad_norm": 2.0}), (1, {"loss": 0.5, "grad_norm": 2.5})]
    rows = [(0, {"loss": 1.0}), (10, {"loss": 0.5, "val_loss": 0.7}), (20, {"loss": 0.4, "val_loss": 0.6})]
    (line,) = adaopt.plot_records(rows, "val_loss").get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [np.nan, 0.7, 0.6])


def test_load_records_refuses_a_file_descriptor_and_leaves_it_open(tmp_path: Path) -> None:
    """open() takes an int as a file descriptor, and closed it: load_records(1) closed the process's stdout."""
    fd = os.dup(1)
    try:
        with pytest.raises(adaopt.HyperparameterError, match=r"^path must be a path \(a str or an os.PathLike"):
            adaopt.load_records(fd)  # type: ignore[arg-type]
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    with adaopt.CsvWriter(str(tmp_path / "r.csv")) as writer:  # a str and a pathlib.Path both read back
        writer.write(0, {"a": 1.0})
    assert adaopt.load_records(str(tmp_path / "r.csv")) == adaopt.load_records(tmp_path / "r.csv") == [(0, {"a": 1.0})]


def test_a_writer_names_its_path_argument() -> None:
    with pytest.raises(adaopt.HyperparameterError, match=r"^path must be a path .*got None"):
        adaopt.CsvWriter(None)  # type: ignore[arg-type]
    with pytest.raises(adaopt.HyperparameterError, match=r"^logdir must be a path .*got None"):
        adaopt.TensorBoardWriter(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        (STEPS, {"names": [0.5]}, r"^names must be a record's name \(a str\) or a non-empty list of them, got \[0.5\]"),
        (STEPS, {"names": None}, r"^names must be .*got None"),
        (STEPS, {"names": []}, r"^names must be .*got \[\]"),
        (STEPS, {"names": "rate_rms", "ax": "abc"}, r"^ax must be a matplotlib Axes .*got 'abc'"),
        (STEPS, {"names": "rate_rms", "logy": "no"}, r"^logy must be True or False, got 'no'"),
        ({"a": 1.0}, {"names": "a"}, r"^source must be .*got \{'a': 1.0\} of type dict \(one step's records"),
        ([(0, 1.0)], {"names": "a"}, r"^source must be .*got \(0, 1.0\) among them"),
        (3, {"names": "a"}, r"^source must be .*got 3 of type int"),
    ],
)
def test_plot_records_names_a_bad_argument(source: Any, kwargs: dict[str, Any], match: str) -> None:
    """Each failed with an AttributeError or an unpacking error, or (logy) was taken for its truth."""
    with pytest.raises(adaopt.HyperparameterError, match=match):
        adaopt.plot_records(source, **kwargs)
    assert adaopt.plot_records(STEPS, "rate_rms", logy=np.bool_(True)).get_yscale() == "log"


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history records of a ``.wandb`` file: a LevelDB-format log (32 KiB blocks of chunks with a
    7-byte header) of ``wandb_internal_pb2.Record`` protobufs, after wandb's 7-byte file header."""
    import json

    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    offset, pending, history = 7, b"", {}
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                history[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_wandb_offline_run_holds_the_records_and_leaves_no_process(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with adaopt.WandbWriter(project="adaopt-test") as writer:
        for step, records in STEPS:
            writer.write(step, records)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # wandb's service stopped with the run
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    assert history == {step: pytest.approx(records) for step, records in STEPS}


def test_a_missing_extra_says_what_to_install(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what an uninstalled module imports as
    with pytest.raises(ImportError, match=r"pip install adaopt\[tensorboard\]"):
        adaopt.TensorBoardWriter(os.devnull)
