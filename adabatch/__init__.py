"""adabatch: adaptive batch-size scheduling for PyTorch from the gradient noise scale."""

from adabatch.config import ConfigError, ControllerConfig
from adabatch.controller import AdaptiveBatchController, NonFiniteLossError
from adabatch.noise import NoiseScaleEstimator
from adabatch.telemetry import StepRecord

__all__ = [
    "AdaptiveBatchController",
    "ConfigError",
    "ControllerConfig",
    "NoiseScaleEstimator",
    "NonFiniteLossError",
    "StepRecord",
]
__version__ = "0.1.0"
