r"""Hyperparameter sweeps in one compiled program: grid, random and Bayesian search, and successive halving.

Every numeric hyperparameter of an adaopt factory can be a traced scalar (that is how
``inject_hyperparams`` and ``jax.grad`` with respect to the learning rate work). A sweep uses it:
the factory is called *inside* the compiled training program with each trial's hyperparameters,
and ``jax.vmap`` runs the trials side by side as the lanes of one program. One compilation trains
every configuration; a new set of configurations (the next Optuna round, the survivors of a
halving rung) reuses it.

The pieces:

- a **search space**, a dict from the factory's argument names to a :class:`~adaopt.Range`
  (continuous, uniform or log-uniform) or to a sequence of numbers (discrete);
- **configurations**, one array of values per name, one entry per trial:
  :func:`grid_configs` (the product of the values) and :func:`random_configs` (seeded draws);
- :class:`Sweep`, which holds the compiled programs of one optimizer and one problem and trains
  configurations (:meth:`Sweep.run`, with successive halving on request) or lets Optuna choose
  them (:meth:`Sweep.optuna`); :func:`sweep` and :func:`optuna_sweep` build one and call it;
- a :class:`SweepResult`: the best configuration, every trial's metric and curve, a text
  :meth:`~SweepResult.table` and a :meth:`~SweepResult.plot`.

**The compiled programs.** A :class:`Sweep` compiles two programs per *width* (the number of
lanes): one that builds each lane's optimizer state (and its initial parameters, from a seed) and
one that trains every lane for ``eval_every`` steps from its current parameters and state, then
evaluates it. The host loop calls the second one ``steps / eval_every`` times. How trials map to
lanes is ``lanes``:

- ``lanes=None`` (the default): all live trials in one call. The first width is the number of
  trials :math:`n`; at each halving the survivors are gathered into the next power of two (the
  extra lanes repeat a trial and are discarded): at most :math:`\lceil \log_2 n \rceil + 1`
  widths, each compiled once (``Sweep.compilations`` counts them).
- ``lanes=W``: blocks of exactly ``W`` lanes, as many calls per chunk as blocks: one width
  whatever the rung, the least compilation, at the cost of ``n / W`` calls per chunk.

Measured on a CPU (``benchmarks/tuning.py``, the convergence workloads, 2 cores): compilation
dominates these small problems (2 to 6 s against 0.2 to 2 s of training), each lane costs about
as much as a run of its own (more, for a small transformer: 8 vmapped lanes ran 14 times as long
as one), so ``lanes=1`` with halving is the fastest there: one compilation, and the steps of the
stopped trials are saved. On an accelerator extra lanes are nearly free: the default fills them.

**Divergence.** A trial whose metric, or any parameter, is ever NaN or infinite is marked
diverged: it ranks after every finite trial, is dropped first by halving, and never stops the
sweep (its lanes compute NaN like any other number).

Example:
  >>> import jax, jax.numpy as jnp, adaopt
  >>> loss = lambda params, batch: jnp.sum((params - batch) ** 2)
  >>> configs = adaopt.grid_configs({"learning_rate": [0.01, 0.1, 0.3], "b1": [0.0, 0.9]})
  >>> result = adaopt.sweep(adaopt.adam, configs, loss, jnp.zeros(3), jnp.ones((50, 3)), eval_every=10)
  >>> result.best_config
  {'learning_rate': 0.3, 'b1': 0.0}
  >>> result.curves.shape  # six trials, five evaluations
  (6, 5)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base, moments
from adaopt._src.registry import OptimizerSpec, Range
from adaopt._src.tuning_free.schedule_free import ScheduleFreeState, schedule_free_eval_params
from adaopt._src.wrappers.hyperparams import is_static

Space = Mapping[str, "Range | Sequence[float]"]
"""A search space: a factory argument's name -> a :class:`~adaopt.Range` or a sequence of numbers."""
Configs = dict[str, np.ndarray]
"""Configurations: a factory argument's name -> one value per trial (1-d arrays of one length)."""
Mode = Literal["min", "max"]

# ---------------------------------------------------------------------------------------------
# Search spaces and configurations.


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_space(space: Any) -> dict[str, Range | tuple[float, ...]]:
    """The space with each discrete entry as a tuple of floats; a ``HyperparameterError`` for a bad entry."""
    if not isinstance(space, Mapping) or not space:
        raise base.HyperparameterError(
            f"space must be a non-empty dict of hyperparameter names to a Range or a list of numbers, got {space!r}."
        )
    checked: dict[str, Range | tuple[float, ...]] = {}
    for name, values in space.items():
        if not isinstance(name, str):
            raise base.HyperparameterError(f"space's keys must be argument names (str), got {name!r}.")
        if isinstance(values, Range):  # checked when it was made
            checked[name] = values
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
            raise base.HyperparameterError(
                f"space[{name!r}] must be a Range or a list of numbers, got {values!r} of type {type(values).__name__}."
            )
        items = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else list(values)
        bad = [v for v in items if not _is_number(v)]
        if not items or bad:
            raise base.HyperparameterError(
                f"space[{name!r}] must hold at least one finite number and only numbers (options such as dtypes, "
                f"masks and flags go in fixed=), got {values!r}."
            )
        checked[name] = tuple(float(v) for v in items)
    return checked


def _range_points(name: str, r: Range, points: int | Mapping[str, int] | None) -> np.ndarray:
    n = points.get(name) if isinstance(points, Mapping) else points
    if n is None:
        raise base.HyperparameterError(
            f"space[{name!r}] is a Range: a grid needs its number of points, e.g. grid_configs(space, points=5) "
            f"or points={{{name!r}: 5}}."
        )
    base.check_integer(f"points for {name!r}", n, 1)
    if n == 1:
        return np.asarray([math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2])
    return np.geomspace(r.low, r.high, n) if r.log else np.linspace(r.low, r.high, n)


def grid_configs(space: Space, points: int | Mapping[str, int] | None = None) -> Configs:
    """Every combination of the space's values: the grid search's configurations.

    The first name varies slowest (``itertools.product``'s order). A :class:`~adaopt.Range` becomes
    ``points`` values from ``low`` to ``high``, both included, evenly spaced (geometrically for
    ``log=True``); one point is the middle.

    Args:
      space: name -> a list of numbers, or a :class:`~adaopt.Range`.
      points: the number of values of each Range: one number for all, or a dict per name.

    Returns:
      name -> a float64 array of one value per configuration.

    Raises:
      HyperparameterError: an empty space, an empty or non-numeric list, a Range with ``low >= high``
        (or ``low <= 0`` on a log scale), or a Range without a number of points.

    Example:
      >>> import adaopt
      >>> configs = adaopt.grid_configs({"learning_rate": adaopt.Range(1e-3, 1e-1, log=True), "b1": [0.0, 0.9]}, 3)
      >>> configs["learning_rate"].tolist(), configs["b1"].tolist()
      ([0.001, 0.001, 0.01, 0.01, 0.1, 0.1], [0.0, 0.9, 0.0, 0.9, 0.0, 0.9])
    """
    checked = _check_space(space)
    axes = {
        name: (_range_points(name, v, points) if isinstance(v, Range) else np.asarray(v, np.float64))
        for name, v in checked.items()
    }
    combos = np.asarray(list(itertools.product(*axes.values())), np.float64).reshape(-1, len(axes))
    return {name: combos[:, i].copy() for i, name in enumerate(axes)}


SEED_MAX = 2**32 - 1  # Optuna's samplers' too (NumPy's RandomState)


def check_seed(seed: Any) -> None:
    base.check_integer("seed", seed, 0, SEED_MAX)


def random_configs(space: Space, n: int, seed: int = 0) -> Configs:
    """``n`` configurations drawn independently: the random search's.

    A :class:`~adaopt.Range` is drawn uniformly (log-uniformly for ``log=True``), a list uniformly
    among its values; each name draws its ``n`` values at once from one ``numpy`` generator seeded
    by ``seed``, in the space's order.

    Args:
      space: name -> a list of numbers, or a :class:`~adaopt.Range`.
      n: the number of configurations, >= 1.
      seed: the seed of the draws, an integer in [0, 2**32 - 1]: the same seed, the same configurations.

    Returns:
      name -> a float64 array of ``n`` values.

    Raises:
      HyperparameterError: a bad space (as :func:`grid_configs`), ``n < 1``, or a ``seed`` that is not an integer
        in [0, 2**32 - 1].

    Example:
      >>> import adaopt
      >>> configs = adaopt.random_configs({"learning_rate": adaopt.Range(1e-4, 1e-1, log=True), "b2": [0.99, 0.999]}, 4)
      >>> bool(((configs["learning_rate"] >= 1e-4) & (configs["learning_rate"] <= 1e-1)).all())
      True
      >>> sorted(set(configs["b2"].tolist())) <= [0.99, 0.999]
      True
    """
    checked = _check_space(space)
    base.check_integer("n", n, 1)
    check_seed(seed)
    rng = np.random.default_rng(seed)
    out: Configs = {}
    for name, v in checked.items():
        if isinstance(v, Range):
            u = rng.random(n)
            if v.log:
                out[name] = np.exp(np.log(v.low) + u * (np.log(v.high) - np.log(v.low)))
            else:
                out[name] = v.low + u * (v.high - v.low)
        else:
            out[name] = np.asarray(v, np.float64)[rng.integers(0, len(v), n)]
    return out


def search_space(spec: OptimizerSpec, learning_rate: Range | Sequence[float] | None = None) -> dict[str, Any]:
    """The registry's valid ranges of ``spec``'s numeric hyperparameters, and the learning rate's.

    Args:
      spec: a registry entry, e.g. ``adaopt.REGISTRY["adamw"]``.
      learning_rate: the learning rate's range or values (the registry does not hold one: a good
        learning rate depends on the model); None leaves it out.

    Returns:
      A search space for :func:`grid_configs`, :func:`random_configs` or :meth:`Sweep.optuna`.

    Raises:
      HyperparameterError: ``spec`` is not a registry entry, or ``learning_rate`` is neither a Range nor a list of
        numbers.

    Example:
      >>> import adaopt
      >>> sorted(adaopt.search_space(adaopt.REGISTRY["adam"], adaopt.Range(1e-4, 1e-2, log=True)))
      ['b1', 'b2', 'eps', 'learning_rate']
    """
    if not isinstance(spec, OptimizerSpec):
        name = getattr(spec, "__name__", None)
        hint = f" For the factory {name}, pass adaopt.REGISTRY[{name!r}]." if callable(spec) and name else ""
        raise base.HyperparameterError(
            f"spec must be a registry entry (an OptimizerSpec, e.g. adaopt.REGISTRY['adamw']), got {spec!r} of type "
            f"{type(spec).__name__}.{hint}"
        )
    space: dict[str, Any] = {} if learning_rate is None else {"learning_rate": learning_rate}
    if space:
        _check_space(space)  # what the grid or the draws would refuse later
    return {**space, **spec.hyperparameters}


# ---------------------------------------------------------------------------------------------
# The result.


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Every trial of a sweep: configurations, curves, which trials diverged or were stopped, and the best.

    Attributes:
      configs: name -> one value per trial (the swept hyperparameters; ``fixed`` ones are not here).
      curves: ``(trials, evaluations)``, the metric at each step of ``eval_steps``; NaN after a trial
        was stopped by halving (and wherever a diverged trial's metric is NaN).
      eval_steps: the step after which each evaluation was taken.
      steps: the steps each trial was trained (fewer than the budget for those stopped by halving).
      diverged: whether each trial's metric or parameters were ever NaN or infinite.
      mode: ``"min"`` (lower is better) or ``"max"``.
      best_params: the best trial's parameters after its last step (None when every trial diverged).
      seconds: the wall time of the sweep, compilation included.
      study: the Optuna study (:meth:`Sweep.optuna`), else None.
    """

    configs: Configs
    curves: np.ndarray
    eval_steps: np.ndarray
    steps: np.ndarray
    diverged: np.ndarray
    mode: Mode = "min"
    best_params: Any = None
    seconds: float = math.nan
    study: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.configs)

    @property
    def n_trials(self) -> int:
        return len(self.steps)

    @property
    def metrics(self) -> np.ndarray:
        """Each trial's metric at its last evaluation (NaN or infinite for some diverged trials)."""
        last = np.searchsorted(self.eval_steps, self.steps, side="right") - 1
        return self.curves[np.arange(self.n_trials), np.maximum(last, 0)]

    @property
    def order(self) -> np.ndarray:
        """The trials' indices, best first (the finite before the diverged, then the longest-trained, then by
        metric; a trial that survived halving and then diverged ranks after the finite ones it outlived)."""
        sign = 1.0 if self.mode == "min" else -1.0
        metrics = np.where(self.diverged | ~np.isfinite(self.metrics), np.inf, sign * self.metrics)
        return np.lexsort((np.arange(self.n_trials), metrics, -self.steps, self.diverged))

    @property
    def best_index(self) -> int | None:
        """The best trial's index; None when every trial diverged."""
        best = int(self.order[0])
        return None if self.diverged[best] else best

    @property
    def best_config(self) -> dict[str, float] | None:
        """The best trial's hyperparameters, as Python floats."""
        best = self.best_index
        return None if best is None else {name: float(v[best]) for name, v in self.configs.items()}

    @property
    def best_metric(self) -> float:
        best = self.best_index
        return math.nan if best is None else float(self.metrics[best])

    def config(self, index: int) -> dict[str, float]:
        """Trial ``index``'s hyperparameters."""
        return {name: float(v[index]) for name, v in self.configs.items()}

    def table(self, max_rows: int | None = None) -> str:
        """The trials as a text table, best first: rank, trial, hyperparameters, metric, steps trained.

        Example:
          >>> import jax.numpy as jnp, adaopt
          >>> loss = lambda params, batch: jnp.sum(params**2)
          >>> result = adaopt.sweep(adaopt.sgd, {"learning_rate": [0.1, 0.4, 1e3]}, loss, jnp.ones(2), steps=20)
          >>> print(result.table())
          rank  trial  learning_rate    metric  steps
             1      1            0.4    0.1042     20
             2      0            0.1    0.2777     20
             3      2           1000  diverged     20
        """
        rows = [
            ["rank", "trial", *self.names, "metric", "steps"],
        ]
        order = self.order if max_rows is None else self.order[:max_rows]
        metrics = self.metrics
        for rank, i in enumerate(order, 1):
            metric = "diverged" if self.diverged[i] else f"{metrics[i]:.4g}"
            rows.append(
                [str(rank), str(i), *(f"{self.configs[n][i]:.4g}" for n in self.names), metric, str(self.steps[i])]
            )
        widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        if max_rows is not None and self.n_trials > max_rows:
            lines.append(f"... {self.n_trials - max_rows} more trials")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, kind: Literal["metric", "curves"] = "metric", x: str | None = None, ax: Any = None) -> Any:
        """A matplotlib plot of the trials (matplotlib is imported here, not by adaopt).

        Args:
          kind: ``"metric"``: each trial's final metric against the hyperparameter ``x``, coloured by
            the steps trained (halving's rungs), diverged trials marked at the top; ``"curves"``: the
            metric against the step, one line per trial, the best in black.
          x: the hyperparameter of the horizontal axis of ``"metric"`` (default ``learning_rate`` if
            swept, else the first name); a log axis when its values span over a decade.
          ax: the axes to draw in (default: a new figure's).

        Returns:
          The matplotlib ``Axes``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        metric = "metric (lower is better)" if self.mode == "min" else "metric (higher is better)"
        best = self.best_index
        if kind == "curves":
            for i in range(self.n_trials):
                if i != best:
                    ax.plot(self.eval_steps, self.curves[i], color="tab:blue", alpha=0.35, lw=1)
            if best is not None:
                ax.plot(self.eval_steps, self.curves[best], color="black", lw=2, label=f"best: trial {best}")
                ax.legend(fontsize="small")
            ax.set(xlabel="step", ylabel=metric)
        elif kind == "metric":
            x = x or ("learning_rate" if "learning_rate" in self.configs else self.names[0])
            if x not in self.configs:
                raise ValueError(f"x={x!r} is not a swept hyperparameter: choose one of {list(self.names)}.")
            xs, ys = self.configs[x], self.metrics
            ok = ~self.diverged & np.isfinite(ys)
            points = ax.scatter(xs[ok], ys[ok], c=self.steps[ok], cmap="viridis", s=25, zorder=3)
            if len(set(self.steps[ok].tolist())) > 1:
                plt.colorbar(points, ax=ax, label="steps trained")
            if (~ok).any():
                top = np.max(ys[ok]) if ok.any() else 1.0
                ax.scatter(xs[~ok], np.full((~ok).sum(), top), marker="x", color="tab:red", label="diverged", zorder=3)
                ax.legend(fontsize="small")
            if best is not None:
                ax.scatter([xs[best]], [ys[best]], s=120, facecolors="none", edgecolors="black", zorder=4)
            positive = xs[xs > 0]
            if positive.size and positive.min() * 10 < positive.max() and (xs > 0).all():
                ax.set_xscale("log")
            ax.set(xlabel=x, ylabel=metric)
        else:
            raise ValueError(f"kind must be 'metric' or 'curves', got {kind!r}.")
        ax.grid(True, alpha=0.3)
        return ax


# ---------------------------------------------------------------------------------------------
# The compiled programs.


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@jax.jit
def _take(tree: Any, rows: jax.Array) -> Any:
    """The rows ``rows`` of every leaf's leading axis (jitted: compiled once per shape)."""
    return jax.tree.map(lambda x: x[rows], tree)


def _concat(blocks: list[Any]) -> Any:
    return blocks[0] if len(blocks) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)


def _regroup(
    old_pool: list[np.ndarray], pool: list[np.ndarray], survivors: np.ndarray, *trees: list[Any]
) -> tuple[list[Any], ...]:
    """The blocks of ``trees`` (hyperparameters, states) rearranged for ``pool``, the survivors' rows.

    ``survivors[r]`` is the old row of new row ``r``. A new block that is an old block unchanged
    (always so with one lane) is reused as it is; the others are gathered (one small program per
    shape).
    """
    where: dict[int, tuple[int, int]] = {}  # old row -> (block, offset), its first occurrence
    for b, rows in enumerate(old_pool):
        for offset, row in enumerate(rows):
            where.setdefault(int(row), (b, offset))
    flat: list[Any] = [None] * len(trees)
    out: list[list[Any]] = [[] for _ in trees]
    for rows in pool:
        sources = [where[int(survivors[r])] for r in rows]
        block = sources[0][0]
        if all(b == block for b, _ in sources) and [o for _, o in sources] == list(range(len(old_pool[block]))):
            for k, tree in enumerate(trees):
                out[k].append(tree[block])
            continue
        width = len(old_pool[0])
        index = jnp.asarray([b * width + o for b, o in sources])
        for k, tree in enumerate(trees):
            if flat[k] is None:
                flat[k] = _concat(tree)
            out[k].append(_take(flat[k], index))
    return tuple(out)


def _number(value: float) -> int | float:
    """A trial's value as the factory would be given it by hand: an integral one as an int (a count, a period) where
    int32 holds it (a count must fit; a larger one is a real number)."""
    integral = float(value).is_integer() and abs(value) <= base.INT32_MAX
    return int(value) if integral else float(value)


class Sweep:
    r"""One optimizer on one problem, compiled to train many configurations at once.

    The factory is called inside the compiled programs with each trial's hyperparameters as traced
    scalars (``fixed`` arguments are passed as they are: dtypes, masks, flags), and each step is

    .. code-block:: python

        loss, grads = jax.value_and_grad(loss_fn)(params, batch)   # loss_fn(params, batch, data) with data=
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)

    (so loss-driven optimizers get the loss), with ``eval_fn(params)`` after every ``eval_every``
    steps: at ``schedule_free_eval_params(state, params)`` for an optimizer whose state holds a
    Schedule-Free state (``Capability.AVERAGED_ITERATES``). Without ``eval_fn`` the metric is the
    mean training loss over the last ``eval_every`` steps. An optimizer that takes a Hessian estimate
    (``Capability.NEEDS_HESSIAN``: Sophia) gets none here, and steps by the sign of its momentum.

    The programs are compiled on first use and kept: reuse one ``Sweep`` for another set of
    configurations of the same shapes (another seed, an Optuna round) and nothing recompiles.
    :attr:`compilations` counts the traces of each program.

    Args:
      factory: a factory such as ``adaopt.adamw``, or a registry entry (``adaopt.REGISTRY["adamw"]``).
      loss_fn: ``loss_fn(params, batch) -> scalar`` (``loss_fn(params, batch, data)`` when ``run``
        is given ``data``).
      eval_fn: ``eval_fn(params) -> scalar`` (``eval_fn(params, data)``), the metric trials are
        ranked by; None: the mean training loss of the last ``eval_every`` steps.
      mode: ``"min"`` (lower metric is better) or ``"max"``.
      fixed: arguments passed to the factory unchanged in every trial (numbers here are not swept).
      schedule: a function of the (traced) learning rate returning the schedule to use, e.g.
        ``lambda lr: optax.cosine_decay_schedule(lr, steps)``; None: a constant learning rate.

    Raises:
      HyperparameterError: ``fixed`` names an argument the factory does not take, ``mode`` is not
        ``"min"`` or ``"max"``, or ``loss_fn`` is not callable.
    """

    def __init__(
        self,
        factory: Callable[..., optax.GradientTransformation] | OptimizerSpec,
        loss_fn: Callable[..., Any],
        *,
        eval_fn: Callable[..., Any] | None = None,
        mode: Mode = "min",
        fixed: Mapping[str, Any] | None = None,
        schedule: Callable[[Any], optax.Schedule] | None = None,
    ) -> None:
        self.factory = factory.factory if isinstance(factory, OptimizerSpec) else factory
        self.name = factory.name if isinstance(factory, OptimizerSpec) else getattr(factory, "__name__", "factory")
        if not callable(self.factory) or not callable(loss_fn):
            raise base.HyperparameterError(f"factory and loss_fn must be callable, got {factory!r} and {loss_fn!r}.")
        if eval_fn is not None and not callable(eval_fn):
            raise base.HyperparameterError(f"eval_fn must be a function of the parameters or None, got {eval_fn!r}.")
        base.check_choice("mode", mode, ("min", "max"))
        if fixed is not None and not isinstance(fixed, Mapping):
            raise base.HyperparameterError(
                f"fixed must be a mapping of the factory's argument names to values (a dict) or None, got {fixed!r} "
                f"of type {type(fixed).__name__}."
            )
        if schedule is not None and not callable(schedule):
            raise base.HyperparameterError(
                f"schedule must be a function of the learning rate returning a schedule (lambda lr: "
                f"optax.cosine_decay_schedule(lr, steps)) or None, got {schedule!r} of type {type(schedule).__name__}."
            )
        self.loss_fn, self.eval_fn, self.mode = loss_fn, eval_fn, mode
        self.fixed = dict(fixed or {})
        self.schedule = schedule
        self._parameters = inspect.signature(self.factory).parameters
        self._any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._parameters.values())
        self._check_names(self.fixed, "fixed", numeric=False)
        self.compilations = {"init": 0, "chunk": 0}
        """Traces of each program so far (jit traces a program once per width and shapes: a trace is a compilation)."""
        self._inits: dict[Any, Any] = {}  # per initialiser (None: shared parameters), its jitted program
        self._chunk = jax.jit(jax.vmap(self._chunk_lane, in_axes=(0, 0, 0, None, None, None)))

    # -- validation ---------------------------------------------------------------------------

    def _check_names(self, names: Mapping[str, Any] | Sequence[str], where: str, numeric: bool = True) -> None:
        for name in names:
            parameter = self._parameters.get(name)
            if parameter is None and not self._any_keyword:
                numbers_ = [n for n, p in self._parameters.items() if not is_static(p)]
                raise base.HyperparameterError(
                    f"{where} names {name!r}, which is not an argument of {self.name}: its numeric hyperparameters are "
                    f"{numbers_}."
                )
            if numeric and parameter is not None and is_static(parameter):
                raise base.HyperparameterError(
                    f"{where} names {name!r}, an option of {self.name} (a mask, dtype, flag or shape), not a number: "
                    f"only numbers are batched. Pass it in fixed=, one sweep per value."
                )
            if numeric and name in self.fixed:
                raise base.HyperparameterError(f"{name!r} is both swept ({where}) and fixed: remove it from one.")

    def _configs(self, configs: Mapping[str, Any]) -> Configs:
        if isinstance(configs, Mapping) and any(isinstance(v, Range) for v in configs.values()):
            raise base.HyperparameterError(
                "configs hold one value per trial; a Range is a search space: draw configurations from it with "
                "adaopt.grid_configs(space, points) or adaopt.random_configs(space, n)."
            )
        if not isinstance(configs, Mapping) or not configs:
            raise base.HyperparameterError(
                f"configs must be a non-empty dict of hyperparameter names to one value per trial, got {configs!r}."
            )
        out: Configs = {}
        for name, values in configs.items():
            array = np.asarray(values)
            if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
                raise base.HyperparameterError(
                    f"configs[{name!r}] must be a non-empty list of numbers, one per trial, got {values!r} (a value "
                    "shared by every trial goes in fixed=)."
                )
            out[name] = array.astype(np.float64)
        lengths = {name: len(v) for name, v in out.items()}
        if len(set(lengths.values())) > 1:
            raise base.HyperparameterError(
                f"configs must give every hyperparameter one value per trial, got lengths {lengths}; for every "
                "combination of lists, use adaopt.grid_configs."
            )
        self._check_names(out, "configs")
        if self.schedule is not None and "learning_rate" not in out and "learning_rate" not in self.fixed:
            raise base.HyperparameterError("schedule= is a function of the learning rate: sweep or fix learning_rate.")
        # Each trial's values checked as the factory checks them, before they are batched (traced, they are not).
        for trial in range(len(next(iter(out.values())))):
            config = {name: _number(values[trial]) for name, values in out.items()}
            try:
                self.optimizer(config)
            except base.HyperparameterError as error:
                raise base.HyperparameterError(f"configs' trial {trial} ({config}): {error}") from None
        return out

    # -- the unbatched bodies -------------------------------------------------------------------

    def optimizer(self, hyperparameters: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
        """The optimizer of one trial: the factory called with ``fixed``, ``hyperparameters`` and the schedule."""
        kwargs = {**self.fixed, **hyperparameters}
        if self.schedule is not None:
            kwargs["learning_rate"] = self.schedule(kwargs["learning_rate"])
        return base.with_extra_args(self.factory(**kwargs))

    def init_lane(self, hyperparameters: Mapping[str, Any], init: Any, key: jax.Array | None = None) -> tuple[Any, Any]:
        """One trial's ``(params, state)``: ``init`` is the parameters, or a function of ``key`` returning them."""
        params = init(key) if callable(init) else init
        return params, self.optimizer(hyperparameters).init(params)

    def _init_program(self, init: Callable[[jax.Array], Any] | None) -> Any:
        """``program(hyperparameters, keys, shared_params) -> (params, states)`` over lanes, for this initialiser."""
        if init not in self._inits:

            def lane(hyperparameters: Any, key: Any, params: Any) -> tuple[Any, Any]:
                self.compilations["init"] += 1
                return self.init_lane(hyperparameters, params if init is None else init, key)

            self._inits[init] = jax.jit(jax.vmap(lane, in_axes=(0, 0, None)))
        return self._inits[init]

    def train_lane(
        self, hyperparameters: Mapping[str, Any], params: Any, state: Any, batches: Any, data: Any = None
    ) -> tuple[Any, Any, jax.Array, jax.Array]:
        """One trial's steps over ``batches`` (a leading step axis), then its evaluation.

        The body that the compiled programs ``jax.vmap`` over the trials.

        Returns:
          ``(params, state, metric, finite)``: ``finite`` is False when the metric or a parameter is
          NaN or infinite.
        """
        tx = self.optimizer(hyperparameters)
        extra = () if data is None else (data,)
        value_and_grad = jax.value_and_grad(self.loss_fn)

        def step(carry: tuple[Any, Any], batch: Any) -> tuple[tuple[Any, Any], jax.Array]:
            p, s = carry
            loss, grads = value_and_grad(p, batch, *extra)
            updates, s = tx.update(grads, s, p, value=loss)
            return (optax.apply_updates(p, updates), s), loss

        (params, state), losses = jax.lax.scan(step, (params, state), batches)
        if self.eval_fn is None:
            metric = jnp.mean(losses)
        else:
            metric = _scalar_metric(self.eval_fn(_evaluation_point(state, params), *extra))
        finite = jnp.isfinite(metric)
        for leaf in jax.tree.leaves(params):
            finite &= jnp.all(jnp.isfinite(leaf))
        return params, state, metric, finite

    def _chunk_lane(
        self, hyperparameters: Any, params: Any, state: Any, chunks: Any, index: jax.Array, data: Any
    ) -> tuple[Any, Any, jax.Array, jax.Array]:
        self.compilations["chunk"] += 1
        batches = jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, index, keepdims=False), chunks)
        return self.train_lane(hyperparameters, params, state, batches, data)

    # -- running --------------------------------------------------------------------------------

    def run(
        self,
        configs: Mapping[str, Any],
        params: Any,
        batches: Any = None,
        *,
        steps: int | None = None,
        eval_every: int | None = None,
        halve_every: int | Sequence[int] | None = None,
        keep: float = 0.5,
        lanes: int | None = None,
        data: Any = None,
        seed: int = 0,
    ) -> SweepResult:
        r"""Train every configuration, the trials as the lanes of one compiled program.

        Args:
          configs: name -> one value per trial (:func:`grid_configs`, :func:`random_configs`, or lists
            of equal length).
          params: the initial parameters, shared by every trial, or a function ``init(key) -> params``
            called with a key per trial (``jax.random.fold_in(jax.random.key(seed), trial)``).
          batches: a pytree of arrays with a leading step axis (at least ``steps`` long), the same
            sequence for every trial; None: each step's batch is the step number.
          steps: the steps to train (default: the batches' length).
          eval_every: steps between evaluations, a divisor of ``steps`` (default: ``steps``, one
            evaluation at the end).
          halve_every: successive halving: an integer ``k`` (a multiple of ``eval_every``) halves at
            steps ``k, 2k, ...`` before the end, a list of steps halves there. At each, the best
            ``max(1, floor(keep * live))`` of the live trials by their latest metric (diverged ones
            last, ties to the lower trial index) go on from their current parameters and states;
            the others stop. None: every trial trains every step.
          keep: the fraction kept at each halving, in (0, 1) (``1 / eta`` in Hyperband's terms).
          lanes: the width of the compiled program (see the module's docstring): None, all live
            trials in one call, the width a power of two; an integer, blocks of that many lanes.
          data: passed to ``loss_fn`` and ``eval_fn`` as their last argument: an argument of the
            compiled program, not a constant compiled into it.
          seed: the seed of the per-trial keys when ``params`` is a function, an integer in [0, 2**32 - 1].

        Returns:
          A :class:`SweepResult`.

        Raises:
          HyperparameterError: bad configurations (unknown, non-numeric or static names, lengths that
            differ), a bad number of steps, ``eval_every`` or ``halve_every``, ``keep`` outside (0, 1), a bad
            ``seed``, or an ``eval_fn`` that returns no real scalar.
        """
        start = time.perf_counter()
        check_seed(seed)
        checked = self._configs(configs)
        n = len(next(iter(checked.values())))
        steps, chunks = _chunks(batches, steps, eval_every)
        n_chunks = jax.tree.leaves(chunks)[0].shape[0]
        every = steps // n_chunks
        rungs = _rungs(halve_every, every, steps)
        base.check_scalar("keep", keep, low=0.0, high=1.0, low_open=True, high_open=True)
        if lanes is not None:
            base.check_integer("lanes", lanes, 1)

        init = params if callable(params) else None
        # The dtype of the optimizers' own scalars, which the traced hyperparameters become.
        dtype = moments.scalar_dtype(jax.eval_shape(init, jax.random.key(0)) if init is not None else params)
        program = self._init_program(init)

        live = np.arange(n)  # the trial of each row of the pool
        pool = self._blocks(n, lanes or n)  # per block, its rows: indices into ``live``, padded
        # Gathered on the host: no program to compile for the first blocks.
        hp_blocks = [{name: jnp.asarray(v[rows], dtype) for name, v in checked.items()} for rows in pool]
        states = []
        for hp, rows in zip(hp_blocks, pool, strict=True):
            if init is None:  # shared parameters: no keys to draw (placeholders, never read)
                states.append(program(hp, jnp.zeros(len(rows), jnp.int32), params))
            else:
                keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(rows))
                states.append(program(hp, keys, None))

        curves = np.full((n, n_chunks), np.nan)
        diverged = np.zeros(n, bool)
        trained = np.full(n, steps)
        fallback: tuple[int, Any] | None = None  # a stopped trial and its parameters, for when the survivors diverge
        for c in range(n_chunks):
            index = jnp.asarray(c, jnp.int32)
            results = [self._chunk(hp, p, s, chunks, index, data) for hp, (p, s) in zip(hp_blocks, states, strict=True)]
            states = [(p, s) for p, s, _, _ in results]
            for rows, (_, _, metric, finite) in zip(pool, results, strict=True):
                # A padding lane repeats a real row: it writes the same numbers again.
                trials = live[rows]
                curves[trials, c] = np.asarray(metric, np.float64)
                diverged[trials] |= ~np.asarray(finite)
            step = (c + 1) * every
            if step in rungs and live.size > 1:
                survivors, best_stopped = _rung(live, curves[:, c], diverged, keep, self.mode)
                trained[np.setdiff1d(live, live[survivors])] = step
                if best_stopped is not None:  # the sweep's best if every survivor diverges later
                    fallback = (int(live[best_stopped]), _row_params(pool, states, best_stopped))
                old_pool = pool
                live = live[survivors]
                pool = self._blocks(live.size, lanes or _next_power_of_two(live.size))
                hp_blocks, states = _regroup(old_pool, pool, survivors, hp_blocks, states)

        result = SweepResult(
            configs=checked,
            curves=curves,
            eval_steps=np.arange(1, n_chunks + 1) * every,
            steps=trained,
            diverged=diverged,
            mode=self.mode,
        )
        best = result.best_index
        best_params = None
        if best is not None and best in live:
            best_params = _row_params(pool, states, int(np.flatnonzero(live == best)[0]))
        elif best is not None and fallback is not None and fallback[0] == best:
            best_params = fallback[1]
        return dataclasses.replace(result, best_params=best_params, seconds=time.perf_counter() - start)

    @staticmethod
    def _blocks(n: int, width: int) -> list[np.ndarray]:
        """Rows 0..n-1 in blocks of the program's width, the last padded by repeating row n-1."""
        rows = np.arange(-(-n // width) * width)
        rows = np.minimum(rows, n - 1)
        return [rows[i : i + width] for i in range(0, rows.size, width)]

    def optuna(
        self,
        space: Space,
        params: Any,
        batches: Any = None,
        *,
        trials_per_round: int = 8,
        rounds: int = 4,
        study: Any = None,
        seed: int = 0,
        **run_kwargs: Any,
    ) -> SweepResult:
        """Bayesian search: Optuna chooses each round's configurations, one vectorised program trains them.

        Each round asks the study for ``trials_per_round`` trials (``study.ask`` with the space's
        distributions: a :class:`~adaopt.Range` is a ``FloatDistribution``, a list a
        ``CategoricalDistribution``), trains them with :meth:`run` (the same compiled program every
        round), reports each evaluation (``trial.report``) and tells the study the final metric
        (``study.tell``): a diverged trial's value is ``inf`` (``-inf`` for ``mode="max"``), a
        trial stopped by halving is told ``PRUNED``. The study's pruner is not consulted: the trials
        of a round train together in one program, so none stops on its own; the early stopping is
        the successive halving of :meth:`run` (``halve_every``). So ``study.best_trial`` is the best
        of the trials that trained to the end (Optuna's ``COMPLETE`` ones), a diverged one included
        when all of those diverged, where the result's best ranks every trial by its last metric,
        halved ones too: read the result's.

        Args:
          space: name -> :class:`~adaopt.Range` or a list of numbers.
          params, batches: as :meth:`run`.
          trials_per_round: trials asked and trained together, >= 1.
          rounds: rounds of ask, train, tell, >= 1.
          study: an ``optuna.Study`` whose direction agrees with ``mode``; None: a new one with a
            ``TPESampler(seed=seed)``.
          seed: the sampler's seed (and :meth:`run`'s).
          **run_kwargs: passed to :meth:`run` (``steps``, ``eval_every``, ``halve_every``, ``data`` ...).

        Returns:
          A :class:`SweepResult` of every round's trials in the order asked, with ``study`` set.

        Raises:
          ImportError: Optuna is not installed (``pip install adaopt[tune]``).
          HyperparameterError: a bad space, round or trial count, seed, or a study of the other direction.
        """
        try:
            import optuna
        except ImportError as error:  # pragma: no cover - the extra is installed in the tests
            raise ImportError("adaopt's Bayesian search needs Optuna: pip install 'adaopt[tune]'.") from error
        checked = _check_space(space)
        self._check_names(checked, "space")
        base.check_integer("trials_per_round", trials_per_round, 1)
        base.check_integer("rounds", rounds, 1)
        check_seed(seed)
        direction = optuna.study.StudyDirection.MINIMIZE if self.mode == "min" else optuna.study.StudyDirection.MAXIMIZE
        if study is None:
            study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=seed))
        elif study.direction != direction:
            raise base.HyperparameterError(
                f"the study's direction is {study.direction.name} but mode={self.mode!r}: make them agree."
            )
        distributions = {
            name: optuna.distributions.FloatDistribution(v.low, v.high, log=v.log)
            if isinstance(v, Range)
            else optuna.distributions.CategoricalDistribution(v)
            for name, v in checked.items()
        }
        results = []
        for _ in range(rounds):
            trials = [study.ask(distributions) for _ in range(trials_per_round)]
            configs = {name: np.asarray([t.params[name] for t in trials], np.float64) for name in checked}
            result = self.run(configs, params, batches, seed=seed, **run_kwargs)
            worst = math.inf if self.mode == "min" else -math.inf
            for i, trial in enumerate(trials):
                for step, value in zip(result.eval_steps, result.curves[i], strict=True):
                    if step <= result.steps[i] and math.isfinite(value):
                        trial.report(float(value), int(step))
                if result.steps[i] < result.eval_steps[-1]:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    value = float(result.metrics[i])
                    study.tell(trial, worst if result.diverged[i] or not math.isfinite(value) else value)
            results.append(result)
        return _merge(results, study)


def _scalar_metric(value: Any) -> jax.Array:
    """What ``eval_fn`` returned, as the metric (a real scalar), or an error naming ``eval_fn``."""
    try:
        metric = jnp.asarray(value)
    except (TypeError, ValueError):
        metric = None
    if (
        metric is None
        or metric.shape != ()
        or not jnp.issubdtype(metric.dtype, jnp.number)
        or (jnp.issubdtype(metric.dtype, jnp.complexfloating))
    ):
        shown = f"shape {metric.shape} and dtype {metric.dtype}" if metric is not None else f"{type(value).__name__}"
        raise base.HyperparameterError(
            f"eval_fn must return the metric, a real scalar (e.g. the mean loss on held-out data), but returned "
            f"{shown}."
        )
    return metric


def _evaluation_point(state: Any, params: Any) -> Any:
    """Where to evaluate: Schedule-Free's averaged iterate when the state holds one, else the parameters."""
    found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScheduleFreeState))
    if any(isinstance(x, ScheduleFreeState) for x in found):
        return schedule_free_eval_params(state, params)
    return params


def _chunks(batches: Any, steps: int | None, eval_every: int | None) -> tuple[int, Any]:
    """``(steps, batches reshaped to (steps / eval_every, eval_every, ...))``."""
    if batches is None:
        if steps is None:
            raise base.HyperparameterError("without batches, give the number of steps: steps=...")
        base.check_integer("steps", steps, 1)
        batches = jnp.arange(steps, dtype=jnp.int32)
    leaves = jax.tree.leaves(batches)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise base.HyperparameterError(
            "batches must be a pytree of arrays with a leading axis of one entry per step (None: the step numbers)."
        )
    available = min(int(jnp.shape(x)[0]) for x in leaves)
    steps = available if steps is None else steps
    base.check_integer("steps", steps, 1, available)
    every = steps if eval_every is None else eval_every
    base.check_integer("eval_every", every, 1, steps)
    if steps % every:
        raise base.HyperparameterError(
            f"eval_every must divide steps: got steps={steps}, eval_every={every} (one program runs eval_every steps)."
        )
    n_chunks = steps // every
    return steps, jax.tree.map(lambda b: jnp.asarray(b)[:steps].reshape(n_chunks, every, *jnp.shape(b)[1:]), batches)


def _rungs(halve_every: int | Sequence[int] | None, every: int, steps: int) -> set[int]:
    if halve_every is None:
        return set()
    if base.is_integer(halve_every):  # a NumPy integer too, as eval_every
        base.check_integer("halve_every", halve_every, 1, steps)
        period = int(halve_every)  # type: ignore[arg-type]  # an integer: is_integer narrows nothing for mypy
        at = list(range(period, steps, period))
    elif isinstance(halve_every, Sequence):
        at = list(halve_every)
        for s in at:
            base.check_integer("a step of halve_every", s, 1, steps - 1)
    else:
        raise base.HyperparameterError(
            f"halve_every must be a number of steps, a list of steps or None, got {halve_every!r}."
        )
    bad = [s for s in at if s % every]
    if bad:
        raise base.HyperparameterError(
            f"halving happens at evaluations: the steps {bad} of halve_every are not multiples of eval_every={every}."
        )
    return set(at)


def _rung(
    live: np.ndarray, metric: np.ndarray, diverged: np.ndarray, keep: float, mode: Mode
) -> tuple[np.ndarray, int | None]:
    """At a rung: the rows of ``live`` kept, in their order (the best ``max(1, floor(keep * len(live)))`` by
    ``metric``, the diverged and non-finite last, ties to the lower trial), and the best finite row stopped (None
    when every stopped row diverged)."""
    values = metric[live] if mode == "min" else -metric[live]
    bad = diverged[live] | ~np.isfinite(values)
    ranked = np.lexsort((live, np.where(bad, np.inf, values), bad))
    k = max(1, math.floor(keep * live.size + 1e-9))
    stopped = [int(row) for row in ranked[k:] if not bad[row]]
    return np.sort(ranked[:k]), (stopped[0] if stopped else None)


def _row_params(pool: list[np.ndarray], states: list[Any], row: int) -> Any:
    """The parameters of the pool's ``row`` (a row of ``live``), from its block's lanes."""
    block, offset = next((b, list(rows).index(row)) for b, rows in enumerate(pool) if row in rows)
    return jax.tree.map(lambda x: x[offset], states[block][0])


def _merge(results: list[SweepResult], study: Any) -> SweepResult:
    first = results[0]
    merged = SweepResult(
        configs={name: np.concatenate([r.configs[name] for r in results]) for name in first.configs},
        curves=np.concatenate([r.curves for r in results]),
        eval_steps=first.eval_steps,
        steps=np.concatenate([r.steps for r in results]),
        diverged=np.concatenate([r.diverged for r in results]),
        mode=first.mode,
        seconds=sum(r.seconds for r in results),
        study=study,
    )
    best = merged.best_index
    offsets = np.cumsum([0] + [r.n_trials for r in results])
    best_params = None
    if best is not None:
        which = int(np.searchsorted(offsets, best, side="right") - 1)
        best_params = results[which].best_params
    return dataclasses.replace(merged, best_params=best_params)


# ---------------------------------------------------------------------------------------------
# One call.


def sweep(
    factory: Callable[..., optax.GradientTransformation] | OptimizerSpec,
    configs: Mapping[str, Any],
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Any = None,
    *,
    eval_fn: Callable[..., Any] | None = None,
    mode: Mode = "min",
    fixed: Mapping[str, Any] | None = None,
    schedule: Callable[[Any], optax.Schedule] | None = None,
    **run_kwargs: Any,
) -> SweepResult:
    """Train every configuration of ``factory`` at once: ``Sweep(factory, loss_fn, ...).run(configs, params, batches, ...)``.

    See :class:`Sweep` for the arguments and :meth:`Sweep.run` for ``run_kwargs`` (``steps``,
    ``eval_every``, ``halve_every``, ``keep``, ``lanes``, ``data``, ``seed``). Build a
    :class:`Sweep` to reuse its compiled programs across calls.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> loss = lambda params, batch: jnp.sum((params - batch) ** 2)
      >>> configs = adaopt.random_configs({"learning_rate": adaopt.Range(1e-3, 1.0, log=True)}, 8, seed=0)
      >>> result = adaopt.sweep(adaopt.adam, configs, loss, jnp.zeros(2), jnp.ones((40, 2)), eval_every=10,
      ...                       halve_every=10)  # 8 trials, 4 after step 10, 2 after 20, 1 after 30
      >>> result.steps.tolist()
      [30, 10, 10, 10, 40, 20, 10, 20]
    """
    return Sweep(factory, loss_fn, eval_fn=eval_fn, mode=mode, fixed=fixed, schedule=schedule).run(
        configs, params, batches, **run_kwargs
    )


def optuna_sweep(
    factory: Callable[..., optax.GradientTransformation] | OptimizerSpec,
    space: Space,
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Any = None,
    *,
    eval_fn: Callable[..., Any] | None = None,
    mode: Mode = "min",
    fixed: Mapping[str, Any] | None = None,
    schedule: Callable[[Any], optax.Schedule] | None = None,
    **optuna_kwargs: Any,
) -> SweepResult:
    """Bayesian search with Optuna, each round's trials in one program: ``Sweep(...).optuna(space, params, ...)``.

    See :class:`Sweep` for the arguments and :meth:`Sweep.optuna` for ``optuna_kwargs``
    (``trials_per_round``, ``rounds``, ``study``, ``seed``, and :meth:`Sweep.run`'s).
    """
    return Sweep(factory, loss_fn, eval_fn=eval_fn, mode=mode, fixed=fixed, schedule=schedule).optuna(
        space, params, batches, **optuna_kwargs
    )


__all__ = [
    "Sweep",
    "SweepResult",
    "grid_configs",
    "optuna_sweep",
    "random_configs",
    "search_space",
    "sweep",
]
