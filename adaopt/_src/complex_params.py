r"""Complex parameters: the two conventions an adaptive optimizer can follow, and the view that gives the second.

For a real loss :math:`f` of a complex parameter :math:`z = x + iy`, the direction of steepest
ascent is :math:`\partial f / \partial x + i\, \partial f / \partial y`. That is the gradient
``torch`` computes; ``jax.grad`` returns its complex conjugate, so, as with optax, pass
``jax.tree.map(jnp.conj, grads)`` to an optimizer. Linear methods (SGD, momentum, the
averages) then need nothing more. Where an optimizer squares or takes the sign of the gradient
per coordinate, two conventions differ:

- ``"modulus"`` (optax's): a complex coordinate is one coordinate. Second moments accumulate
  :math:`|g|^2`, a sign is the phase :math:`g / |g|`, and the step commutes with a rotation
  :math:`z \to e^{i\phi} z` of the parameter.
- ``"real_imag"`` (``torch.optim``'s, through ``torch.view_as_real``): the real and imaginary
  parts are two real coordinates, each with its own second moment and sign.

:func:`as_real_imag` turns any optimizer into the second kind. adaopt's optimizers whose two
forms differ take a ``complex_convention`` argument; those built on norms and real inner products
of a step linear in the gradient, the same under both, take none. A core assembled without a
convention (``base.assemble``'s default) is given the real view, which is correct for any real
algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

CONVENTIONS = ("modulus", "real_imag")


def is_complex(x: Any) -> bool:
    """True for a complex array or dtype."""
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.complexfloating))


def _to_pairs(x: Any) -> Any:
    if x is None or not is_complex(x):
        return x
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)


def _from_pairs(pairs: Any, like: Any) -> Any:
    if pairs is None or not is_complex(like):
        return pairs
    return jax.lax.complex(pairs[..., 0], pairs[..., 1]).astype(jnp.result_type(like))


def is_real_view(leaf: Any, param: Any) -> bool:
    """Whether a state leaf is a complex parameter's real view (``s + (2,)``, real): the state of an optimizer with
    ``complex_convention="real_imag"``."""
    return is_complex(param) and not is_complex(leaf) and np.shape(leaf) == (*np.shape(param), 2)


def mirrors(leaf: Any, param: Any) -> bool:
    """Whether a state leaf has ``param``'s shape, or is its real view (:func:`is_real_view`)."""
    return np.shape(leaf) == np.shape(param) or is_real_view(leaf, param)


def to_pairs(tree: Any) -> Any:
    """``tree`` with each complex leaf as its real view: shape ``s + (2,)``, the real and imaginary parts."""
    return jax.tree.map(_to_pairs, tree)


def from_pairs(pairs: Any, like: Any) -> Any:
    """The inverse of :func:`to_pairs`: each leaf of ``pairs`` whose leaf in ``like`` is complex, made complex again."""
    return jax.tree.map(_from_pairs, pairs, like)


def _has_complex(tree: Any) -> bool:
    return any(is_complex(leaf) for leaf in jax.tree.leaves(tree))


def as_real_imag(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` with each complex parameter seen as a pair of real ones, as ``torch.optim`` does.

    A complex leaf of shape ``s`` reaches ``inner`` (its gradient, its parameter, its state) as
    a real leaf of shape ``s + (2,)`` holding the real and the imaginary part, exactly
    ``torch.view_as_real``; the update comes back complex. Real leaves pass through untouched,
    and a tree without complex leaves costs nothing.

    Args:
      inner: any gradient transformation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s on the real view.

    Example:
      >>> import jax.numpy as jnp, adaopt
      >>> z = jnp.array([1 + 1j, 2 - 1j], jnp.complex64)
      >>> tx = adaopt.as_real_imag(adaopt.scale_by_adam())
      >>> updates, state = tx.update(z, tx.init(z))  # the gradient of |z|^2 / 2, torch's way
      >>> updates.round(4)  # one sign per real and imaginary part
      Array([1.+1.j, 1.-1.j], dtype=complex64)
    """
    from adaopt._src import base  # imported here: base imports this module

    base.check_transformation("inner", inner)
    inner = base.with_extra_args(inner)

    def init_fn(params: Any) -> Any:
        return inner.init(to_pairs(params))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        if not _has_complex(updates):
            return inner.update(updates, state, params, **extra_args)
        real_params = None if params is None else to_pairs(params)
        new, state = inner.update(to_pairs(updates), state, real_params, **extra_args)
        return from_pairs(new, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_convention(
    tx: optax.GradientTransformationExtraArgs, complex_convention: str | None
) -> optax.GradientTransformationExtraArgs:
    """``tx`` for the chosen convention: as it is for ``"modulus"`` (its own complex math), viewed
    as real pairs for ``"real_imag"`` and for None (an optimizer with no complex math of its own)."""
    return tx if complex_convention == "modulus" else as_real_imag(tx)
