"""bnjax: Batch Normalization (Ioffe & Szegedy, 2015) as a pure JAX function.

The core is ``init`` and ``batch_norm``: parameters and running statistics are
explicit ``NamedTuple`` pytrees, threaded in and out of every call. ``bnjax.linen``
and ``bnjax.nnx`` are drop-in replacements for Flax's ``BatchNorm`` modules,
``bnjax.equinox`` for Equinox's and ``bnjax.haiku`` for Haiku's, thin shells over
the same core; they import their framework, so they load on first use
(``bnjax.linen.BatchNorm`` after ``import bnjax`` works, and the core alone never
imports Flax, Equinox or Haiku).
"""

import importlib as _importlib

# Weights and statistics from PyTorch, Keras and Haiku, and back (a namespace: bnjax.convert.*).
from bnjax import convert as convert
from bnjax.accumulation import PendingUpdate as PendingUpdate
from bnjax.accumulation import accumulate_batch_norm as accumulate_batch_norm
from bnjax.accumulation import apply_pending as apply_pending
from bnjax.accumulation import init_pending as init_pending
from bnjax.accumulation import merge_moments as merge_moments
from bnjax.batch_norm import BatchNormParams as BatchNormParams
from bnjax.batch_norm import BatchNormState as BatchNormState
from bnjax.batch_norm import batch_norm as batch_norm
from bnjax.batch_norm import init as init
from bnjax.describe import LayerStatistics as LayerStatistics
from bnjax.describe import StatisticsReport as StatisticsReport
from bnjax.describe import StatisticsScopeWarning as StatisticsScopeWarning
from bnjax.describe import describe as describe
from bnjax.fold import fold as fold
from bnjax.freeze import freeze_statistics as freeze_statistics
from bnjax.moving_average import MovingAverageWeights as MovingAverageWeights
from bnjax.moving_average import cumulative_momentum as cumulative_momentum
from bnjax.moving_average import debiased_momentum as debiased_momentum
from bnjax.moving_average import update_moving_average as update_moving_average
from bnjax.population import PopulationStatistics as PopulationStatistics
from bnjax.population import init_population as init_population
from bnjax.population import population_state as population_state
from bnjax.population import update_population as update_population
from bnjax.renorm import batch_renorm as batch_renorm
from bnjax.stats import Moments as Moments
from bnjax.stats import batch_moments as batch_moments
from bnjax.sync import sync_state as sync_state

__version__ = "0.1.0"

# The drop-ins (Flax, Equinox, Haiku), imported on first access.
_LAZY_SUBMODULES = ("linen", "nnx", "equinox", "haiku")


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f"bnjax.{name}")  # also sets the attribute
  raise AttributeError(f"module 'bnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_LAZY_SUBMODULES])
