"""``shard_states``: optimizer states split across the data axis (ZeRO), on the (4, 2) mesh of 8 CPU devices.

The parameters are data-parallel (replicated over ``data``; one tensor-parallel leaf split over ``model``
and one fully sharded leaf already split over ``data``), the batch is split over ``data``. The same
optimizer with and without ``shard_states`` must give the same parameters, while each state leaf that
mirrors a parameter holds a quarter of it per device, as :func:`adaopt.zero_plan` says.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adaopt
from benchmarks.zero import per_device_bytes

N_STEPS = 3
DATA = 4  # the size of the mesh's data axis
# w: tensor-parallel (column-parallel); r: row-parallel, its first dimension taken by the model axis; t: a
# tensor-parallel vector, no dimension left to split; e: its first dimension is not divisible by 4, its second is;
# odd: neither is; f: already split along the data axis (FSDP); b, k: replicated.
SHAPES = {
    "w": (64, 32), "r": (16, 12), "t": (64,), "b": (32,), "k": (16, 8), "e": (6, 8), "odd": (3, 5), "f": (16, 4)
}  # fmt: skip
SPECS = {
    "w": P(None, "model"), "r": P("model", None), "t": P("model"), "b": P(), "k": P(), "e": P(), "odd": P(),
    "f": P("data", None),
}  # fmt: skip
PLAN = {"w": 0, "r": 1, "t": None, "b": 0, "k": 0, "e": 1, "odd": None, "f": None}
BATCH = 16

OPTIMIZERS = {
    "adam_int8": lambda: adaopt.adam(
        1e-2, mu_dtype=adaopt.Blockwise("dynamic8", block_size=8, min_size=0), nu_dtype="bfloat16_sr"
    ),
    "adam_int4_fp8": lambda: adaopt.adam(  # packed codes, scales per block
        1e-2,
        mu_dtype=adaopt.Blockwise("dynamic4", block_size=4, min_size=0),
        nu_dtype=adaopt.Blockwise("fp8", block_size=4, min_size=0),
    ),
    "lamb": lambda: adaopt.lamb(1e-2),  # trust ratios: norms over the split leaves
    "prodigy": lambda: adaopt.prodigy(1.0),  # a global estimate summed over every slice
    "adafactor": lambda: adaopt.adafactor(1e-2),  # factored statistics keep their own sharding
    "shampoo": lambda: adaopt.shampoo(1e-2, start_preconditioning_step=1),  # whole-matrix statistics
    # Moments of the matrices' projections (kept as they are) beside those of the vectors, split (they were kept
    # whole with them, their tree not mirroring the parameters as a whole).
    "galore": lambda: adaopt.galore_adamw(1e-2, rank=2, update_proj_gap=2),
    "groups": lambda: adaopt.param_groups(
        adaopt.adam, [adaopt.Group("k", optimizer=optax.sgd(1e-2, momentum=0.9))], learning_rate=1e-2
    ),  # one group's state has MaskedNode in place of the other's leaves
}


def _mesh() -> Mesh:
    assert jax.device_count() >= 8, "conftest.py should give the test process 8 CPU devices"
    return jax.make_mesh((DATA, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))


def _host() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    targets = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    return params, targets, rng.uniform(0.5, 1.5, size=(N_STEPS, BATCH)).astype(np.float32)


def _loss(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A mean over a batch split along ``data``: its gradient is summed across the data axis."""
    _, targets, _ = _host()
    total = jnp.zeros([], jnp.float32)
    for name, target in targets.items():
        p = params[name]
        scale = jnp.mean(x)  # replicated after a reduction over the batch's shards
        total += scale * jnp.sum((p - target) ** 2) + 0.1 * jnp.sum(jnp.sin(3.0 * p)) * jnp.mean(x**2)
    return total


def _placed(mesh: Mesh) -> dict[str, jax.Array]:
    host, _, _ = _host()
    return {name: jax.device_put(host[name], NamedSharding(mesh, SPECS[name])) for name in SHAPES}


def _train(tx: optax.GradientTransformation, mesh: Mesh, *, context: bool = True) -> tuple[Any, Any, Any]:
    """Init and N_STEPS jitted steps on ``mesh``, under ``jax.set_mesh`` (``context``) or with placed arrays alone."""
    _, _, batches = _host()

    @jax.jit
    def step(params: Any, state: Any, x: jax.Array) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        params = _placed(mesh)
        init_state = state = tx.init(params)
        for x in batches:
            params, state = step(params, state, jax.device_put(x, NamedSharding(mesh, P("data"))))
    return init_state, params, state


@functools.cache
def _plain(name: str) -> Any:
    return _train(OPTIMIZERS[name](), _mesh())[1]


def _split_spec(param_spec: P, ndim: int, dim: int | None) -> P:
    entries = [*param_spec, *(None,) * (ndim - len(param_spec))]
    if dim is not None:
        entries[dim] = "data" if entries[dim] is None else (entries[dim], "data")
    return P(*entries)


def _check_split(state: Any, unsplit: Any, params: Any, mesh: Mesh, when: str) -> None:
    """Every leaf mirroring a parameter is placed as in the optimizer's own state, ``unsplit``, with the data axis
    added by the plan; a stored moment's codes and scales too."""

    def held(x: Any) -> bool:
        return isinstance(x, (adaopt.StoredLeaf, optax.MaskedNode))

    def mirrors(x: Any) -> bool:
        return jax.tree.structure(x, is_leaf=held) == jax.tree.structure(params)

    def split_on(leaf: Any, x: jax.Array, shape: tuple[int, ...], dim: int | None) -> int | None:
        """The dimension of ``x``, an array of a state leaf of the parameter's ``shape``, that takes the data axis."""
        if dim is None:
            return None
        if isinstance(leaf, adaopt.Quantized) and x.shape != shape:
            # Scales and 4-bit codes: the leading axes, then one axis of the blocks of the trailing ones, split
            # where that axis's slices hold whole blocks; a flattened leaf's (no whole blocks) whole.
            lead = leaf.storage.lead_axes(shape)
            return dim if lead is not None and (dim < lead or (dim == lead and x.shape[lead] % DATA == 0)) else None
        return dim if x.shape == shape else None

    nodes = [node for node in jax.tree.leaves(state, is_leaf=mirrors) if mirrors(node)]
    unsplit_nodes = [node for node in jax.tree.leaves(unsplit, is_leaf=mirrors) if mirrors(node)]
    assert nodes and len(nodes) == len(unsplit_nodes), f"{when}: no state mirrors the parameters"
    for subtree, unsplit_subtree in zip(nodes, unsplit_nodes, strict=True):
        for name, leaf in subtree.items():
            if isinstance(leaf, optax.MaskedNode):
                continue
            shape, dim = SHAPES[name], PLAN[name]
            for x, y in zip(jax.tree.leaves(leaf), jax.tree.leaves(unsplit_subtree[name]), strict=True):
                want = _split_spec(y.sharding.spec, x.ndim, split_on(leaf, x, shape, dim))
                assert x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim), (
                    f"{when}: {name}: {x.sharding.spec} != {want}"
                )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_split_states_give_the_steps_of_whole_ones(name: str) -> None:
    mesh = _mesh()
    init_state, got, state = _train(adaopt.shard_states(OPTIMIZERS[name]()), mesh)
    with jax.set_mesh(mesh):
        unsplit = OPTIMIZERS[name]().init(_placed(mesh))
    _check_split(init_state, unsplit, got, mesh, "after init")
    _check_split(state, unsplit, got, mesh, f"after {N_STEPS} steps")
    _assert_same_steps(got, _plain(name), mesh)


def _assert_same_steps(got: Any, want: Any, mesh: Mesh) -> None:
    host, _, _ = _host()
    for leaf in SHAPES:
        assert got[leaf].sharding.is_equivalent_to(NamedSharding(mesh, SPECS[leaf]), len(SHAPES[leaf])), leaf
        # The same arithmetic on slices: elementwise steps agree to the last bit or so (XLA fuses the
        # split program's kernels differently); norms and global estimates summed over slices in another
        # order by a few ulps of the displacement, as in test_sharding.
        displacement = float(np.max(np.abs(np.asarray(want[leaf]) - host[leaf])))
        atol = max(5e-7, 64 * float(np.finfo(np.float32).eps) * displacement)
        np.testing.assert_allclose(np.asarray(got[leaf]), np.asarray(want[leaf]), rtol=1e-6, atol=atol, err_msg=leaf)
        assert not np.array_equal(np.asarray(got[leaf]), host[leaf]), f"{leaf} did not move"


def test_a_groups_split_state_and_a_step_outside_a_mesh_context() -> None:
    """shard_states as one group's optimizer (inside optax.masked, as a param_groups Group's) failed at init: its
    state's MaskedNode leaves were counted, the parameters' not; shard_states(muon) jitted outside jax.set_mesh failed
    in Newton-Schulz's gather (a spec alone needs a mesh context), as did SOAP's and GaLore's."""
    mesh = _mesh()
    mask = {name: name != "k" for name in SHAPES}
    init_state, got, _ = _train(optax.masked(adaopt.shard_states(adaopt.adam(1e-2)), mask), mesh)
    _assert_same_steps(got, _train(optax.masked(adaopt.adam(1e-2), mask), mesh)[1], mesh)
    assert optax.tree.get(init_state, "mu")["w"].sharding.spec == P("data", "model")
    _, got, _ = _train(adaopt.shard_states(adaopt.muon(1e-2)), mesh, context=False)
    _assert_same_steps(got, _train(adaopt.muon(1e-2), mesh)[1], mesh)


def test_each_device_holds_a_quarter_of_the_split_state() -> None:
    """Adam's moments: the bytes on each device are the whole state's divided by the data axis, except the
    leaves the plan keeps (odd: nowhere to split; f: already split); the parameters' shards are untouched."""
    mesh = _mesh()
    with jax.set_mesh(mesh):
        state = adaopt.shard_states(adaopt.adam(1e-2)).init(_placed(mesh))
        whole = adaopt.adam(1e-2).init(_placed(mesh))

    shards = {"odd": 1, "f": DATA, "t": 2}  # the leaves the plan keeps, and their parameters' shards
    kept = sum(2 * 4 * int(np.prod(SHAPES[n])) // k for n, k in shards.items())
    for device, nbytes in per_device_bytes(state).items():
        whole_bytes = per_device_bytes(whole)[device]
        assert nbytes - kept - 4 == (whole_bytes - kept - 4) // DATA, (device, nbytes, whole_bytes)  # 4: the count


def test_the_step_gathers_updates_and_keeps_the_state_split() -> None:
    """The compiled step slices the summed gradients and all-gathers the updates; no state leaf is gathered
    into the output (the state's output shardings are its input shardings)."""
    mesh = _mesh()
    tx = adaopt.shard_states(adaopt.adam(1e-2))
    _, _, batches = _host()
    with jax.set_mesh(mesh):
        params = _placed(mesh)
        state = tx.init(params)

        def step(params: Any, state: Any, x: jax.Array) -> tuple[Any, Any]:
            updates, state = tx.update(jax.grad(_loss)(params, x), state, params)
            return optax.apply_updates(params, updates), state

        x = jax.device_put(batches[0], NamedSharding(mesh, P("data")))
        compiled = jax.jit(step).lower(params, state, x).compile()
    hlo = compiled.as_text() or ""
    assert re.search(r"all-gather(-start)?\(", hlo), "the updates are not gathered"
    _, out_state = compiled.output_shardings
    for got, leaf in zip(jax.tree.leaves(out_state), jax.tree.leaves(state), strict=True):
        assert got.is_equivalent_to(leaf.sharding, leaf.ndim), (got, leaf.sharding)


def test_zero_plan() -> None:
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = {n: jax.device_put(jnp.zeros(s), NamedSharding(mesh, SPECS[n])) for n, s in SHAPES.items()}
        assert adaopt.zero_plan(params) == PLAN
        assert adaopt.zero_plan(params, min_size=129) == {**PLAN, "b": None, "k": None, "e": None}
        # Along the model axis (size 2): w, r, t are already split along it; f's first dimension is split along
        # the data axis, its second takes the model axis.
        along_model = {"w": None, "r": None, "t": None, "b": 0, "k": 0, "e": 0, "odd": None, "f": 1}
        assert adaopt.zero_plan(params, "model") == along_model


def test_gradients_placed_otherwise_are_resharded_to_the_slices() -> None:
    """Gradients reduce-scattered already (along another dimension, or with the model axis too), or split where the
    parameter is replicated, give the updates of gradients placed as the parameters."""
    mesh = _mesh()
    tx = adaopt.shard_states(adaopt.adam(1e-2))
    rng = np.random.default_rng(3)
    host = {"k": rng.normal(size=(16, 8)).astype(np.float32), "w": rng.normal(size=(64, 32)).astype(np.float32)}
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in host.items()}
        state = tx.init(params)
        step = jax.jit(tx.update)
        want, _ = step(params, state, params)
        for k_spec, w_spec in [(P(None, "data"), P("data", "model")), (P("model", None), P(None, ("model", "data")))]:
            grads = {
                "k": jax.device_put(host["k"], NamedSharding(mesh, k_spec)),
                "w": jax.device_put(host["w"], NamedSharding(mesh, w_spec)),
            }
            got, _ = step(grads, state, params)
            for k in host:
                assert got[k].sharding.spec == grads[k].sharding.spec  # back to the gradients' placement
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_bad_input_is_refused_with_a_clear_error() -> None:
    with pytest.raises(adaopt.HyperparameterError, match="min_size"):
        adaopt.shard_states(adaopt.adam(1e-2), min_size=0)
    with pytest.raises(adaopt.HyperparameterError, match="axis"):
        adaopt.shard_states(adaopt.adam(1e-2), axis="")
    with pytest.raises(adaopt.MeshAxisError, match="no parameter is placed on a mesh"):
        adaopt.shard_states(adaopt.adam(1e-2)).init({"w": jnp.zeros(4)})
    mesh = _mesh()
    with jax.set_mesh(mesh), pytest.raises(adaopt.MeshAxisError, match=r"\['w'\].*no axis 'batch'"):
        params = {"w": jax.device_put(jnp.zeros(8), NamedSharding(mesh, P()))}
        adaopt.shard_states(adaopt.adam(1e-2), axis="batch").init(params)
    mixed = jax.make_mesh((DATA, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Explicit))
    with jax.set_mesh(mixed), pytest.raises(adaopt.MeshAxisError, match="axis 'data' is of type Auto"):
        params = {"w": jax.device_put(jnp.zeros(8), NamedSharding(mixed, P()))}
        adaopt.shard_states(adaopt.adam(1e-2)).init(params)
    # abstract_state makes a mesh's axes explicit to trace init: on a mesh that init refuses, it refuses too.
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mixed, P()))}
    with pytest.raises(adaopt.MeshAxisError, match="axis 'data' is of type Auto"):
        adaopt.abstract_state(adaopt.shard_states(adaopt.adam(1e-2)), target)
    auto = jax.make_mesh((DATA * 2,), ("data",), axis_types=(AxisType.Auto,))
    # Parameters placed on a mesh of automatic axes alone: named as such (the error said none was placed); beside a
    # parameter on a mesh with explicit axes, that one decides.
    on_auto = jax.device_put(jnp.zeros((8, 4)), NamedSharding(auto, P()))
    with pytest.raises(adaopt.MeshAxisError, match="axis 'data' is of type Auto"):
        adaopt.shard_states(adaopt.adam(1e-2)).init({"w": on_auto})
    adaopt.shard_states(adaopt.adam(1e-2)).init(
        {"a": on_auto, "w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P()))}
    )
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(auto, P()))}
    with pytest.raises(adaopt.MeshAxisError, match="no parameter is placed on a mesh with explicit axes"):
        adaopt.abstract_state(adaopt.shard_states(adaopt.adam(1e-2)), target)


def test_a_complex_parameters_real_view_is_split_too() -> None:
    """complex_convention="real_imag" keeps a complex parameter's moments as its real view, shape s + (2,): they
    mirror the parameter and are split along its data dimension like it (they were all kept whole)."""
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = {
            "z": jax.device_put(jnp.ones((8, 4), jnp.complex64), NamedSharding(mesh, P())),
            "r": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P())),
        }
        state = adaopt.shard_states(adaopt.adam(1e-2, complex_convention="real_imag")).init(params)
    mu = optax.tree.get(state, "mu")
    assert mu["z"].shape == (8, 4, 2) and mu["z"].sharding.spec == P("data", None, None)
    assert mu["r"].sharding.spec == P("data", None)


def test_a_split_lookahead_steps_as_a_whole_one() -> None:
    """shard_states(lookahead(adam)): the gradients are the fast weights' and the parameters a LookaheadParams, which
    shard_states mapped together (a tree mismatch at the first update); its updates, of both weights, go back to the
    parameters' placement. The steps equal lookahead's unsplit ones."""
    mesh = _mesh()
    rng = np.random.default_rng(4)
    host = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=(8,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in host.items()} for _ in range(4)]

    def run(tx: optax.GradientTransformation, params: Any) -> Any:
        params = optax.LookaheadParams.init_synced(params)
        state, step = tx.init(params), jax.jit(tx.update)
        for g in grads:
            updates, state = step(g, state, params)
            params = optax.apply_updates(params, updates)
        return params

    inner = lambda: adaopt.lookahead(adaopt.adam(1e-2), 2, 0.5)
    want = run(inner(), host)
    with jax.set_mesh(mesh):
        placed = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in host.items()}
        got = run(adaopt.shard_states(inner()), placed)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
