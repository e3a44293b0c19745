"""The reference implementations, keyed by the names the registry gives them.

Each reference is built from hyperparameters in adaopt's names (the registry entry's drawn
values merged with the reference's fixed ``kwargs``). torch references get a list of parameter
groups; optax references get the learning rate (a number or a schedule) and the decay mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from unittest import mock

import adam_mini
import adopt as torch_adopt
import came_pytorch
import dog
import heavyball
import heavyball.utils
import jax
import jax.numpy as jnp
import optax
import optax.contrib
import pytorch_optimizer
import schedulefree
import torch
from optax._src import factorized

from tests.parity import TorchFactory

HP = dict[str, Any]
# heavyball eager: torch.compile would take minutes per optimizer for the same numbers (its SOAP is compared in
# tests/test_soap.py, which sets this itself).
heavyball.utils.compile_mode = None
OptaxFactory = Callable[[Any, HP, Any], optax.GradientTransformation]


def _betas(hp: HP) -> tuple[float, float]:
    return (hp["b1"], hp["b2"])


def heavyball_optimizer(cls: Any, groups: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """A heavyball optimizer, eager (above), with its state in the parameters' dtype (its default is float32);
    ``groups``: parameter groups or a list of tensors."""
    first = groups[0]
    dtype = (first["params"][0] if isinstance(first, dict) else first).dtype
    return cls(groups, storage_dtype=str(dtype).removeprefix("torch."), **kwargs)


def _train_mode(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The schedulefree package steps only in train mode; before the first step, train() moves nothing."""
    opt.train()  # type: ignore[attr-defined]
    return opt


def _schedule_free(cls: Any, hp: HP, groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    averaging = {"r": hp.get("r", 0.0), "weight_lr_power": hp.get("weight_lr_power", 2.0)}
    return _train_mode(cls(groups, lr=1.0, warmup_steps=hp.get("warmup_steps", 0), **averaging, **kwargs))


class _DoGOneGroup(dog.DoG):
    """dog.DoG with every tensor in one group (its r-bar and G are per group); the masked decay is
    added to the gradients before the step exactly as dog.DoG adds its own (p.grad.add_(p, alpha=wd))."""

    def __init__(self, groups: list[dict[str, Any]], **kwargs: Any) -> None:
        self._decayed = [(p, g["weight_decay"]) for g in groups for p in g["params"] if g["weight_decay"] > 0]
        super().__init__([{"params": [p for g in groups for p in g["params"]]}], **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for p, weight_decay in self._decayed:
            p.grad.add_(p, alpha=weight_decay)
        return super().step(closure)


def _mars(groups: list[dict[str, Any]], hp: HP) -> torch.optim.Optimizer:
    """pytorch_optimizer.MARS with its 1-d decay per group (decayed groups: adaopt's adam_weight_decay, or
    weight_decay where that is None), and the 1-d learning rate lr_1d / lr = adam_learning_rate_factor."""
    aux_decay = hp.get("adam_weight_decay")
    aux_decay = hp["weight_decay"] if aux_decay is None else aux_decay
    for group in groups:
        group["weight_decay_1d"] = aux_decay if group["weight_decay"] > 0 else 0.0
    return pytorch_optimizer.MARS(
        groups,
        lr=1.0,
        betas=_betas(hp),
        gamma=hp["gamma"],
        mars_type=hp.get("mars_type", "adamw"),
        optimize_1d=hp.get("optimize_1d", False),
        lr_1d=hp.get("adam_learning_rate_factor", 1.0),
        betas_1d=(hp["adam_b1"], hp["adam_b2"]),
        eps=hp["eps"],
        ams_bound=hp.get("amsgrad", False),
    )


def _dog_kwargs(hp: HP) -> dict[str, Any]:
    return {"lr": 1.0, "reps_rel": hp["reps_rel"], "eps": hp["eps"], "init_eta": hp.get("init_eta")}


def _came_betas(hp: HP) -> tuple[float, float, float]:
    return (hp["b1"], hp["b2"], hp["b3"])


def _sm3_beta(hp: HP) -> float:
    """pytorch-optimizer's SM3 sums for beta = 0 (adaopt's b2=None) and keeps a running maximum of an EMA otherwise."""
    b2 = hp.get("b2")
    assert (b2 is not None) == hp.get("monotone_accumulators", False), "its beta > 0 implies monotone accumulators"
    return 0.0 if b2 is None else b2


def _adam_mini(groups: list[dict[str, Any]], hp: HP) -> torch.optim.Optimizer:
    """adam_mini.Adam_mini on the groups' tensors, named "p0", "p1"... (no name of its rule: one block per tensor),
    each decayed by its group's weight decay (Adam_mini decays by name; it takes named tensors, not groups)."""
    tensors = [p.requires_grad_() for g in groups for p in g["params"]]
    decays = [g["weight_decay"] for g in groups for _ in g["params"]]
    opt = adam_mini.Adam_mini(
        [(f"p{i}", p) for i, p in enumerate(tensors)], lr=1.0, betas=_betas(hp), eps=hp["eps"], verbose=False
    )
    for group, decay in zip(opt.param_groups, decays, strict=True):  # one group per tensor, in order
        group["weight_decay"] = decay
    return opt


def _adafactor_transformers(groups: list[dict[str, Any]], hp: HP) -> torch.optim.Optimizer:
    """transformers' Adafactor (imported here: the package is slow to import); with relative_step its lr is None."""
    from transformers.optimization import Adafactor

    relative = hp.get("relative_step", True)
    return Adafactor(
        groups,
        lr=None if relative else 1.0,
        eps=(hp.get("eps", 1e-30), hp["eps_scale"]),
        clip_threshold=hp["clip_threshold"],
        decay_rate=-hp["decay_rate"],
        beta1=hp.get("b1"),
        scale_parameter=hp.get("scale_parameter", True),
        relative_step=relative,
        warmup_init=hp.get("warmup_init", False),
    )


TORCH: dict[str, TorchFactory] = {
    "transformers.optimization.Adafactor": _adafactor_transformers,
    "torch.optim.Adafactor": lambda groups, hp: torch.optim.Adafactor(
        groups, lr=1.0, beta2_decay=-hp["decay_rate"], eps=(hp.get("eps"), hp["eps_scale"]), d=hp["clip_threshold"]
    ),
    "torch.optim.SGD": lambda groups, hp: torch.optim.SGD(
        groups, lr=1.0, momentum=hp["momentum"], dampening=hp["dampening"], nesterov=hp.get("nesterov", False)
    ),
    "torch.optim.Adagrad": lambda groups, hp: torch.optim.Adagrad(
        groups,
        lr=1.0,
        lr_decay=hp["lr_decay"],
        initial_accumulator_value=hp["initial_accumulator_value"],
        eps=hp["eps"],
    ),
    "torch.optim.RMSprop": lambda groups, hp: torch.optim.RMSprop(
        groups, lr=1.0, alpha=hp["decay"], eps=hp["eps"], momentum=hp["momentum"], centered=hp.get("centered", False)
    ),
    "torch.optim.Adadelta": lambda groups, hp: torch.optim.Adadelta(groups, lr=1.0, rho=hp["rho"], eps=hp["eps"]),
    "torch.optim.Adam": lambda groups, hp: torch.optim.Adam(groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]),
    "torch.optim.AdamW": lambda groups, hp: torch.optim.AdamW(groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]),
    "torch.optim.Rprop": lambda groups, hp: torch.optim.Rprop(groups, lr=1.0, etas=(hp["eta_minus"], hp["eta_plus"])),
    "heavyball.AdamW": lambda groups, hp: heavyball_optimizer(
        heavyball.AdamW, groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]
    ),
    "heavyball.NAdam(decoupled_weight_decay=True)": lambda groups, hp: heavyball_optimizer(
        heavyball.NAdam,
        groups,
        lr=1.0,
        betas=_betas(hp),
        eps=hp["eps"],
        momentum_decay=hp["momentum_decay"],
        decoupled_weight_decay=True,
    ),
    "heavyball.RMSprop": lambda groups, hp: heavyball_optimizer(
        heavyball.RMSprop, groups, lr=1.0, betas=(0.0, hp["decay"]), eps=hp["eps"]
    ),
    "heavyball.ADOPT": lambda groups, hp: heavyball_optimizer(
        heavyball.ADOPT, groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]
    ),
    "heavyball.LaProp": lambda groups, hp: heavyball_optimizer(heavyball.LaProp, groups, lr=1.0, betas=_betas(hp)),
    "heavyball.AdEMAMix": lambda groups, hp: heavyball_optimizer(
        heavyball.AdEMAMix, groups, lr=1.0, betas=(hp["b1"], hp["b2"], hp["b3"]), alpha=hp["alpha"], eps=hp["eps"]
    ),
    # Its warmup rate is t / (W + 1): adaopt's warmup_steps W + 1.
    "heavyball.SFAdamW": lambda groups, hp: heavyball_optimizer(
        heavyball.SFAdamW,
        groups,
        lr=1.0,
        betas=_betas(hp),
        eps=hp["eps"],
        r=hp["r"],
        weight_lr_power=hp["weight_lr_power"],
        warmup_steps=max(hp.get("warmup_steps", 0) - 1, 0),
    ),
    "torch.optim.Adam(amsgrad=True)": lambda groups, hp: torch.optim.Adam(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], amsgrad=True
    ),
    "torch.optim.Adamax": lambda groups, hp: torch.optim.Adamax(groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]),
    "torch.optim.NAdam": lambda groups, hp: torch.optim.NAdam(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], momentum_decay=hp["momentum_decay"]
    ),
    "torch.optim.NAdam(decoupled_weight_decay=True)": lambda groups, hp: torch.optim.NAdam(
        groups,
        lr=1.0,
        betas=_betas(hp),
        eps=hp["eps"],
        momentum_decay=hp["momentum_decay"],
        decoupled_weight_decay=True,
    ),
    "torch.optim.RAdam": lambda groups, hp: torch.optim.RAdam(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], decoupled_weight_decay=hp.get("decoupled_weight_decay", False)
    ),
    "pytorch_optimizer.AdaBelief": lambda groups, hp: pytorch_optimizer.AdaBelief(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]
    ),
    "pytorch_optimizer.Yogi": lambda groups, hp: pytorch_optimizer.Yogi(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]
    ),
    "adopt.ADOPT": lambda groups, hp: torch_adopt.ADOPT(groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]),
    "adopt.ADOPT(decouple=True)": lambda groups, hp: torch_adopt.ADOPT(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], decouple=True
    ),
    "pytorch_optimizer.ADOPT": lambda groups, hp: pytorch_optimizer.ADOPT(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"]
    ),
    "pytorch_optimizer.AdEMAMix": lambda groups, hp: pytorch_optimizer.AdEMAMix(
        groups,
        lr=1.0,
        betas=(hp["b1"], hp["b2"], hp["b3"]),
        alpha=hp["alpha"],
        t_alpha_beta3=hp.get("warmup_steps"),
        eps=hp["eps"],
    ),
    "pytorch_optimizer.LaProp": lambda groups, hp: pytorch_optimizer.LaProp(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], foreach=False
    ),
    "pytorch_optimizer.Lion": lambda groups, hp: pytorch_optimizer.Lion(groups, lr=1.0, betas=_betas(hp)),
    "pytorch_optimizer.Adan": lambda groups, hp: pytorch_optimizer.Adan(
        groups,
        lr=1.0,
        betas=(hp["b1"], hp["b2"], hp["b3"]),
        eps=hp["eps"],
        weight_decouple=hp.get("weight_decay_mode", "proximal") == "decoupled",
        max_grad_norm=hp.get("max_grad_norm") or 0.0,
    ),
    "pytorch_optimizer.MARS": lambda groups, hp: _mars(groups, hp),
    "pytorch_optimizer.Lamb(weight_decouple=False)": lambda groups, hp: pytorch_optimizer.Lamb(
        groups, lr=1.0, betas=_betas(hp), eps=hp["eps"], weight_decouple=False
    ),
    "came_pytorch.CAME": lambda groups, hp: came_pytorch.CAME(
        groups,
        lr=1.0,
        eps=(hp.get("eps1", 1e-30), hp.get("eps2", 1e-16)),
        clip_threshold=hp["clip_threshold"],
        betas=_came_betas(hp),
    ),
    "pytorch_optimizer.CAME": lambda groups, hp: pytorch_optimizer.CAME(
        groups,
        lr=1.0,
        betas=_came_betas(hp),
        weight_decouple=hp.get("decoupled_weight_decay", True),
        clip_threshold=hp["clip_threshold"],
        eps1=hp.get("eps1", 1e-30),
        eps2=hp.get("eps2", 1e-16),
    ),
    "pytorch_optimizer.SM3": lambda groups, hp: pytorch_optimizer.SM3(
        groups, lr=1.0, momentum=hp["momentum"], beta=_sm3_beta(hp), eps=hp["eps"]
    ),
    "adam_mini.Adam_mini": _adam_mini,
    "schedulefree.SGDScheduleFree": lambda groups, hp: _schedule_free(
        schedulefree.SGDScheduleFree, hp, groups, momentum=hp["momentum"]
    ),
    "schedulefree.SGDScheduleFreeReference": lambda groups, hp: _schedule_free(
        schedulefree.SGDScheduleFreeReference, hp, groups, momentum=hp["momentum"]
    ),
    "schedulefree.AdamWScheduleFree": lambda groups, hp: _schedule_free(
        schedulefree.AdamWScheduleFree, hp, groups, betas=_betas(hp), eps=hp["eps"]
    ),
    "schedulefree.AdamWScheduleFreeReference": lambda groups, hp: _schedule_free(
        schedulefree.AdamWScheduleFreeReference, hp, groups, betas=_betas(hp), eps=hp["eps"]
    ),
    "schedulefree.AdamWScheduleFreePaper": lambda groups, hp: _schedule_free(
        schedulefree.AdamWScheduleFreePaper, hp, groups, betas=_betas(hp), eps=hp["eps"]
    ),
    "dog.DoG": lambda groups, hp: _DoGOneGroup(groups, **_dog_kwargs(hp)),
    "dog.LDoG": lambda groups, hp: dog.LDoG(groups, **_dog_kwargs(hp)),  # per-tensor statistics
    "schedulefree.RAdamScheduleFree": lambda groups, hp: _train_mode(
        schedulefree.RAdamScheduleFree(
            groups,
            lr=1.0,
            betas=_betas(hp),
            eps=hp["eps"],
            silent_sgd_phase=hp.get("silent_sgd_phase", True),
            r=hp.get("r", 0.0),
            weight_lr_power=hp.get("weight_lr_power", 2.0),
        )
    ),
}


def _optax_schedule_free_sgd(lr: Any, hp: HP, mask: Any) -> optax.GradientTransformation:
    """optax.contrib.schedule_free_sgd's own chain, with the decay mask it does not take."""
    inner = optax.chain(optax.add_decayed_weights(hp["weight_decay"], mask), optax.sgd(lr))
    return optax.contrib.schedule_free(inner, lr, b1=hp["momentum"], weight_lr_power=hp["weight_lr_power"])


def _optax_schedule_free_adamw(lr: Any, hp: HP, mask: Any) -> optax.GradientTransformation:
    """optax.contrib.schedule_free_adamw's own chain, with the decay mask it does not take."""
    inner = optax.chain(
        optax.scale_by_rms(decay=hp["b2"], eps=hp["eps"], eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(hp["weight_decay"], mask),
        optax.scale_by_learning_rate(lr),
    )
    return optax.contrib.schedule_free(inner, lr, b1=hp["b1"], weight_lr_power=hp["weight_lr_power"])


def _amsgrad_paper(lr: Any, hp: HP, mask: Any) -> optax.GradientTransformation:
    del mask
    core = optax.scale_by_amsgrad(hp["b1"], hp["b2"], hp["eps"], bias_correction_mu=False, bias_correction_nu=False)
    return optax.chain(core, optax.scale_by_learning_rate(lr))


def _zero_d_as_vectors(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with each 0-d leaf (of the gradients, the parameters and the state) seen as a vector of one element."""
    as_vector = lambda tree: jax.tree.map(lambda x: x.reshape(1) if x.ndim == 0 else x, tree)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new, state = inner.update(as_vector(updates), state, None if params is None else as_vector(params))
        return jax.tree.map(lambda n, u: n.reshape(u.shape), new, updates), state

    return optax.GradientTransformation(lambda params: inner.init(as_vector(params)), update_fn)


def _optax_sm3(lr: Any, hp: HP, mask: Any) -> optax.GradientTransformation:
    """optax.sm3's block (b1 = momentum, b2 = 1 for sums) and the learning rate; optax fails on 0-d leaves."""
    del mask
    b2 = hp.get("b2")
    core = optax.scale_by_sm3(hp["momentum"], 1.0 if b2 is None else b2, hp["eps"])
    return _zero_d_as_vectors(optax.chain(core, optax.scale_by_learning_rate(lr)))


def _decay_rate_in_dtype(step: Any, exponent: Any) -> Any:
    """optax's ``_decay_rate_pow`` in the default float dtype (float64 under x64), where optax rounds t to float32."""
    t = jnp.asarray(step + 1).astype(jnp.result_type(float))
    return 1.0 - t ** (-exponent)


def _optax_adafactor(lr: Any, hp: HP, mask: Any) -> optax.GradientTransformation:
    """optax.adafactor as it is, but for its second-moment decay computed in the parameters' dtype
    (:func:`_decay_rate_in_dtype` patched in while it builds its chain); its least parameter scale is 1e-3."""
    assert hp["eps_scale"] == 1e-3, "optax.adafactor's scale_by_param_block_rms keeps its min_scale of 1e-3"
    patched = functools.partial(factorized.scale_by_factored_rms, decay_rate_fn=_decay_rate_in_dtype)
    with mock.patch.object(factorized, "scale_by_factored_rms", patched):
        return optax.adafactor(
            lr,
            min_dim_size_to_factor=hp["min_dim_size_to_factor"],
            decay_rate=hp["decay_rate"],
            decay_offset=hp.get("decay_offset", 0),
            multiply_by_parameter_scale=hp.get("scale_parameter", True),
            clipping_threshold=hp["clip_threshold"],
            momentum=hp.get("b1"),
            dtype_momentum=hp.get("mu_dtype"),
            weight_decay_rate=hp["weight_decay"],
            eps=hp.get("eps", 1e-30),
            factored=hp.get("factored", True),
            weight_decay_mask=mask,
        )


OPTAX: dict[str, OptaxFactory] = {
    "optax.adafactor": _optax_adafactor,
    "optax.sgd": lambda lr, hp, mask: optax.sgd(lr, hp["momentum"] or None, nesterov=hp.get("nesterov", False)),
    "optax.adagrad": lambda lr, hp, mask: optax.adagrad(lr, hp["initial_accumulator_value"], hp["eps"]),
    "optax.rmsprop": lambda lr, hp, mask: optax.rmsprop(
        lr, hp["decay"], hp["eps"], centered=hp.get("centered", False), momentum=hp["momentum"] or None
    ),
    "optax.adadelta": lambda lr, hp, mask: optax.adadelta(
        lr, hp["rho"], hp["eps"], weight_decay=hp["weight_decay"], weight_decay_mask=mask
    ),
    "optax.adam": lambda lr, hp, mask: optax.adam(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.adamw": lambda lr, hp, mask: optax.adamw(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], mask=mask
    ),
    "optax.amsgrad": lambda lr, hp, mask: optax.amsgrad(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.scale_by_amsgrad(bias_correction_mu=False, bias_correction_nu=False)": _amsgrad_paper,
    "optax.adamax": lambda lr, hp, mask: optax.adamax(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.nadam": lambda lr, hp, mask: optax.nadam(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.nadamw": lambda lr, hp, mask: optax.nadamw(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], mask=mask
    ),
    "optax.radam": lambda lr, hp, mask: optax.radam(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.adabelief": lambda lr, hp, mask: optax.adabelief(lr, hp["b1"], hp["b2"], hp["eps"], hp["eps"]),
    "optax.yogi": lambda lr, hp, mask: optax.yogi(lr, hp["b1"], hp["b2"], hp["eps"]),
    "optax.adan": lambda lr, hp, mask: optax.adan(
        lr, hp["b1"], hp["b2"], hp["b3"], hp["eps"], hp["eps_root"], weight_decay=hp["weight_decay"], mask=mask
    ),
    "optax.lion": lambda lr, hp, mask: optax.lion(lr, hp["b1"], hp["b2"], weight_decay=hp["weight_decay"], mask=mask),
    "optax.lamb": lambda lr, hp, mask: optax.lamb(
        lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"], mask=mask
    ),
    "optax.contrib.dog": lambda lr, hp, mask: optax.contrib.dog(
        lr, ("heuristic", hp["reps_rel"]), hp["eps"], weight_decay=hp["weight_decay"] or None, mask=mask
    ),
    "optax.contrib.dowg": lambda lr, hp, mask: optax.contrib.dowg(
        lr, hp.get("init_estim_sq_dist"), hp["eps"], weight_decay=hp["weight_decay"] or None, mask=mask
    ),
    "optax.scale_by_sm3": _optax_sm3,
    "optax.contrib.schedule_free_sgd": _optax_schedule_free_sgd,
    "optax.contrib.schedule_free_adamw": _optax_schedule_free_adamw,
}


def is_known(name: str) -> bool:
    return name in TORCH or name in OPTAX
