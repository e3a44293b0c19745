"""adaopt: adaptive-learning-rate optimizers for JAX, verified step for step against their references."""

# What users chain with, from optax (not re-written).
from optax import GradientTransformation as GradientTransformation
from optax import GradientTransformationExtraArgs as GradientTransformationExtraArgs
from optax import MultiSteps as MultiSteps
from optax import add_decayed_weights as add_decayed_weights
from optax import apply_if_finite as apply_if_finite
from optax import apply_updates as apply_updates
from optax import chain as chain
from optax import clip as clip
from optax import clip_by_global_norm as clip_by_global_norm
from optax import inject_hyperparams as inject_hyperparams
from optax import schedules as schedules
from optax.schedules import constant_schedule as constant_schedule
from optax.schedules import cosine_decay_schedule as cosine_decay_schedule
from optax.schedules import exponential_decay as exponential_decay
from optax.schedules import join_schedules as join_schedules
from optax.schedules import linear_schedule as linear_schedule
from optax.schedules import piecewise_constant_schedule as piecewise_constant_schedule
from optax.schedules import polynomial_schedule as polynomial_schedule
from optax.schedules import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from optax.schedules import warmup_exponential_decay_schedule as warmup_exponential_decay_schedule

from adaopt._src.adagrad import AdadeltaState as AdadeltaState
from adaopt._src.adagrad import AdagradState as AdagradState
from adaopt._src.adagrad import adadelta as adadelta
from adaopt._src.adagrad import adagrad as adagrad
from adaopt._src.adagrad import scale_by_adadelta as scale_by_adadelta
from adaopt._src.adagrad import scale_by_adagrad as scale_by_adagrad
from adaopt._src.adam import AdamaxState as AdamaxState
from adaopt._src.adam import AdamState as AdamState
from adaopt._src.adam import NadamState as NadamState
from adaopt._src.adam import adabelief as adabelief
from adaopt._src.adam import adam as adam
from adaopt._src.adam import adamax as adamax
from adaopt._src.adam import adamw as adamw
from adaopt._src.adam import amsgrad as amsgrad
from adaopt._src.adam import nadam as nadam
from adaopt._src.adam import nadamw as nadamw
from adaopt._src.adam import radam as radam
from adaopt._src.adam import scale_by_adam as scale_by_adam
from adaopt._src.adam import scale_by_adamax as scale_by_adamax
from adaopt._src.adam import scale_by_nadam as scale_by_nadam
from adaopt._src.adam import scale_by_radam as scale_by_radam
from adaopt._src.adam import yogi as yogi
from adaopt._src.base import HyperparameterError as HyperparameterError
from adaopt._src.base import TreeMismatchError as TreeMismatchError
from adaopt._src.lamb import lamb as lamb
from adaopt._src.lamb import scale_by_trust_ratio as scale_by_trust_ratio
from adaopt._src.lion import LionState as LionState
from adaopt._src.lion import lion as lion
from adaopt._src.lion import scale_by_lion as scale_by_lion
from adaopt._src.registry import REGISTRY as REGISTRY
from adaopt._src.registry import OptimizerSpec as OptimizerSpec
from adaopt._src.registry import Reference as Reference
from adaopt._src.rmsprop import RmsState as RmsState
from adaopt._src.rmsprop import rmsprop as rmsprop
from adaopt._src.rmsprop import scale_by_rms as scale_by_rms
from adaopt._src.sgd import MomentumState as MomentumState
from adaopt._src.sgd import scale_by_momentum as scale_by_momentum
from adaopt._src.sgd import sgd as sgd

__version__ = "0.1.0"
