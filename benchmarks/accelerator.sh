#!/usr/bin/env bash
# The accelerator measurements the open issues ask for, in one run of a few minutes on a GPU machine.
#
# Run from the repository's root, where a Python with JAX (built for the accelerator), optax, torch
# and scikit-learn is `python3` (or $PYTHON); adaopt is read from the checkout (PYTHONPATH), nothing
# is installed:
#
#     OUT=gpu-results bash benchmarks/accelerator.sh           # under 9 minutes
#     SMOKE=1 OUT=/tmp/smoke bash benchmarks/accelerator.sh    # the same steps, small and quick (on a CPU too)
#
# Each step has its own time limit and a failed step does not stop the others. What it writes, in $OUT
# (default: accelerator-results):
#
# - RESULTS-accelerator.md: the sections of the benchmarks (speed-accelerator, speed-accelerator-muon,
#   memory, monitor, convergence), each headed by its machine, to move into benchmarks/RESULTS.md beside
#   the CPU's (rename the markers of memory and monitor, which the CPU's sections use too);
# - log.txt: every step's output and exit status; environment.txt: the accelerator and the versions;
# - the convergence step's three plots (named as the CPU run's: rename them when moving them in).
#
# Six files in all: a device machine's tool brings back at most eight.
#
# The steps, the most wanted first: the Adam and AdamW step on the GPT-2 tree against optax and torch's
# fused Adam, with the measured memory bandwidth and the compile times (issue 14); AdamW's step with
# int8, int4, FP8 and bfloat16 moments and the compiled peaks (issue 11); Muon's step against AdamW's
# (issue 12); the cost of adaopt.monitor (issue 13); two convergence workloads, to show that the suite
# runs unchanged (issue 14). The limits add up to 8 minutes 15 seconds: give the run 9.

set -u
OUT=${OUT:-accelerator-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/RESULTS-accelerator.md"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ "${SMOKE:-0}" = 1 ]; then
    TREE=single REPS=2 LIMIT_SCALE=4 CONVERGENCE=(--steps-scale 0.02) MEMORY=(--no-timing)
else
    TREE=gpt2 REPS=20 LIMIT_SCALE=1 CONVERGENCE=(--quick) MEMORY=(--reps 5 --no-training)
fi

# step NAME LIMIT_SECONDS MODULE ARGS...: one benchmark, its output and status in the log.
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE)) module=$3
    shift 3
    echo "=== $name: python -m $module $* (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$PYTHON" -m "$module" "$@" 2>&1
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s$([ $status = 124 ] && echo ', stopped at its limit')"
}

{
    echo "=== environment"
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
        "$PYTHON" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "optax", "numpy", "torch", "sklearn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing package shows here, and in the steps that need it
        print(name, "missing:", error)
import jax, jax.numpy as jnp, optax, adaopt
print("devices", jax.devices())
params = {"w": jnp.ones((512, 512)), "b": jnp.zeros(512)}
for label, tx in [("adamw", adaopt.adamw(1e-3)), ("adamw int8", adaopt.adamw(1e-3, mu_dtype="int8", nu_dtype="int8")),
                  ("muon", adaopt.muon(1e-3))]:
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    print("smoke", label, "ok" if bool(jnp.isfinite(optax.global_norm(updates))) else "NOT FINITE")
EOF
    } | tee "$OUT/environment.txt"
    step speed 150 benchmarks.speed --trees "$TREE" --optimizers adam,adamw --reps "$REPS" \
        --layouts flat-params --section speed-accelerator --out "$RESULTS"
    step memory 120 benchmarks.memory "${MEMORY[@]}" --copy-elision off --out "$RESULTS"
    step muon 90 benchmarks.speed --trees "$TREE" --optimizers muon --reps "$REPS" --no-torch --layouts none \
        --section speed-accelerator-muon --out "$RESULTS"
    step monitor 75 benchmarks.monitor --tree "$TREE" --reps 5 --copy-elision off --out "$RESULTS"
    step convergence 60 benchmarks.convergence --workloads softmax,mlp --optimizers adamw,muon "${CONVERGENCE[@]}" \
        --no-progress --out "$RESULTS"
} 2>&1 | tee "$LOG"
