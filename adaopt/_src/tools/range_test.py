"""The learning-rate range test: train at a learning rate that grows every iteration, and read off where
the loss falls fastest (Smith, 2017), as torch-lr-finder runs it, in one compiled loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaopt._src import base
from adaopt._src.base import Params

STEP_MODES = ("exp", "linear")


@dataclasses.dataclass(frozen=True, eq=False)
class RangeTestResult:
    """What :func:`range_test` recorded, one entry per iteration run (up to and including the one that diverged).

    Attributes:
      learning_rates: the learning rate of each iteration's step, float64.
      losses: the loss of each iteration as measured: the training loss of its batch (the mean over
        its ``accumulation_steps`` batches) at the parameters before its step, or, with
        ``val_batches`` or ``val_loader``, the validation loss after it.
      smoothed_losses: ``losses`` smoothed exponentially (torch-lr-finder's ``history["loss"]``).
      diverged_at: the iteration at which the smoothed loss diverged (the last one recorded), or
        None when all ``num_iter`` iterations ran.
      step_mode: ``"exp"`` or ``"linear"``, how the learning rate grew.
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    diverged_at: int | None
    step_mode: str

    def _trimmed(self, skip_start: int, skip_end: int, *, for_suggestion: bool) -> tuple[np.ndarray, np.ndarray]:
        """The learning rates and smoothed losses without the first ``skip_start`` and last ``skip_end`` iterations."""
        base.check_integer("skip_start", skip_start, 0)
        base.check_integer("skip_end", skip_end, 0)
        n = len(self.learning_rates)
        if for_suggestion and n < skip_start + skip_end + 2:
            raise ValueError(
                f"Need at least skip_start + skip_end + 2 = {skip_start + skip_end + 2} recorded iterations to "
                f"suggest a learning rate, got {n}"
                + (f" (the loss diverged at iteration {self.diverged_at})" if self.diverged_at is not None else "")
                + ": lower skip_start or skip_end, or run the test with more iterations or from a lower start_lr."
            )
        stop = n - skip_end
        return self.learning_rates[skip_start:stop], self.smoothed_losses[skip_start:stop]

    def suggest_lr(self, skip_start: int = 10, skip_end: int = 5) -> float:
        r"""The learning rate where the smoothed loss falls fastest, as torch-lr-finder's ``plot(suggest_lr=True)``.

        Without the first ``skip_start`` and the last ``skip_end`` iterations, the learning rate at
        the minimum of ``numpy.gradient`` of the smoothed losses (differences per iteration, central
        inside, one-sided at the ends): the steepest descent along the sweep. A non-finite loss (a test
        stopped by a NaN, with ``skip_end=0``) and those after it are left out, where torch-lr-finder's
        ``argmin`` would pick the learning rate beside it.

        Args:
          skip_start: iterations left out at the start (the loss is still settling there).
          skip_end: iterations left out at the end (where the loss takes off).

        Returns:
          The suggested learning rate, one of :attr:`learning_rates`.

        Raises:
          ValueError: fewer than ``skip_start + skip_end + 2`` iterations were recorded.
        """
        lrs, losses = self._trimmed(skip_start, skip_end, for_suggestion=True)
        return float(lrs[_steepest(losses, skip_start)])

    def plot(
        self,
        ax: Any = None,
        *,
        skip_start: int = 10,
        skip_end: int = 5,
        log_lr: bool | None = None,
        suggest: bool = True,
    ) -> Any:
        """The smoothed loss against the learning rate, with the suggestion marked (matplotlib, imported here).

        Plots what torch-lr-finder's ``plot`` does: the smoothed losses without the first
        ``skip_start`` and last ``skip_end`` iterations, and a red dot at :meth:`suggest_lr`'s
        learning rate. Unlike it, never calls ``plt.show()``.

        Args:
          ax: the ``matplotlib.axes.Axes`` to draw in; None draws in a new figure.
          skip_start: iterations left out at the start.
          skip_end: iterations left out at the end.
          log_lr: a logarithmic learning-rate axis; None chooses it for an exponential sweep.
          suggest: mark the suggested learning rate (which needs ``skip_start + skip_end + 2``
            recorded iterations).

        Returns:
          The ``matplotlib.axes.Axes`` drawn in.
        """
        import matplotlib.pyplot as plt  # an optional dependency, needed only to plot

        lrs, losses = self._trimmed(skip_start, skip_end, for_suggestion=suggest)
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(lrs, losses)
        if suggest:
            index = _steepest(losses, skip_start)
            label = f"steepest descent: {lrs[index]:.2e}"
            ax.scatter(lrs[index], losses[index], s=75, marker="o", color="red", zorder=3, label=label)
            ax.legend()
        if self.step_mode == "exp" if log_lr is None else log_lr:
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Smoothed loss")
        return ax


def _steepest(losses: np.ndarray, skip_start: int) -> int:
    """The index of the steepest descent of the smoothed ``losses`` (trimmed, from iteration ``skip_start``): the
    minimum of ``numpy.gradient`` over those before the first non-finite one (the loss that stopped the test, with
    ``skip_end`` 0, would make ``np.argmin`` pick its neighbour)."""
    is_finite = np.isfinite(losses)
    finite = len(losses) if is_finite.all() else int(np.argmin(is_finite))
    if finite < 2:
        raise ValueError(
            f"The smoothed loss is not finite from iteration {skip_start + finite} on: too few finite losses to "
            "suggest a learning rate. Raise skip_end, or run the test from a lower start_lr."
        )
    return int(np.argmin(np.gradient(losses[:finite])))


def _learning_rates(start_lr: float, end_lr: float, num_iter: int, step_mode: str) -> np.ndarray:
    """The learning rates of a range test, in Python floats with the operations of torch-lr-finder's
    ``ExponentialLR`` and ``LinearLR`` in their order: its rates bit for bit."""
    _check_sweep(start_lr, end_lr, num_iter, step_mode)
    start_lr, end_lr = float(start_lr), float(end_lr)  # never a 0-d array: its float32 would round the rates
    ratios = [i / (num_iter - 1) for i in range(num_iter)]
    if step_mode == "exp":
        return np.array([start_lr * (end_lr / start_lr) ** r for r in ratios], np.float64)
    return np.array([start_lr + r * (end_lr - start_lr) for r in ratios], np.float64)


def _check_sweep(start_lr: Any, end_lr: Any, num_iter: Any, step_mode: Any) -> None:
    base.check_scalar("start_lr", start_lr, low=0.0, low_open=True)
    base.check_scalar("end_lr", end_lr, low=0.0, low_open=True)
    if not end_lr > start_lr:
        raise base.HyperparameterError(
            f"end_lr must be greater than start_lr: the test sweeps the learning rate up from start_lr to end_lr, "
            f"got start_lr={start_lr!r} and end_lr={end_lr!r}."
        )
    base.check_integer("num_iter", num_iter, 2)
    base.check_choice("step_mode", step_mode, STEP_MODES)


def _leading_size(tree: Any, name: str, entry: str = "batch") -> int:
    """The common length of the leading axis of every array in ``tree``: the number of batches it holds (or, with
    ``entry="example"``, of examples in one batch)."""
    shapes = [np.shape(x) for x in jax.tree.leaves(tree)]
    sizes = {shape[0] if shape else 0 for shape in shapes}
    if len(sizes) != 1 or 0 in sizes:
        alternative = ", or a function of the batch index" if name == "batches" else ""
        raise ValueError(
            f"{name} must be a pytree of arrays that share a leading axis of one entry per {entry} (at least one)"
            f"{alternative}; got leaves of shapes {shapes}."
        )
    return sizes.pop()


def _is_loader(batches: Any) -> bool:
    """Whether ``batches`` yields batches one by one (a generator, a torch DataLoader): an iterable that is no pytree
    of arrays (JAX takes it for one leaf) and no array."""
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)) or hasattr(batches, "shape"):
        return False
    leaves = jax.tree.leaves(batches)
    return len(leaves) == 1 and leaves[0] is batches


def _stacked_list(batches: Any) -> Any:
    """A list of batches, each a tree of arrays of one structure (``[(x, y), (x, y), ...]``, as a torch loader's
    ``list(loader)``), stacked into one tree with a leading axis of batches; anything else as it is (a list of
    arrays stays a pytree: its arrays are the stacked batches' parts)."""
    if not isinstance(batches, list) or not batches:
        return batches
    structures = {jax.tree.structure(batch) for batch in batches}
    if len(structures) != 1 or jax.tree_util.treedef_is_leaf(structures.pop()):  # arrays: the stacked form
        return batches
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(batch)) for batch in batches}
    if len(shapes) != 1:
        raise ValueError(
            f"batches is a list of {len(batches)} batches of different shapes ({sorted(shapes)[:3]}...): they are "
            "stacked into one array per part, so give batches of one size (a loader's drop_last=True), or pass a "
            "function of the batch index."
        )
    return jax.tree.map(lambda *parts: np.stack([np.asarray(p) for p in parts]), *batches)


ValidationGroups = tuple[tuple[tuple[Any, np.ndarray], ...], np.ndarray]


def _validation_groups(val_batches: Any, val_loader: Iterable[Any] | None) -> ValidationGroups | None:
    """The validation batches as groups of one shape each (the group's batches stacked, each batch's size), and
    the number of examples their weighted sum is divided by.

    ``val_batches`` (already stacked) is one group of equal weights; ``val_loader``'s batches are
    grouped by structure and shape, in order of first appearance (a loader's full batches and its
    last, shorter one: two groups), each weighted by its size. The divisor is the length of the
    loader's dataset where it has one (torch-lr-finder's ``len(val_iter.dataset)``: with ``drop_last``
    or a sampler over part of it, more than were evaluated), else the examples evaluated.
    """
    if val_batches is not None:
        n = _leading_size(val_batches, "val_batches")
        return ((val_batches, np.ones(n)),), np.asarray(n, np.float64)
    if val_loader is None:
        return None
    if isinstance(val_loader, (str, bytes, Mapping)) or not isinstance(val_loader, Iterable):
        hint = (
            " (stacked batches, one tree of arrays: pass them as val_batches)"
            if isinstance(val_loader, Mapping)
            else ""
        )
        raise base.HyperparameterError(
            f"val_loader must be None or an iterable of validation batches (a list, a torch DataLoader, a generator), "
            f"got {val_loader!r} of type {type(val_loader).__name__}{hint}."
        )
    groups: dict[Any, tuple[list[Any], list[int]]] = {}
    for position, batch in enumerate(val_loader):
        batch = jax.tree.map(np.asarray, batch)
        size = _leading_size(batch, f"val_loader's batch {position}", "example")
        key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        members, sizes = groups.setdefault(key, ([], []))
        members.append(batch)
        sizes.append(size)
    if not groups:
        raise ValueError("val_loader yielded no batches: give it at least one validation batch, or leave it None.")
    examples = sum(sum(sizes) for _, sizes in groups.values())
    with contextlib.suppress(AttributeError, TypeError):  # no dataset, or one without a length (an iterable one)
        examples = len(val_loader.dataset)  # type: ignore[attr-defined]
    stacked = tuple(
        (jax.tree.map(lambda *xs: np.stack(xs), *members), np.asarray(sizes, np.float64))
        for members, sizes in groups.values()
    )
    return stacked, np.asarray(examples, np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
    """A static argument of the compiled loop compared by identity: the same function, the same program
    (the cache holds it, so its id cannot be reused while cached)."""

    value: Any

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def _constant(value: Any) -> base.Schedule:
    return lambda count: value


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "batch_fn", "accumulation_steps", "num_batches"))
def _run(
    params: Params,
    batches: Any,
    val_groups: ValidationGroups | None,
    lrs: jax.Array,
    smooth_f: jax.Array,
    diverge_th: jax.Array,
    *,
    loss_fn: _ByIdentity,
    optimizer: _ByIdentity,
    batch_fn: _ByIdentity | None,
    accumulation_steps: int,
    num_batches: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole test as one scan: per iteration the loss, the smoothed loss and whether it diverged."""
    loss_of = loss_fn.value
    scale_updates = base.is_transformation(optimizer.value)

    def transformation(lr: jax.Array) -> optax.GradientTransformationExtraArgs:
        # A schedule that returns this iteration's rate whatever count the optimizer keeps: the rate
        # torch-lr-finder writes into the parameter group before each step.
        tx = optimizer.value if scale_updates else optimizer.value(learning_rate=_constant(lr))
        return base.with_extra_args(tx)

    def batch(k: jax.Array) -> Any:
        if batch_fn is not None:
            return batch_fn.value(k)
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k % num_batches, keepdims=False), batches)

    def scaled_value_and_grad(p: Params, k: jax.Array) -> tuple[jax.Array, Any]:
        # The loss divided before differentiating, as torch-lr-finder's `loss /= accumulation_steps`.
        return jax.value_and_grad(lambda q: loss_of(q, batch(k)) / accumulation_steps)(p)

    def train_loss_and_grads(p: Params, i: jax.Array) -> tuple[jax.Array, Any]:
        first = i * accumulation_steps
        loss, grads = scaled_value_and_grad(p, first)
        if accumulation_steps == 1:
            return loss, grads

        def accumulate(j: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            loss_j, grads_j = scaled_value_and_grad(p, first + j)
            return carry[0] + loss_j, optax.tree.add(carry[1], grads_j)

        return jax.lax.fori_loop(1, accumulation_steps, accumulate, (loss, grads))

    # The losses are smoothed, compared and recorded in float32 at least (torch-lr-finder: Python floats): a bfloat16
    # model's loss, smoothed in bfloat16, moves only when f |loss - s| exceeds half its ulp, a staircase.
    loss_dtype = jnp.promote_types(jax.eval_shape(lambda p: loss_of(p, batch(jnp.int32(0))), params).dtype, jnp.float32)

    def val_loss(p: Params) -> jax.Array:
        # torch-lr-finder's sum of each batch's loss times its size, over the number of examples
        assert val_groups is not None
        groups, examples = val_groups
        weighted = jnp.zeros((), loss_dtype)
        for group, sizes in groups:
            sizes = sizes.astype(loss_dtype)
            weighted += jnp.sum(jax.lax.map(lambda b: loss_of(p, b), group).astype(loss_dtype) * sizes)
        return weighted / examples.astype(loss_dtype)

    smooth_f, diverge_th = smooth_f.astype(loss_dtype), diverge_th.astype(loss_dtype)

    def live(carry: tuple, i: jax.Array, lr: jax.Array) -> tuple[tuple, tuple]:
        p, opt_state, previous, best, _ = carry
        loss, grads = train_loss_and_grads(p, i)
        updates, opt_state = transformation(lr).update(grads, opt_state, p, value=loss)
        if scale_updates:
            updates = jax.tree.map(lambda u: jnp.asarray(lr, u.dtype) * u, updates)
        p = optax.apply_updates(p, updates)
        if val_groups is not None:
            loss = val_loss(p)
        loss = loss.astype(loss_dtype)
        smoothed = jnp.where((i == 0) | (smooth_f == 0), loss, smooth_f * loss + (1 - smooth_f) * previous)
        best = jnp.where((i == 0) | (smoothed < best), smoothed, best)  # `<`, as torch: a NaN never becomes the best
        diverged = (smoothed > diverge_th * best) | ~jnp.isfinite(smoothed)
        return (p, opt_state, smoothed, best, diverged), (loss, smoothed, diverged)

    def stopped(carry: tuple, i: jax.Array, lr: jax.Array) -> tuple[tuple, tuple]:
        nan = jnp.full((), jnp.nan, loss_dtype)
        return carry, (nan, nan, jnp.bool_(True))

    def step(carry: tuple, xs: tuple[jax.Array, jax.Array]) -> tuple[tuple, tuple]:
        i, lr = xs
        return jax.lax.cond(carry[-1], stopped, live, carry, i, lr)

    opt_state = transformation(lrs[0]).init(params)
    zero = jnp.zeros((), loss_dtype)
    iterations = jnp.arange(lrs.shape[0], dtype=jnp.int32)
    _, (losses, smoothed, diverged) = jax.lax.scan(
        step, (params, opt_state, zero, zero, jnp.bool_(False)), (iterations, lrs)
    )
    return losses, smoothed, diverged


def range_test(
    loss_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    optimizer: optax.GradientTransformation | Callable[..., optax.GradientTransformation],
    batches: Any,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    step_mode: str = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    accumulation_steps: int = 1,
    val_batches: Any = None,
    val_loader: Iterable[Any] | None = None,
) -> RangeTestResult:
    r"""The learning-rate range test (Smith, 2017): one step per learning rate, from ``start_lr`` up to ``end_lr``.

    Iteration :math:`i = 0, \dots, n-1` takes one optimizer step at the learning rate

    .. math::
        \eta_i = \eta_0 \left(\frac{\eta_1}{\eta_0}\right)^{i/(n-1)} \;\text{(exp)} \qquad\text{or}\qquad
        \eta_i = \eta_0 + \frac{i}{n-1} (\eta_1 - \eta_0) \;\text{(linear)}

    (:math:`\eta_0` = ``start_lr``, :math:`\eta_1` = ``end_lr``, :math:`n` = ``num_iter``) and
    records the loss :math:`\ell_i`: the training loss of the step's batch at the parameters
    before the step, or with ``val_batches`` or ``val_loader`` the validation loss after it. The loss is smoothed
    against the previous smoothed value, and the test stops at the first iteration whose
    smoothed loss exceeds ``diverge_th`` times the best so far, or is not finite:

    .. math::
        s_0 = \ell_0, \qquad s_i = f \ell_i + (1 - f) s_{i-1}, \qquad
        b_i = \min_{j \le i} s_j, \qquad \text{stop at the first } i \text{ with } s_i > \theta\, b_i

    with :math:`f` = ``smooth_f`` (:math:`s_i = \ell_i` for :math:`f = 0`) and :math:`\theta` =
    ``diverge_th`` (the loss must be positive: a negative one "diverges" at once). The test is
    one compiled ``jax.lax.scan``: after the divergence, its remaining iterations do nothing, and
    the result holds the iterations up to it. ``params`` is not changed: train from it afterwards.

    The learning rate reaches the optimizer in one of two ways:

    - ``optimizer`` a factory taking ``learning_rate`` (``adaopt.adam``,
      ``functools.partial(adaopt.adamw, weight_decay=0.1)``, ``optax.sgd``): it is built with a
      schedule that returns :math:`\eta_i` in iteration :math:`i`, whatever step count the
      optimizer keeps, as torch-lr-finder sets ``param_group["lr"]`` before each step. Exact for
      every optimizer, also one whose step is not linear in the learning rate.
    - ``optimizer`` an ``optax.GradientTransformation`` built with ``learning_rate=1.0``: its
      updates are multiplied by :math:`\eta_i`. Exact only when the update is the learning rate
      times a step that, like the state, does not depend on it: SGD (with momentum or
      Nesterov's, as torch keeps the buffer), Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad, Lion,
      LAMB, Muon, DoG. Not for Adafactor, for the methods whose state holds, learns or sums the
      learning rate (hypergradient descent, bold driver, Polyak, Prodigy, D-Adaptation,
      Schedule-Free, Mechanic), for lookahead, nor for an optax chain that applies the rate
      before a momentum (``optax.rmsprop(..., momentum=0.9)``): pass their factory.

    With :func:`adaopt.param_groups`, the factory's ``learning_rate`` is the default group's: a group that sets its own
    keeps it through the test (torch-lr-finder's ``start_lr`` sets every group's). To sweep every group, give each a
    multiple of the swept rate: ``lambda learning_rate: adaopt.param_groups(adaopt.adamw, [adaopt.Group("embed/*",
    learning_rate=lambda count: 0.1 * learning_rate(count))], learning_rate=learning_rate)``.

    ``update`` is called with ``value=`` the training loss, so the loss-driven optimizers run too; an optimizer that
    takes a Hessian estimate (``Capability.NEEDS_HESSIAN``: Sophia) gets none, and steps by the sign of its momentum.

    Reproduces torch-lr-finder 0.2.2, ``LRFinder(model, torch_optimizer,
    criterion).range_test(DataLoader(data, batch_size, shuffle=False), start_lr=..., end_lr=...,
    num_iter=..., step_mode=..., smooth_f=..., diverge_th=..., accumulation_steps=...,
    val_loader=...)``, given the model's weights as ``params``, its loss as ``loss_fn``, the
    loader's batches in its order as ``batches`` (it restarts the loader when it runs out: batch
    :math:`k` is ``batches[k % len]`` here), the validation loader itself as ``val_loader`` (or
    its batches, of one size, stacked as ``val_batches``) and the same settings: the same
    learning rates bit for bit, the same smoothed losses (its ``history["loss"]``), the same
    stopping iteration, and the learning rate its ``plot(suggest_lr=True)`` suggests (a shorter
    last validation batch weighs by its size there and here). Tested in float64 to 1e-10 (tests/test_range_test.py)
    with ``torch.optim.SGD``, ``torch.optim.Adam`` and ``prodigyopt.Prodigy`` against
    ``adaopt.sgd``, ``adaopt.adam`` and ``adaopt.prodigy``. One difference: a non-finite
    smoothed loss stops the test here, where torch-lr-finder runs on with NaN.

    Args:
      loss_fn: ``loss_fn(params, batch)``, a scalar; pure (randomness such as dropout comes in
        the batch).
      params: the parameters to start from.
      optimizer: a factory taking ``learning_rate`` (preferred), or an optimizer built with
        ``learning_rate=1.0``.
      batches: the training batches in order: a pytree of arrays with a leading axis of one entry
        per batch (cycled when the test needs more), a list of batches of one size and structure
        (``[(x, y), ...]``, stacked here; a list of plain arrays is itself such a pytree, its
        arrays' leading axis the batches: ``jnp.stack`` them for one batch per array), an iterable of such batches
        (a generator, a torch ``DataLoader``: the ``num_iter * accumulation_steps`` batches the test takes are read
        into such a list, cycled if it ends sooner), or a function from the batch index
        :math:`k` (a traced int32; iteration :math:`i` uses :math:`k = i a, \dots, i a + a - 1` for
        :math:`a` = ``accumulation_steps``) to a batch.
      start_lr: the first learning rate, > 0.
      end_lr: the last learning rate, > ``start_lr``.
      num_iter: the number of iterations, >= 2.
      step_mode: ``"exp"`` or ``"linear"``.
      smooth_f: the smoothing factor :math:`f` in [0, 1); 0 records the losses as they are.
      diverge_th: the divergence threshold :math:`\theta` > 1.
      accumulation_steps: batches per step, >= 1: the step takes the mean of their gradients,
        and records the mean of their losses.
      val_batches: None, or validation batches of one size as a pytree with a leading axis: after
        each step, the loss recorded is the mean of ``loss_fn`` over them.
      val_loader: None, or validation batches one by one, of any sizes: a list, or any iterable
        (a data loader) yielding pytrees of arrays, read once. After each step, the loss
        recorded is torch-lr-finder's mean over the validation set: each batch's ``loss_fn``
        times its size (the leading axis of its arrays), summed, over the number of examples
        (``len(val_loader.dataset)`` where the loader has one, as torch-lr-finder: with
        ``drop_last=True`` that counts the examples dropped too).
        Batches of one shape are evaluated together (a loader's last, shorter batch compiles
        once more). Not with ``val_batches``.

    Returns:
      A :class:`RangeTestResult`: learning rates, losses, smoothed losses, where it diverged, and
      :meth:`~RangeTestResult.suggest_lr` and :meth:`~RangeTestResult.plot`.

    Raises:
      HyperparameterError: a setting is out of range, or ``val_loader`` is not an iterable of batches.
      ValueError: ``batches``, ``val_batches`` or a batch of ``val_loader`` is not a pytree of
        arrays with one leading axis, ``val_loader`` is empty, or both validation arguments are given.

    Example:
      >>> import jax, jax.numpy as jnp, adaopt
      >>> x = jax.random.normal(jax.random.key(0), (10, 16))  # 10 batches of 16 points
      >>> batches = (x, 3.0 * x - 1.0)
      >>> loss_fn = lambda p, b: jnp.mean((p["w"] * b[0] + p["b"] - b[1]) ** 2)
      >>> params = {"w": jnp.array(0.0), "b": jnp.array(0.0)}
      >>> result = adaopt.range_test(loss_fn, params, adaopt.sgd, batches, start_lr=1e-4, end_lr=10.0, num_iter=50)
      >>> result.diverged_at  # the smoothed loss took off here, at 5 times its best: the test stopped
      48
      >>> print(f"{result.learning_rates[-1]:.2f} {result.suggest_lr():.2f}")  # where it stopped, the suggestion
      7.91 0.18

    References:
      Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
      https://arxiv.org/abs/1506.01186; torch-lr-finder, https://github.com/davidtvs/pytorch-lr-finder.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(params, batch) -> scalar, got {loss_fn!r}.")
    if not (base.is_transformation(optimizer) or callable(optimizer)):
        raise TypeError(
            "optimizer must be a factory taking learning_rate (e.g. adaopt.adam) or an optax GradientTransformation "
            f"built with learning_rate=1.0, got {optimizer!r}."
        )
    lrs = _learning_rates(start_lr, end_lr, num_iter, step_mode)
    start_lr = float(start_lr)
    base.check_scalar("smooth_f", smooth_f, low=0.0, high=1.0, high_open=True)
    base.check_scalar("diverge_th", diverge_th, low=1.0, low_open=True)
    base.check_integer("accumulation_steps", accumulation_steps, 1)
    if _is_loader(batches):  # read as far as the test needs, as torch-lr-finder reads its loader
        batches = list(itertools.islice(iter(batches), num_iter * accumulation_steps))
        if not batches:
            raise ValueError("batches yielded no batch: give the range test at least one training batch.")
    batches = _stacked_list(batches)
    batch_fn = _ByIdentity(batches) if callable(batches) else None
    num_batches = 0 if callable(batches) else _leading_size(batches, "batches")
    if val_batches is not None and val_loader is not None:
        raise ValueError(
            "Give the validation batches once: val_batches (stacked, of one size) or val_loader (one by one), not both."
        )
    val_groups = _validation_groups(val_batches, val_loader)
    if not base.is_transformation(optimizer):
        _check_factory(optimizer, start_lr)
    losses, smoothed, diverged = _run(
        params,
        None if callable(batches) else batches,
        val_groups,
        lrs,
        np.asarray(smooth_f),
        np.asarray(diverge_th),
        loss_fn=_ByIdentity(loss_fn),
        optimizer=_ByIdentity(optimizer),
        batch_fn=batch_fn,
        accumulation_steps=accumulation_steps,
        num_batches=num_batches,
    )
    diverged = np.asarray(diverged)
    diverged_at = int(np.argmax(diverged)) if diverged.any() else None
    n = num_iter if diverged_at is None else diverged_at + 1
    return RangeTestResult(
        learning_rates=lrs[:n],
        losses=np.asarray(losses)[:n],
        smoothed_losses=np.asarray(smoothed)[:n],
        diverged_at=diverged_at,
        step_mode=step_mode,
    )


def _check_factory(factory: Callable[..., Any], start_lr: float) -> None:
    """A clear error, before tracing, for a factory that takes no ``learning_rate`` schedule."""
    try:
        tx = factory(learning_rate=_constant(start_lr))
    except TypeError as error:
        raise TypeError(
            f"optimizer {factory!r} was taken for a factory (it is not a GradientTransformation), but calling it as "
            f"optimizer(learning_rate=schedule) failed: {error}. Pass a factory such as adaopt.adam or "
            "functools.partial(adaopt.adamw, weight_decay=0.1), or an optimizer built with learning_rate=1.0."
        ) from error
    if not base.is_transformation(tx):
        raise TypeError(
            f"optimizer(learning_rate=schedule) must return an optax GradientTransformation, got {type(tx).__name__}."
        )


__all__ = ["RangeTestResult", "range_test"]
