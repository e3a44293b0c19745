"""Optimizers with no learning rate to tune: D-Adaptation, Prodigy, DoG, COCOB, Schedule-Free, Mechanic."""
