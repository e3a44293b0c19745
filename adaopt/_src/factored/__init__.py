"""Optimizers whose state is smaller than the parameters: factored, blocked or low-rank second moments."""
