"""The dense linear algebra of the matrix methods (eigh, QR, SVD, triangular solves), one matrix at a time on the CPU.

jaxlib's CPU kernels for these (LAPACK, through XLA's FFI) split a batch of matrices across XLA's
intra-op thread pool and wait, on the thread that runs the kernel, for the parts to finish. When
as many of these kernels run at once as the pool has threads (XLA:CPU runs independent kernels
concurrently: on a 2-core machine two are enough), every thread waits on parts that no thread is
left to run, and the program hangs for good (jaxlib 0.10.2; seen with PSGD Kron's triangular
solves and SOAP's QR decompositions under ``vmap``, over a learning-rate grid or
:func:`adaopt.Sweep`'s lanes). So on the CPU, :func:`one_at_a_time` computes a batch of matrices,
whether from leading axes or from a ``vmap``, one matrix after another (``lax.map``), each kernel
called on one matrix (nothing to split, nothing to wait for); on other platforms the batched
kernels run as they are. The numbers are the same either way: each matrix goes through the same
kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adaopt._src import placement


def one_at_a_time(fn: Callable[..., Any], cores: Sequence[int]) -> Callable[..., Any]:
    """``fn`` (one problem's LAPACK call) computed for every problem of a batch in turn on the CPU.

    ``cores[i]``: how many trailing axes of argument ``i`` make one problem (2 for a matrix). The
    leading axes are the batch: the same for every argument that has them; an argument without
    them is shared by every problem. Under ``vmap`` the mapped axis joins the batch (a custom
    batching rule), and reverse-mode derivatives are those of ``fn`` (a custom VJP: ``vmap`` and
    reverse mode cannot both be customised otherwise).
    """
    cores = tuple(cores)

    def serial(*args: Any) -> Any:
        # Whole on every device: lax.map takes its leading axis whole, and the batched kernels the same placement of
        # every argument's batch, where a population split across a mesh meets a shared argument broadcast to it.
        args = tuple(placement.whole(a) for a in args)
        leads = [a.shape[: a.ndim - c] for a, c in zip(args, cores, strict=True)]
        batch = max(leads, key=len)
        if not batch:
            return fn(*args)
        if any(lead and lead != batch for lead in leads):
            raise ValueError(f"Batch axes differ between the arguments: {leads}.")
        n = math.prod(batch)

        def on_cpu(*args: Any) -> Any:
            mapped = [j for j, lead in enumerate(leads) if lead]

            def one(parts: Sequence[jax.Array]) -> Any:
                whole = list(args)
                for j, part in zip(mapped, parts, strict=True):
                    whole[j] = part
                return fn(*whole)

            outs = jax.lax.map(one, [args[j].reshape(n, *args[j].shape[len(batch) :]) for j in mapped])
            return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), outs)

        def batched(*args: Any) -> Any:  # the kernels take the same batch axes on every argument
            return fn(
                *(a if lead else jnp.broadcast_to(a, (*batch, *a.shape)) for a, lead in zip(args, leads, strict=True))
            )

        return jax.lax.platform_dependent(*args, cpu=on_cpu, default=batched)

    @jax.custom_batching.custom_vmap
    def mappable(*args: Any) -> Any:
        return serial(*args)

    @mappable.def_vmap
    def _rule(axis_size: int, in_batched: Sequence[bool], *args: Any) -> tuple[Any, Any]:
        # Every argument takes the mapped axis in front (a shared one broadcast to it), so that it joins the batch.
        args = tuple(
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched, strict=True)
        )
        out = mappable(*args)
        return out, jax.tree.map(lambda _: True, out)

    @jax.custom_vjp
    def call(*args: Any) -> Any:
        return mappable(*args)

    def _fwd(*args: Any) -> tuple[Any, Any]:
        return mappable(*args), args

    def _bwd(args: Any, cotangent: Any) -> Any:
        return jax.vjp(serial, *args)[1](cotangent)

    call.defvjp(_fwd, _bwd)
    return functools.wraps(fn)(call)


eigh = one_at_a_time(functools.partial(jnp.linalg.eigh, symmetrize_input=False), (2,))
"""``jnp.linalg.eigh(x, symmetrize_input=False)`` (its lower triangle read), one matrix at a time on the CPU."""

qr = one_at_a_time(jnp.linalg.qr, (2,))
"""``jnp.linalg.qr(x)`` (reduced), one matrix at a time on the CPU."""

svd = one_at_a_time(functools.partial(jnp.linalg.svd, full_matrices=False), (2,))
"""``jnp.linalg.svd(x, full_matrices=False)``, one matrix at a time on the CPU."""

solve_upper_right = one_at_a_time(
    functools.partial(jax.lax.linalg.triangular_solve, left_side=False, lower=False), (2, 2)
)
"""``b @ inv(a)`` for an upper-triangular ``a`` (``solve_upper_right(a, b)``), one system at a time on the CPU."""
