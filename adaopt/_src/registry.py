"""The one list of adaopt's optimizers, which the tests, the benchmarks, the demo and the docs iterate over.

Each entry holds what a user needs: the factory, the ranges of valid hyperparameters, the
reference implementations it matches step for step (with the adaopt arguments that reproduce
each), and its capabilities, which say what it needs and how it behaves. Code that selects
optimizers (a test, a benchmark, a sweep) filters by :class:`Capability`, never by name.
Tolerances, test paths and tuned learning rates belong to ``tests/`` and ``benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from adaopt._src.base import (
    Factory,
    HyperparameterError,
    MaskOrFn,
    ScalarOrSchedule,
    as_python,
    check_flag,
    is_integer,
    is_real,
)
from adaopt._src.factored import adafactor, adam_mini, came, sm3
from adaopt._src.loss_driven import bold_driver, hypergradient, polyak
from adaopt._src.optimizers import (
    adagrad,
    adam,
    adan,
    ademamix,
    adopt,
    lamb,
    laprop,
    lion,
    mars,
    rmsprop,
    rprop,
    sgd,
    sophia,
)
from adaopt._src.preconditioned import muon, psgd_kron, scion, shampoo, soap
from adaopt._src.tuning_free import cocob, dadapt, dog, mechanic, prodigy, schedule_free
from adaopt._src.wrappers import galore


class Capability(enum.StrEnum):
    """What an optimizer needs or how it behaves: filter :data:`REGISTRY` by these, never by name.

    Example:
      >>> import adaopt
      >>> [s.name for s in adaopt.REGISTRY.values() if adaopt.Capability.NEEDS_VALUE in s.capabilities]
      ['bold_driver', 'polyak_sgd']
    """

    MOMENT_DTYPES = "moment_dtypes"
    """Keeps a moment that mirrors the parameters at its defaults and takes ``mu_dtype`` (and ``nu_dtype`` where it
    keeps two): how they are stored, a dtype or a storage (``"int8"``, ...). Factored statistics stay floats."""
    NEEDS_PARAMS = "needs_params"
    """``update`` needs the parameters even without weight decay: ``update(grads, state, params)`` (the method reads
    them: a trust ratio, a distance travelled, a relative step). With ``weight_decay > 0`` every optimizer needs them,
    as optax's do (``adamw`` at its defaults)."""
    SIGN_UPDATE = "sign_update"
    """Every coordinate moves by exactly the learning rate (Lion)."""
    WEIGHT_DECAY = "weight_decay"
    """Takes ``weight_decay`` and ``weight_decay_mask``."""
    AVERAGED_ITERATES = "averaged_iterates"
    """The parameters trained are not the ones to evaluate (:func:`adaopt.schedule_free_eval_params`)."""
    GLOBAL_STEP_SIZE = "global_step_size"
    """One step size from whole-tree statistics: decaying some leaves rescales the steps of all."""
    CONSTANT_LEARNING_RATE = "constant_learning_rate"
    """Its step size decays by itself: run it at a constant learning rate, not under a decaying schedule."""
    DELAYED_START = "delayed_start"
    """Its first few updates are exactly zero (Schedule-Free RAdam's silent phase, ADOPT's first call)."""
    NEEDS_VALUE = "needs_value"
    """``update`` needs the loss: ``update(grads, state, params, value=loss)``."""
    NEEDS_HESSIAN = "needs_hessian"
    """``update`` takes a diagonal Hessian estimate, ``update(grads, state, params, hessian=...)``: a tree, or a
    function of the parameters that it calls every ``update_interval`` steps (``lambda p:
    adaopt.hutchinson_hessian_diagonal(loss, p, key)``). Without one its curvature stays 0 and every coordinate steps
    by the clipped learning rate: the sign of the momentum (Sophia)."""
    TUNING_FREE = "tuning_free"
    """Meant to run at its defaults, with no learning rate to tune."""
    FULL_BATCH = "full_batch"
    """Compares the loss between steps: it needs the same (full-batch) objective at every step."""
    MOVES_AT_ZERO_LR = "moves_at_zero_lr"
    """A learning rate of 0 does not freeze the parameters (dual averaging, a learned scale)."""
    REAL_ONLY = "real_only"
    """Refuses complex parameters (its math has no complex form here): ``init`` raises a ``TypeError``."""
    MATRIX_STATE = "matrix_state"
    """Keeps square matrices per leaf (Kronecker factors, their eigenbases or inverse roots), replicated on a mesh,
    beside the state that mirrors the parameters: one tuple per parameter leaf, in ``jax.tree.leaves`` order."""
    FACTORED_STATE = "factored_state"
    """Keeps statistics of reduced shape (row and column means, one accumulator per slice of an axis) where others keep
    a moment of the parameter's shape: in a subtree with the parameters' structure, such a leaf has its parameter's
    shape with axes removed, and the sharding of the axes it keeps (or, for blocks of several indices along an axis,
    Adam-mini's heads, a vector of one entry per block along it)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Valid values a test may draw for a hyperparameter: uniform, or log-uniform."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        finite = all(is_real(x) and math.isfinite(x) for x in (self.low, self.high))  # a NumPy scalar too
        if not finite or not self.low < self.high:
            raise HyperparameterError(f"a Range needs finite low < high, got low={self.low!r}, high={self.high!r}.")
        check_flag("log", self.log)
        kind = lambda x: int if is_integer(x) else float
        as_python(self, low=kind(self.low), high=kind(self.high), log=bool)
        if self.log and self.low <= 0:
            raise HyperparameterError(f"a log-uniform Range needs low > 0, got low={self.low!r}.")

    def sample(self, u: float) -> float:
        """The value at quantile ``u`` in [0, 1)."""
        if self.log:
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)


@dataclasses.dataclass(frozen=True)
class Reference:
    """An implementation the optimizer must match step for step.

    ``kwargs`` fixes hyperparameters on both sides (e.g. ``centered=True``); ``convention``
    maps the hyperparameters, in adaopt's names, to the adaopt arguments that reproduce the
    reference's placement of eps and similar conventions.
    """

    name: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    convention: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    weight_decay: bool = True  # whether the reference takes weight decay
    schedule: bool = True  # whether it follows the same trajectory under a learning-rate schedule
    note: str = ""  # where the two differ, or what the comparison needs

    def adaopt_kwargs(self, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**hyperparameters, **self.kwargs}
        return self.convention(merged) if self.convention else merged


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the registry.

    Attributes:
      name: the key in :data:`REGISTRY`, the factory's name where it has one.
      factory: builds the optimizer; every argument has a default.
      hyperparameters: a range of valid values of each numeric hyperparameter beside the learning rate,
        what tests and sweeps draw from (not every valid value: a default may lie outside it).
      references: the implementations it matches step for step.
      capabilities: what it needs and how it behaves.
      summary: one line on what adapts the step.
    """

    name: str
    factory: Factory
    hyperparameters: Mapping[str, Range]
    references: tuple[Reference, ...]
    capabilities: frozenset[Capability]
    summary: str = ""

    def make(self, **overrides: Any) -> Any:
        """The optimizer at the factory's defaults, updated by ``overrides``."""
        return self.factory(**overrides)


def _eps_inside(hp: dict[str, Any]) -> dict[str, Any]:
    """optax's placement: eps inside the root."""
    return {**hp, "eps": 0.0, "eps_root": hp.get("eps", 0.0)}


def _eps_both(hp: dict[str, Any]) -> dict[str, Any]:
    """pytorch-optimizer's AdaBelief: the same eps inside the EMA and outside the root."""
    return {**hp, "eps_root": hp["eps"]}


_OPTAX_RMS = (
    "optax.rmsprop applies the learning rate before the momentum (torch, and adaopt, after it): "
    "the two agree for a constant learning rate and differ under a schedule."
)
BETAS = {"b1": Range(0.5, 0.99), "b2": Range(0.9, 0.9999)}
EPS = {"eps": Range(1e-8, 1e-3, log=True)}
_ADAM_FAMILY = frozenset({Capability.MOMENT_DTYPES, Capability.WEIGHT_DECAY})
_LAPROP_FOREACH = "run with foreach=False: its foreach path computes the debiasing step size in float32"
_ADOPT_CLIP = "evaluates the clip bound one step later than torch-adopt (the authors'): clip_count='call'"
_ADAN = {"b1": Range(0.9, 0.99), "b2": Range(0.8, 0.99), "b3": Range(0.95, 0.999), **EPS}
_ADAN_OPTAX = (
    "optax.adan weighs the gradient difference by 1 - b2 where the authors' code and pytorch-optimizer weigh it by b2 "
    "(diff_weight=1 - b2), decays the weights as AdamW (weight_decay_mode='decoupled'), eps_root=1e-8"
)
_ADAN_NOT_REPRODUCED = "its adanorm and use_gc options are not reproduced"
_MARS = {
    "b1": Range(0.9, 0.99), "b2": Range(0.95, 0.999), "gamma": Range(0.005, 0.05), **EPS,
    "adam_b1": Range(0.5, 0.99), "adam_b2": Range(0.9, 0.999), "adam_learning_rate_factor": Range(0.3, 3.0, log=True),
}  # fmt: skip
_MARS_NOTES = (
    "its fixed term 1e-15 inside the root (eps_root); weight_decay_1d per group; lr_1d = adam_learning_rate_factor "
    "* lr. Not reproduced: weight_decouple=False (its coupled decay changes the gradient after the step used it), "
    "fixed_decay, cautious (adaopt.cautious(mars) matches it for 'adamw' only); 'shampoo' in tests/test_mars.py "
    "(its Newton-Schulz runs in bfloat16)"
)
_ACCUMULATOR = frozenset({Capability.WEIGHT_DECAY})

_SCHEDULE_FREE = frozenset(
    {Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.AVERAGED_ITERATES, Capability.TUNING_FREE}
)
_SF_AVERAGING = {"r": Range(0.0, 2.0), "weight_lr_power": Range(0.0, 3.0)}
_OPTAX_SCHEDULE_FREE = (
    "optax.contrib steps z with the learning rate at count but weighs the average with the one at count + 1 "
    "(the package: both at count), warms up from 0, and has no r: it agrees with a constant learning rate."
)

_MUON_PACKAGE = (
    "the author's package (muon-optimizer): groups by adaopt.default_muon_mask, use_muon=True for Muon's; "
    "its Newton-Schulz runs in bfloat16 (ns_dtype=jnp.bfloat16), compared in float64 with it patched to float64"
)
_MUON_TORCH = "2-d parameters only; Newton-Schulz in bfloat16, patched to float64 for the comparison"
_SCION = (
    "one parameter group per norm (adaopt.default_scion_norms's, and AUTO's rule); momentum = 1 - beta; its "
    "Newton-Schulz runs in bfloat16 (ns_dtype=jnp.bfloat16), compared in float64 and float32 with it run in the "
    "gradient's dtype; weight_decay is ignored under constraint=True"
)
_SCION_LIGHT = (
    "SCION with the momentum kept in p.grad: driven as meant, the gradients accumulated into the buffers, "
    "never zeroed (its momentum=1 never clears them)"
)
_SOPHIA_G = (
    "the authors' package: update_hessian() averages p.grad squared, step(bs=B) multiplies rho by B; fed the same "
    "estimates (hessian = B * g_hat**2 every update_interval steps), eps=1e-15 added, not a floor"
)
_SOPHIA_H = (
    "its own Hutchinson draws from torch's RNG, read from adaopt.hutchinson_hessian_diagonal's vectors in the test, "
    "on a real loss (each side at its own iterates); gamma=1, clip=p; default distribution 'gaussian'"
)

_SOAP_QR = (
    "its QR decomposition runs in float32 whatever the parameters' dtype: compared in float64 with it patched to "
    "float64 (and unpatched, to float32's precision); merge_dims=True fails there on 1-d leaves of 2 to "
    "max_precondition_dim elements and on leaves whose axes all merge into one"
)

_HEAVYBALL_MUON = {
    "eps_mode": "max", "nesterov_form": "add", "matrix_view": "flatten", "ns_coefficients": muon.HEAVYBALL_NS_COEFFICIENTS,
}  # fmt: skip
_HEAVYBALL_EPS = "eps floors the root of the debiased second moment (eps_mode='max'); run eager"
_SOAP_HEAVYBALL = (
    "eager, torch's default dtype the parameters' (it computes its learning rate and the "
    "factors' debiasing in it), frequencies that are powers of two (it counts refreshes in floating point)"
)
_HEAVYBALL_SOAP = {
    "eps_mode": "max", "refresh_count": "call", "shift_power_iteration": True, "weight_decay_mode": "decoupled",
    "merge_dims": "trailing",
}  # fmt: skip


_SHAMPOO_POWER = (
    "its power iteration (the Newton iteration's ridge) starts from torch.randn: the comparison patches in the "
    "fixed start vector"
)

_ORIGINAL_SHAMPOO = {
    "b1": 0.0, "sum_statistics": True, "graft": "none", "nesterov": False, "start_preconditioning_step": 1,
    "preconditioning_compute_steps": 1, "shape_interpretation": False, "precondition_1d": True, "root_method": "eigh",
    "block_size": 2**31 - 1, "no_preconditioning_for_layers_with_dim_gt": 2**31 - 1,
}  # fmt: skip
_SHAMPOO_ORIGINAL = (
    "the original algorithm at its defaults (momentum=0, weight_decay=0, preconditioning_compute_steps=1); its "
    "momentum, weight decay (both before the statistics) and zero roots before the first computation are not "
    "reproduced; float32 needs matrix_eps above float32's rounding of the statistics (1e-5)"
)

_PSGD_JAX = (
    "exact with the same seed (psgd-jax's fixed key is the default); its default precond_dtype=None keeps the factors "
    "in JAX's default float (float64 under x64, whatever the parameters'): pass precond_dtype to both; its "
    "scanned_layers is not reproduced; with a mu_dtype narrower than the gradients it multiplies the stored momentum "
    "by b1 in that dtype (here: in the compute dtype)"
)

_KRON_TORCH = (
    "in distribution (its probes come from torch's generator): the preconditioner fitted to gradients of noise whitens "
    "them as far as adaopt's, run for run; its merge_dims=True (the default) views a 3-d+ leaf as a matrix, it decays "
    "only 2-d+ leaves, evaluates the probability schedule one step earlier and solves in float32"
)

_CAME_PO = (
    "its fixed_decay (a decay not scaled by the learning rate) and ams_bound (a running maximum of the root of the "
    "second moment, rooted again) are not reproduced"
)
_SM3_OPTAX = (
    "optax.sm3's block (b1 = momentum; its b2 = 1 is b2=None here) with the learning rate after it; it fails on 0-d "
    "leaves (IndexError): the runner gives each as a vector of one element, the full accumulator kept here"
)
_SM3_MONOTONE = "beta = b2 > 0: its accumulators keep their running maximum (monotone_accumulators=True)"

_ADAM_MINI = (
    "the authors' package (1.1.1), here on parity's tree, whose names select no head, row or bias: one second "
    "moment per tensor, decayed by the groups' weight decay; its rule on a transformer's names in tests/test_adam_mini.py"
)

_ADAFACTOR = {
    "decay_rate": Range(0.5, 1.0),
    "clip_threshold": Range(1.0, 2.0),
    "eps_scale": Range(1e-4, 1e-2, log=True),
}
_ADAFACTOR_TRANSFORMERS = (
    "relative_step=False: its lr is the learning_rate; its default relative step (lr=None, the paper's, "
    "adafactor()'s), warmup_init and beta1 are compared in tests/test_adafactor.py"
)
_ADAFACTOR_TORCH = (
    "its lr caps the relative step, as the learning_rate here, and scales the decay; eps=(None, eps_scale)"
)
_ADAFACTOR_OPTAX = (
    "factors the two largest axes from min_dim_size_to_factor=4 here (its 128 would factor no leaf of the test), its "
    "least parameter scale is 1e-3 (eps_scale); it "
    "computes beta2_t in float32 whatever the parameters' dtype: the runner has it computed in theirs (without, "
    "float64 runs agree to ~1e-7)"
)

_GALORE = (
    "galore-torch's AdamW: eps on the raw root, the decay after the step; its SVD runs in float32 and leaves the "
    "singular vectors' signs to the SVD: compared with it patched to float64 and to adaopt's sign convention. The "
    "registry's rank (128) projects no matrix of the generic tests' trees: tests/test_galore.py projects"
)

_DOG = {"reps_rel": Range(1e-3, 1e-1, log=True), "eps": Range(1e-10, 1e-6, log=True)}
_DOG_GROUPS = (
    "dog.DoG keeps r-bar and G per parameter group: the runner puts every tensor in one group and adds "
    "the masked decay to the gradients before the step, as DoG adds its own."
)

_D_ADAPT = {"d0": Range(1e-7, 1e-5, log=True)}  # growth_rate may be inf: tests/test_dadapt.py
_TUNING_FREE = frozenset(
    {Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.GLOBAL_STEP_SIZE, Capability.TUNING_FREE}
)
_ESTIMATES_D = (
    "D is estimated from the progress on a real problem: compared there (a noisy quadratic at each side's own "
    "iterates), not on tests/test_parity.py's pure-noise gradients, on which D never grows."
)
_LOSS_DRIVEN = "driven by the loss: compared on a real problem, each side at its own iterates"
_HD = (
    "the paper's authors' code (github gbaydin/hypergradient-descent), not on PyPI: the test restates its step "
    "operation for operation"
)


def _mechanic_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    weight_decay_mask: MaskOrFn | None = None,
    s_decay: Any = 0.01,
    s_init: Any = 1e-8,
    store_delta: bool = False,
) -> Any:
    """Mechanic around AdamW, as the registry runs it: ``mechanic(adamw(learning_rate, ...), s_decay, s_init=...)``.

    Any optimizer can be wrapped with :func:`adaopt.mechanic`; AdamW at learning rate 1 is the
    package's recommended use (Mechanic learns the scale).
    """
    inner = adam.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask)
    return mechanic.mechanic(inner, s_decay, s_init=s_init, store_delta=store_delta)


OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "sgd", sgd.sgd,
        {"momentum": Range(0.0, 0.95), "dampening": Range(0.0, 0.5)},
        (
            Reference("torch.optim.SGD"),
            Reference("torch.optim.SGD", kwargs={"nesterov": True, "dampening": 0.0}),
            Reference("optax.sgd", kwargs={"dampening": 0.0}, weight_decay=False),
        ),
        _ACCUMULATOR, "momentum, Nesterov, dampening",
    ),
    OptimizerSpec(
        "adagrad", adagrad.adagrad,
        {"lr_decay": Range(0.0, 0.05), "initial_accumulator_value": Range(0.0, 0.5), **EPS},
        (
            Reference("torch.optim.Adagrad"),
            Reference("optax.adagrad", kwargs={"lr_decay": 0.0}, convention=_eps_inside, weight_decay=False),
        ),
        _ACCUMULATOR, "sum of squared gradients",
    ),
    OptimizerSpec(
        "rmsprop", rmsprop.rmsprop,
        {"decay": Range(0.8, 0.999), "momentum": Range(0.0, 0.9), **EPS},
        (
            Reference("torch.optim.RMSprop"),
            Reference("torch.optim.RMSprop", kwargs={"centered": True}),
            Reference(
                "heavyball.RMSprop",
                kwargs={"bias_correction": True, "eps_mode": "max", "decoupled_weight_decay": True, "momentum": None},
                note="debiased RMSprop: the second moment debiased as Adam's, the root floored at eps",
            ),
            Reference("optax.rmsprop", convention=_eps_inside, weight_decay=False, schedule=False, note=_OPTAX_RMS),
            Reference(
                "optax.rmsprop", kwargs={"centered": True}, convention=_eps_inside, weight_decay=False,
                schedule=False, note=_OPTAX_RMS,
            ),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES}), "EMA of squared gradients, centered, momentum",
    ),
    OptimizerSpec(
        "adadelta", adagrad.adadelta,
        {"rho": Range(0.8, 0.99), "eps": Range(1e-7, 1e-4, log=True)},
        (Reference("torch.optim.Adadelta"), Reference("optax.adadelta")),
        _ACCUMULATOR, "windowed AdaGrad with unit correction",
    ),
    OptimizerSpec(
        "adam", adam.adam, {**BETAS, **EPS},
        (Reference("torch.optim.Adam"), Reference("optax.adam", weight_decay=False)),
        _ADAM_FAMILY, "bias-corrected first and second moments",
    ),
    OptimizerSpec(
        "adamw", adam.adamw, {**BETAS, **EPS},
        (
            Reference("torch.optim.AdamW"), Reference("optax.adamw"),
            Reference("heavyball.AdamW", kwargs={"eps_mode": "max"}, note=_HEAVYBALL_EPS),
        ),
        _ADAM_FAMILY, "Adam with decoupled weight decay",
    ),
    OptimizerSpec(
        "amsgrad", adam.amsgrad, {**BETAS, **EPS},
        (
            Reference("torch.optim.Adam(amsgrad=True)", kwargs={"max_of": "raw"}),
            Reference("optax.amsgrad", kwargs={"max_of": "debiased"}, weight_decay=False),
            Reference(
                "optax.scale_by_amsgrad(bias_correction_mu=False, bias_correction_nu=False)",
                kwargs={"bias_correction": False}, weight_decay=False, note="the paper's Algorithm 2",
            ),
        ),
        _ADAM_FAMILY, "Adam with a non-decreasing second moment",
    ),
    OptimizerSpec(
        "rprop", rprop.rprop, {"eta_minus": Range(0.3, 0.7), "eta_plus": Range(1.1, 1.5)},
        (
            Reference(
                "torch.optim.Rprop", weight_decay=False, schedule=False,
                note="it reads its learning rate once, as the initial step size",
            ),
        ),
        frozenset({Capability.FULL_BATCH, Capability.CONSTANT_LEARNING_RATE, Capability.WEIGHT_DECAY}),
        "a step size per coordinate, grown while its gradient keeps its sign, shrunk when it flips",
    ),
    OptimizerSpec(
        "adamax", adam.adamax, {**BETAS, **EPS},
        (Reference("torch.optim.Adamax"), Reference("optax.adamax", weight_decay=False)),
        _ADAM_FAMILY, "Adam with the infinity norm",
    ),
    OptimizerSpec(
        "nadam", adam.nadam, {**BETAS, **EPS, "momentum_decay": Range(1e-3, 1e-2, log=True)},
        (
            Reference("torch.optim.NAdam"),
            Reference("optax.nadam", kwargs={"momentum_decay": None}, weight_decay=False),
        ),
        _ADAM_FAMILY, "Adam with Nesterov momentum",
    ),
    OptimizerSpec(
        "nadamw", adam.nadamw, {**BETAS, **EPS, "momentum_decay": Range(1e-3, 1e-2, log=True)},
        (
            Reference("torch.optim.NAdam(decoupled_weight_decay=True)"),
            Reference("optax.nadamw", kwargs={"momentum_decay": None}),
            Reference("heavyball.NAdam(decoupled_weight_decay=True)", kwargs={"eps_mode": "max"}, note=_HEAVYBALL_EPS),
        ),
        _ADAM_FAMILY, "NAdam with decoupled weight decay",
    ),
    OptimizerSpec(
        "radam", adam.radam, {**BETAS, **EPS},
        (
            Reference("torch.optim.RAdam"),
            Reference("torch.optim.RAdam", kwargs={"decoupled_weight_decay": True}),
            Reference("optax.radam", kwargs={"eps_before_debias": False}, weight_decay=False),
        ),
        _ADAM_FAMILY, "Adam with a rectified adaptive learning rate",
    ),
    OptimizerSpec(
        "adabelief", adam.adabelief, {**BETAS, "eps": Range(1e-16, 1e-8, log=True)},
        (
            Reference("pytorch_optimizer.AdaBelief", convention=_eps_both),
            Reference("optax.adabelief", convention=_eps_both, weight_decay=False),
        ),
        _ADAM_FAMILY, "Adam with the variance around the EMA",
    ),
    OptimizerSpec(
        "yogi", adam.yogi, {**BETAS, "eps": Range(1e-4, 1e-2, log=True)},
        (Reference("pytorch_optimizer.Yogi"), Reference("optax.yogi", weight_decay=False)),
        _ADAM_FAMILY, "Adam with an additive second-moment update",
    ),
    OptimizerSpec(
        "adopt", adopt.adopt, {**BETAS, **EPS},
        (
            Reference("adopt.ADOPT"),
            Reference(
                "adopt.ADOPT(decouple=True)", kwargs={"decoupled_weight_decay": True, "decay_at_first_call": False},
                schedule=False, note="a constant rate, so that a decay at the first call would show",
            ),
            Reference("pytorch_optimizer.ADOPT", kwargs={"clip_count": "call"}, note=_ADOPT_CLIP),
            Reference(
                "heavyball.ADOPT",
                kwargs={"clip_exponent": None, "debias": True, "decoupled_weight_decay": True, "decay_at_first_call": False},
                note="both averages debiased as they go, no clip, decoupled decay from the second call",
            ),
        ),
        _ADAM_FAMILY | {Capability.DELAYED_START}, "Adam normalised by the previous second moment, clipped",
    ),
    OptimizerSpec(
        "ademamix", ademamix.ademamix,
        {**BETAS, "b3": Range(0.99, 0.9999), "alpha": Range(1.0, 10.0), **EPS, "warmup_steps": Range(50.0, 500.0)},
        (
            Reference("pytorch_optimizer.AdEMAMix"),
            Reference(
                "heavyball.AdEMAMix", kwargs={"eps_mode": "max", "warmup_steps": None, "decoupled_weight_decay": True},
                note=_HEAVYBALL_EPS + "; without warmup (its warmups take ln(beta + 1e-8), about 1e-7 away)",
            ),
        ),
        _ADAM_FAMILY, "Adam plus a slow EMA of the gradients",
    ),
    OptimizerSpec(
        "laprop", laprop.laprop, {**BETAS, **EPS},
        (
            Reference("pytorch_optimizer.LaProp", kwargs={"eps_root": 1e-15}, note=_LAPROP_FOREACH),
            Reference(
                "heavyball.LaProp", kwargs={"eps": 1e-8, "eps_mode": "max", "weight_decay_mode": "decoupled"},
                schedule=False, note="it floors the debiased root at 1e-8 whatever its eps; it decays before the step",
            ),
        ),
        _ADAM_FAMILY, "momentum of RMSProp-normalised gradients",
    ),
    OptimizerSpec(
        "adan", adan.adan, _ADAN,
        (
            Reference("pytorch_optimizer.Adan", note=_ADAN_NOT_REPRODUCED),
            Reference(
                "pytorch_optimizer.Adan", kwargs={"weight_decay_mode": "decoupled"}, note=_ADAN_NOT_REPRODUCED
            ),
            Reference(
                "optax.adan", kwargs={"eps_root": 1e-8, "weight_decay_mode": "decoupled"},
                convention=lambda hp: {**hp, "diff_weight": 1 - hp["b2"]}, note=_ADAN_OPTAX,
            ),
        ),
        _ADAM_FAMILY, "Adam plus a moment of the gradient differences (Nesterov without the extra gradient)",
    ),
    OptimizerSpec(
        "mars", mars.mars, _MARS,
        (
            Reference("pytorch_optimizer.MARS", kwargs={"eps_root": 1e-15}, note=_MARS_NOTES),
            Reference("pytorch_optimizer.MARS", kwargs={"eps_root": 1e-15, "mars_type": "lion"}, note=_MARS_NOTES),
        ),
        _ADAM_FAMILY, "a variance-reduced gradient correction, clipped per tensor, in AdamW or Lion",
    ),
    OptimizerSpec(
        "sophia", sophia.sophia,
        {
            "b1": Range(0.9, 0.99), "b2": Range(0.95, 0.999), "gamma": Range(0.01, 0.1, log=True),
            "eps": Range(1e-12, 1e-8, log=True), "clip": Range(0.5, 2.0),
        },
        (
            Reference("sophia_opt.SophiaG", kwargs={"eps": 1e-15, "eps_mode": "add", "clip": 1.0}, note=_SOPHIA_G),
            Reference("pytorch_optimizer.SophiaH", kwargs={"gamma": 1.0}, note=_SOPHIA_H),
        ),
        _ADAM_FAMILY | {Capability.REAL_ONLY, Capability.NEEDS_HESSIAN},
        "clipped momentum over an EMA of a diagonal Hessian estimate (update(..., hessian=))",
    ),
    OptimizerSpec(
        "lion", lion.lion, {"b1": Range(0.5, 0.99), "b2": Range(0.9, 0.999)},
        (Reference("pytorch_optimizer.Lion"), Reference("optax.lion")),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.SIGN_UPDATE}), "sign of interpolated momentum",
    ),
    OptimizerSpec(
        "lamb", lamb.lamb, {**BETAS, "eps": Range(1e-8, 1e-4, log=True)},
        (
            Reference(
                "pytorch_optimizer.Lamb(weight_decouple=False)",
                convention=lambda hp: {**hp, "debias": "step", "max_param_norm": 10.0, "trust_eps": hp["eps"]},
            ),
            Reference("optax.lamb"),
        ),
        _ADAM_FAMILY | {Capability.NEEDS_PARAMS}, "Adam with layer-wise trust ratios",
    ),
    OptimizerSpec(
        "muon", muon.muon,
        {
            "momentum": Range(0.5, 0.99), "eps": Range(1e-8, 1e-6, log=True), "adam_b1": Range(0.5, 0.99),
            "adam_b2": Range(0.9, 0.9999), "adam_eps": Range(1e-10, 1e-6, log=True),
        },
        (
            Reference("muon.SingleDeviceMuonWithAuxAdam", note=_MUON_PACKAGE),
            Reference("torch.optim.Muon", kwargs={"eps_mode": "max"}, note=_MUON_TORCH),
            Reference(
                "heavyball.MuonAdamW", kwargs={**_HEAVYBALL_MUON, "adam_eps_mode": "max"},
                note="its Newton-Schulz coefficients change at each iteration; every leaf of 2+ axes goes to Muon",
            ),
            Reference(
                "heavyball.Muon", kwargs={**_HEAVYBALL_MUON, "aux": "momentum"},
                note="its other leaves take the momentum and look-ahead alone",
            ),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY}),
        "Newton–Schulz-orthogonalised momentum per matrix, AdamW for the other leaves",
    ),
    OptimizerSpec(
        "scion", scion.scion, {"momentum": Range(0.5, 0.99), "radius": Range(0.5, 2.0)},
        (
            Reference("pytorch_optimizer.SCION", note=_SCION),
            Reference("pytorch_optimizer.SCIONLight", kwargs={"momentum_form": "sum"}, note=_SCION_LIGHT),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY}),
        "each leaf's momentum through the linear minimisation oracle of its norm (spectral, sign, column, RMS)",
    ),
    OptimizerSpec(
        "soap", soap.soap,
        {**BETAS, "shampoo_beta": Range(0.5, 0.99), "eps": Range(1e-10, 1e-6, log=True)},
        (
            Reference("pytorch_optimizer.SOAP", note=_SOAP_QR),
            Reference("heavyball.SOAP", kwargs=_HEAVYBALL_SOAP, note=_SOAP_HEAVYBALL),
        ),
        frozenset(
            {
                Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY, Capability.DELAYED_START,
                Capability.MATRIX_STATE,
            }
        ),
        "Adam in the eigenbasis of each leaf's Kronecker factors (Shampoo's), refreshed every k steps",
    ),
    OptimizerSpec(
        "shampoo", shampoo.shampoo,
        {**BETAS, "matrix_eps": Range(1e-8, 1e-4, log=True), "diagonal_eps": Range(1e-12, 1e-8, log=True)},
        (
            Reference("pytorch_optimizer.ScalableShampoo", note=_SHAMPOO_POWER),
            Reference("pytorch_optimizer.Shampoo", kwargs=_ORIGINAL_SHAMPOO, weight_decay=False, note=_SHAMPOO_ORIGINAL),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY, Capability.MATRIX_STATE}),
        "Kronecker-factored preconditioner per block, grafted onto SGD's, AdaGrad's or RMSProp's step size",
    ),
    OptimizerSpec(
        "psgd_kron", psgd_kron.psgd_kron,
        {"b1": Range(0.5, 0.99), "preconditioner_lr": Range(0.02, 0.3, log=True),
         "preconditioner_update_probability": Range(0.1, 1.0)},
        (
            Reference("psgd_jax.kron", note=_PSGD_JAX),
            Reference("kron_torch.Kron", note=_KRON_TORCH),
        ),
        frozenset({
            Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY, Capability.MATRIX_STATE,
            Capability.FACTORED_STATE,
        }),
        "momentum preconditioned by Kronecker factors (triangular or diagonal) fitted online to whiten it",
    ),
    OptimizerSpec(
        "adafactor", adafactor.adafactor, _ADAFACTOR,
        (
            Reference("transformers.optimization.Adafactor", kwargs={"relative_step": False}, note=_ADAFACTOR_TRANSFORMERS),
            Reference(
                "torch.optim.Adafactor", kwargs={"eps": None, "eps_mode": "max", "weight_decay_mode": "learning_rate"},
                note=_ADAFACTOR_TORCH,
            ),
            Reference(
                "optax.adafactor",
                kwargs={
                    "relative_step": False, "factored_axes": "largest_two", "min_dim_size_to_factor": 4,
                    "weight_decay_mode": "unscaled", "eps_scale": 1e-3,
                },
                note=_ADAFACTOR_OPTAX,
            ),
        ),
        # Not MOMENT_DTYPES: no first moment at its defaults (b1=None) and a factored second moment; with b1 its
        # mu_dtype takes a storage too (tests/test_storage.py).
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.REAL_ONLY, Capability.FACTORED_STATE}),
        "factored second moments (row and column statistics), a step relative to the parameters' scale, clipped",
    ),
    OptimizerSpec(
        "came", came.came,
        {"b1": Range(0.8, 0.95), "b2": Range(0.99, 0.9999), "b3": Range(0.999, 0.9999), "clip_threshold": Range(0.5, 2.0)},
        (
            Reference("came_pytorch.CAME"),
            Reference("pytorch_optimizer.CAME", note=_CAME_PO),
            Reference("pytorch_optimizer.CAME", kwargs={"decoupled_weight_decay": False}, note=_CAME_PO),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY, Capability.FACTORED_STATE}),
        "Adafactor's factored second moment, clipped, with momentum weighed by a factored confidence",
    ),
    OptimizerSpec(
        "sm3", sm3.sm3, {"momentum": Range(0.0, 0.95), "eps": Range(1e-10, 1e-6, log=True)},
        (
            Reference("optax.scale_by_sm3", weight_decay=False, note=_SM3_OPTAX),
            Reference("optax.scale_by_sm3", kwargs={"b2": 0.95}, weight_decay=False, note=_SM3_OPTAX),
            Reference("pytorch_optimizer.SM3", weight_decay=False),
            Reference(
                "pytorch_optimizer.SM3", kwargs={"b2": 0.95, "monotone_accumulators": True}, weight_decay=False,
                note=_SM3_MONOTONE,
            ),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.MOMENT_DTYPES, Capability.REAL_ONLY, Capability.FACTORED_STATE}),
        "AdaGrad with one accumulator per slice of each axis (rows, columns): the cover sets' minimum",
    ),
    OptimizerSpec(
        "adam_mini", adam_mini.adam_mini, {**BETAS, **EPS},
        (Reference("adam_mini.Adam_mini", note=_ADAM_MINI),),
        _ADAM_FAMILY | {Capability.FACTORED_STATE},
        "Adam with one second moment per block (head, output neuron, tensor), chosen by the parameters' names",
    ),
    OptimizerSpec(
        "galore_adamw", galore.galore_adamw, {**BETAS, "eps": Range(1e-8, 1e-4, log=True)},
        (Reference("galore_torch.GaLoreAdamW", note=_GALORE),),
        _ADAM_FAMILY, "AdamW on a low-rank projection of each matrix's gradient, refreshed by SVD every k steps",
    ),
    OptimizerSpec(
        "schedule_free_sgd", schedule_free.schedule_free_sgd,
        {"momentum": Range(0.5, 0.98), **_SF_AVERAGING},
        (
            Reference("schedulefree.SGDScheduleFree"),
            Reference("schedulefree.SGDScheduleFree", kwargs={"warmup_steps": 10}),
            Reference("schedulefree.SGDScheduleFreeReference"),
            Reference("optax.contrib.schedule_free_sgd", kwargs={"r": 0.0}, schedule=False, note=_OPTAX_SCHEDULE_FREE),
        ),
        _SCHEDULE_FREE, "Schedule-Free SGD: interpolation and averaging in place of a schedule",
    ),
    OptimizerSpec(
        "schedule_free_adamw", schedule_free.schedule_free_adamw,
        {**BETAS, **EPS, **_SF_AVERAGING},
        (
            Reference("schedulefree.AdamWScheduleFree"),
            Reference("schedulefree.AdamWScheduleFree", kwargs={"warmup_steps": 10}),
            Reference("schedulefree.AdamWScheduleFreeReference"),
            Reference("schedulefree.AdamWScheduleFreePaper", kwargs={"debias": "learning_rate"}),
            Reference(
                "heavyball.SFAdamW", kwargs={"eps_mode": "max"}, schedule=False,
                note=_HEAVYBALL_EPS + "; its averaging weights take the current learning rate, not the largest so far",
            ),
            Reference(
                "heavyball.SFAdamW", kwargs={"eps_mode": "max", "warmup_steps": 10}, schedule=False,
                note="its warmup_steps=9: its warmup rate is t / (W + 1)",
            ),
            Reference("optax.contrib.schedule_free_adamw", kwargs={"r": 0.0}, schedule=False, note=_OPTAX_SCHEDULE_FREE),
        ),
        _SCHEDULE_FREE | {Capability.MOMENT_DTYPES}, "Schedule-Free AdamW",
    ),
    OptimizerSpec(
        "schedule_free_radam", schedule_free.schedule_free_radam,
        {**BETAS, **EPS, **_SF_AVERAGING},
        (
            Reference("schedulefree.RAdamScheduleFree"),
            Reference("schedulefree.RAdamScheduleFree", kwargs={"silent_sgd_phase": False}),
        ),
        _SCHEDULE_FREE | {Capability.MOMENT_DTYPES, Capability.DELAYED_START}, "Schedule-Free RAdam: rectified, no warmup",
    ),
    OptimizerSpec(
        "dog", dog.dog, _DOG,
        (
            Reference("dog.DoG", note=_DOG_GROUPS),
            Reference("dog.DoG", kwargs={"init_eta": 1e-2}, note=_DOG_GROUPS + " The first step is init_eta, unscaled by lr."),
            Reference("optax.contrib.dog"),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.GLOBAL_STEP_SIZE, Capability.CONSTANT_LEARNING_RATE, Capability.TUNING_FREE}),
        "distance over gradients: one learning-rate-free step size",
    ),
    OptimizerSpec(
        "ldog", dog.ldog, _DOG,
        (Reference("dog.LDoG"), Reference("dog.LDoG", kwargs={"init_eta": 1e-2})),
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.CONSTANT_LEARNING_RATE, Capability.TUNING_FREE}),
        "layer-wise DoG: one step size per leaf",
    ),
    OptimizerSpec(
        "dowg", dog.dowg,
        {"init_estim_sq_dist": Range(1e-4, 1e-1, log=True), "eps": Range(1e-8, 1e-4, log=True)},
        (
            Reference("optax.contrib.dowg"),
            Reference("optax.contrib.dowg", kwargs={"eps": 0.0}, note="eps = 0: Algorithm 1 of the paper exactly"),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.GLOBAL_STEP_SIZE, Capability.TUNING_FREE}),
        "distance over weighted gradients",
    ),
    OptimizerSpec(
        "prodigy", prodigy.prodigy,
        {**BETAS, "eps": Range(1e-8, 1e-6, log=True), "d0": Range(1e-7, 1e-5, log=True), "d_coef": Range(0.5, 2.0)},
        (
            Reference("prodigyopt.Prodigy", note=_ESTIMATES_D),
            Reference("optax.contrib.prodigy", kwargs={"bias_correction": True}, weight_decay=False),
        ),
        _TUNING_FREE | {Capability.MOMENT_DTYPES}, "Prodigy: D-Adaptation's Adam with a faster-growing D",
    ),
    OptimizerSpec(
        "dadapt_adam", dadapt.dadapt_adam, {**BETAS, "eps": Range(1e-8, 1e-6, log=True), **_D_ADAPT},
        (
            Reference("dadaptation.DAdaptAdam", note=_ESTIMATES_D),
            Reference(
                "optax.contrib.dadapt_adamw", kwargs={"bias_correction": True, "decoupled_weight_decay": True},
                weight_decay=False,
            ),
        ),
        # Reads the parameters only for a decoupled weight decay.
        (_TUNING_FREE - {Capability.NEEDS_PARAMS}) | {Capability.MOMENT_DTYPES}, "D-Adaptation Adam: the step size from a lower bound on the distance",
    ),
    OptimizerSpec(
        "dadapt_sgd", dadapt.dadapt_sgd, {"momentum": Range(0.0, 0.95), **_D_ADAPT},
        (Reference("dadaptation.DAdaptSGD", note=_ESTIMATES_D),),
        _TUNING_FREE, "D-Adaptation SGD",
    ),
    OptimizerSpec(
        "dadapt_adagrad", dadapt.dadapt_adagrad,
        {"momentum": Range(0.0, 0.95), "eps": Range(1e-8, 1e-4, log=True), **_D_ADAPT},
        (Reference("dadaptation.DAdaptAdaGrad", note=_ESTIMATES_D),),
        _TUNING_FREE | {Capability.MOVES_AT_ZERO_LR}, "D-Adaptation AdaGrad (dual averaging)",
    ),
    OptimizerSpec(
        "cocob", cocob.cocob, {"alpha": Range(10.0, 200.0), "eps": Range(1e-8, 1e-4, log=True)},
        (
            Reference("parameterfree.COCOB"),
            Reference("optax.contrib.cocob"),
        ),
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_PARAMS, Capability.TUNING_FREE}), "COCOB-Backprop: coin betting per coordinate",
    ),
    OptimizerSpec(
        "mechanic", _mechanic_adamw,
        {**BETAS, **EPS, "s_decay": Range(0.0, 0.05), "s_init": Range(1e-8, 1e-6, log=True)},
        (
            Reference("mechanic_pytorch.mechanize"),
            Reference("optax.contrib.mechanize", weight_decay=False),
        ),
        _TUNING_FREE | {Capability.MOVES_AT_ZERO_LR}, "Mechanic around AdamW: a learned scale for any optimizer's steps",
    ),
    OptimizerSpec(
        "sgd_hd", hypergradient.sgd_hd, {"hyper_lr": Range(1e-5, 1e-3, log=True), "momentum": Range(0.0, 0.9)},
        (Reference("hypergradient-descent:SGDHD", note=_HD),),
        frozenset({Capability.WEIGHT_DECAY, Capability.TUNING_FREE, Capability.GLOBAL_STEP_SIZE, Capability.MOVES_AT_ZERO_LR}), "SGD whose learning rate descends its own hypergradient",
    ),
    OptimizerSpec(
        "sgdn_hd", hypergradient.sgdn_hd, {"hyper_lr": Range(1e-5, 1e-3, log=True), "momentum": Range(0.5, 0.95)},
        (Reference("hypergradient-descent:SGDHD(nesterov=True)", note=_HD),),
        frozenset({Capability.WEIGHT_DECAY, Capability.TUNING_FREE, Capability.GLOBAL_STEP_SIZE, Capability.MOVES_AT_ZERO_LR}), "Nesterov SGD with hypergradient descent on the learning rate",
    ),
    OptimizerSpec(
        "adam_hd", hypergradient.adam_hd, {**BETAS, **EPS, "hyper_lr": Range(1e-9, 1e-7, log=True)},
        (Reference("hypergradient-descent:AdamHD", note=_HD),),
        _ADAM_FAMILY | {Capability.TUNING_FREE, Capability.GLOBAL_STEP_SIZE, Capability.MOVES_AT_ZERO_LR}, "Adam with hypergradient descent on the learning rate",
    ),
    OptimizerSpec(
        "bold_driver", bold_driver.bold_driver, {"increase": Range(1.01, 1.2), "decrease": Range(0.3, 0.9)},
        (),  # no reference implementation exists: tests/test_bold_driver.py checks the rule itself
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_VALUE, Capability.TUNING_FREE, Capability.FULL_BATCH}), "grow the learning rate while the loss falls, cut it when it rises",
    ),
    OptimizerSpec(
        "polyak_sgd", polyak.polyak_sgd, {"c": Range(0.2, 1.0), "max_learning_rate": Range(0.1, 10.0, log=True)},
        (Reference("optax.polyak_sgd", note=_LOSS_DRIVEN),),
        frozenset({Capability.WEIGHT_DECAY, Capability.NEEDS_VALUE, Capability.TUNING_FREE, Capability.GLOBAL_STEP_SIZE}), "Polyak step sizes (SPS, SPS-max)",
    ),
)  # fmt: skip

REGISTRY: Mapping[str, OptimizerSpec] = MappingProxyType({spec.name: spec for spec in OPTIMIZERS})
