"""What practitioners use optimizers with: monitoring, the learning-rate range test, sweeps, early stopping.

Tools use optimizers; optimizers never import tools.
"""
