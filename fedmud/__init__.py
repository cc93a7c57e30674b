"""FedMUD: federated training of decomposed model updates (pure PyTorch + numpy; no Flower)."""

from .config import ConfigError, DecompositionConfig, RunConfig, parse_run_config
from .methods import METHODS, Method, plan_decomposition, register
from .methods.fedmud import DecomposedUpdate
from .methods.lora import LoRAAdapter
from .mud import DecomposedModel, decompose
from .plan import DecompositionPlan

__all__ = [
    "ConfigError",
    "DecomposedModel",
    "DecomposedUpdate",
    "DecompositionConfig",
    "DecompositionPlan",
    "LoRAAdapter",
    "METHODS",
    "Method",
    "RunConfig",
    "decompose",
    "parse_run_config",
    "plan_decomposition",
    "register",
]
