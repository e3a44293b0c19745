"""The diagonal optimizers, by what adapts the step: the Adam family, AdaGrad, RMSProp, SGD, Lion, LAMB."""
