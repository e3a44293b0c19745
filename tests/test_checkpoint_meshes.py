"""A checkpoint written on one mesh resumes on another: 8 devices to 4 with other shardings, and to one device.

A small model (two matrices and a bias) trains on 8 of conftest's CPU devices, data-parallel (everything
replicated) or FSDP/tensor-parallel (a (4, 2) mesh, every leaf split), with one optimizer of each capability
class (``tests.multiprocess_worker.cases``). Its ``(params, opt_state)`` is saved with orbax mid-run and
restored onto ``adaopt.abstract_state``'s targets on a (2, 2) mesh of the first 4 devices and on one device.

What is bitwise, and why. The loss is a sum of elementwise terms, so every coordinate's gradient is computed
from that coordinate alone, with the same bits on any mesh (a model whose gradient is reduced across devices,
a data-parallel batch mean, would sum in a mesh-dependent order before any optimizer runs). Then:

- the restore is exact: every leaf (params, moments, int8 codes and scales, bfloat16 moments and their uint32
  counters, a PRNG key) has the saved bits, the dtype saved and the sharding asked for;
- on the same mesh the continuation equals the uninterrupted run bitwise, for every class;
- on another mesh, an *elementwise* optimizer (Adam, Adam with int8 or stochastically rounded moments)
  computes each coordinate from that coordinate's history alone: the continuation equals the uninterrupted
  8-device run bitwise, state included;
- an optimizer that reduces across coordinates (a global norm for clipping or LAMB's trust ratios, LDoG's,
  DoG's and Polyak's sums over the tree, Shampoo's and Muon's matrix products) may sum its partial results in
  another order on another mesh: the continuation equals, bitwise, the same mesh's run from the state moved
  there in memory (``jax.device_put``, no checkpoint), and the uninterrupted run to tests/test_sharding.py's tolerance
  (64 float32 roundings of each leaf's displacement).

The elementwise classes resume on both targets (and the quantized one from both placements); each other class on
one of them, in turn: the compiled steps are the cost, and the argument is the same on both.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import adaopt
from benchmarks import learning_rates
from tests import multiprocess_worker as worker
from tests import problems

# 8-bit blocks of 32 elements for leaves of 1024 and more (bitsandbytes' are 256 and 4096: the same code on a
# model small enough to compile and step fast). w1's rows of 64 are cut into two blocks, split in two at most (a
# block must not straddle two shards); w2's rows of 48 hold no whole block: it is blocked along both axes merged. The
# matrices are near square, so that Shampoo's Kronecker factors have full rank within two steps (the inverse root of
# a rank-deficient factor turns rounding into steps: tests/multiprocess_worker.py's note on SOAP).
SHAPES = {"w1": (64, 64), "w2": (40, 48), "b": (64,)}
INT8 = adaopt.Blockwise("dynamic8", block_size=32, min_size=1024)
STEPS_AFTER = 3
# Where the run starts (8 devices) and where it resumes: other axes, other shardings, fewer devices.
SOURCES = {
    "dp": ((8,), ("data",), {"w1": P(), "w2": P(), "b": P()}),
    "fsdp_tp": ((4, 2), ("data", "model"), {"w1": P("data", "model"), "w2": P("data", "model"), "b": P("model")}),
}
TARGETS = {
    "4 devices": (
        (2, 2),
        ("data", "model"),
        {"w1": P("model", "data"), "w2": P(None, "data"), "b": P(("data", "model"))},
    ),
    "1 device": None,
}
# Classes whose step reads each coordinate's own history only (tests.multiprocess_worker.cases' labels).
ELEMENTWISE = {"elementwise", "quantized"}


def _cases() -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    """tests.multiprocess_worker's optimizer of each capability class; the quantized one with :data:`INT8`'s blocks
    for its first moment and stochastically rounded bfloat16 for its second (uint32 counters in its state)."""
    cases = worker.cases()
    (quantized,) = (case for case in cases if case.startswith("quantized:"))
    spec = adaopt.REGISTRY[quantized.split(":")[1]]
    cases[quantized] = lambda: learning_rates.make(spec, mu_dtype=INT8, nu_dtype="bfloat16_sr")
    return cases


CASES = _cases()


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names), devices=devices)


def _host_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.normal(size=shape) / 4).astype(np.float32) for name, shape in SHAPES.items()}


def _loss(params: dict[str, jax.Array], step: jax.Array) -> jax.Array:
    """A sum of elementwise terms whose gradients change from step to step (tests/test_sharding.py's)."""
    rng = np.random.default_rng(1)
    scale = 1.0 + 0.5 * step.astype(jnp.float32)
    total = jnp.zeros([], jnp.float32)
    for name, shape in SHAPES.items():
        p = params[name]
        total += jnp.sum((p - rng.normal(size=shape).astype(np.float32)) ** 2) + 0.1 * scale * jnp.sum(jnp.sin(3 * p))
    return total


@functools.cache
def _step(case: str) -> Callable[..., Any]:
    """One jitted step per case, shared by every mesh (jit compiles it once per placement of its arguments)."""
    tx = CASES[case]()

    @functools.partial(jax.jit, compiler_options=problems.DEFAULT_EMITTERS)  # the same bits on every mesh
    def step(params: Any, state: Any, i: jax.Array) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(_loss)(params, i)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    return step


def _run(case: str, pair: Any, first: int, count: int, mesh: Mesh | None) -> Any:
    """``count`` steps from step ``first`` of ``(params, state)``, under ``mesh`` (None: one device)."""
    step = _step(case)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for i in range(first, first + count):
            pair = step(*pair, jnp.asarray(i, jnp.int32))
    return jax.block_until_ready(pair)


def _targets(placement: tuple[dict[str, P], Mesh] | None) -> dict[str, jax.ShapeDtypeStruct]:
    """The parameters' restore targets: placed by ``(specs, mesh)``, or on the first device."""
    device = SingleDeviceSharding(jax.devices()[0])
    return {
        name: jax.ShapeDtypeStruct(
            shape,
            jnp.float32,
            sharding=device if placement is None else NamedSharding(placement[1], placement[0][name]),
        )
        for name, shape in SHAPES.items()
    }


def _assert_same_bits(got: Any, want: Any, what: str) -> None:
    got_leaves, want_leaves = jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), what
    for (path, a), b in zip(got_leaves, want_leaves, strict=True):
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert a.dtype == b.dtype, f"{where}: {a.dtype} != {b.dtype}"
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def _assert_placed(got: Any, targets: Any, what: str) -> None:
    for (path, leaf), target in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(targets), strict=True):
        assert (leaf.shape, leaf.dtype) == (target.shape, target.dtype), f"{what}{jax.tree_util.keystr(path)}"
        assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim), (
            f"{what}{jax.tree_util.keystr(path)} is placed {leaf.sharding}, not {target.sharding}"
        )


def _assert_close(got: dict[str, jax.Array], want: dict[str, jax.Array], what: str) -> None:
    """tests/test_sharding.py's tolerance: 64 float32 ulps of each leaf's largest displacement."""
    initial = _host_params()
    for name in SHAPES:
        w = np.asarray(want[name])
        displacement = float(np.max(np.abs(w - initial[name])))
        atol = max(5e-7, 64 * float(np.finfo(np.float32).eps) * displacement)
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=1e-6, atol=atol, err_msg=f"{what}: {name}")
        assert not np.array_equal(w, initial[name]), f"{what}: {name} did not move"


def _parameters() -> list[Any]:
    """Each elementwise class resumes on both targets, from both sources; each other class on one target, in turn
    (the argument for closeness is the same on both: another order of the same sums), from the (4, 2) mesh."""
    parameters = []
    for i, case in enumerate(CASES):
        elementwise = case.split(":")[0] in ELEMENTWISE
        for target in list(TARGETS) if elementwise else [list(TARGETS)[i % 2]]:
            for source in ("fsdp_tp", "dp") if case.startswith("quantized:") else ("fsdp_tp",):
                parameters.append(
                    pytest.param(case, source, target, id=f"{case}-{source}-to-{target.replace(' ', '_')}")
                )
    return parameters


@functools.cache
def _init(case: str) -> Callable[[Any], Any]:
    return jax.jit(CASES[case]().init)


@pytest.mark.parametrize(("case", "source", "target"), _parameters())
def test_a_checkpoint_resumes_on_another_mesh(case: str, source: str, target: str, tmp_path: pathlib.Path) -> None:
    """Saved mid-run on 8 devices, restored on the same mesh and on ``target``: the bits, dtypes and placements
    restored, and the continuation, as the module's docstring says."""
    label = case.split(":")[0]
    before = worker.n_steps(case)
    shape, names, specs = SOURCES[source]
    mesh = _mesh(shape, names)
    tx = CASES[case]()
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), {name: NamedSharding(mesh, spec) for name, spec in specs.items()})
        state = _init(case)(params)
        key = jax.device_put(jax.random.key(7), NamedSharding(mesh, P()))  # a training loop's key, saved with it
    saved = (*_run(case, (params, state), 0, before, mesh), key)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", saved)
    checkpointer.wait_until_finished()
    straight = _run(case, saved[:2], before, STEPS_AFTER, mesh)

    other = TARGETS[target]
    placements = {"same mesh": (specs, mesh), target: None if other is None else (other[2], _mesh(*other[:2]))}
    for where, placement in placements.items():
        target_mesh = None if placement is None else placement[1]
        abstract_params = _targets(placement)
        key_sharding = (
            SingleDeviceSharding(jax.devices()[0]) if target_mesh is None else NamedSharding(target_mesh, P())
        )
        restore_target = (
            abstract_params,
            adaopt.abstract_state(tx, abstract_params),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=key_sharding),
        )
        restored = checkpointer.restore(tmp_path / "ckpt", restore_target)
        assert jax.tree.structure(restored) == jax.tree.structure(saved), where
        _assert_same_bits(restored, saved, f"{where}: restored")  # dtypes too: uint8 codes, uint32 counters, the key
        _assert_placed(restored, restore_target, f"{where}: restored")
        if where == "same mesh":  # abstract_state placed the state as init and the steps did
            _assert_placed(saved, restore_target, f"{where}: saved")

        resumed = _run(case, restored[:2], before, STEPS_AFTER, target_mesh)
        _assert_placed(resumed, restore_target[:2], f"{where}: resumed")  # the steps keep the placement restored
        if where != "same mesh":
            moved = jax.device_put(saved[:2], jax.tree.map(lambda t: t.sharding, restore_target[:2]))
            _assert_same_bits(resumed, _run(case, moved, before, STEPS_AFTER, target_mesh), f"{where}: vs moved")
        if where == "same mesh" or label in ELEMENTWISE:
            _assert_same_bits(resumed, straight, f"{where}: vs uninterrupted")
        else:
            _assert_close(resumed[0], straight[0], f"{where}: vs uninterrupted")


def test_abstract_state_places_the_state_on_a_mesh_of_auto_axes_as_on_explicit_ones() -> None:
    """On ``Auto`` axes, where ``jax.jit(init)`` leaves the state's placement to XLA, ``abstract_state`` gives the
    placement of explicit axes on the mesh given, and ``out_shardings`` from it places a fresh state so."""
    tx = CASES[next(case for case in CASES if case.startswith("quantized:"))]()
    _, names, specs = SOURCES["fsdp_tp"]
    meshes = [_mesh((4, 2), names), jax.make_mesh((4, 2), names, axis_types=(AxisType.Auto,) * 2)]
    explicit, auto = (
        adaopt.abstract_state(
            tx,
            {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(m, specs[n])) for n, s in SHAPES.items()},
        )
        for m in meshes
    )
    assert jax.tree.structure(explicit) == jax.tree.structure(auto)
    for e, a in zip(jax.tree.leaves(explicit), jax.tree.leaves(auto), strict=True):
        assert (a.shape, a.dtype, a.sharding.spec, a.sharding.mesh) == (e.shape, e.dtype, e.sharding.spec, meshes[1])
    assert {leaf.sharding.spec for leaf in jax.tree.leaves(auto)} > {P()}  # some leaves are split, not all replicated

    params = jax.device_put(_host_params(), {n: NamedSharding(meshes[1], specs[n]) for n in SHAPES})
    state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, auto))(params)
    _assert_placed(state, auto, "a fresh state on auto axes")


def test_abstract_state_follows_a_wrapper_that_places_the_state_itself() -> None:
    """``shard_states`` splits the state of replicated parameters along the data axis (ZeRO): so does its target."""
    tx = adaopt.shard_states(CASES[next(case for case in CASES if case.startswith("quantized:"))](), axis="data")
    shape, names, specs = SOURCES["dp"]
    mesh = _mesh(shape, names)
    with jax.set_mesh(mesh):
        params = jax.device_put(_host_params(), {name: NamedSharding(mesh, spec) for name, spec in specs.items()})
        state = jax.jit(tx.init)(params)
    target = adaopt.abstract_state(tx, params)
    _assert_placed(state, target, "shard_states' state")
    assert any("data" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(target))  # split, not replicated


def test_abstract_state_of_unplaced_parameters_is_the_state_s_shapes() -> None:
    """jax.eval_shape's structs (no sharding, the natural template) give the state's structs, unplaced: they were
    refused as 'sharding None'."""
    tx = adaopt.adamw(1e-3, mu_dtype="int8", nu_dtype="bfloat16")
    params = {"w": jnp.ones((64, 128)), "b": jnp.ones((3,))}
    target = adaopt.abstract_state(tx, jax.eval_shape(lambda: params))
    state = tx.init(params)
    assert jax.tree.structure(target) == jax.tree.structure(state)
    for t, x in zip(jax.tree.leaves(target), jax.tree.leaves(state), strict=True):
        assert (t.shape, t.dtype, t.sharding) == (x.shape, x.dtype, None)


def test_abstract_state_says_which_parameter_it_cannot_place() -> None:
    tx = adaopt.adam(1e-3)
    mesh = _mesh((2,), ("data",))
    other = _mesh((4,), ("data",))
    w = jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match=r"params\['b'\] has sharding None"):
        adaopt.abstract_state(tx, {"w": w, "b": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match=r"2 different meshes or devices .*params\['b'\] on"):
        adaopt.abstract_state(
            tx, {"w": w, "b": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(other, P()))}
        )
    with pytest.raises(ValueError, match=r"params\['w'\] is placed on an abstract mesh"):
        adaopt.abstract_state(
            tx, {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh.abstract_mesh, P()))}
        )
    with pytest.raises(ValueError, match="no array leaves"):
        adaopt.abstract_state(tx, {})
    three = _mesh((3,), ("data",))
    with pytest.raises(ValueError, match=r"params\['w'\] of shape \(8, 4\).*dimension 0 \(8\) into 3 parts"):
        adaopt.abstract_state(
            tx, {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(three, P("data")))}
        )
