"""Methods and suites: what each run is, as the ``-c`` overrides of one ``flwr run``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fedmud.config import RunConfig
from fedmud.seeds import sample_size

# name -> run-config overrides; every other key keeps its pyproject.toml default. The dense baselines
# pin their codecs (float32 downlink: they send the full model), and the MUD methods their float32
# upload (the default until issue 27), so a change of a default moves no committed table. `fedmud` is
# the paper's configuration; `fedmud-int4-sr` is what `method=fedmud` runs by default now.
DENSE_DOWNLINK = {"downlink-codec": "float32"}
FLOAT32_UP = {"uplink": "float32"}
FEDMUD = {"method": "fedmud", "kind": "kron", "pattern": "aad", "ratio": "1/32", **FLOAT32_UP}  # mud-kron-aad
# the levers of issue 27, composed into the methods below
INT8_SR = {"uplink": "int8", "stochastic-rounding": True}  # unbiased rounding, no error feedback
INT4_SR = {"uplink": "int4", "stochastic-rounding": True}
LINK_INT2 = {"downlink-codec": "int2"}  # 2-bit chain links (the server keeps their error)
RANK_16 = {"ratio": "1/16"}  # twice the trained values of the 1/32 default
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg", **DENSE_DOWNLINK, "uplink": "float32"},
    "fedavg-fp16": {"method": "fedavg", **DENSE_DOWNLINK, "uplink": "float16"},
    "fedavg-int8": {"method": "fedavg", **DENSE_DOWNLINK, "uplink": "int8", "stochastic-rounding": False},
    "topk-ef": {
        "method": "fedavg", **DENSE_DOWNLINK, "uplink": "topk", "error-feedback": True, "topk-ratio": "1/32"
    },
    # EF-signSGD (Karimireddy et al. 2019): 1 bit per value of the dense update, with error feedback
    "ef-signsgd": {"method": "fedavg", **DENSE_DOWNLINK, "uplink": "sign", "error-feedback": True},
    # the same with the chain downlink FedMUD uses (int4 links): the fairest 1-bit rival both ways
    "ef-signsgd-int4": {"method": "fedavg", "uplink": "sign", "error-feedback": True, "downlink-codec": "int4"},
    "fedlmt": {"method": "fedlmt", "kind": "mat", "ratio": "1/32"},
    "fedpara": {"method": "fedpara", "ratio": "1/32"},  # FedPara: low-rank Hadamard-product weights
    "mud-mat-ab": {"method": "fedmud", "kind": "mat", "pattern": "ab", "ratio": "1/32", **FLOAT32_UP},
    "mud-mat-aad": {"method": "fedmud", "kind": "mat", "pattern": "aad", "ratio": "1/32", **FLOAT32_UP},
    "fedmud": dict(FEDMUD),
    "fedmud-link-float32": {**FEDMUD, "downlink-codec": "float32"},  # the exact float32 chain
    "fedmud-link-int8": {**FEDMUD, "downlink-codec": "int8"},
    "fedmud-link-int4": {**FEDMUD, "downlink-codec": "int4"},
    "fedmud-int8-ef": {**FEDMUD, "uplink": "int8", "error-feedback": True},
    "fedmud-int4-ef": {**FEDMUD, "uplink": "int4", "error-feedback": True},
    "fedmud-sign-ef": {**FEDMUD, "uplink": "sign", "error-feedback": True},
    # unbiased rounding without error feedback: a client's memory is ~10 rounds stale at 10% participation
    "fedmud-int8-sr": {**FEDMUD, **INT8_SR},
    "fedmud-int4-sr": {**FEDMUD, **INT4_SR},
    "fedmud-link-int2": {**FEDMUD, **LINK_INT2},
    "fedmud-int4-sr-link-int2": {**FEDMUD, **INT4_SR, **LINK_INT2},
    # rank <-> bits: twice the trained values at int8, half the upload bytes
    "fedmud-r16-int8-sr": {**FEDMUD, **RANK_16, **INT8_SR},
    "fedmud-r16-int4-sr-link-int2": {**FEDMUD, **RANK_16, **INT4_SR, **LINK_INT2},
    # fine-tuning adapters (pair with init-weights=... classes=...; docs/finetune.md)
    "lora": {"method": "lora", "init": "zero", "lora-rank": 8, "lora-alpha": 16.0},
    "lora-nonzero": {"method": "lora", "init": "nonzero", "lora-rank": 8, "lora-alpha": 16.0},
    "lora-hrp": {"method": "lora", "init": "hrp", "lora-rank": 8, "lora-alpha": 16.0, "hrp-rank": 32},
    "ffa-lora": {"method": "ffa-lora", "init": "zero", "lora-rank": 8, "lora-alpha": 16.0},
}
BASELINE = "fedavg"  # the "vs FedAvg" column divides by this method's bytes to target


# the methods of the first benchmark (docs/benchmarks.md), the suites `default` and `dirichlet`
FIRST_NINE = (
    "fedavg", "fedavg-fp16", "fedavg-int8", "topk-ef", "fedlmt", "mud-mat-ab", "mud-mat-aad", "fedmud", "fedmud-int8-ef"
)
RIVALS = ("fedavg", "ef-signsgd", "fedpara", "fedmud", "fedmud-int4-ef", "fedmud-sign-ef")


@dataclass(frozen=True)
class Suite:
    """The fixed parameters of a benchmark: every method runs with exactly these, once per seed.

    seeds: the run's ``seed`` (initialisation, frozen factors, client sampling, batch order),
        one run per method and seed; ``data_seed`` stays fixed, so every run of every method
        trains and is tested on the same split and partition, and the spread over seeds is that
        of training, not of the data.
    fraction_train, min_train_nodes: clients per round, ``max(int(supernodes * fraction_train),
        min_train_nodes)``; None keeps the pyproject.toml default (1.0 and 2: every client, every round).
    local_epochs, lr, batch_size: None keeps the pyproject.toml default.
    client_cpus: the CPUs Flower's simulation gives each ClientApp (``client-resources-num-cpus``);
        with 1, a 2-core machine trains two clients at a time, each on one thread, which is ~1.4x
        faster per round than Flower's default of 2 (one client at a time on two threads).
    """

    name: str
    methods: tuple[str, ...] = FIRST_NINE
    dataset: str = "mnist5k"  # a built-in name or 'package.module:factory'
    model: str | None = None  # None: the pyproject.toml default ('auto'); a built-in name or 'package.module:factory'
    partition: str = "iid"
    alpha: float = 0.3
    supernodes: int = 10
    client_cpus: float = 1
    fraction_train: float | None = None
    min_train_nodes: int | None = None
    rounds: int = 8
    target: float = 0.95
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 42
    local_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    up_mbps: float = 5.0
    down_mbps: float = 20.0
    extra: dict[str, Any] = field(default_factory=dict)  # further run-config keys, same for every method

    def run_config(self, method: str, seed: int | None = None) -> dict[str, Any]:
        """The ``-c`` keys of one method's run with ``seed`` (default: the first seed), without ``run-dir``."""
        config = {
            **METHODS[method],
            "num-server-rounds": self.rounds,
            "dataset": self.dataset,
            "partition": self.partition,
            "alpha": self.alpha,
            "num-partitions": self.supernodes,
            "seed": self.seeds[0] if seed is None else seed,
            "data-seed": self.data_seed,
        }
        optional = {
            "model": self.model,
            "fraction-train": self.fraction_train,
            "min-train-nodes": self.min_train_nodes,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "batch-size": self.batch_size,
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        return {**config, **self.extra}

    @property
    def clients_per_round(self) -> int:
        """How many clients train each round (the server's sampling rule; unset keys at their defaults)."""
        defaults = RunConfig()
        fraction = defaults.fraction_train if self.fraction_train is None else self.fraction_train
        minimum = defaults.min_train_nodes if self.min_train_nodes is None else self.min_train_nodes
        return sample_size(self.supernodes, fraction, minimum)

    @property
    def runs(self) -> list[tuple[str, int]]:
        """(method, seed) in the order they run: every method with one seed before the next seed,
        so an interrupted bench still compares every method."""
        return [(method, seed) for seed in self.seeds for method in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "methods": list(self.methods), "seeds": list(self.seeds)}


# the methods the statistics suites (iid, dirichlet) run: the dense baseline, its best compressor,
# model factorisation, and MUD as a low-rank and as a block-Kronecker update
STATS_FIVE = ("fedavg", "topk-ef", "fedlmt", "mud-mat-aad", "fedmud")

# Wall times on 2 CPU cores. A run costs ~20 s of start-up plus its rounds; a round of MNIST-5k with
# 10 training clients takes ~3.5 s at the defaults (2 epochs, batch 32, 400 examples each; two
# clients at a time, one thread each) and ~1 s when they hold a few dozen examples.
SUITES: dict[str, Suite] = {
    # 5 methods x 3 seeds x (~20 s + 20 rounds x ~3.5 s): ~23 min. The first benchmark's nine
    # methods (FIRST_NINE, 8 rounds, one seed) are `--methods` away.
    "iid": Suite("iid", methods=STATS_FIVE, rounds=20, seeds=(0, 1, 2)),
    # the same on a skewed partition
    "dirichlet": Suite("dirichlet", methods=STATS_FIVE, partition="dirichlet", alpha=0.3, rounds=20, seeds=(0, 1, 2)),
    # 2 runs of 2 rounds, 2 clients x 2,000 examples: a run took 22 s on free cores, so ~50 s;
    # measured 2 min 28 s on cores shared with other jobs (load ~5)
    "smoke": Suite("smoke", methods=("fedavg", "fedmud"), supernodes=2, rounds=2, local_epochs=1),
    # the smoke suite with 2 seeds, 4 runs: measured 2 min 36 s (three runs of 22 s, one of 77 s under load)
    "smoke-seeds": Suite(
        "smoke-seeds", methods=("fedavg", "fedmud"), supernodes=2, rounds=2, local_epochs=1, seeds=(0, 1)
    ),
    # The FedMUD paper's setting: 100 clients holding 40 examples on average (MNIST-5k), 10 a round,
    # Dirichlet(0.3), 3 epochs of batch 64 at lr 0.01. 5 methods x 3 seeds = 15 runs x
    # (~25 s + 40 rounds x ~4.5 s): ~50 min
    "p10": Suite(
        "p10",
        methods=("fedavg", "ef-signsgd", "fedpara", "fedmud-link-float32", "fedmud"),
        partition="dirichlet",
        alpha=0.3,
        supernodes=100,
        fraction_train=0.1,
        min_train_nodes=10,
        rounds=40,
        local_epochs=3,
        batch_size=64,
        lr=0.01,
        seeds=(0, 1, 2),
    ),
    # 1% participation: 1,000 clients holding 4 examples each (MNIST-5k), 10 a round, IID. Flower's
    # simulation registers the 1,000 nodes at once and runs only the drawn ones: a 2-round run of
    # fedmud took 41 s in all (measured, loaded cores). 3 methods x 3 seeds = 9 runs x
    # (~25 s + 30 rounds x ~4 s): ~22 min
    "p1": Suite(
        "p1",
        methods=("fedavg", "fedmud-link-float32", "fedmud"),
        supernodes=1000,
        fraction_train=0.01,
        min_train_nodes=10,
        rounds=30,
        seeds=(0, 1, 2),
    ),
    # every client every round, the rivals: 6 methods x 3 seeds = 18 runs x (~20 s + 8 x ~8 s): ~25 min each
    "full-iid": Suite("full-iid", methods=RIVALS, seeds=(0, 1, 2)),
    "full-dirichlet": Suite("full-dirichlet", methods=RIVALS, partition="dirichlet", alpha=0.3, seeds=(0, 1, 2)),
}


# Suites run one after another into OUT/<suite>: `default` covers the participation users run,
# every client every round, 10% and 1% (measured ~1 h 30 min on 2 cores; see docs/benchmarks.md).
GROUPS: dict[str, tuple[str, ...]] = {"default": ("full-iid", "p10", "p1")}


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
    suite = replace(suite, seeds=tuple(suite.seeds))
    if not suite.seeds or len(set(suite.seeds)) != len(suite.seeds) or min(suite.seeds) < 0:
        raise ValueError(f"seeds {list(suite.seeds)}: give one or more different integers >= 0")
    if suite.fraction_train is not None and not 0 < suite.fraction_train <= 1:
        raise ValueError(f"fraction_train={suite.fraction_train}: it must be in (0, 1]")
    if suite.min_train_nodes is not None and not 1 <= suite.min_train_nodes <= suite.supernodes:
        # the server would wait round-timeout seconds for clients that do not exist
        raise ValueError(f"min_train_nodes={suite.min_train_nodes}: it must be in [1, supernodes={suite.supernodes}]")
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
