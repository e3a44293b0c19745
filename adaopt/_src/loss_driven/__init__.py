"""Learning rates driven by the loss: hypergradient descent, bold driver, Polyak steps, reduce on plateau."""
