"""Every optimizer under a sharded parameter tree: a (4, 2) mesh of the 8 CPU devices set up by conftest.

The mesh's axes are explicit (sharding in types), so the sharding of every array traced under
``jit`` is fixed by the code that builds it, not left to the compiler. An optimizer's state that
mirrors the parameters (moments, accumulators, momentum buffers) must then have the sharding of
the parameter it mirrors, both after ``init`` and after training steps; scalar leaves (step counts,
running products) are replicated. The sharded run must also give the numbers of the same
computation on single-device arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from adaopt import Capability, FlatTree, OptimizerSpec
from benchmarks import learning_rates
from tests.test_contract import kept_axes

N_STEPS = 3
SHAPES = {"w": (64, 32), "b": (32,), "k": (16, 8)}
SPECS = {"w": P("data", None), "b": P(), "k": P("data", "model")}


def _mesh() -> Mesh:
    assert jax.device_count() >= 8, "conftest.py should give the test process 8 CPU devices"
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))


def _host_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _targets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _loss(params: dict[str, jax.Array], step: jax.Array) -> jax.Array:
    """A smooth loss whose gradients depend on the parameters and change from step to step."""
    scale = 1.0 + 0.5 * step.astype(jnp.float32)
    total = jnp.zeros([], jnp.float32)
    for name, target in _targets().items():
        p = params[name]
        total += jnp.sum((p - target) ** 2) + 0.1 * scale * jnp.sum(jnp.sin(3.0 * p))
    return total


def _train(
    tx: optax.GradientTransformationExtraArgs, params: dict[str, jax.Array], n_steps: int = N_STEPS
) -> tuple[Any, Any, Any]:
    """``init`` under jit, then ``n_steps`` jitted update + apply_updates steps.

    Returns the initial state, the final parameters and the final state.
    """

    @jax.jit
    def step(params: Any, state: Any, i: jax.Array) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(_loss)(params, i)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    init_state = state = jax.jit(tx.init)(params)
    for i in range(n_steps):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return init_state, params, state


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _mirroring_subtrees(state: Any, params: Any) -> tuple[list[Any], list[Any]]:
    """The subtrees of ``state`` with the parameters' tree structure, and the leaves outside them.

    A group's state under ``optax.partition`` mirrors the parameters with ``optax.MaskedNode()``
    in place of the other groups' leaves: it counts as mirroring them.
    """
    treedef = jax.tree.structure(params)

    def mirrors(x: Any) -> bool:
        return jax.tree.structure(x, is_leaf=_is_masked) == treedef

    nodes = jax.tree.leaves(state, is_leaf=mirrors)
    mirroring = [node for node in nodes if mirrors(node)]
    others = [node for node in nodes if not mirrors(node)]
    return mirroring, others


def _spec_of(x: jax.Array) -> Any:
    sharding = x.sharding
    assert isinstance(sharding, NamedSharding), f"expected a NamedSharding, got {sharding}"
    return sharding.spec


def _has_sharding_of(s: jax.Array, p: jax.Array, factored: bool) -> bool:
    """``s`` is placed as ``p``; a leaf of ``p``'s shape with axes removed (``factored``: Capability.FACTORED_STATE)
    is placed as ``p``'s axes that it keeps."""
    if s.shape == p.shape or not factored:
        return s.sharding.is_equivalent_to(p.sharding, p.ndim)
    kept = kept_axes(s.shape, p.shape)
    if kept is None:
        return False
    spec = (*p.sharding.spec, *(None,) * (p.ndim - len(p.sharding.spec)))
    return s.sharding.is_equivalent_to(NamedSharding(p.sharding.mesh, P(*(spec[a] for a in kept))), s.ndim)


def _check_state_shardings(
    state: Any, params: dict[str, jax.Array], mesh: Mesh, when: str, matrices: bool = False, factored: bool = False
) -> None:
    """The state mirroring the parameters keeps their shardings; the rest is replicated scalars, and
    (``matrices``: Capability.MATRIX_STATE) replicated square matrices."""
    mirroring, others = _mirroring_subtrees(state, params)
    for subtree in mirroring:
        got = jax.tree.map(lambda x: None if _is_masked(x) else _spec_of(x), subtree, is_leaf=_is_masked)
        want = jax.tree.map(_spec_of, params)
        # Compare as normalised NamedShardings: P() and P(None, None) are the same placement.
        same = jax.tree.map(
            lambda s, p: _is_masked(s) or (_has_sharding_of(s, p, factored) and s.sharding.mesh == mesh),
            subtree,
            params,
            is_leaf=_is_masked,
        )
        assert all(jax.tree.leaves(same)), f"{when}: state leaves {got} do not mirror the parameters' shardings {want}"
    for leaf in others:
        square = matrices and leaf.ndim == 2 and leaf.shape[0] == leaf.shape[1]
        assert leaf.ndim == 0 or square, f"{when}: a state leaf of shape {leaf.shape} does not mirror a parameter"
        assert leaf.sharding.is_fully_replicated, (
            f"{when}: state leaf of shape {leaf.shape} is not replicated: {leaf.sharding}"
        )


@pytest.mark.parametrize("spec", list(adaopt.REGISTRY.values()), ids=list(adaopt.REGISTRY))
def test_sharded_state_and_steps_match_unsharded(spec: OptimizerSpec) -> None:
    tx = learning_rates.make(spec)
    n_steps = N_STEPS + 6 if Capability.DELAYED_START in spec.capabilities else N_STEPS  # its first updates are zero

    # Reference: the same computation on unsharded arrays of one device.
    device = jax.devices()[0]
    single = jax.device_put(_host_params(), device)
    _, want_params, _ = _train(tx, single, n_steps)

    mesh = _mesh()
    shardings = {name: NamedSharding(mesh, spec_) for name, spec_ in SPECS.items()}
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), shardings)
        init_state, got_params, state = _train(tx, params, n_steps)

        matrices = Capability.MATRIX_STATE in spec.capabilities
        factored = Capability.FACTORED_STATE in spec.capabilities
        _check_state_shardings(init_state, params, mesh, "after init", matrices, factored)
        _check_state_shardings(state, got_params, mesh, f"after {n_steps} steps", matrices, factored)

    for name, sharding in shardings.items():
        assert got_params[name].sharding.is_equivalent_to(sharding, len(SHAPES[name])), (
            f"{name}: {got_params[name].sharding} != {sharding}"
        )
    for name in SHAPES:
        # Global norms and dot products summed across shards in another order change a step size by
        # an ulp or a few, which moves every coordinate by that fraction of its whole displacement
        # (more where a step size feeds back, as hypergradient descent's does): atol is 64 float32
        # ulps of the leaf's largest displacement. A wrong sharding or reduction is off by far more.
        want = np.asarray(want_params[name])
        displacement = float(np.max(np.abs(want - _host_params()[name])))
        atol = max(5e-7, 64 * float(np.finfo(np.float32).eps) * displacement)
        np.testing.assert_allclose(np.asarray(got_params[name]), want, rtol=1e-6, atol=atol, err_msg=name)
        # Exact comparison: D-Adaptation's first steps (d0 = 1e-6) move float32 parameters by an ulp.
        assert not np.array_equal(np.asarray(got_params[name]), _host_params()[name]), f"{name} did not move"


@pytest.mark.parametrize("wrapper", ["single_pass", "multi_tensor"])
@pytest.mark.usefixtures("fusion_on")
def test_speed_wrappers_keep_shardings_and_steps(wrapper: str) -> None:
    """``single_pass`` (traced in its sibling form) and ``multi_tensor`` around Adam on the sharded tree.

    The parameters and the updates keep their shardings; ``single_pass``'s state mirrors them like Adam's, and
    ``multi_tensor`` keeps the large leaf's state apart with its parameter's sharding (the small
    leaves' state is one packed buffer). The steps are Adam's.
    """
    if wrapper == "single_pass":
        tx = adaopt.single_pass(adaopt.adam(1e-2), min_size=1)
    else:
        tx = adaopt.multi_tensor(adaopt.adam(1e-2), min_size=1024)  # w (2048 elements) apart; b and k packed
    _, want_params, _ = _train(adaopt.adam(1e-2), jax.device_put(_host_params(), jax.devices()[0]))

    mesh = _mesh()
    shardings = {name: NamedSharding(mesh, spec_) for name, spec_ in SPECS.items()}
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), shardings)
        init_state, got_params, state = _train(tx, params)
        grads = jax.grad(_loss)(params, jnp.asarray(0, jnp.int32))
        updates, _ = jax.jit(tx.update)(grads, init_state, params)
        for name, sharding in shardings.items():  # the updates carry the gradients' shardings
            assert updates[name].sharding.is_equivalent_to(sharding, len(SHAPES[name])), (name, updates[name].sharding)
        if wrapper == "single_pass":
            _check_state_shardings(init_state, params, mesh, "after init")
            _check_state_shardings(state, got_params, mesh, f"after {N_STEPS} steps")
        else:
            packed = [
                x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, FlatTree)) if isinstance(x, FlatTree)
            ]
            assert len(packed) == 2  # Adam's two moments
            for moment in packed:
                (w_state,) = moment.leaves
                assert w_state.sharding.is_equivalent_to(shardings["w"], 2), w_state.sharding

    for name, sharding in shardings.items():
        assert got_params[name].sharding.is_equivalent_to(sharding, len(SHAPES[name])), name
        np.testing.assert_allclose(np.asarray(got_params[name]), np.asarray(want_params[name]), rtol=1e-6, atol=5e-7)


@pytest.mark.parametrize("packed_size", [0, None], ids=["alone", "packed"])
def test_monitor_records_on_a_mesh_match_unsharded(packed_size: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """adaopt.monitor around AdamW on the sharded tree, recording at every step, in both of its forms (the cond
    and ``record=True``): the parameters are the unmonitored run's, the state keeps their shardings, and the records
    are the unsharded run's (sums across shards in another order: float32 tolerances). Its statistics of small leaves
    are packed into one vector (``packed``), or each reduced alone."""
    from adaopt._src.tools import monitor as monitor_module

    if packed_size is not None:
        monkeypatch.setattr(monitor_module, "PACKED_SIZE", packed_size)
    make = lambda: adaopt.monitor(adaopt.adamw(1e-2, weight_decay=0.1), every=1)
    single = jax.device_put(_host_params(), jax.devices()[0])
    _, want_params, want_state = _train(make(), single)
    _, plain_params, _ = _train(adaopt.adamw(1e-2, weight_decay=0.1), single)
    mesh = _mesh()
    shardings = {name: NamedSharding(mesh, spec_) for name, spec_ in SPECS.items()}
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), shardings)
        init_state, got_params, state = _train(make(), params)
        _check_state_shardings(init_state.inner_state, params, mesh, "after init")
        _check_state_shardings(state.inner_state, got_params, mesh, f"after {N_STEPS} steps")
        tx = make()
        grads = jax.grad(_loss)(params, jnp.asarray(0, jnp.int32))
        _, static_state = jax.jit(functools.partial(tx.update, record=True))(grads, tx.init(params), params)
    _, _, first = _train(make(), single, 1)  # the cond form's record of the first step, on one device
    for got, want in ((state, want_state), (static_state, first)):
        got_records, want_records = adaopt.read_records(got), adaopt.read_records(want)
        assert list(got_records) == list(want_records)
        np.testing.assert_allclose(list(got_records.values()), list(want_records.values()), rtol=2e-5, atol=1e-7)
    for name in SHAPES:  # within an ulp or two: XLA may fuse apply_updates' add into another multiply-add here
        for params in (got_params, want_params):
            np.testing.assert_allclose(np.asarray(params[name]), np.asarray(plain_params[name]), rtol=1e-6, atol=5e-7)


def test_range_test_and_sweep_on_a_mesh_match_one_device() -> None:
    """The practitioner's tools take sharded parameters as they are: the range test's losses and a sweep's metrics
    on the (4, 2) mesh are the single device's, to float32 tolerances."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 16, 64)).astype(np.float32)
    y = rng.normal(size=(20, 16, 32)).astype(np.float32)
    host = {"w": 0.1 * rng.normal(size=(64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}
    loss = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)
    configs = adaopt.grid_configs({"learning_rate": [1e-3, 1e-2, 1e-1]})

    def run(params: Any) -> tuple[np.ndarray, np.ndarray]:
        found = adaopt.range_test(loss, params, adaopt.adam, (x, y), start_lr=1e-4, end_lr=1.0, num_iter=20)
        swept = adaopt.sweep(adaopt.adamw, configs, loss, params, (x, y))
        return np.asarray(found.losses), np.asarray(swept.curves)

    want = run(jax.device_put(host, jax.devices()[0]))
    mesh = _mesh()
    with jax.set_mesh(mesh):
        shardings = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model"))}
        got = run(jax.device_put(host, shardings))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_every_optimizer_inits_and_steps_eagerly_outside_a_mesh_context() -> None:
    """Placed parameters, no ``jax.set_mesh``: ``init`` and (where it places arrays) a step run eagerly (the README's ZeRO example), the state
    placed as a jitted ``init`` places it under the mesh (``abstract_state``'s placement; but for scalars). Factored statistics from ``jax.eval_shape`` are typed on an
    abstract mesh there, and a reshard to a bare spec needs a mesh in context: both failed."""
    mesh = _mesh()
    params = jax.device_put(_host_params(), {name: NamedSharding(mesh, spec) for name, spec in SPECS.items()})
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    failures = {}
    # The steps that place arrays (matrix methods, factored statistics, GaLore's projections) run eagerly; the
    # elementwise ones, whose eager ops are the jitted step's, only initialise (an eager step costs its compiles).
    placing = {Capability.REAL_ONLY, Capability.FACTORED_STATE, Capability.MATRIX_STATE}
    for name, spec in adaopt.REGISTRY.items():
        tx = spec.factory()
        try:
            state = tx.init(params)
            if spec.capabilities & placing or name.startswith("galore"):
                tx.update(grads, state, params, value=jnp.float32(1.0))
        except Exception as error:  # every optimizer's failure is reported at once
            failures[name] = f"{type(error).__name__}: {str(error)[:120]}"
            continue
        want = jax.tree.map(lambda x: x.sharding, adaopt.abstract_state(tx, params))  # a jitted init's, traced only
        got = jax.tree.map(lambda x: x.sharding, state)
        # Scalars (counts, step sizes) are made on one device eagerly, as optax's are, and replicated under jit.
        same = jax.tree.map(lambda g, w, x: x.ndim == 0 or g.is_equivalent_to(w, x.ndim), got, want, state)
        if not all(jax.tree.leaves(same)):
            failures[name] = f"eager init placed the state as {got}, jitted init as {want}"
    assert not failures, failures


def test_soap_steps_eagerly_under_a_mesh_context() -> None:
    """SOAP's first call (its zero step) and the later ones are one ``lax.cond``: eagerly under ``jax.set_mesh`` the
    zero steps had no sharding in their type, the later steps their gradients', and the cond refused the pair."""
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), {name: NamedSharding(mesh, spec) for name, spec in SPECS.items()})
        tx = adaopt.soap(1e-2)
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(jax.tree.map(lambda p: 0.1 * p, params), state, params)
            params = optax.apply_updates(params, updates)
    for name, spec in SPECS.items():
        assert params[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), params[name].ndim), name


def test_multi_tensor_packs_small_leaves_split_along_any_axis() -> None:
    """A small leaf split along its last axis ((8, 8) by columns, (7, 8) too) cannot be raveled as it is placed:
    multi_tensor raveled before gathering it, and init failed ("This reshape is not supported"). Gathered first, it
    packs; the updates are Adam's and keep each leaf's sharding."""
    mesh = _mesh()
    rng = np.random.default_rng(3)
    specs = {"a": P(None, "model"), "b": P(None, "model"), "c": P("data", "model"), "big": P()}
    shapes = {"a": (8, 8), "b": (7, 8), "c": (4, 8), "big": (64, 64)}
    host = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    packed, plain = adaopt.multi_tensor(adaopt.adam(1e-2), min_size=1024), adaopt.adam(1e-2)
    want, _ = jax.jit(plain.update)(host, plain.init(host), host)
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
        updates, _ = jax.jit(packed.update)(params, jax.jit(packed.init)(params), params)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(want[k]), rtol=1e-6, err_msg=k)
        assert updates[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), 2), (k, updates[k].sharding)


def _two_steps(tx: optax.GradientTransformation) -> Any:
    """Two steps of ``tx`` from a parameter, its own gradient (a population member's run)."""

    def run(p: jax.Array) -> jax.Array:
        state = tx.init(p)
        for _ in range(2):
            updates, state = tx.update(p, state, p)
            p = optax.apply_updates(p, updates)
        return p

    return run


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_population_split_across_the_mesh_steps_quantized_moments_under_vmap(kind: str) -> None:
    """jit(vmap(step)) over four members placed on the "data" axis: inside the vmap a table lookup's indices leave
    the mapped axis out of their type, and the gather had no placement ("Use .at[...].get(out_sharding=)"). Each
    member's steps equal its own run's."""
    mesh = _mesh()
    tx = adaopt.adam(1e-2, mu_dtype=kind, nu_dtype=kind)

    run = _two_steps(tx)

    members = np.random.default_rng(0).normal(size=(4, 64, 128)).astype(np.float32)  # 8192 elements: quantized
    want = np.stack([np.asarray(jax.jit(run)(m)) for m in members])
    with jax.set_mesh(mesh):
        got = jax.jit(jax.vmap(run))(jax.device_put(members, NamedSharding(mesh, P("data", None, "model"))))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_a_population_split_across_the_mesh_steps_psgd_kron_under_vmap() -> None:
    """PSGD Kron's triangular solves one at a time (linalg.one_at_a_time) under jit(vmap) of a population placed on
    the "data" axis: lax.map refused a split leading axis, and the batched kernel a shared factor broadcast without
    the population's placement. Each member's steps equal its own run's."""
    mesh = _mesh()
    tx = adaopt.psgd_kron(1e-2, preconditioner_update_probability=1.0)

    run = _two_steps(tx)

    members = np.random.default_rng(1).normal(size=(4, 8, 6)).astype(np.float32)
    want = np.stack([np.asarray(jax.jit(run)(m)) for m in members])
    with jax.set_mesh(mesh):
        got = jax.jit(jax.vmap(run))(jax.device_put(members, NamedSharding(mesh, P("data", None, "model"))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["soap", "shampoo", "adafactor"])
def test_a_population_split_across_the_mesh_steps_matrix_and_factored_optimizers_under_vmap(name: str) -> None:
    """jit(vmap(step)) and an eager vmap, under jax.set_mesh, over four members placed on the "data" axis: SOAP's
    first call (its eigenbases) and later ones, Shampoo's and Adafactor's statistics of each axis. Each member's steps
    equal its own run's."""
    mesh = _mesh()
    run = _two_steps(getattr(adaopt, name)(1e-2))
    members = np.random.default_rng(2).normal(size=(4, 8, 6)).astype(np.float32)
    want = np.stack([np.asarray(jax.jit(run)(m)) for m in members])
    with jax.set_mesh(mesh):
        placed = jax.device_put(members, NamedSharding(mesh, P("data", None, "model")))
        for got in (jax.jit(jax.vmap(run))(placed), jax.vmap(run)(placed)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_under_automatic_sharding_abstract_state_places_a_jitted_init() -> None:
    """README's recipe: on a mesh of Auto axes, jit(init) leaves the state where XLA chooses (one device, as optax's
    does); with out_shardings from abstract_state, each moment is placed as its parameter, int8 codes included."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    sharding = NamedSharding(mesh, P("data", "model"))
    params = {"w": jax.device_put(np.ones((64, 128), np.float32), sharding)}  # 8192 elements: quantized
    tx = adaopt.adam(1e-3, mu_dtype="int8")
    target = jax.tree.map(lambda s: s.sharding, adaopt.abstract_state(tx, params))
    state = jax.jit(tx.init, out_shardings=target)(params)
    mu = optax.tree.get(state, "AdamState").mu["w"]
    assert mu.codes.sharding.is_equivalent_to(sharding, 2), mu.codes.sharding
    nu = optax.tree.get(state, "AdamState").nu["w"]
    assert nu.sharding.is_equivalent_to(sharding, 2), nu.sharding
