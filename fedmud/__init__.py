"""FedMUD: federated training of decomposed model updates (pure PyTorch + numpy; no Flower)."""

from .config import ConfigError, DecompositionConfig, RunConfig, parse_run_config
from .mud import DecomposedModel, DecomposedUpdate, LoRAAdapter, decompose
from .plan import DecompositionPlan, plan_decomposition

__all__ = [
    "ConfigError",
    "DecomposedModel",
    "DecomposedUpdate",
    "DecompositionConfig",
    "DecompositionPlan",
    "LoRAAdapter",
    "RunConfig",
    "decompose",
    "parse_run_config",
    "plan_decomposition",
]
