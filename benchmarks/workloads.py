"""The workloads of the convergence benchmark (``benchmarks/convergence.py``): data, model, loss, accuracy, target.

Five small real problems that run on a CPU in seconds each, and a larger language model, in float32:

- ``softmax``: softmax regression on scikit-learn's digits (64 pixels -> 10 classes), full batch.
- ``mlp``: a 64 -> 64 -> 10 tanh MLP on digits, minibatches of 128.
- ``conv``: a two-layer convolutional network on the 8x8 digit images, minibatches of 32.
- ``charlm``: a 2-layer pre-LN character-level transformer language model (width 64, 4 heads, MLP
  width 128, context 64, 4 windows a step) on the text of the Python Language Reference that
  ships with CPython (``pydoc_data.topics``, about 465 kB).
- ``quadratic``: an ill-conditioned (condition number 10^3.5) rotated quadratic in 100 dimensions
  with additive Gaussian gradient noise.
- ``gpt``: a GPT-style byte-level language model on the same text (4 pre-LN layers, width 128, 4
  heads, MLP width 512, context 128, 4 windows a step; 0.84 M parameters), for the matrix optimizers.
  It is not among ``DEFAULT_WORKLOADS``: trained by name (``--section language-model``).

Every workload is pure data plus pure functions. ``loss(params, data, batch)`` returns the scalar
whose gradient the optimizer gets at one step and the value it passes as ``value=`` (the same
minibatch loss, except on the quadratic, whose value is the noiseless loss). ``evaluate(params, data)``
gives the reported metric (the one the target and the tuning use) and an accuracy (NaN where it
does not apply). The data travel as arguments of the compiled training loop, never as constants
baked into it.

The reported metric of each workload:

- ``softmax``, ``mlp``, ``conv``: the training objective on the whole training split (mean
  cross-entropy plus the L2 penalty ``L2 * sum of squared weights``); the accuracy is on the
  held-out test split. The objective has a floor above zero (the penalty), so ratios of final
  losses mean something.
- ``charlm``: the loss in bits per character on a fixed set of held-out validation windows (the
  last 10% of the text, never trained on); the accuracy is the next-character accuracy there.
- ``quadratic``: the noiseless quadratic ``0.5 (x - x*)^T H (x - x*)``; no accuracy.

Targets are fixed constants (``TARGETS``), chosen once so that Adam with its tuned learning rate
and the default cosine schedule reaches them at about 50-70% of the step budget; they are never
computed from the run being reported. The one exception is ``softmax``, whose objective is strictly
convex: its target is 1% above its minimum, found by L-BFGS in float64 (scipy) when the workload is
built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

import adaopt

Params = Any
Data = dict[str, Any]
Batch = Any

L2 = 1e-3  # weight of the L2 penalty (weights only, not biases) in the digits objectives
SEED = 0

# Targets of the reported metric (see the module docstring). ``softmax``'s is relative to its optimum.
SOFTMAX_TARGET_GAP = 0.01
# Calibrated once on Adam at its tuned learning rate (the cosine schedule and the budgets below):
# it first reaches them at 58% (mlp), 64% (conv), 60% (charlm) and 60% (quadratic) of the budget.
# Fixed here: a later run never moves them.
TARGETS = {
    "mlp": 0.093,
    "conv": 0.16,
    "charlm": 3.72,  # bits per character
    "quadratic": 0.048,
    # Tuned AdamW's final loss there (learning rate 1e-3 of its grid, 600 steps, cosine decay), so that
    # steps to target are the steps each optimizer needs to reach what AdamW reaches in the budget.
    "gpt": 3.225,
}
STEPS = {"softmax": 1000, "mlp": 1500, "conv": 1000, "charlm": 300, "quadratic": 1500, "gpt": 600}
# Evaluations per run: fewer where an evaluation costs many training steps.
EVALS = {"softmax": 50, "mlp": 50, "conv": 25, "charlm": 15, "quadratic": 50, "gpt": 20}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One problem: its data, its initial parameters, its losses, its step budget and its target.

    ``batches(steps, full_batch)`` returns the per-step batches, a pytree of arrays with a leading
    axis of length ``steps``, the same sequence for every optimizer (fixed seeds). With
    ``full_batch=True`` every step sees the whole training set (for methods that compare the loss
    between steps); ``has_full_batch`` says whether the workload offers that.
    """

    name: str
    summary: str
    metric: str  # what ``evaluate``'s loss is, for the report
    steps: int  # the step budget at --steps-scale 1
    target: float  # of ``evaluate``'s loss
    init: Callable[[], Params]  # fresh float32 initial parameters (host arrays), the same every call
    data: Data
    loss: Callable[[Params, Data, Batch], tuple[jax.Array, jax.Array]]
    evaluate: Callable[[Params, Data], tuple[jax.Array, jax.Array]]
    batches: Callable[[int, bool], Batch]
    has_full_batch: bool = True
    has_accuracy: bool = True

    @property
    def evals(self) -> int:
        """Evaluations per run, by default (``EVALS``)."""
        return EVALS.get(self.name, 50)


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def update_extras(spec: adaopt.OptimizerSpec, loss_of_params: Callable[[Params], jax.Array], key: jax.Array) -> dict:
    """``update``'s arguments beside ``value=`` that ``spec`` needs to be itself: for one that takes a Hessian estimate
    (``Capability.NEEDS_HESSIAN``: Sophia, which without one steps by the sign of its momentum), ``hessian=``
    Hutchinson's estimate of the diagonal of ``loss_of_params``'s Hessian (Sophia-H's) from ``key``, a function of the
    parameters that the optimizer calls every ``update_interval`` steps; for the others, none."""
    if adaopt.Capability.NEEDS_HESSIAN not in spec.capabilities:
        return {}
    return {"hessian": lambda p: adaopt.hutchinson_hessian_diagonal(loss_of_params, p, key)}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def minibatch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of shape ``(steps, batch_size)``: one fixed-seed permutation per epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps].astype(np.int32)


def _step_numbers(steps: int) -> np.ndarray:
    """A per-step placeholder batch for full-batch steps (the loss ignores it)."""
    return np.arange(steps, dtype=np.int32)


def _l2(params: Params) -> jax.Array:
    """``L2 *`` the sum of squares of the leaves named ``w*`` (weights), summed in float32."""
    leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _is_weight(path)]
    return L2 * sum((jnp.sum(jnp.square(w)) for w in leaves), jnp.zeros([], jnp.float32))


def _is_weight(path: tuple[Any, ...]) -> bool:
    key = path[-1]
    name = getattr(key, "key", getattr(key, "name", ""))
    return isinstance(name, str) and name.startswith("w")


@functools.cache
def digits() -> dict[str, np.ndarray]:
    """scikit-learn's digits, split 80/20 (stratified, ``random_state=0``), standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0  # pixels that are always blank
    return {
        "x_train": ((x_tr - mean) / std).astype(np.float32),
        "y_train": y_tr.astype(np.int32),
        "x_test": ((x_te - mean) / std).astype(np.float32),
        "y_test": y_te.astype(np.int32),
    }


def _classifier(
    name: str,
    summary: str,
    forward: Callable[[Params, jax.Array], jax.Array],
    init: Callable[[], Params],
    batch_size: int | None,
    target: float,
) -> Workload:
    """A digits classifier: objective = mean cross-entropy + L2 penalty; accuracy on the test split."""
    data = digits()
    n_train = data["x_train"].shape[0]

    def objective(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = forward(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + _l2(params)

    def loss(params: Params, data: Data, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if batch.ndim == 0:  # a step number: the whole training set
            value = objective(params, data["x_train"], data["y_train"])
        else:
            value = objective(params, data["x_train"][batch], data["y_train"][batch])
        return value, value

    def evaluate(params: Params, data: Data) -> tuple[jax.Array, jax.Array]:
        train = objective(params, data["x_train"], data["y_train"])
        accuracy = jnp.mean(jnp.argmax(forward(params, data["x_test"]), -1) == data["y_test"])
        return train, accuracy.astype(jnp.float32)

    def batches(steps: int, full_batch: bool) -> Batch:
        if batch_size is None or full_batch:
            return _step_numbers(steps)
        return minibatch_indices(n_train, steps, batch_size, SEED)

    return Workload(
        name, summary, "training objective (cross-entropy + L2, nats)", STEPS[name], target, init,
        dict(data), loss, evaluate, batches,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Softmax regression: convex, its optimum known.


def _softmax_forward(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["w"] + params["b"]


@functools.cache
def softmax_optimum() -> float:
    """The minimum of the (strictly convex) softmax-regression objective, by L-BFGS in float64."""
    data = digits()
    x, y = data["x_train"].astype(np.float64), data["y_train"]
    onehot = np.eye(10)[y]
    d = x.shape[1]

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = flat[: d * 10].reshape(d, 10), flat[d * 10 :]
        logits = x @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        value = -np.mean(np.log(p[np.arange(len(y)), y])) + L2 * np.sum(w**2)
        dlogits = (p - onehot) / len(y)
        return value, np.concatenate([(x.T @ dlogits + 2 * L2 * w).ravel(), dlogits.sum(0)])

    result = scipy.optimize.minimize(
        objective, np.zeros(d * 10 + 10), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 10_000}
    )
    return float(result.fun)


def softmax_regression() -> Workload:
    return _classifier(
        "softmax",
        "softmax regression on digits (64 -> 10), full batch, L2 1e-3",
        _softmax_forward,
        lambda: {"w": _zeros(64, 10), "b": _zeros(10)},
        None,
        (1 + SOFTMAX_TARGET_GAP) * softmax_optimum(),
    )


# ---------------------------------------------------------------------------------------------
# MLP.


def _mlp_forward(params: Params, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w0"] + params["b0"])
    return h @ params["w1"] + params["b1"]


def _mlp_init(hidden: int = 64) -> Params:
    rng = np.random.default_rng(SEED)
    return {
        "w0": _normal(rng, (64, hidden), 1 / math.sqrt(64)),
        "b0": _zeros(hidden),
        "w1": _normal(rng, (hidden, 10), 1 / math.sqrt(hidden)),
        "b1": _zeros(10),
    }


def mlp() -> Workload:
    return _classifier(
        "mlp", "64 -> 64 -> 10 tanh MLP on digits, minibatches of 128, L2 1e-3", _mlp_forward, _mlp_init, 128,
        TARGETS["mlp"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A small convolutional network.


def _conv(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """A 3x3 convolution with "SAME" padding, stride 1, then ReLU; NHWC images, HWIO kernels.

    Written as one matrix product over the 9 shifted copies of the image (im2col): on a CPU this is
    several times faster than XLA's convolution for so few channels, and it computes the same sum.
    """
    _, h, wd, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)], -1)
    return jax.nn.relu(patches @ w.reshape(9 * c, -1) + b)


def _pool(x: jax.Array) -> jax.Array:
    """2x2 average pooling."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _conv_forward(params: Params, x: jax.Array) -> jax.Array:
    x = x.reshape(-1, 8, 8, 1)
    x = _pool(_conv(x, params["w_conv1"], params["b_conv1"]))  # 4x4x8
    x = _pool(_conv(x, params["w_conv2"], params["b_conv2"]))  # 2x2x16
    return x.reshape(x.shape[0], -1) @ params["w_out"] + params["b_out"]


def _conv_init() -> Params:
    rng = np.random.default_rng(SEED)
    return {
        "w_conv1": _normal(rng, (3, 3, 1, 8), math.sqrt(2 / 9)),
        "b_conv1": _zeros(8),
        "w_conv2": _normal(rng, (3, 3, 8, 16), math.sqrt(2 / 72)),
        "b_conv2": _zeros(16),
        "w_out": _normal(rng, (64, 10), 1 / math.sqrt(64)),
        "b_out": _zeros(10),
    }


def convnet() -> Workload:
    return _classifier(
        "conv",
        "conv 3x3x8, pool, conv 3x3x16, pool, dense on 8x8 digits (ReLU), minibatches of 32, L2 1e-3",
        _conv_forward,
        _conv_init,
        32,
        TARGETS["conv"],
    )


# ---------------------------------------------------------------------------------------------
# A character-level transformer language model.


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The shape of a pre-LN transformer language model over bytes (characters)."""

    width: int
    layers: int
    heads: int
    context: int
    batch: int  # windows per training step
    mlp: int = 4  # hidden width of the MLP blocks, in multiples of the width
    vocab: int = 128  # ASCII; other characters become "?"
    validation_windows: int = 32

    def describe(self) -> str:
        return (
            f"{self.layers} layers, width {self.width}, {self.heads} heads, MLP width {self.mlp * self.width}, "
            f"context {self.context}, batch {self.batch}"
        )


CHAR_LM = LMConfig(width=64, layers=2, heads=4, context=64, batch=4, mlp=2)
GPT = LMConfig(width=128, layers=4, heads=4, context=128, batch=4)


@functools.cache
def corpus() -> bytes:
    """The text of the Python Language Reference's topics, shipped with CPython as ``pydoc_data.topics``.

    English technical prose with code examples, installed with every CPython: no download. The
    topics are joined in the order of their sorted names and kept as ASCII ("?" for anything
    else): about 465 kB in CPython 3.11.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text.encode("ascii", errors="replace")


def _layer_norm(x: jax.Array, p: Params) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _lm_forward(config: LMConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Logits of shape ``(batch, time, vocab)`` for each next character."""
    b, t = tokens.shape
    heads, width = config.heads, config.width
    x = params["embed"][tokens] + params["pos"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(config.layers):
        p = params[f"block{i}"]
        h = _layer_norm(x, p["ln1"])
        q, k, v = jnp.split(h @ p["w_qkv"], 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, width // heads) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
        scores = jnp.where(mask, scores, -1e9)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, width)
        x = x + attended @ p["w_proj"]
        h = _layer_norm(x, p["ln2"])
        x = x + jax.nn.gelu(h @ p["w_fc"] + p["b_fc"]) @ p["w_out"] + p["b_out"]
    return _layer_norm(x, params["ln_f"]) @ params["w_head"]


def _lm_init(config: LMConfig) -> Params:
    """GPT-2's initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2 layers)."""
    rng = np.random.default_rng(SEED)
    w, hidden, std = config.width, config.mlp * config.width, 0.02
    resid = std / math.sqrt(2 * config.layers)

    def ln() -> Params:
        return {"scale": np.ones(w, np.float32), "bias": _zeros(w)}

    params: Params = {"embed": _normal(rng, (config.vocab, w), std), "pos": _normal(rng, (config.context, w), std)}
    for i in range(config.layers):
        params[f"block{i}"] = {
            "ln1": ln(),
            "w_qkv": _normal(rng, (w, 3 * w), std),
            "w_proj": _normal(rng, (w, w), resid),
            "ln2": ln(),
            "w_fc": _normal(rng, (w, hidden), std),
            "b_fc": _zeros(hidden),
            "w_out": _normal(rng, (hidden, w), resid),
            "b_out": _zeros(w),
        }
    params["ln_f"] = ln()
    params["w_head"] = _normal(rng, (w, config.vocab), std)
    return params


def _language_model(name: str, config: LMConfig) -> Workload:
    """A transformer language model of the given shape on the corpus, the last 10% held out."""
    text = np.frombuffer(corpus(), np.uint8)
    split = int(0.9 * len(text))
    train, valid = text[:split], text[split:]
    span = np.arange(config.context + 1)
    # Evenly spaced, fixed validation windows: the same held-out characters for every evaluation.
    valid_starts = np.linspace(0, len(valid) - config.context - 2, config.validation_windows).astype(np.int32)
    data = {"train": train, "valid_windows": valid[valid_starts[:, None] + span]}

    def nats(params: Params, windows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean next-character cross-entropy (nats) and accuracy over the windows."""
        logits = _lm_forward(config, params, windows[:, :-1])
        targets = windows[:, 1:]
        value = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return value, jnp.mean(jnp.argmax(logits, -1) == targets).astype(jnp.float32)

    def loss(params: Params, data: Data, starts: jax.Array) -> tuple[jax.Array, jax.Array]:
        windows = data["train"][starts[:, None] + jnp.arange(config.context + 1)].astype(jnp.int32)
        value = nats(params, windows)[0]
        return value, value

    def evaluate(params: Params, data: Data) -> tuple[jax.Array, jax.Array]:
        value, accuracy = nats(params, data["valid_windows"].astype(jnp.int32))
        return value / math.log(2), accuracy

    def batches(steps: int, full_batch: bool) -> Batch:
        if full_batch:
            raise ValueError(f"{name} has no full batch: it samples windows of a 0.4 MB text")
        rng = np.random.default_rng(SEED)
        return rng.integers(0, len(train) - config.context - 1, (steps, config.batch)).astype(np.int32)

    return Workload(
        name,
        f"byte-level transformer LM ({config.describe()}) on the Python Language Reference text shipped with "
        f"CPython (pydoc_data.topics, {len(text) / 1e3:.0f} kB; last 10% held out)",
        "validation loss (bits per character)",
        STEPS[name],
        TARGETS[name],
        functools.partial(_lm_init, config),
        data,
        loss,
        evaluate,
        batches,
        has_full_batch=False,
    )


def char_lm() -> Workload:
    return _language_model("charlm", CHAR_LM)


def gpt() -> Workload:
    """The GPT-style language model the matrix optimizers (Muon, Shampoo, SOAP) are compared on."""
    return _language_model("gpt", GPT)


# ---------------------------------------------------------------------------------------------
# A noisy ill-conditioned quadratic.

QUADRATIC_DIM = 100
QUADRATIC_CONDITION = 10**3.5
QUADRATIC_NOISE = 0.1  # standard deviation of the additive gradient noise, per coordinate


def noisy_quadratic() -> Workload:
    rng = np.random.default_rng(SEED)
    d = QUADRATIC_DIM
    eigenvalues = np.logspace(0, -math.log10(QUADRATIC_CONDITION), d)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    hessian = (rotation * eigenvalues) @ rotation.T
    optimum = rng.standard_normal(d)
    data = {"hessian": hessian.astype(np.float32), "optimum": optimum.astype(np.float32)}

    def value(params: Params, data: Data) -> jax.Array:
        delta = params["x"] - data["optimum"]
        return 0.5 * delta @ (data["hessian"] @ delta)

    def loss(params: Params, data: Data, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The gradient is H (x - x*) + noise; the value passed to the optimizer is the noiseless
        # quadratic, the same objective every step.
        exact = value(params, data)
        return exact + params["x"] @ noise, exact

    def evaluate(params: Params, data: Data) -> tuple[jax.Array, jax.Array]:
        return value(params, data), jnp.float32(jnp.nan)

    def batches(steps: int, full_batch: bool) -> Batch:
        noise_rng = np.random.default_rng(SEED + 1)
        return (noise_rng.standard_normal((steps, d)) * QUADRATIC_NOISE).astype(np.float32)

    return Workload(
        "quadratic",
        f"rotated quadratic, dimension {d}, Hessian eigenvalues log-spaced in [10^-3.5, 1] (condition number "
        f"{QUADRATIC_CONDITION:.0f}), additive N(0, {QUADRATIC_NOISE}^2) gradient noise, from x = 0",
        "noiseless quadratic 0.5 (x - x*)^T H (x - x*)",
        STEPS["quadratic"],
        TARGETS["quadratic"],
        lambda: {"x": _zeros(d)},
        data,
        loss,
        evaluate,
        batches,
        has_accuracy=False,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "softmax": softmax_regression,
    "mlp": mlp,
    "conv": convnet,
    "charlm": char_lm,
    "quadratic": noisy_quadratic,
    "gpt": gpt,
}
# The workloads a plain run of the convergence benchmark trains on; the GPT-style model takes
# minutes per optimizer on a CPU, so it is run by name (``--workloads gpt``).
DEFAULT_WORKLOADS = ("softmax", "mlp", "conv", "charlm", "quadratic")
