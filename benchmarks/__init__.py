"""adaopt's measurements: speed, memory and convergence against optax and torch, and the demo.

Run a script as a module from the repository's root, e.g. ``python -m benchmarks.speed``.
"""
