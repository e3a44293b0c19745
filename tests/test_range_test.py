"""adaopt.range_test against torch-lr-finder 0.2.2 on one small MLP: the same learning rates (bit for bit),
smoothed losses (to 1e-10 in float64), stopping iteration and suggested learning rate, with SGD, Adam and
Prodigy (whose step is not linear in the learning rate), exponential and linear sweeps, a few smoothing
factors, validation batches (stacked, or a loader's with a shorter last batch) and gradient accumulation; an optimizer given built, batches given as a
function; the stop on a non-finite loss; the loss passed to the optimizer; the settings refused with a clear error; the plot."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import prodigyopt
import pytest
import torch
import torch_lr_finder

import adaopt

matplotlib.use("Agg")  # torch-lr-finder's plot draws with pyplot: no window in a test
import matplotlib.pyplot as plt

BATCH = 8
TRAIN_BATCHES = 8  # the tests run more iterations than this: the loader restarts, the batches cycle
VAL_BATCHES = 3


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * (TRAIN_BATCHES + VAL_BATCHES), 4))
    y = np.sin(x @ rng.normal(size=(4, 1))) + 0.1 * rng.normal(size=(len(x), 1))
    split = BATCH * TRAIN_BATCHES
    return {"x": x[:split], "y": y[:split], "val_x": x[split:], "val_y": y[split:]}


DATA = _data()


def _torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def _params() -> dict[str, jax.Array]:
    """The torch model's initial weights, as JAX parameters (float64)."""
    first, _, second = _torch_model()
    weights = {"w1": first.weight.T, "b1": first.bias, "w2": second.weight.T, "b2": second.bias}
    return {k: jnp.asarray(v.detach().numpy()) for k, v in weights.items()}


def loss_fn(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    out = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


def _stacked(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The loader's batches in its order (shuffle=False), stacked on a leading axis."""
    return x.reshape(-1, BATCH, x.shape[-1]), y.reshape(-1, BATCH, y.shape[-1])


@dataclasses.dataclass(frozen=True)
class Case:
    optimizer: str  # "sgd" (momentum 0.9) or "adam"
    step_mode: str
    smooth_f: float
    diverge_th: float
    start_lr: float
    end_lr: float
    num_iter: int = 60
    accumulation_steps: int = 1
    validation: bool = False
    val_batch_size: int | None = None  # validation by a loader of this batch size (the last batch shorter)
    val_drop_last: bool = False  # that loader drops its last batch (torch-lr-finder still divides by all examples)
    batches_as_function: bool = False  # batches(k) rather than a stacked pytree

    def settings(self) -> dict[str, Any]:
        return {
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "num_iter": self.num_iter,
            "step_mode": self.step_mode,
            "smooth_f": self.smooth_f,
            "diverge_th": self.diverge_th,
            "accumulation_steps": self.accumulation_steps,
        }


FACTORIES = {"sgd": functools.partial(adaopt.sgd, momentum=0.9), "adam": adaopt.adam, "prodigy": adaopt.prodigy}
# The learning rate given here is replaced by start_lr (torch-lr-finder sets it in the parameter group).
TORCH = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1.0, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1.0),
    "prodigy": lambda params: prodigyopt.Prodigy(params, lr=1.0),
}

CASES = {
    "sgd-exp": Case("sgd", "exp", smooth_f=0.05, diverge_th=5.0, start_lr=1e-4, end_lr=10.0),
    "sgd-linear-unsmoothed": Case("sgd", "linear", smooth_f=0.0, diverge_th=5.0, start_lr=1e-3, end_lr=1.0),
    "adam-exp": Case("adam", "exp", smooth_f=0.3, diverge_th=3.0, start_lr=1e-4, end_lr=10.0),
    "adam-linear": Case("adam", "linear", smooth_f=0.05, diverge_th=5.0, start_lr=1e-3, end_lr=1.0),
    "adam-exp-accumulated": Case(
        "adam",
        "exp",
        smooth_f=0.05,
        diverge_th=5.0,
        start_lr=1e-4,
        end_lr=10.0,
        accumulation_steps=3,
        batches_as_function=True,
    ),
    "sgd-exp-validation": Case(
        "sgd", "exp", smooth_f=0.05, diverge_th=5.0, start_lr=1e-4, end_lr=10.0, validation=True
    ),
    # 24 validation points in batches of 5: the last one holds 4, and weighs 4/24
    "adam-exp-validation-loader": Case(
        "adam", "exp", smooth_f=0.05, diverge_th=5.0, start_lr=1e-4, end_lr=10.0, validation=True, val_batch_size=5
    ),
    # Prodigy's estimate of the step size sums the learning rates it was given: not linear in them.
    "prodigy-exp": Case("prodigy", "exp", smooth_f=0.05, diverge_th=5.0, start_lr=1e-2, end_lr=100.0),
}
# The same loader dropping its last batch: 20 points evaluated, their weighted sum over 24 (the dataset's).
CASES["adam-exp-validation-loader-drop-last"] = dataclasses.replace(
    CASES["adam-exp-validation-loader"], val_drop_last=True
)
NOT_DIVERGING = {"adam-linear"}


def _loader(
    x: np.ndarray, y: np.ndarray, batch_size: int = BATCH, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


@functools.cache
def torch_run(case: Case) -> tuple[list[float], list[float], float | None]:
    """torch-lr-finder's learning rates, smoothed losses and suggestion (None when too few iterations)."""
    model = _torch_model()
    finder = torch_lr_finder.LRFinder(model, TORCH[case.optimizer](model.parameters()), torch.nn.MSELoss())
    val_loader = None
    if case.validation:
        val_loader = _loader(DATA["val_x"], DATA["val_y"], case.val_batch_size or BATCH, case.val_drop_last)
    finder.range_test(_loader(DATA["x"], DATA["y"]), val_loader=val_loader, **case.settings())
    suggestion = None
    if len(finder.history["lr"]) >= 10 + 5 + 2:
        _, ax = plt.subplots()
        _, suggestion = finder.plot(skip_start=10, skip_end=5, ax=ax, suggest_lr=True)
        plt.close(ax.figure)
    return finder.history["lr"], finder.history["loss"], suggestion


@functools.cache
def adaopt_run(case: Case) -> adaopt.RangeTestResult:
    x, y = _stacked(DATA["x"], DATA["y"])
    with jax.enable_x64(True):
        if case.batches_as_function:  # batch k (of iteration k // accumulation_steps), cycled as the loader is
            batches: Any = lambda k: (jnp.asarray(x)[k % len(x)], jnp.asarray(y)[k % len(y)])
        else:
            batches = (x, y)
        validation: dict[str, Any] = {}
        if case.val_batch_size is not None:  # the very loader torch-lr-finder reads: [x, y] torch tensors
            validation["val_loader"] = _loader(DATA["val_x"], DATA["val_y"], case.val_batch_size, case.val_drop_last)
        elif case.validation:
            validation["val_batches"] = _stacked(DATA["val_x"], DATA["val_y"])
        return adaopt.range_test(
            loss_fn, _params(), FACTORIES[case.optimizer], batches, **validation, **case.settings()
        )


def assert_matches_torch(result: adaopt.RangeTestResult, case: Case) -> None:
    lrs, smoothed, suggestion = torch_run(case)
    np.testing.assert_array_equal(result.learning_rates, lrs)  # bit for bit: also the stopping iteration
    np.testing.assert_allclose(result.smoothed_losses, smoothed, rtol=1e-10, atol=0)
    assert result.diverged_at == (len(lrs) - 1 if len(lrs) < case.num_iter else None)
    if suggestion is not None:
        assert result.suggest_lr() == suggestion


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_lr_finder(name: str) -> None:
    case = CASES[name]
    result = adaopt_run(case)
    assert_matches_torch(result, case)
    assert result.smoothed_losses.dtype == np.float64


def test_the_cases_diverge_and_suggest() -> None:
    """The comparisons above cover a stop by divergence (and a full run) and the suggestion."""
    diverging = {name for name, case in CASES.items() if len(torch_run(case)[0]) < case.num_iter}
    assert diverging == set(CASES) - NOT_DIVERGING
    assert all(torch_run(case)[2] is not None for case in CASES.values())


def test_a_wrong_setting_is_caught() -> None:
    """The comparison can fail: torch-lr-finder's run with other smoothing, or another data order, differs."""
    case = CASES["sgd-exp"]
    with pytest.raises(AssertionError):
        assert_matches_torch(adaopt_run(dataclasses.replace(case, smooth_f=0.1)), case)
    with jax.enable_x64(True):
        x, y = _stacked(DATA["x"], DATA["y"])
        reordered = adaopt.range_test(loss_fn, _params(), FACTORIES["sgd"], (x[::-1], y[::-1]), **case.settings())
    with pytest.raises(AssertionError):
        assert_matches_torch(reordered, case)


def test_losses_are_the_ones_smoothed() -> None:
    """The raw losses: the first at the initial parameters on the first batch, and smoothed as torch-lr-finder does."""
    case = CASES["sgd-exp"]
    result = adaopt_run(case)
    with jax.enable_x64(True):
        x, y = _stacked(DATA["x"], DATA["y"])
        np.testing.assert_allclose(result.losses[0], loss_fn(_params(), (x[0], y[0])), rtol=1e-15)
    smoothed = [float(result.losses[0])]
    for loss in result.losses[1:]:
        smoothed.append(case.smooth_f * loss + (1 - case.smooth_f) * smoothed[-1])
    np.testing.assert_allclose(result.smoothed_losses, smoothed, rtol=1e-15, atol=0)  # XLA may fuse a * b + c
    unsmoothed = adaopt_run(CASES["sgd-linear-unsmoothed"])
    np.testing.assert_array_equal(unsmoothed.smoothed_losses, unsmoothed.losses)


def test_a_bfloat16_loss_is_smoothed_in_float32() -> None:
    """A bfloat16 model's loss (here: the batch's value, 100 falling slowly) is smoothed as torch-lr-finder smooths
    Python floats. In bfloat16 the smoothed loss stayed at 100 until a step of 5% (its half ulp over f), a staircase."""
    falling = jnp.linspace(100.0, 80.0, 40).astype(jnp.bfloat16)
    result = adaopt.range_test(
        lambda p, b: (b + 0 * p).astype(jnp.bfloat16), jnp.zeros((), jnp.bfloat16), adaopt.sgd, falling, num_iter=40
    )
    smoothed = [float(falling[0])]
    for loss in np.asarray(falling[1:], np.float64):
        smoothed.append(0.05 * loss + 0.95 * smoothed[-1])
    np.testing.assert_allclose(result.smoothed_losses, smoothed, rtol=1e-6)


def _quadratic(params: jax.Array, batch: jax.Array) -> jax.Array:
    return jnp.sum(jnp.arange(1.0, 4.0) * (params - batch) ** 2)


@functools.cache
def quadratic_run(optimizer: Any) -> adaopt.RangeTestResult:
    batches = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    return adaopt.range_test(_quadratic, jnp.zeros(3), optimizer, batches, start_lr=1e-3, end_lr=10.0, num_iter=30)


@pytest.mark.parametrize(("factory", "linear"), [(adaopt.adam, True), (adaopt.prodigy, False)])
def test_built_optimizer_is_scaled_by_the_learning_rate(factory: Any, linear: bool) -> None:
    """Built with learning_rate=1, its updates times the sweep's rate: the same test as with the factory for an
    optimizer whose step is linear in the learning rate (Adam), another for one whose step is not (Prodigy)."""
    built, made = quadratic_run(factory(1.0)), quadratic_run(factory)
    n = min(len(built.learning_rates), len(made.learning_rates))
    assert n > 10
    assert np.allclose(built.smoothed_losses[:n], made.smoothed_losses[:n], rtol=1e-6) == linear


class _OwnTransformation:
    """A gradient transformation that is no optax type: an object with ``init`` and ``update``."""

    def __init__(self, inner: optax.GradientTransformation) -> None:
        self.inner = inner

    def init(self, params: Any) -> Any:
        return self.inner.init(params)

    def update(self, updates: Any, state: Any, params: Any = None) -> Any:
        return self.inner.update(updates, state, params)


def test_a_transformation_of_another_class_is_scaled_as_a_built_one() -> None:
    """Told from a factory by its init and update, as the wrappers tell it; it was refused as no factory."""
    own = quadratic_run(_OwnTransformation(adaopt.adam(1.0)))
    np.testing.assert_array_equal(own.smoothed_losses, quadratic_run(adaopt.adam(1.0)).smoothed_losses)


def _sqrt_loss(params: jax.Array, batch: jax.Array) -> jax.Array:
    return jnp.sqrt(params) + 0.0 * batch  # NaN once a step takes the parameter below 0


def test_stops_at_a_non_finite_loss() -> None:
    """Where torch-lr-finder would run on with NaN (NaN > threshold is False), the test stops."""
    result = adaopt.range_test(
        _sqrt_loss, jnp.array(1.0), adaopt.sgd, jnp.zeros(1), start_lr=1e-2, end_lr=10.0, num_iter=40, diverge_th=1e9
    )
    assert result.diverged_at is not None and result.diverged_at < 39
    assert np.isnan(result.losses[-1]) and np.isfinite(result.losses[:-1]).all()
    assert np.all(np.diff(result.smoothed_losses[:-1]) < 0)  # no stop by the threshold before


def test_the_suggestion_leaves_a_non_finite_loss_out() -> None:
    """With skip_end 0 the loss that stopped the test is in the suggestion's window: np.argmin of a gradient with a
    NaN picks the NaN's neighbour (torch-lr-finder's choice with those losses), not the steepest descent."""
    losses = np.asarray([1.0, 0.9, 0.5, 0.45, 0.44, 0.43, np.nan])
    lrs = np.geomspace(1e-4, 1.0, len(losses))
    result = adaopt.RangeTestResult(lrs, losses, losses, diverged_at=6, step_mode="exp")
    assert result.suggest_lr(0, 0) == lrs[int(np.argmin(np.gradient(losses[:-1])))] == lrs[1]
    ax = result.plot(skip_start=0, skip_end=0)  # and the plot marks it (it marked the NaN's neighbour)
    try:
        assert ax.collections[0].get_offsets()[0][0] == lrs[1]
    finally:
        plt.close(ax.figure)
    result = adaopt.RangeTestResult(lrs[:2], losses[5:], losses[5:], diverged_at=1, step_mode="exp")
    with pytest.raises(ValueError, match="too few finite losses"):
        result.suggest_lr(0, 0)


def test_passes_the_loss_to_the_optimizer() -> None:
    """A loss-driven optimizer (which needs update(..., value=loss)) runs, and finds the minimum."""
    quadratic = lambda p, b: jnp.sum((p - b) ** 2)
    result = adaopt.range_test(
        quadratic, jnp.zeros(2), adaopt.polyak_sgd, jnp.ones((1, 2)), start_lr=1e-3, end_lr=1.0, num_iter=20
    )
    assert result.losses[0] == 2.0 and result.losses[-1] < 1e-2


X = jnp.zeros((4, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start_lr": 0.0}, adaopt.HyperparameterError, r"start_lr must be a finite number in \(0.0, inf\), got 0.0"),
        ({"start_lr": 1.0, "end_lr": 1.0}, adaopt.HyperparameterError, "end_lr must be greater than start_lr"),
        ({"num_iter": 1}, adaopt.HyperparameterError, r"num_iter must be an integer in \[2, "),
        ({"num_iter": 10.0}, adaopt.HyperparameterError, "num_iter must be an integer"),
        ({"step_mode": "cos"}, adaopt.HyperparameterError, r"step_mode must be one of \('exp', 'linear'\), got 'cos'"),
        ({"smooth_f": 1.0}, adaopt.HyperparameterError, r"smooth_f must be a finite number in \[0.0, 1.0\)"),
        ({"smooth_f": -0.1}, adaopt.HyperparameterError, "smooth_f"),
        ({"diverge_th": 1.0}, adaopt.HyperparameterError, r"diverge_th must be a finite number in \(1.0, inf\)"),
        ({"accumulation_steps": 0}, adaopt.HyperparameterError, "accumulation_steps must be an integer in"),
        ({"batches": (X, jnp.zeros((3, 1)))}, ValueError, r"share a leading axis.*\(4, 1\), \(3, 1\)"),
        ({"batches": jnp.float32(1.0)}, ValueError, "share a leading axis"),
        ({"val_batches": {"x": jnp.zeros(())}}, ValueError, "val_batches must be a pytree of arrays"),
        (
            {"val_loader": [X[0], jnp.zeros(())]},
            ValueError,
            r"val_loader's batch 1 must be a pytree of arrays.*\[\(\)\]",
        ),
        ({"val_loader": iter([])}, ValueError, "val_loader yielded no batches"),
        ({"val_loader": [X[0]], "val_batches": X}, ValueError, "val_batches .* or val_loader .*, not both"),
        ({"optimizer": 0.1}, TypeError, "optimizer must be a factory taking learning_rate"),
        ({"optimizer": lambda: optax.sgd(0.1)}, TypeError, r"calling it as optimizer\(learning_rate=schedule\) failed"),
        ({"loss_fn": None}, TypeError, "loss_fn must be a function"),
    ],
)
def test_refuses_bad_settings(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments = {"loss_fn": _sqrt_loss, "params": jnp.array(1.0), "optimizer": adaopt.sgd, "batches": X} | kwargs
    with pytest.raises(error, match=match):
        adaopt.range_test(**arguments)


def test_suggestion_needs_enough_iterations() -> None:
    result = adaopt_run(CASES["sgd-exp"])
    n = len(result.learning_rates)
    assert result.suggest_lr(skip_start=n - 2, skip_end=0) in result.learning_rates[-2:]
    with pytest.raises(ValueError, match=f"Need at least skip_start \\+ skip_end \\+ 2 = {n + 1} .* got {n}"):
        result.suggest_lr(skip_start=n - 1, skip_end=0)
    with pytest.raises(adaopt.HyperparameterError, match="skip_end must be an integer"):
        result.suggest_lr(skip_end=-1)


@pytest.mark.parametrize("name", ["adam-exp", "adam-linear"])
def test_plot(name: str) -> None:
    """The smoothed losses between the skipped ends, a log axis for an exponential sweep, the suggestion marked."""
    result = adaopt_run(CASES[name])
    ax = result.plot()
    try:
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), result.learning_rates[10:-5])
        np.testing.assert_array_equal(line.get_ydata(), result.smoothed_losses[10:-5])
        assert ax.get_xscale() == ("log" if CASES[name].step_mode == "exp" else "linear")
        (marker,) = ax.collections
        assert marker.get_offsets()[0][0] == result.suggest_lr()
        assert f"{result.suggest_lr():.2e}" in ax.get_legend().get_texts()[0].get_text()
        assert not result.plot(ax=ax, suggest=False, log_lr=False).collections[1:]  # drawn in the given axes
    finally:
        plt.close(ax.figure)


@pytest.mark.parametrize("val_loader", [3, "batches", {"x": np.ones((2, 4))}])
def test_a_val_loader_that_is_no_iterable_of_batches_is_named(val_loader: Any) -> None:
    loss_fn = lambda p, b: jnp.mean((p - b) ** 2)
    with pytest.raises(adaopt.HyperparameterError, match=r"^val_loader must be None or an iterable of validation"):
        adaopt.range_test(loss_fn, jnp.zeros(4), adaopt.sgd, jnp.ones((5, 4)), num_iter=5, val_loader=val_loader)


def test_an_iterable_of_batches_is_read_as_far_as_the_test_needs() -> None:
    """A generator of batches (a torch loader's form) was taken for one pytree leaf ("leaves of shapes [()]"): its
    first num_iter * accumulation_steps batches are read, cycled when it ends sooner, as the stacked batches."""
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(30, 8, 3)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    loss_fn = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
    params = {"w": jnp.zeros(3)}
    read = []

    def loader(n: int):
        for i in range(n):
            read.append(i)
            yield xs[i], ys[i]

    for n, accumulation in ((30, 2), (5, 1)):
        ours = adaopt.range_test(loss_fn, params, adaopt.adam, loader(n), num_iter=12, accumulation_steps=accumulation)
        stacked = adaopt.range_test(
            loss_fn, params, adaopt.adam, (xs[: min(n, 24)], ys[: min(n, 24)]), num_iter=12,
            accumulation_steps=accumulation,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(ours.losses), np.asarray(stacked.losses))
        assert len(read) == min(n, 12 * accumulation)
        read.clear()
    with pytest.raises(ValueError, match="batches yielded no batch"):
        adaopt.range_test(loss_fn, params, adaopt.adam, loader(0), num_iter=12)


def test_a_list_of_batches_is_stacked() -> None:
    """[(x, y), ...] (a torch loader's list) was read as one pytree whose leading axis is the examples: the loss got
    a list of tuples and failed. A list of arrays stays the stacked form; batches of two sizes are named."""
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(4, 8, 3)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    loss_fn = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
    params = {"w": jnp.zeros(3)}
    listed = adaopt.range_test(loss_fn, params, adaopt.adam, list(zip(xs, ys, strict=True)), num_iter=12)
    stacked = adaopt.range_test(loss_fn, params, adaopt.adam, (xs, ys), num_iter=12)
    np.testing.assert_array_equal(np.asarray(listed.losses), np.asarray(stacked.losses))
    as_list = adaopt.range_test(loss_fn, params, adaopt.adam, [xs, ys], num_iter=12)  # a list of stacked parts
    np.testing.assert_array_equal(np.asarray(as_list.losses), np.asarray(stacked.losses))
    with pytest.raises(ValueError, match=r"list of 2 batches of different shapes.*drop_last=True"):
        adaopt.range_test(loss_fn, params, adaopt.adam, [(xs[0], ys[0]), (xs[1, :5], ys[1, :5])], num_iter=12)
