"""The multi-tensor layouts: ``multi_tensor`` and ``flatten_params`` follow the tree-shaped optimizer's trajectory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaopt
from adaopt import (
    REGISTRY,
    FlatTree,
    MultiTensorState,
    NotElementwiseError,
    TreeMismatchError,
    flatten_params,
    multi_tensor,
)
from benchmarks import learning_rates

MIN_SIZE = 256  # small enough that the test tree has leaves on both sides
STEPS = 50


def mixed_tree(dtype: Any = jnp.float32) -> dict:
    """Small and large leaves, float and bfloat16, a scalar, zero-size leaves and a None."""
    rng = np.random.default_rng(0)

    def leaf(shape: tuple[int, ...], dt: Any = dtype) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape), dt)

    return {
        "large": leaf((20, 16)),  # 320 elements: its own buffers
        "large_bf16": leaf((300,), jnp.bfloat16),
        "bias": leaf((7,)),
        "scale": leaf(()),
        "empty": leaf((0, 4)),
        "half": leaf((5, 3), jnp.bfloat16),
        "none": None,
        "layer": {"kernel": leaf((4, 6)), "empty_bf16": leaf((0,), jnp.bfloat16), "gain": leaf((1,))},
    }


def gradient_sequence(params: Any, steps: int = STEPS) -> Any:
    """Fresh random gradients for each step: a tree of (steps, *shape) arrays in the leaves' dtypes."""
    rng = np.random.default_rng(1)  # numpy, not jax.random: no compilation per leaf shape
    return jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal((steps, *jnp.shape(x))), jnp.float32).astype(x.dtype),
        params,
    )


def trajectory(tx: optax.GradientTransformation, params: Any, grads: Any) -> Any:
    """The parameters after every step, the whole run in one compiled scan."""

    def step(carry: tuple, g: Any) -> tuple[tuple, Any]:
        p, s = carry
        updates, s = tx.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p: Any, gs: Any) -> Any:
        return jax.lax.scan(step, (p, tx.init(p)), gs)[1]

    return run(params, grads)


def assert_close(ours: Any, theirs: Any, rtol: float) -> None:
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        # A half-precision leaf is rounded after each step: one rounding that an FMA tipped is one ulp.
        tol = max(rtol, 2 * float(jnp.finfo(x.dtype).eps))
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
        assert float(np.max(np.abs(x - y), initial=0.0)) <= tol * scale


# Registry entries of elementwise optimizers, with non-default options where the step has branches.
ELEMENTWISE = {
    "sgd": {"momentum": 0.9, "dampening": 0.2, "weight_decay": 1e-2},
    "adamw": {"weight_decay": 0.1},  # Adam's moments (NAdam's differ only in the elementwise arithmetic)
    "rmsprop": {"centered": True, "momentum": 0.5},
    "adagrad": {"lr_decay": 0.01},
    "lion": {"weight_decay": 0.1},
}


def make(name: str) -> optax.GradientTransformation:
    spec = REGISTRY[name]
    return learning_rates.make(spec, **ELEMENTWISE[name])


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_float32_trajectory_equals_the_tree_shaped_optimizer(name: str) -> None:
    params = mixed_tree()
    grads = gradient_sequence(params)
    plain = trajectory(make(name), params, grads)
    packed = trajectory(multi_tensor(make(name), min_size=MIN_SIZE), params, grads)
    # The same operations per coordinate; XLA contracts a*b + c into FMAs according to where its
    # kernels start and end, which the layout changes: agreement to a few float32 roundings.
    assert_close(packed, plain, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_float64_trajectory_equals_the_tree_shaped_optimizer(name: str) -> None:
    with jax.enable_x64(True):
        params = mixed_tree(jnp.float64)
        grads = gradient_sequence(params)
        plain = trajectory(make(name), params, grads)
        packed = trajectory(multi_tensor(make(name), min_size=MIN_SIZE), params, grads)
        assert_close(packed, plain, rtol=1e-12)


@pytest.mark.parametrize("name", ["adamw"])
def test_eager_steps_are_bit_for_bit_the_tree_shaped_optimizer(name: str) -> None:
    """Run op by op (no fusion, no FMA contraction), every coordinate sees the very same arithmetic."""
    full = mixed_tree()
    params = {k: full[k] for k in ("large", "bias", "scale", "half")}
    grads = gradient_sequence(params, steps=2)
    results = []
    for tx in (make(name), multi_tensor(make(name), min_size=MIN_SIZE)):
        p, s = params, tx.init(params)
        for t in range(2):
            updates, s = tx.update(jax.tree.map(lambda g, t=t: g[t], grads), s, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_state_is_flat_for_small_leaves_and_a_plain_pytree_of_arrays() -> None:
    params = mixed_tree()
    tx = multi_tensor(adaopt.adam(1e-2), min_size=MIN_SIZE)
    state = tx.init(params)
    assert isinstance(state, MultiTensorState)
    mu = optax.tree.get(state.inner, "mu")
    assert isinstance(mu, FlatTree)
    # 7 + 1 + 0 + 4*6 + 1 float32 and 15 + 0 bfloat16 elements, one buffer each; the two large leaves apart.
    assert {k: v.shape for k, v in mu.buffers.items()} == {"bfloat16": (15,), "float32": (33,)}
    assert {k: v.dtype for k, v in mu.buffers.items()} == {"bfloat16": jnp.float32, "float32": jnp.float32}
    assert [leaf.shape for leaf in mu.leaves] == [(20, 16), (300,)]

    # A checkpoint: the state's leaves as host arrays, restored into the same structure, resumes exactly.
    grads = gradient_sequence(params, steps=4)
    step = jax.jit(tx.update)
    for t in range(2):
        _, state = step(jax.tree.map(lambda g, t=t: g[t], grads), state, params)
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x)) for x in leaves])
    for t in (2, 3):
        g = jax.tree.map(lambda g, t=t: g[t], grads)
        (u1, state), (u2, restored) = step(g, state, params), step(g, restored, params)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_jit_compiles_once() -> None:
    params = mixed_tree()
    tx = multi_tensor(adaopt.adam(1e-2), min_size=MIN_SIZE)
    traces = 0

    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        nonlocal traces
        traces += 1
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step)
    state = tx.init(params)
    grads = gradient_sequence(params, steps=3)
    for t in range(3):
        params, state = jitted(params, state, jax.tree.map(lambda g, t=t: g[t], grads))
    assert traces == 1


def test_inject_hyperparams_outside_and_inside() -> None:
    params = mixed_tree()
    grads = gradient_sequence(params, steps=10)
    plain = trajectory(adaopt.adam(3e-2), params, grads)
    outside = optax.inject_hyperparams(
        lambda learning_rate: multi_tensor(adaopt.adam(learning_rate), min_size=MIN_SIZE)
    )
    inside = multi_tensor(optax.inject_hyperparams(adaopt.adam)(learning_rate=3e-2), min_size=MIN_SIZE)
    assert_close(trajectory(outside(learning_rate=3e-2), params, grads), plain, rtol=1e-5)
    assert_close(trajectory(inside, params, grads), plain, rtol=1e-5)

    # A hyperparameter changed in the state takes effect.
    tx = outside(learning_rate=3e-2)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    g = jax.tree.map(lambda g: g[0], grads)
    updates, _ = jax.jit(tx.update)(g, state, params)
    assert all(not np.any(np.asarray(u, np.float32)) for u in jax.tree.leaves(updates))


def test_grad_through_the_update_with_respect_to_the_learning_rate() -> None:
    params = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones((2, 3))}
    g = jax.tree.map(lambda x: 0.5 * x + 0.1, params)

    def moved(lr: jax.Array, tx_of: Any) -> jax.Array:
        tx = tx_of(lr)
        updates, _ = tx.update(g, tx.init(params), params)
        return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

    ours = jax.grad(moved)(jnp.asarray(0.1), lambda lr: multi_tensor(adaopt.sgd(lr, momentum=0.9)))
    theirs = jax.grad(moved)(jnp.asarray(0.1), lambda lr: adaopt.sgd(lr, momentum=0.9))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_vmap_over_learning_rates_is_a_sweep() -> None:
    """A vmapped sweep over the learning rate (as benchmarks/convergence.py runs its grid) equals
    the tree-shaped optimizer run at each learning rate."""
    params = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones((2, 3)), "big": jnp.full((40, 30), 0.5)}
    grads = jax.tree.map(lambda x: jnp.stack([jnp.sin(3 * x + k) for k in range(4)]), params)
    rates = jnp.asarray([1e-3, 1e-2, 1e-1])
    ours = jax.jit(jax.vmap(lambda lr: trajectory(multi_tensor(adaopt.adam(lr), min_size=1000), params, grads)))(rates)
    for i, lr in enumerate(rates):
        theirs = trajectory(adaopt.adam(lr), params, grads)
        assert_close(jax.tree.map(lambda x: x[i], ours), theirs, rtol=1e-6)


@pytest.mark.parametrize("tree", [{}, {"n": None}, {"z": jnp.zeros((0,))}, jnp.asarray(2.0)], ids=str)
def test_awkward_trees(tree: Any) -> None:
    tx = multi_tensor(adaopt.adam(1e-2))
    state = tx.init(tree)
    updates, _ = jax.jit(tx.update)(tree, state, tree)
    assert jax.tree.structure(updates) == jax.tree.structure(tree)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_half_precision_zero_gradient_gives_finite_updates_in_the_parameter_dtype(dtype: Any) -> None:
    params = {"a": jnp.ones((3, 2), dtype), "b": jnp.ones(4, dtype)}
    tx = multi_tensor(adaopt.adam(1e-3))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for u in jax.tree.leaves(updates):
        assert u.dtype == dtype and bool(jnp.all(jnp.isfinite(u)))


@pytest.mark.parametrize(
    "tx",
    [
        adaopt.lamb(1e-3),  # per-leaf trust ratios
        adaopt.dog(),  # a step size from whole-tree norms
        adaopt.ldog(),  # a step size per leaf
        adaopt.prodigy(),
        optax.chain(optax.clip_by_global_norm(1.0), adaopt.adam(1e-3)),
    ],
    ids=["lamb", "dog", "ldog", "prodigy", "clip_by_global_norm"],
)
def test_an_optimizer_that_mixes_coordinates_is_refused(tx: optax.GradientTransformation) -> None:
    params = mixed_tree()
    wrapped = multi_tensor(tx)
    state = wrapped.init(params)
    with pytest.raises(NotElementwiseError, match=r"elementwise optimizer.*clip_by_global_norm"):
        wrapped.update(params, state, params)


@pytest.mark.parametrize(
    "tx",
    [
        adaopt.muon(1e-2),  # Muon's matrices: a packed buffer would go to its AdamW
        adaopt.adafactor(relative_step=False, scale_parameter=False, clip_threshold=None),  # factored by shape
        adaopt.soap(precondition_frequency=1),
    ],
    ids=["muon", "adafactor", "soap"],
)
def test_an_optimizer_that_decides_by_a_leafs_shape_is_refused(tx: optax.GradientTransformation) -> None:
    """Small matrices packed into a vector take these optimizers' elementwise vector path: the update is checked on
    the leaves themselves too, where it is not elementwise."""
    params = {"w": jnp.ones((16, 8)), "b": jnp.ones(8)}
    wrapped = multi_tensor(tx)
    with pytest.raises(NotElementwiseError, match="a matrix's own step would become a vector's"):
        wrapped.update(params, wrapped.init(params), params)


@pytest.mark.parametrize("storage", ["int8", "int4", "fp8", "bfloat16_sr"])
def test_a_stored_moment_is_refused_at_init_with_the_reason(storage: str) -> None:
    """A moment in blocks or stochastically rounded: refused at init naming the storage (the update's check had
    named only a gather or an iota), even where every packed leaf is below the storage's min_size."""
    params = {"big": jnp.ones((256, 256)), "b": jnp.ones(128), "c": jnp.ones(16)}
    tx = adaopt.multi_tensor(adaopt.adamw(1e-3, mu_dtype=storage, nu_dtype=storage))
    with pytest.raises(NotElementwiseError, match=r"stores a moment with (Blockwise|StochasticBf16)\(.*float32"):
        tx.init(params)


def test_complex_leaves_viewed_as_real_pairs_are_refused_with_the_reason() -> None:
    params = {"z": jnp.ones(3, jnp.complex64), "r": jnp.ones(2)}
    for tx in (adaopt.rprop(1e-2), adaopt.adam(1e-2, complex_convention="real_imag")):
        wrapped = multi_tensor(tx)
        with pytest.raises(NotElementwiseError, match="views each as real pairs"):
            wrapped.update(params, wrapped.init(params), params)
    wrapped = multi_tensor(adaopt.adam(1e-2))  # modulus: complex arithmetic, coordinate by coordinate
    wrapped.update(params, wrapped.init(params), params)


def test_half_precision_parameters_with_float32_gradients() -> None:
    """Mixed precision: bfloat16 parameters, float32 gradients (the layout is the parameters', as init's)."""
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(4, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.cos(p.astype(jnp.float32)), params)
    for make in (lambda: adaopt.adam(1e-2), lambda: adaopt.sgd(1e-2, momentum=0.9)):
        wrapped, plain = multi_tensor(make()), make()
        ours, _ = jax.jit(wrapped.update)(grads, wrapped.init(params), params)
        theirs, _ = jax.jit(plain.update)(grads, plain.init(params), params)
        assert_close(ours, theirs, rtol=0)


def test_a_static_extra_argument_stays_static() -> None:
    """monitor's record=False, static under jit, through the elementwise check's trace."""
    params = mixed_tree()
    tx = adaopt.monitor(adaopt.adam(1e-2))
    step = lambda t: jax.jit(t.update, static_argnames="record")(params, t.init(params), params, record=False)[0]
    assert_close(step(multi_tensor(tx, min_size=MIN_SIZE)), step(tx), rtol=1e-6)


def _stateless(step: Any) -> optax.GradientTransformation:
    return optax.GradientTransformation(optax.init_empty_state, lambda g, s, p=None: (jax.tree.map(step, g), s))


@pytest.mark.parametrize(
    ("step", "primitive"),
    [
        # Each depends on more than the coordinate itself, through a primitive no list of mixing
        # operations named before: only an allow list of elementwise primitives catches them all.
        (lambda g: g * jnp.arange(g.size, dtype=g.dtype).reshape(g.shape), "iota"),  # the coordinate's position
        (lambda g: g - jax.lax.reduce(g, np.array(0, g.dtype), jax.lax.add, tuple(range(g.ndim))), "reduce"),
        (lambda g: g + jax.random.normal(jax.random.key(0), g.shape, g.dtype), "random"),  # a draw per position
    ],
    ids=["iota", "reduce", "random"],
)
def test_an_update_outside_the_elementwise_primitives_is_refused(step: Any, primitive: str) -> None:
    params = mixed_tree()
    wrapped = multi_tensor(_stateless(step))
    state = wrapped.init(params)
    with pytest.raises(NotElementwiseError, match=rf"applies `[^`]*{primitive}[^`]*`"):
        wrapped.update(params, state, params)


def test_an_elementwise_update_with_scalar_arithmetic_and_broadcasts_is_accepted() -> None:
    params = mixed_tree()
    scale = lambda g: (
        jnp.where(jnp.sum(jnp.ones(())) > 0, jnp.broadcast_to(jnp.asarray(2.0, g.dtype), g.shape), 1.0) * g
    )
    wrapped = multi_tensor(_stateless(scale), min_size=MIN_SIZE)
    updates, _ = wrapped.update(params, wrapped.init(params), params)
    assert_close(updates, jax.tree.map(lambda p: 2 * p, params), rtol=0)


def test_clipping_chained_outside_the_wrapper_is_accepted() -> None:
    params = mixed_tree()
    grads = gradient_sequence(params, steps=10)
    outside = optax.chain(optax.clip_by_global_norm(0.5), multi_tensor(adaopt.adam(1e-2), min_size=MIN_SIZE))
    plain = optax.chain(optax.clip_by_global_norm(0.5), adaopt.adam(1e-2))
    assert_close(trajectory(outside, params, grads), trajectory(plain, params, grads), rtol=1e-5)


def test_a_mask_matching_the_parameters_is_a_clear_error() -> None:
    params = mixed_tree()
    mask = jax.tree.map(lambda x: x.ndim > 1, params)
    with pytest.raises(TreeMismatchError, match="add_decayed_weights"):
        multi_tensor(adaopt.adamw(1e-3, weight_decay_mask=mask)).init(params)


def test_bad_min_size_is_refused() -> None:
    with pytest.raises(ValueError, match="min_size"):
        multi_tensor(adaopt.adam(1e-3), min_size=0)
    with pytest.raises(ValueError, match="min_size"):
        multi_tensor(adaopt.adam(1e-3), min_size=2.5)
    with pytest.raises(ValueError, match="min_size"):
        flatten_params({"a": jnp.ones(2)}, min_size=-3)


def test_flatten_params_round_trip_dtypes_and_gradient() -> None:
    params = mixed_tree()
    flat, unflatten = flatten_params(params)
    assert flat.leaves == ()
    assert {k: (v.shape, v.dtype) for k, v in flat.buffers.items()} == {
        "bfloat16": ((315,), jnp.bfloat16),
        "float32": ((353,), jnp.float32),
    }
    back = unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))

    def loss(p: Any) -> jax.Array:
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p))

    tree_grads = jax.grad(loss)(params)
    flat_grads = jax.grad(lambda f: loss(unflatten(f)))(flat)
    expected, _ = flatten_params(tree_grads)
    for x, y in zip(jax.tree.leaves(flat_grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))

    # Forward mode too: the tangent of unflatten is unflatten of the tangent.
    tangent = jax.tree.map(lambda x: jnp.full_like(x, 0.5), flat)
    _, jvp = jax.jit(lambda f, t: jax.jvp(lambda f: loss(unflatten(f)), (f,), (t,)))(flat, tangent)
    expected_jvp = sum(0.5 * jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(expected))
    np.testing.assert_allclose(jvp, expected_jvp, rtol=1e-2)  # bfloat16 leaves: a loose tolerance

    large, _ = flatten_params(params, min_size=MIN_SIZE)
    assert [x.shape for x in large.leaves] == [(20, 16), (300,)]


def test_flat_params_step_equals_the_tree_step() -> None:
    params = mixed_tree()
    grads = gradient_sequence(params)
    flat, unflatten = flatten_params(params)
    flat_grads = jax.vmap(lambda g: flatten_params(g)[0])(grads)
    ours = jax.vmap(unflatten)(trajectory(adaopt.adam(1e-2), flat, flat_grads))
    assert_close(ours, trajectory(adaopt.adam(1e-2), params, grads), rtol=1e-5)


def test_both_layouts_train_a_small_regression() -> None:
    """A two-layer network fitted by Adam: tree-shaped, multi-tensor and flat parameters all reduce the loss alike."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    y = jnp.sin(x @ jnp.asarray(rng.normal(size=(5, 1)), jnp.float32))
    params = {
        "l1": {"w": jnp.asarray(0.5 * rng.normal(size=(5, 16)), jnp.float32), "b": jnp.zeros(16)},
        "l2": {"w": jnp.asarray(0.5 * rng.normal(size=(16, 1)), jnp.float32), "b": jnp.zeros(1)},
    }

    def loss(p: Any) -> jax.Array:
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        return jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2)

    def train(tx: optax.GradientTransformation, p: Any, loss_fn: Any) -> Any:
        @jax.jit
        def run(p: Any) -> Any:
            def body(carry: tuple, _: Any) -> tuple[tuple, None]:
                p, s = carry
                updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
                return (optax.apply_updates(p, updates), s), None

            return jax.lax.scan(body, (p, tx.init(p)), None, length=200)[0][0]

        return run(p)

    flat, unflatten = flatten_params(params)
    final = {
        "tree": loss(train(adaopt.adam(1e-2), params, loss)),
        "multi_tensor": loss(train(multi_tensor(adaopt.adam(1e-2)), params, loss)),
        "flat": loss(unflatten(train(adaopt.adam(1e-2), flat, lambda f: loss(unflatten(f))))),
    }
    start = float(loss(params))
    for name, value in final.items():
        assert float(value) < 0.2 * start, name
    np.testing.assert_allclose(final["multi_tensor"], final["tree"], rtol=1e-4)
    np.testing.assert_allclose(final["flat"], final["tree"], rtol=1e-4)
