"""PSGD Kron against psgd_jax.kron.kron (psgd-jax 0.2.9), step for step, and what it does with every kind of leaf.

psgd-jax pins ``optax<=0.2.6`` (it imports ``optax._src.clipping``, gone from 0.2.8) and needs
chex and flax, so it lives in an environment of its own, ``.venv/ref-psgd`` (built by the
Makefile's ``.venv/.test-installed`` recipe, on the same jax and jaxlib as ours). One subprocess
for the whole module runs every case there (tests/psgd_jax_reference.py) and writes the
trajectories to one file; adaopt runs the same cases here. The draws match exactly: psgd-jax
takes its probes from ``fold_in(PRNGKey(5318008), step)``, adaopt from the seed in its state,
psgd-jax's by default.

Each case is one compile on each side: several random draws of the hyperparameters that both
take as traced values (the learning rate, the update probability, the preconditioner's step size
and initial scale) run as a ``vmap``, 200 steps in a ``lax.scan``; ``b1`` and the weight decay
(compared with 0 in Python by psgd-jax) are drawn once per case. The gradients are noise with a
different scale per coordinate, so that the preconditioner has something to whiten. The fixed key
draws the rebalancing coin (probability 0.01) at step 152: the draws that update the preconditioner
at every second step ("triangular"'s second, all of "all_diag"'s) rebalance their factors there.

Not compared: a ``mu_dtype`` narrower than the gradients (psgd-jax multiplies the stored momentum
by ``b1`` in that dtype, a weakly typed product, before adding the gradient's share in the wider
one; adaopt reads it back into the wider dtype first: the two differ by that rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import pathlib
import subprocess
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch._dynamo

import adaopt
from tests import parity

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / ".venv" / "ref-psgd" / "bin" / "python"
SCRIPT = ROOT / "tests" / "psgd_jax_reference.py"
STEPS = 200
DRAWS = 3
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}  # the largest relative error over the trajectory
PRECISE = {"precond_update_precision": "highest", "precond_grads_precision": "highest"}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: functools.cache keys on it
class Case:
    """One compiled comparison: a tree, psgd-jax's fixed options, and what is drawn."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    options: dict[str, Any]
    dtype: str = "float64"
    weight_decay: bool = False
    b1: float | None = None  # None: drawn from [0.5, 0.99)
    lr_schedule: bool = False  # optax's warmup-cosine (else a constant learning rate)
    probability_schedule: dict[str, Any] | None = None  # psgd-jax's anneal (else a drawn constant)


CASES = [
    # Triangular factors (a 3-d tensor's three, a matrix's second axis), an axis longer than max_size_triangular
    # (5 > 4: diagonal), a 1-d leaf's diagonal factor, a 0-d leaf's scalar one, masked decay; leaves of equal shapes
    # (a model's repeated layers: their factors fitted in one loop, each with its own probe).
    Case(
        "triangular", {"w": (5, 4), "b": (4,), "s": (), "t": (2, 3, 4), "w2": (5, 4), "b2": (4,), "t2": (2, 3, 4)},
        {"max_size_triangular": 4, "precond_dtype": "float64", **PRECISE}, weight_decay=True,
    ),
    # one_diag (each leaf's longest axis diagonal), an axis of size 1, the probes fitted to the gradient, both
    # schedules (the update probability annealed within the 200 steps).
    Case(
        "one_diag", {"w": (5, 4), "t": (3, 1, 4), "e": (9, 3)},
        {"memory_save_mode": "one_diag", "max_size_triangular": 6, "momentum_into_precond_update": False,
         "precond_dtype": "float64", **PRECISE},
        lr_schedule=True, probability_schedule={"flat_start": 50, "decay": 0.02, "min_prob": 0.2},
    ),
    # all_diag, no momentum (b1 = 0: the gradient is preconditioned), decay on every leaf.
    Case(
        "all_diag", {"w": (5, 4), "t": (2, 3, 4)},
        {"memory_save_mode": "all_diag", "precond_dtype": "float64", **PRECISE}, weight_decay=True, b1=0.0,
    ),
    # float32 at psgd-jax's defaults (its precisions, its factors in the parameters' float32), and 1-d leaves with
    # a triangular factor (min_ndim_triangular=1).
    Case("float32", {"w": (5, 4), "b": (4,)}, {"min_ndim_triangular": 1}, dtype="float32", weight_decay=True),
]  # fmt: skip


def _seed(case: Case) -> int:
    return zlib.crc32(f"psgd_kron/{case.name}/{case.dtype}".encode())


def _fixed(case: Case) -> dict[str, Any]:
    """``b1``, the decay and its mask, and the case's options: the arguments of both sides, in psgd-jax's names."""
    rng = np.random.default_rng(_seed(case))
    b1 = float(rng.uniform(0.5, 0.99)) if case.b1 is None else case.b1
    decay = float(rng.uniform(1e-3, 0.1)) if case.weight_decay else 0.0
    mask = {k: len(s) != 1 for k, s in case.shapes.items()} if case.weight_decay and case.name != "all_diag" else None
    return {"b1": b1, "weight_decay": decay, "weight_decay_mask": mask, **case.options}


def _draws(case: Case) -> dict[str, np.ndarray]:
    """DRAWS values of each traced hyperparameter."""
    rng = np.random.default_rng(_seed(case) + 1)

    def log_uniform(low: float, high: float) -> np.ndarray:
        return np.exp(rng.uniform(np.log(low), np.log(high), DRAWS)).astype(case.dtype)

    draws = {
        "learning_rate": log_uniform(1e-3, 1e-2),
        "preconditioner_lr": log_uniform(0.02, 0.3),
        "preconditioner_init_scale": log_uniform(0.1, 10.0),
    }
    if case.probability_schedule is None:
        draws["preconditioner_update_probability"] = rng.uniform(0.15, 1.0, DRAWS).astype(case.dtype)
    return draws


def _problem(case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Standard-normal parameters, and gradients of noise scaled per coordinate (over two orders of magnitude)."""
    rng = np.random.default_rng(_seed(case) + 2)
    params = {k: rng.normal(size=s).astype(case.dtype) for k, s in case.shapes.items()}
    grads = {
        k: (rng.normal(size=(STEPS, *s)) * np.exp(rng.uniform(-2.5, 2.5, s)) + 0.1).astype(case.dtype)
        for k, s in case.shapes.items()
    }
    return params, grads


def _learning_rate(case: Case, peak: Any) -> Any:
    if not case.lr_schedule:
        return peak
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, 20, STEPS, 0.1)  # as tests/psgd_jax_reference.py's
    return lambda count: peak * shape(jnp.asarray(count, case.dtype))


def _with_seed(state: Any, seed: jax.Array) -> Any:
    """``state`` with the seed of its PSGD Kron block replaced."""
    is_kron = lambda x: isinstance(x, adaopt.PsgdKronState)
    return jax.tree.map(lambda s: s._replace(seed=seed) if is_kron(s) else s, state, is_leaf=is_kron)


@functools.cache
def _compiled(case: Case) -> Any:
    """The case's trajectories for a batch of draws (and a seed), compiled once."""
    fixed = _fixed(case)
    options = {
        k: jnp.dtype(v) if k.endswith("_dtype") else v for k, v in fixed.items() if k not in ("b1", "weight_decay")
    }
    if case.probability_schedule is not None:
        options["preconditioner_update_probability"] = adaopt.precond_update_prob_schedule(**case.probability_schedule)

    def trajectory(draw: dict[str, Any], seed: jax.Array, params: Any, grads: Any) -> Any:
        draw = dict(draw)
        lr = _learning_rate(case, draw.pop("learning_rate"))
        tx = adaopt.psgd_kron(lr, fixed["b1"], fixed["weight_decay"], **options, **draw)

        def step(carry: tuple[Any, Any], g: Any) -> tuple[tuple[Any, Any], Any]:
            p, s = carry
            updates, s = tx.update(g, s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        return jax.lax.scan(step, (params, _with_seed(tx.init(params), seed)), grads)[1]

    return jax.jit(jax.vmap(trajectory, in_axes=(0, None, None, None)))


def _adaopt(case: Case, draws: dict[str, np.ndarray], seed: int = 5318008) -> dict[str, np.ndarray]:
    params, grads = _problem(case)
    with jax.enable_x64(case.dtype == "float64"):
        out = _compiled(case)(draws, jnp.asarray(seed, jnp.uint32), params, grads)
        return {k: np.asarray(v) for k, v in out.items()}


def _missing_environment() -> str:
    recipe = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if "ref-psgd" in line]
    return (
        f"psgd-jax's environment is missing: {REFERENCE_PYTHON.relative_to(ROOT)} does not exist. psgd-jax pins "
        "optax<=0.2.6, so it has its own environment inside .venv, which `make test` builds on a fresh checkout "
        "(the Makefile's .venv/.test-installed recipe). In an existing checkout, run its lines from the repository's "
        "root (with $(BIN) = .venv/bin, $(VENV) = .venv):\n  " + "\n  ".join(recipe)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """psgd-jax's trajectories of every case (name -> leaf -> draws x steps x shape), from one subprocess."""
    if not REFERENCE_PYTHON.exists():
        pytest.fail(_missing_environment())
    folder = tmp_path_factory.mktemp("psgd_jax")
    inputs: dict[str, Any] = {}
    for i, case in enumerate(CASES):
        params, grads = _problem(case)
        spec = {
            "dtype": case.dtype,
            "arguments": _fixed(case),
            "schedule": {"kind": "warmup_cosine", "warmup": 20, "steps": STEPS} if case.lr_schedule else None,
            "probability_schedule": case.probability_schedule,
        }
        inputs[f"{i}/spec"] = np.asarray(json.dumps(spec))
        inputs.update({f"{i}/drawn/{k}": v for k, v in _draws(case).items()})
        inputs.update({f"{i}/params/{k}": v for k, v in params.items()})
        inputs.update({f"{i}/grads/{k}": v for k, v in grads.items()})
    np.savez(folder / "in.npz", **inputs)
    run = subprocess.run(
        [str(REFERENCE_PYTHON), str(SCRIPT), str(folder / "in.npz"), str(folder / "out.npz")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, f"psgd-jax's run failed:\n{run.stderr[-5000:]}"
    out = np.load(folder / "out.npz")
    return {case.name: {k: out[f"{i}/{k}"] for k in case.shapes} for i, case in enumerate(CASES)}


def _error(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """The largest relative error over the trajectory, of any draw."""
    return max(parity.relative_error({k: v[d] for k, v in ours.items()}, {k: v[d] for k, v in theirs.items()})
               for d in range(DRAWS))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_psgd_jax_kron(case: Case, reference: dict[str, dict[str, np.ndarray]]) -> None:
    theirs = reference[case.name]
    params, _ = _problem(case)
    for k, v in theirs.items():
        moved = float(np.max(np.abs(v[:, -1] - params[k])))
        assert moved > 1e-2, f"{k} barely moved ({moved:.2g}): the comparison would prove little"
    ours = _adaopt(case, _draws(case))
    for k in case.shapes:
        assert ours[k].dtype == np.dtype(case.dtype)
    error = _error(ours, theirs)
    assert error <= TOLERANCE[case.dtype], f"relative error {error:.3g}"


def test_the_comparison_is_sharp(reference: dict[str, dict[str, np.ndarray]]) -> None:
    """A preconditioner step size off by 1e-4 of itself, or another seed (other probes), fails it."""
    case = CASES[0]
    draws = _draws(case)
    off = {**draws, "preconditioner_lr": draws["preconditioner_lr"] * (1 + 1e-4)}
    assert _error(_adaopt(case, off), reference[case.name]) > 1e2 * TOLERANCE[case.dtype]
    assert _error(_adaopt(case, draws, seed=1), reference[case.name]) > 1e-4


# What each kind of leaf does.


def _factor_shapes(tx: Any, params: dict) -> tuple[dict[str, list[tuple[int, ...]]], list[dict[str, Any]]]:
    """The triangular factors' shapes of each leaf (leaves in sorted key order), and each diagonal slot's shapes."""
    shapes = jax.eval_shape(tx.init, params)  # the state's shapes, nothing computed
    state = next(s for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, adaopt.PsgdKronState))
                 if isinstance(s, adaopt.PsgdKronState))  # fmt: skip
    triangular = {k: [x.shape for x in v] for k, v in zip(sorted(params), state.triangular, strict=True)}
    diagonal = [{k: v.shape for k, v in slot.items() if not isinstance(v, optax.MaskedNode)} for slot in state.diagonal]
    return triangular, diagonal


def test_each_kind_of_leaf_gets_its_factors() -> None:
    params = {
        "w": jnp.ones((6, 5)), "b": jnp.ones(5), "s": jnp.ones(()), "t": jnp.ones((2, 3, 4)),
        "embed": jnp.ones((100, 4)), "one": jnp.ones((1, 7)), "empty": jnp.ones((0, 3)),
    }  # fmt: skip
    triangular, diagonal = _factor_shapes(adaopt.psgd_kron(max_size_triangular=50), params)
    assert triangular == {
        "w": [(6, 6), (5, 5)], "b": [], "s": [], "t": [(2, 2), (3, 3), (4, 4)], "embed": [(4, 4)], "one": [(7, 7)],
        "empty": [],
    }  # fmt: skip
    # A vector's, a scalar's, the long axis's and the axis of size 1's diagonal factors, all on axis 0.
    assert diagonal == [{"b": (5,), "s": (), "embed": (100,), "one": (1,)}]
    # one_diag: each leaf's longest axis (the last of equals), all_diag: every axis; min_ndim_triangular: 1-d too.
    triangular, diagonal = _factor_shapes(adaopt.psgd_kron(memory_save_mode="one_diag"), {"w": jnp.ones((4, 6, 6))})
    assert triangular == {"w": [(4, 4), (6, 6)]} and diagonal == [{}, {}, {"w": (6,)}]
    triangular, diagonal = _factor_shapes(adaopt.psgd_kron(memory_save_mode="all_diag"), {"w": jnp.ones((4, 6))})
    assert triangular == {"w": []} and diagonal == [{"w": (4,)}, {"w": (6,)}]
    assert _factor_shapes(adaopt.psgd_kron(min_ndim_triangular=1), {"b": jnp.ones(5)}) == ({"b": [(5, 5)]}, [])


def test_a_leaf_of_more_than_13_axes_is_refused_at_init() -> None:
    with pytest.raises(ValueError, match=r"at most 13 axes.*\['x'\] has shape \(1, 1, 1"):
        adaopt.psgd_kron().init({"x": jnp.ones((1,) * 14)})


def test_the_preconditioner_is_updated_every_ceil_1_over_p_steps() -> None:
    """The reference's "probability" is a counter: with p = 0.3, the factors change at steps 4, 8, 12, ...;
    between, the state's factors stay as they are and the steps use them."""
    params = {"w": jnp.ones((3, 2))}
    tx = adaopt.scale_by_psgd_kron(preconditioner_update_probability=0.3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    changed = []
    for t in range(1, 13):
        g = {"w": jnp.asarray(np.random.default_rng(t).normal(size=(3, 2)), jnp.float32)}
        before = state.triangular
        _, state = update(g, state)
        changed.append(
            any(
                bool(jnp.any(a != b))
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.triangular), strict=True)
            )
        )
    assert [t for t, c in zip(range(1, 13), changed, strict=True) if c] == [4, 8, 12]


def test_complex_parameters_are_refused_at_init() -> None:
    with pytest.raises(TypeError, match=r"PSGD Kron does not take complex parameters.*\['w'\]"):
        adaopt.psgd_kron().init({"w": jnp.ones((3, 3), jnp.complex64)})


def test_validation_names_the_option() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"preconditioner_update_probability": 0.0}, "preconditioner_update_probability"),
        ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
        ({"max_size_triangular": 2.5}, "max_size_triangular"), ({"min_ndim_triangular": -1}, "min_ndim_triangular"),
        ({"memory_save_mode": "some_diag"}, "memory_save_mode"), ({"preconditioner_lr": 0.0}, "preconditioner_lr"),
        ({"preconditioner_init_scale": -1.0}, "preconditioner_init_scale"), ({"b1": 1.0}, "b1"),
        ({"precond_dtype": jnp.int8}, "precond_dtype"), ({"mu_dtype": jnp.int32}, "mu_dtype"),
        ({"precond_update_precision": "fp8"}, "precond_update_precision"),
        ({"precond_grads_precision": "low"}, "precond_grads_precision"), ({"seed": -1}, "seed"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(adaopt.HyperparameterError, match=name):
            adaopt.psgd_kron(**kwargs)
    with pytest.raises(adaopt.HyperparameterError, match="min_prob"):
        adaopt.precond_update_prob_schedule(min_prob=0.0)


# Against kron-torch, statistically.

WHITENING_RUNS = 6
WHITENING_STEPS = 100


def _kron_torch() -> Any:
    try:
        import kron_torch
    except ImportError:
        recipe = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if "kron-torch" in line]
        pytest.fail(
            "kron-torch is not installed in the test environment. The Makefile's .venv/.test-installed recipe installs "
            "it (without triton, which it lists but does not use on CPU): run\n  " + "\n  ".join(recipe)
        )
    return kron_torch


def _whitening_problem() -> tuple[np.ndarray, np.ndarray]:
    """Gradients of noise :math:`G = L Z R^\\top` (one sequence per run) and :math:`\\Sigma^{1/4}`, the fourth root of
    their covariance :math:`\\Sigma = L L^\\top \\otimes R R^\\top` (of the row-major ``vec(G)``)."""
    rng = np.random.default_rng(20241205)
    m, n = 4, 3
    left = rng.normal(size=(m, m)) * np.exp(rng.uniform(-1.5, 1.5, m))
    right = rng.normal(size=(n, n)) * np.exp(rng.uniform(-1.5, 1.5, n))
    z = rng.normal(size=(WHITENING_RUNS, WHITENING_STEPS, m, n))
    grads = np.einsum("ij,rtjk,lk->rtil", left, z, right)
    values, vectors = np.linalg.eigh(np.kron(left @ left.T, right @ right.T))
    return grads, (vectors * values**0.25) @ vectors.T


def _whitening_error(q_left: np.ndarray, q_right: np.ndarray, sigma_quarter: np.ndarray) -> float:
    """The RMS of the log eigenvalues of :math:`\\Sigma^{1/4} P \\Sigma^{1/4}`, :math:`P = Q_L^\\top Q_L \\otimes
    Q_R^\\top Q_R`: 0 where :math:`P = \\Sigma^{-1/2}`, the fit's fixed point (:math:`P \\Sigma P = I`)."""
    p = np.kron(q_left.T @ q_left, q_right.T @ q_right)
    m = sigma_quarter @ p @ sigma_quarter
    return float(np.sqrt(np.mean(np.log(np.linalg.eigvalsh((m + m.T) / 2)) ** 2)))


@functools.cache
def _whitening_runs() -> Any:
    """adaopt's factors after WHITENING_STEPS steps of each run (its own seed), for a preconditioner step size per run."""

    def run(seed: jax.Array, grads: jax.Array, preconditioner_lr: jax.Array) -> tuple[jax.Array, ...]:
        tx = adaopt.scale_by_psgd_kron(0.0, 1.0, preconditioner_lr=preconditioner_lr, precond_dtype=jnp.float64)
        state = tx.init(grads[0])._replace(seed=seed)
        state = jax.lax.scan(lambda s, g: (tx.update(g, s)[1], None), state, grads)[0]
        return state.triangular[0]

    return jax.jit(jax.vmap(run))


def test_whitens_as_kron_torch_does() -> None:
    r"""Against ``kron_torch.Kron`` (kron-torch 0.3.3, the author's torch port), in distribution.

    Its draws cannot be matched: its probes come from torch's generator and its rebalancing coin
    from Python's; it also bounds the spectral norm from the column of largest norm only (psgd-jax,
    and adaopt, take the larger of the column's and the row's bound) and solves its triangular
    systems in float32. But both fit the same preconditioner: the fit's fixed point is
    :math:`P = \Sigma^{-1/2}`, :math:`\Sigma` the covariance of the gradients. On gradients of noise
    with an ill-conditioned Kronecker covariance, from :math:`P = I`, each of 6 runs of 100 steps
    (momentum 0, an update every step) measures how far :math:`P` still is from it
    (:func:`_whitening_error`: 2.25 at the start, about 1.2 after them for both); both see the same
    gradient sequence in each run, with their own probes. The mean of the paired differences of the
    errors must be within 4 of its standard errors (it is 0.004, its standard error 0.017). A
    preconditioner step size 30% lower or 50% higher moves it by 0.14, 8 standard errors: the test
    asserts more than 5, so the comparison can fail.
    """
    kron_torch = _kron_torch()
    grads, sigma_quarter = _whitening_problem()
    start = _whitening_error(np.eye(4), np.eye(3), sigma_quarter)

    tensors = _torch_parameters(grads.shape[2:])
    with _eager_torch():
        torch.manual_seed(0)
        opt = kron_torch.Kron(
            tensors, lr=0.0, b1=0.0, preconditioner_update_probability=1.0, precond_dtype=torch.float64
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the sizes of its state
            for t in range(WHITENING_STEPS):
                for run, tensor in enumerate(tensors):
                    tensor.grad = torch.tensor(grads[run, t])
                opt.step()
        theirs = np.array([_whitening_error(*(q.numpy() for q in opt.state[x]["Q"]), sigma_quarter) for x in tensors])

    def ours(preconditioner_lr: float) -> np.ndarray:
        with jax.enable_x64(True):
            factors = _whitening_runs()(
                jnp.arange(WHITENING_RUNS, dtype=jnp.uint32), jnp.asarray(grads),
                jnp.full(WHITENING_RUNS, preconditioner_lr),
            )  # fmt: skip
            factors = [np.asarray(f) for f in factors]
        return np.array([_whitening_error(factors[0][r], factors[1][r], sigma_quarter) for r in range(WHITENING_RUNS)])

    def paired(errors: np.ndarray) -> tuple[float, float]:
        difference = errors - theirs
        return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(WHITENING_RUNS))

    assert theirs.mean() < 0.75 * start, f"kron-torch did not whiten: {theirs.mean():.3g} from {start:.3g}"
    mean, standard_error = paired(ours(0.1))
    assert abs(mean) <= 4 * standard_error, f"paired difference {mean:.3g} +- {standard_error:.3g}"
    for off in (0.07, 0.15):
        mean_off, _ = paired(ours(off))
        assert abs(mean_off) > 5 * standard_error, f"preconditioner_lr={off}: {mean_off:.3g}"


def _torch_parameters(shape: tuple[int, ...]) -> list[Any]:
    return [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for _ in range(WHITENING_RUNS)]


@contextlib.contextmanager
def _eager_torch() -> Iterator[None]:
    """kron-torch's steps eager, on one thread: its ``torch.compile`` would compile for tens of seconds, and
    torch's threads on these tiny products only wait on each other. Its einsums contract in the given order
    (opt_einsum's search costs more than the products)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True), torch.backends.opt_einsum.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)
