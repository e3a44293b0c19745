"""SGD beyond its torch comparison (tests/test_parity.py): torch's momentum of 0, with dampening."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adaopt


@pytest.mark.parametrize("momentum", ["python", "array"])
def test_a_momentum_of_zero_ignores_the_dampening_as_torch_does(momentum: str) -> None:
    """torch's SGD with momentum 0 is plain SGD whatever its dampening (its buffer is unused); so is adaopt's, with a
    Python 0 or an array 0 (a sweep's traced value), where a buffer damped by 1 - 0.5 halved every step after the
    first. 30 steps against torch in float64, with coupled weight decay."""
    rng = np.random.default_rng(0)
    p0, grads = rng.standard_normal((4, 3)), rng.standard_normal((30, 4, 3))
    param = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([param], 0.1, momentum=0.0, dampening=0.5, weight_decay=0.01)
    theirs = []
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step()
        theirs.append(param.detach().numpy().copy())
    with jax.enable_x64(True):
        mu: Any = 0.0 if momentum == "python" else jnp.zeros([], jnp.float64)
        tx = adaopt.sgd(0.1, mu, 0.5, 0.01)
        params = jnp.asarray(p0)
        state = tx.init(params)
        ours = []
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, params)
            params = params + updates
            ours.append(np.asarray(params))
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), rtol=1e-13, atol=1e-15)
