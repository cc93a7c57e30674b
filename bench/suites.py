"""Methods and suites: what each run is, as the ``-c`` overrides of one ``flwr run``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# name -> run-config overrides; every other key keeps its pyproject.toml default
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    "fedavg-fp16": {"method": "fedavg", "uplink": "float16"},
    "fedavg-int8": {"method": "fedavg", "uplink": "int8"},
    "topk-ef": {"method": "fedavg", "uplink": "topk", "error-feedback": True, "topk-ratio": "1/32"},
    "fedlmt": {"method": "fedlmt", "kind": "mat", "ratio": "1/32"},
    "mud-mat-ab": {"method": "fedmud", "kind": "mat", "pattern": "ab", "ratio": "1/32"},
    "mud-mat-aad": {"method": "fedmud", "kind": "mat", "pattern": "aad", "ratio": "1/32"},
    "fedmud": {"method": "fedmud", "kind": "kron", "pattern": "aad", "ratio": "1/32"},  # mud-kron-aad
    "fedmud-int8-ef": {
        "method": "fedmud",
        "kind": "kron",
        "pattern": "aad",
        "ratio": "1/32",
        "uplink": "int8",
        "error-feedback": True,
    },
}
BASELINE = "fedavg"  # the "vs FedAvg" column divides by this method's bytes to target


@dataclass(frozen=True)
class Suite:
    """The fixed parameters of a benchmark: every method runs with exactly these."""

    name: str
    methods: tuple[str, ...] = tuple(METHODS)
    dataset: str = "mnist5k"  # a built-in name or 'package.module:factory'
    model: str | None = None  # None: the pyproject.toml default ('auto'); a built-in name or 'package.module:factory'
    partition: str = "iid"
    alpha: float = 0.3
    supernodes: int = 10
    rounds: int = 8
    target: float = 0.95
    seed: int = 0
    data_seed: int = 42
    local_epochs: int | None = None  # None: the pyproject.toml default
    up_mbps: float = 5.0
    down_mbps: float = 20.0
    extra: dict[str, Any] = field(default_factory=dict)  # further run-config keys, same for every method

    def run_config(self, method: str) -> dict[str, Any]:
        """The ``-c`` keys of one method's run (without ``run-dir``)."""
        config = {
            **METHODS[method],
            "num-server-rounds": self.rounds,
            "dataset": self.dataset,
            "partition": self.partition,
            "alpha": self.alpha,
            "num-partitions": self.supernodes,
            "seed": self.seed,
            "data-seed": self.data_seed,
        }
        if self.model is not None:
            config["model"] = self.model
        if self.local_epochs is not None:
            config["local-epochs"] = self.local_epochs
        return {**config, **self.extra}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "methods": list(self.methods)}


SUITES: dict[str, Suite] = {
    # 9 methods x (~20 s start-up + 8 rounds x ~8-10 s) on 2 CPU cores: ~15 min; keep it under 30
    "default": Suite("default"),
    "dirichlet": Suite("dirichlet", partition="dirichlet", alpha=0.3),
    "smoke": Suite("smoke", methods=("fedavg", "fedmud"), supernodes=2, rounds=2, local_epochs=1),
}


def resolve(name: str, **overrides: Any) -> Suite:
    """Suite ``name`` with the fields in ``overrides`` (None = keep) replaced."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    known = {f.name for f in fields(Suite)}
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown suite field(s): {', '.join(sorted(unknown))}")
    suite = replace(SUITES[name], **changes)
    bad = [m for m in suite.methods if m not in METHODS]
    if bad or not suite.methods:
        raise ValueError(f"unknown method(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    if len(set(suite.methods)) != len(suite.methods):
        raise ValueError("a method is listed twice")
    return suite


def toml_value(value: Any) -> str:
    """One value as TOML, the way ``flwr run -c`` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" in text:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return f"'{text}'"  # literal string: no escapes, safe for Windows-free paths


def render_overrides(config: dict[str, Any]) -> str:
    """``key=value`` pairs for ``flwr run -c``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())
