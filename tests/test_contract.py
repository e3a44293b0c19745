"""The contract every optimizer in the registry keeps: jit, vmap, grad, optax wrappers, trees, dtypes."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import REGISTRY, Capability, OptimizerSpec
from benchmarks import learning_rates

SPECS = pytest.mark.parametrize("spec", tuple(REGISTRY.values()), ids=lambda s: s.name)


def _steps(spec: OptimizerSpec, n: int) -> int:
    """``n`` steps that move the parameters: a Capability.DELAYED_START optimizer's first updates are zero."""
    return n + 6 if Capability.DELAYED_START in spec.capabilities else n


def _params(dtype: Any = None) -> dict:
    """float32 leaves by default (float64 inside ``jax.enable_x64``)."""
    dtype = jnp.asarray(0.0).dtype if dtype is None else dtype
    rng = np.random.default_rng(0)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=3), dtype)},
        "scale": jnp.asarray(1.5, dtype),
    }


def _grads(params: Any, seed: int) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, jnp.shape(x), jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


def _loss(params: dict) -> jax.Array:
    """A smooth loss whose gradient depends on the parameters, so steps interact."""
    w, b, s = params["dense"]["w"], params["dense"]["b"], params["scale"]
    return jnp.sum(jnp.tanh(s * (jnp.ones(4) @ w) + b) ** 2) + 0.1 * jnp.sum(w**2)


def _update(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """Every optimizer takes the loss as ``value=`` (the loss-driven ones need it, the others ignore it)."""
    return tx.update(grads, state, params, value=_loss(params))


def _run(
    tx: optax.GradientTransformation, params: Any, steps: int, grads_fn: Any = None, *, jit: bool = False
) -> tuple[Any, Any]:
    """``steps`` steps from ``params``: eagerly (elementwise optimizers' primitives compile once per process),
    or, with ``jit`` (matrix optimizers: many distinct eigendecompositions and products), as one program."""
    if jit:
        return jax.jit(lambda p: _run(tx, p, steps, grads_fn))(params)
    state = tx.init(params)
    for t in range(steps):
        grads = grads_fn(params, t) if grads_fn else jax.grad(_loss)(params)
        updates, state = _update(tx, grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _run_update(tx: optax.GradientTransformation, grads: Any, params: Any, *, jit: bool = False) -> tuple[Any, Any]:
    """The first update from ``params`` (jitted with ``jit``, as in :func:`_run`)."""
    first = lambda g, p: _update(tx, g, tx.init(p), p)
    return jax.jit(first)(grads, params) if jit else first(grads, params)


def _compiled_if_matrix(spec: OptimizerSpec, fn: Any) -> Any:
    """``fn`` jitted for a Capability.MATRIX_STATE optimizer (eagerly, its many distinct
    eigendecompositions and products each compile), as it is for the others."""
    return jax.jit(fn) if Capability.MATRIX_STATE in spec.capabilities else fn


def _assert_trees_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        # atol is relative to the leaf's scale: a coordinate near 0 that came from a large step is
        # only as exact as the step.
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


def _precise(spec: OptimizerSpec) -> Any:
    """float64 for Capability.MATRIX_STATE optimizers, float32 for the others. A matrix preconditioner
    whose factor has a null space (a (4, 3) gradient's left factor) normalises the gradient's
    rounding noise along it into whole steps (SOAP's Adam in the eigenbasis, as its reference):
    compiled and eager float32 then differ by more than rounding. Returns the x64 context."""
    return jax.enable_x64(Capability.MATRIX_STATE in spec.capabilities)


@SPECS
def test_jit_compiles_once_and_matches_eager(spec: OptimizerSpec) -> None:
    with _precise(spec):
        _jit_compiles_once_and_matches_eager(spec)


def _jit_compiles_once_and_matches_eager(spec: OptimizerSpec) -> None:
    tx = learning_rates.make(spec)
    traces = 0

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        updates, state = _update(tx, jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = _params(), tx.init(_params())
    # Matrix optimizers' eager steps each compile their eigendecompositions: two moving steps will do.
    steps = _steps(spec, 2 if Capability.MATRIX_STATE in spec.capabilities else 3)
    for _ in range(steps):
        params, state = step(params, state)
    assert traces == 1, "the step recompiled: the state's types or shapes changed between steps"
    eager, _ = _run(tx, _params(), steps)
    _assert_trees_close(params, eager, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, _params())
    assert max(jax.tree.leaves(moved)) > 0, "three steps did not move the parameters"


@SPECS
def test_vmap_over_a_batch_of_parameter_trees(spec: OptimizerSpec) -> None:
    """In float64: large first steps (Schedule-Free SGD at learning rate 1) amplify float32 rounding."""
    with jax.enable_x64(True):
        tx = learning_rates.make(spec)
        batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), _params(jnp.float64))

        def two_steps(params: Any) -> Any:
            return _run(tx, params, 2)[0]

        batched = jax.jit(jax.vmap(two_steps))(batch)
        singles = [jax.jit(two_steps)(jax.tree.map(lambda x: x[i], batch)) for i in range(3)]
    # Eigenbases (SOAP's) turn a last-bit difference between the batched and the single programs into 1e-10.
    rtol = 1e-9 if Capability.MATRIX_STATE in spec.capabilities else 1e-10
    for i, single in enumerate(singles):
        _assert_trees_close(jax.tree.map(lambda x: x[i], batched), single, rtol=rtol, atol=1e-12)


@SPECS
def test_grad_through_updates_with_respect_to_the_learning_rate(spec: OptimizerSpec) -> None:
    """Meta-learning: d(loss after two steps)/d(learning rate) agrees with finite differences. A row of "pad" multiplies
    an input that is always 0 (padding, an unused embedding row): its gradient is exactly 0, yet a function of the
    parameters, and a square root's infinite derivative at a zero moment made the hypergradient NaN. (PSGD Kron's was
    infinite as these tests compile, from a maximum's derivative: ``psgd_kron._largest``.)"""

    def loss(p: dict) -> jax.Array:
        return _loss(p) + jnp.sum(jnp.tanh(jnp.asarray([1.0, 0.0]) @ p["pad"]) ** 2)

    with jax.enable_x64(True):
        params = _params(jnp.float64)
        params["pad"] = jnp.asarray([[0.3, -0.2, 0.7], [0.1, 0.4, -0.6]])

        @functools.partial(_compiled_if_matrix, spec)
        def loss_after(lr: jax.Array) -> jax.Array:
            return loss(_run(spec.factory(learning_rate=lr), params, 2, lambda p, _: jax.grad(loss)(p))[0])

        lr = jnp.asarray(learning_rates.TUNED[spec.name] * 0.1, jnp.float64)
        grad = jax.grad(loss_after)(lr)
        h = 1e-6 * lr
        numeric = (loss_after(lr + h) - loss_after(lr - h)) / (2 * h)
        assert np.isfinite(float(grad))
        np.testing.assert_allclose(float(grad), float(numeric), rtol=1e-4, atol=1e-8)


@SPECS
def test_inject_hyperparams_matches_fixed_hyperparameters(spec: OptimizerSpec) -> None:
    with _precise(spec):
        _inject_hyperparams_matches_fixed_hyperparameters(spec)


def _inject_hyperparams_matches_fixed_hyperparameters(spec: OptimizerSpec) -> None:
    numeric = {
        "learning_rate": learning_rates.TUNED[spec.name],
        **{k: r.sample(0.5) for k, r in spec.hyperparameters.items()},
    }
    injected = adaopt.inject_hyperparams(spec.factory)(**numeric)
    fixed = spec.factory(**numeric)
    ours, state = jax.jit(lambda p: _run(injected, p, 3))(_params())
    _assert_trees_close(ours, _run(fixed, _params(), 3)[0], rtol=1e-5, atol=1e-6)
    # Changing the injected learning rate changes the step, without rebuilding anything.
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    grads = jax.grad(_loss)(ours)
    updates, _ = _update(injected, grads, state, ours)
    # Schedule-Free: learning rate 0 still moves y toward the average; dual averaging and learned
    # scales move at learning rate 0 by design.
    if not spec.capabilities & {Capability.AVERAGED_ITERATES, Capability.MOVES_AT_ZERO_LR}:
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


@SPECS
def test_injected_hyperparameters_keep_each_leafs_dtype(spec: OptimizerSpec) -> None:
    """inject_hyperparams passes every numeric hyperparameter as an array of the tree's widest
    dtype (float32 here): the bfloat16 leaves' updates stay bfloat16, and finite."""
    params = {"half": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.bfloat16).reshape(3, 2), "full": jnp.ones(4)}
    numeric = {
        "learning_rate": learning_rates.TUNED[spec.name],
        **{k: r.sample(0.5) for k, r in spec.hyperparameters.items()},
    }
    injected = adaopt.inject_hyperparams(spec.factory)(**numeric)
    state = injected.init(params)
    for t in range(_steps(spec, 3)):
        grads = _grads(params, t)
        updates, state = jax.jit(injected.update)(grads, state, params, value=jnp.asarray(1.0 / (1 + t)))
        for name, u in updates.items():
            assert u.dtype == params[name].dtype, f"{name}: update in {u.dtype} for a {params[name].dtype} parameter"
            assert bool(jnp.all(jnp.isfinite(u)))
        params = optax.apply_updates(params, updates)


@SPECS
def test_chained_with_clipping_equals_clipping_first(spec: OptimizerSpec) -> None:
    schedule = adaopt.warmup_cosine_decay_schedule(0.0, learning_rates.TUNED[spec.name], 2, 10)
    chained = adaopt.chain(adaopt.clip_by_global_norm(0.5), learning_rates.make(spec, learning_rate=schedule))
    plain = learning_rates.make(spec, learning_rate=schedule)
    big = lambda p, t: jax.tree.map(lambda g: 100.0 * g, jax.grad(_loss)(p))

    def clipped(p: Any, t: int) -> Any:
        g = big(p, t)
        norm = optax.tree.norm(g)
        return jax.tree.map(lambda x: x * (0.5 / norm), g)

    # Two compiled programs round differently, which SOAP's eigenbases amplify: matrix optimizers
    # compare in float64, the others eagerly on both sides.
    matrix = Capability.MATRIX_STATE in spec.capabilities
    with _precise(spec):
        ours, theirs = (
            _run(chained, _params(), 4, big, jit=matrix)[0],
            _run(plain, _params(), 4, clipped, jit=matrix)[0],
        )
    _assert_trees_close(ours, theirs, 1e-5, 1e-6)


@SPECS
def test_multisteps_accumulates_to_the_mean_gradient(spec: OptimizerSpec) -> None:
    tx = learning_rates.make(spec)
    multi = adaopt.MultiSteps(tx, every_k_schedule=3)
    params = _params()
    micro = [_grads(params, t) for t in range(3)]
    state = multi.init(params)
    update = jax.jit(lambda g, s, p: _update(multi, g, s, p))  # one compile for the three calls
    for g in micro:
        updates, state = update(g, state, params)
    mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
    expected, _ = _run_update(tx, mean, params, jit=Capability.MATRIX_STATE in spec.capabilities)
    _assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6)


@SPECS
def test_inside_optax_partition_it_steps_its_group_as_alone(spec: OptimizerSpec) -> None:
    """optax.partition puts MaskedNode in place of the other group's leaves, in the gradients and the state: the
    optimizer's group steps as the optimizer on that subtree alone (Adafactor and GaLore took optax's MaskedNode
    for their own "no statistic here" and refused the gradients)."""
    params = _params()
    tx = learning_rates.make(spec)
    labels = {"dense": {"w": "ours", "b": "ours"}, "scale": "frozen"}
    partitioned = optax.partition({"ours": tx, "frozen": optax.set_to_zero()}, labels)
    grads = _grads(params, 0)
    updates, _ = _compiled_if_matrix(spec, lambda g: _update(partitioned, g, partitioned.init(params), params))(grads)
    alone = {"dense": params["dense"]}
    value = _loss(params)
    expected, _ = _compiled_if_matrix(spec, lambda g: tx.update(g, tx.init(alone), alone, value=value))(
        {"dense": grads["dense"]}
    )
    _assert_trees_close(updates["dense"], expected["dense"])
    assert float(updates["scale"]) == 0.0


@SPECS
def test_apply_if_finite_skips_a_nan_step(spec: OptimizerSpec) -> None:
    tx = adaopt.apply_if_finite(learning_rates.make(spec), max_consecutive_errors=5)
    params = _params()
    state = tx.init(params)
    update = _compiled_if_matrix(spec, lambda g, s: _update(tx, g, s, params))
    bad = jax.tree.map(lambda g: g.at[()].set(jnp.nan) if g.ndim == 0 else g.at[0].set(jnp.inf), _grads(params, 0))
    updates, state = update(bad, state)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    good = _grads(params, 1)
    updates, _ = update(good, state)
    expected, _ = _run_update(learning_rates.make(spec), good, params, jit=Capability.MATRIX_STATE in spec.capabilities)
    _assert_trees_close(updates, expected)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _mirrors(state: Any, params: Any) -> list[Any]:
    """The subtrees of ``state`` that have the parameters' tree structure, where a partitioned optimizer's
    group (``optax.partition``) holds ``optax.MaskedNode()`` in place of the leaves of the other groups."""
    target = jax.tree.structure(params)
    found: list[Any] = []

    def visit(node: Any) -> None:
        if jax.tree.structure(node, is_leaf=_is_masked) == target:
            found.append(node)
        elif isinstance(node, tuple | list):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


def _buffers(tree: Any) -> list[int]:
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]


@SPECS
def test_steps_at_the_saturated_count_stay_finite(spec: OptimizerSpec) -> None:
    """Counts saturate at 2**31 - 1 (int32): every int32 scalar of a state set just below the cap, the steps across
    it stay finite (NAdam's next-step momentum read count + 1, which wrapped to -2**31: NaN from the cap on)."""
    params = _params()
    tx = learning_rates.make(spec)
    _, state = _run(tx, params, 2)
    near_cap = lambda x: jnp.full_like(x, 2**31 - 3) if x.dtype == jnp.int32 and x.ndim == 0 else x
    state = jax.tree.map(near_cap, state)
    step = jax.jit(lambda p, s: _update(tx, jax.grad(_loss)(p), s, p))
    for _ in range(4):
        updates, state = step(params, state)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), updates
        params = optax.apply_updates(params, updates)


@SPECS
def test_the_state_holds_each_buffer_once_and_none_of_the_parameters(spec: OptimizerSpec) -> None:
    """A state built outside jit and donated whole (``jax.jit(step, donate_argnums=...)``) must not hold one buffer
    twice, nor a parameter's: XLA refuses to donate a buffer twice. inject_hyperparams' arrays are the first values of
    some estimates (D-Adaptation's d, Schedule-Free's weights), and one zero once served two sums."""
    params = _params()
    numeric = {
        "learning_rate": learning_rates.TUNED[spec.name],
        **{k: r.sample(0.5) for k, r in spec.hyperparameters.items()},
    }
    for tx in (learning_rates.make(spec), adaopt.inject_hyperparams(spec.factory)(**numeric)):
        held = _buffers(tx.init(params))
        assert len(set(held)) == len(held), "a buffer held twice"
        assert not set(held) & set(_buffers(params)), "a parameter's buffer held"


@SPECS
def test_state_mirrors_the_parameter_tree(spec: OptimizerSpec) -> None:
    params = _params()
    state = learning_rates.make(spec).init(params)
    mirrors = _mirrors(state, params)
    in_mirrors = {id(x) for m in mirrors for x in jax.tree.leaves(m)}
    # Every non-scalar state leaf belongs to a subtree that mirrors the parameters (but the square
    # matrices of Capability.MATRIX_STATE: Kronecker factors, eigenbases, inverse roots).
    matrices = Capability.MATRIX_STATE in spec.capabilities
    for x in jax.tree.leaves(state):
        square = matrices and jnp.ndim(x) == 2 and x.shape[0] == x.shape[1]
        assert jnp.ndim(x) == 0 or square or id(x) in in_mirrors, f"a state leaf of shape {x.shape} mirrors nothing"
    # Capability.FACTORED_STATE: a mirroring leaf may be its parameter's shape with axes removed (row, column statistics).
    factored = Capability.FACTORED_STATE in spec.capabilities
    for m in mirrors:
        for s, p in zip(jax.tree.leaves(m, is_leaf=_is_masked), jax.tree.leaves(params), strict=True):
            assert _is_masked(s) or s.shape == p.shape or (factored and kept_axes(s.shape, p.shape) is not None)


def kept_axes(shape: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes of ``full`` that ``shape`` keeps when it is ``full`` with some axes removed (the first match), else None."""
    kept: list[int] = []
    for n in shape:
        start = kept[-1] + 1 if kept else 0
        axis = next((a for a in range(start, len(full)) if full[a] == n), None)
        if axis is None:
            return None
        kept.append(axis)
    return tuple(kept) if len(kept) < len(full) else None


AWKWARD_TREES = {
    # Nesting of dicts, lists and tuples; None (frozen) leaves; scalar, (1, 1) and zero-size leaves.
    "awkward": {
        "a": {"b": [jnp.ones((2, 3)), (jnp.ones(4), jnp.asarray(2.0))]},
        "c": jnp.ones((1, 1)),
        "frozen": None,
        "d": [None, jnp.asarray(-1.0)],
        "empty": jnp.ones((0, 3)),
    },
    "no_leaves": {},
}


@SPECS
@pytest.mark.parametrize("tree", list(AWKWARD_TREES), ids=str)
def test_awkward_trees(spec: OptimizerSpec, tree: str) -> None:
    params = AWKWARD_TREES[tree]
    tx = learning_rates.make(spec)
    grads = jax.tree.map(lambda x: 0.1 * x + 0.05, params)

    @functools.partial(_compiled_if_matrix, spec)  # others eager: jit is test_jit_compiles_once_and_matches_eager's
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        loss = sum((jnp.sum(x**2) for x in jax.tree.leaves(p)), jnp.zeros([]))
        u, s = tx.update(grads, s, p, value=loss)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    new = params
    for _ in range(_steps(spec, 2)):
        new, state = step(new, state)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for x, p in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        assert x.shape == p.shape and x.dtype == p.dtype
        assert bool(jnp.all(jnp.isfinite(x)))
    for x, p in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        assert x.size == 0 or bool(jnp.any(x != p)), f"a leaf of shape {p.shape} did not move"


# float32 is every other test's; "half" mixes float16 and bfloat16 leaves in one tree.
DTYPES = {"half": (jnp.bfloat16, jnp.float16, jnp.bfloat16), "float64": (jnp.float64,) * 3}


def _typed_params(dtypes: tuple[Any, Any, Any]) -> dict:
    params = _params(jnp.float32)
    return {
        "dense": {"w": params["dense"]["w"].astype(dtypes[0]), "b": params["dense"]["b"].astype(dtypes[1])},
        "scale": params["scale"].astype(dtypes[2]),
    }


@SPECS
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=str)
def test_dtypes_are_kept_and_half_precision_is_safe(spec: OptimizerSpec, dtypes: str) -> None:
    with jax.enable_x64(dtypes == "float64"), jax.numpy_dtype_promotion("strict"):
        params = _typed_params(DTYPES[dtypes])
        tx = learning_rates.make(spec)
        state = tx.init(params)
        update = _compiled_if_matrix(spec, tx.update)
        for grads in (jax.tree.map(jnp.zeros_like, params), _grads(params, 0), _grads(params, 1)):
            updates, state = update(grads, state, params, value=jnp.asarray(1.0, params["scale"].dtype))
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
                assert u.dtype == p.dtype, f"update in {u.dtype} for a {p.dtype} gradient"
                assert bool(jnp.all(jnp.isfinite(u))), f"non-finite update for a {p.dtype} parameter"
            params = optax.apply_updates(params, updates)
        for p, dtype in zip(jax.tree.leaves(params), jax.tree.leaves(_typed_params(DTYPES[dtypes])), strict=True):
            assert p.dtype == dtype.dtype


@SPECS
def test_mismatched_gradient_tree_is_a_clear_error(spec: OptimizerSpec) -> None:
    tx = learning_rates.make(spec)
    params = _params()
    state = tx.init(params)
    wrong = {"dense": {"w": params["dense"]["w"]}, "scale": params["scale"]}
    with pytest.raises(adaopt.TreeMismatchError, match=r"do not have the structure of the optimizer's parameters"):
        _update(tx, wrong, state, params)


@SPECS
def test_a_gradient_of_the_wrong_shape_names_its_leaf_and_both_shapes(spec: OptimizerSpec) -> None:
    tx = learning_rates.make(spec)
    params = _params()
    state = tx.init(params)
    wrong = {**params, "dense": {**params["dense"], "w": jnp.ones((5, 3))}}
    with pytest.raises(adaopt.TreeMismatchError, match=r"\['dense'\]\['w'\] have shape \(5, 3\).* has shape \(4, 3\)"):
        _update(tx, wrong, state, params)


@pytest.mark.parametrize(
    "spec", [s for s in REGISTRY.values() if Capability.WEIGHT_DECAY in s.capabilities], ids=lambda s: s.name
)
def test_weight_decay_mask_selects_the_decayed_leaves(spec: OptimizerSpec) -> None:
    """In float64, where the tiny first steps of D-Adaptation (d0 = 1e-6) are exact."""
    mask = {"dense": {"w": True, "b": False}, "scale": False}
    n = _steps(spec, 2)
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        grads = _grads(params, 0)
        tx_d, tx_p = (
            learning_rates.make(spec, weight_decay=0.5, weight_decay_mask=mask),
            learning_rates.make(spec, weight_decay=0.0),
        )
        matrices = Capability.MATRIX_STATE in spec.capabilities
        decayed, _ = _run(tx_d, params, n, lambda p, t: grads, jit=matrices)
        plain, _ = _run(tx_p, params, n, lambda p, t: grads, jit=matrices)
        u_d, _ = _run_update(tx_d, grads, params, jit=matrices)
        u_p, _ = _run_update(tx_p, grads, params, jit=matrices)
    # Adaptive steps normalise the decay away in part: any change to the decayed leaf shows
    # the decay acted, and the others must be bitwise untouched.
    assert not np.array_equal(decayed["dense"]["w"], plain["dense"]["w"]), "decay had no effect"
    if Capability.GLOBAL_STEP_SIZE in spec.capabilities:
        # One step size from whole-tree norms: the decay rescales the undecayed leaves' step, all by one factor.
        ratio = np.concatenate([np.ravel(u_d["dense"]["b"] / u_p["dense"]["b"]), np.ravel(u_d["scale"] / u_p["scale"])])
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    else:
        np.testing.assert_array_equal(decayed["dense"]["b"], plain["dense"]["b"])
        np.testing.assert_array_equal(decayed["scale"], plain["scale"])
