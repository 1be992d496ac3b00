"""hubprune: drop the layers a causal LM does not need, heal it, and ship it."""

from hubprune._version import __version__
from hubprune.config import CalibrationConfig, PruneConfig, Recipe
from hubprune.methods.scan import ScanResult
from hubprune.pruner import LayerPruner, PrunedModel
from hubprune.record import PruneRecord

__all__ = [
    "CalibrationConfig",
    "LayerPruner",
    "PruneConfig",
    "PruneRecord",
    "PrunedModel",
    "Recipe",
    "ScanResult",
    "__version__",
]
