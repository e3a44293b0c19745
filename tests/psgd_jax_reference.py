"""Trajectories of the real ``psgd_jax.kron.kron`` (psgd-jax 0.2.9), for tests/test_psgd_kron.py.

Runs in its own environment (psgd-jax needs ``optax<=0.2.6``, chex and flax: the Makefile builds
``.venv/ref-psgd``), as ``python tests/psgd_jax_reference.py IN.npz OUT.npz``. For each case
``i``, ``IN.npz`` holds ``i/spec`` (a JSON string: ``kron``'s fixed arguments, the learning
rate's schedule if any, the dtype), ``i/drawn/NAME`` (one value per draw of each drawn argument),
``i/params/LEAF`` and ``i/grads/LEAF`` (every step's gradient, stacked). ``OUT.npz`` gets
``i/LEAF``: the parameters after every step, for every draw (draws x steps x shape).

Each case compiles once: ``kron`` is built inside a ``vmap`` over the draws, which it takes as
traced values (the learning rate, the update probability, the preconditioner's step size and
initial scale; ``b1`` and the weight decay, which it compares with 0 in Python, are fixed per
case), and the steps run in one ``lax.scan``. Nothing runs at import: pytest imports every
module of tests/ for its doctests, in an environment without psgd-jax.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _learning_rate(schedule: dict[str, Any] | None, value: Any, dtype: Any) -> Any:
    import jax.numpy as jnp
    import optax

    if schedule is None:
        return value
    assert schedule["kind"] == "warmup_cosine", schedule
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, schedule["warmup"], schedule["steps"], 0.1)
    # The drawn peak is traced (optax's schedule compares its peak with 0 in Python): it scales the schedule's
    # shape. optax evaluates a schedule in float32 at an int32 count: both sides evaluate it in the case's dtype.
    return lambda count: value * shape(jnp.asarray(count, dtype))


def _run(spec: dict[str, Any], drawn: dict[str, Any], params: dict[str, Any], grads: dict[str, Any]) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from psgd_jax.kron import kron, precond_update_prob_schedule

    dtype = np.dtype(spec["dtype"])
    fixed = dict(spec["arguments"])
    for name in ("mu_dtype", "precond_dtype"):
        if fixed.get(name) is not None:
            fixed[name] = jnp.dtype(fixed[name])
    if spec.get("probability_schedule") is not None:
        fixed["preconditioner_update_probability"] = precond_update_prob_schedule(**spec["probability_schedule"])

    def trajectory(draw: dict[str, Any], p: Any, gs: Any) -> Any:
        arguments = {**fixed, **draw}
        arguments["learning_rate"] = _learning_rate(spec.get("schedule"), draw["learning_rate"], dtype)
        tx = kron(**arguments)

        def step(carry: tuple[Any, Any], g: Any) -> tuple[tuple[Any, Any], Any]:
            p, s = carry
            updates, s = tx.update(g, s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        return jax.lax.scan(step, (p, tx.init(p)), gs)[1]

    run = jax.jit(jax.vmap(trajectory, in_axes=(0, None, None)))
    return {k: np.asarray(v) for k, v in run(drawn, params, grads).items()}


def main(source: str, target: str) -> None:
    import contextlib
    import io

    import jax
    import numpy as np

    data = np.load(source)
    n_cases = len({key.split("/")[0] for key in data.files})
    out = {}
    for i in range(n_cases):
        spec = json.loads(str(data[f"{i}/spec"]))

        def part(kind: str, i: int = i) -> dict[str, Any]:
            return {k.split("/")[2]: data[k] for k in data.files if k.startswith(f"{i}/{kind}/")}

        with jax.enable_x64(spec["dtype"] == "float64"), contextlib.redirect_stdout(io.StringIO()):
            # kron's init prints the sizes of its state: kept off the test's output.
            trajectory = _run(spec, part("drawn"), part("params"), part("grads"))
        for name, values in trajectory.items():
            out[f"{i}/{name}"] = values
    np.savez(target, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
