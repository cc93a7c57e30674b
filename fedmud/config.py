"""Typed, validated configuration, parsed once at the edge.

Flower hands both apps a flat mapping of run-config keys (``pyproject.toml``'s
``[tool.flwr.app.config]`` merged with ``-c`` overrides). :func:`parse_run_config`
turns it into frozen dataclasses; a bad value stops here with one message naming
the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .codec import SCHEMES

METHODS = ("fedmud", "fedavg", "fedlmt", "fedpara", "lora", "ffa-lora")
LORA_METHODS = ("lora", "ffa-lora")  # persistent adapters on a (pretrained) model: fine-tuning
KINDS = ("kron", "mat")
PATTERNS = ("ab", "fab", "aad")
INITS = ("zero", "nonzero", "nonzero-compensated", "hrp")
# what `init` may be for each method family (fedavg, fedlmt and fedpara ignore it)
METHOD_INITS = {"lora": ("zero", "nonzero", "hrp"), "ffa-lora": ("zero", "nonzero")}
# `init=auto` for the LoRA methods (docs/finetune.md): Init[AB] for lora, which beat Init[A] at every
# learning rate with SGD and Adam; Init[A] for ffa-lora, whose frozen A gains nothing from a non-zero B
LORA_INIT = {"lora": "nonzero", "ffa-lora": "zero"}
UPLINKS = tuple(SCHEMES)  # the codec's table of schemes
LINK_CODECS = tuple(name for name, scheme in SCHEMES.items() if not scheme.sparse)  # a chain link codes every value
LOSSY_UPLINKS = tuple(name for name, scheme in SCHEMES.items() if scheme.residual)
# codes with levels to round to: stochastic-rounding applies to these
LEVELLED_UPLINKS = tuple(n for n, scheme in SCHEMES.items() if scheme.residual and scheme.bits <= 8 and not scheme.sparse)
CLIENT_STATES = ("keep", "none")
OPTIMIZERS = ("sgd", "adam")
# The built-in datasets and their number of classes (the labels are 0 .. n-1); fedmud.data.SPECS holds
# the rest of each one's description (shape, normalisation) and takes the class count from here.
DATASET_CLASSES = {
    "mnist5k": 10, "digits": 10, "mnist": 10, "fashionmnist": 10, "svhn": 10, "cifar10": 10, "cifar100": 100
}
DATASETS = tuple(DATASET_CLASSES)
PARTITIONS = ("iid", "dirichlet", "label-count")
# Built-in names; `model` and `dataset` also take a user factory as 'package.module:factory'.
MODELS = ("auto", "cnn-mnist", "cnn-cifar", "resnet18", "mobilenet-v3-small", "vit", "text-transformer", "lstm")
DOWNLINKS = ("chain", "full")
TASKS = ("classification", "regression")
NORM_ACTIONS = ("reject", "clip")
IMPORT_STRING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class DecompositionConfig:
    """How each round's model update is parameterised.

    method: ``fedmud`` trains a decomposed update of every layer not kept dense;
        ``fedavg`` keeps every layer dense (the baseline, same code path);
        ``fedlmt`` factorises the model itself (W = U·V, both trained and averaged,
        no MUD), the FedLMT-style baseline, sized by ``ratio``;
        ``fedpara`` parameterises the model itself as FedPara's low-rank Hadamard
        product W = (X1·Y1ᵀ) ⊙ (X2·Y2ᵀ) (all four trained and averaged, no MUD;
        rank up to r² from 2r(m+n) values), sized by ``ratio``.
        ``lora`` fine-tunes with persistent LoRA adapters W0 + (α/r)·B·A on every
        tensor not kept dense, both trained and averaged (FedIT; inexact:
        mean(B)·mean(A) ≠ mean(B·A)); ``ffa-lora`` freezes A (drawn from the seed,
        part of the global model) and trains B only, so aggregation is exact.
        ``kind`` and ``pattern`` apply to ``fedmud`` only; ``ratio`` does not apply to
        the LoRA methods (their size is ``lora_rank``).
    kind: ``kron`` block-wise Kronecker factors (BKD) or ``mat`` low-rank matrix.
    pattern: ``ab`` both factors trained; ``fab`` one frozen seed-drawn factor and
        one trained; ``aad`` aggregation-aware, two branches each linear in its
        trained factor (F1·T1 + T2·F2), so aggregation is exact.
    ratio: target for everything uploaded (dense layers and BatchNorm included)
        relative to dense FedAvg's upload, in (0, 1].
    dense_layers: tensors trained densely (see :mod:`fedmud.plan`): ``auto`` the
        paper's first and last layers when they fit the ratio; ``first``/``last``
        those layers always; a tensor name (``conv1.weight``) or a module name (every
        weight tensor under it).
    init: ``zero`` trained factors start at 0 (for ``ab``: the right factor),
        ``nonzero`` trained factors drawn too and the round-start update kept,
        ``nonzero-compensated`` drawn too and ΔW(T0) subtracted exactly,
        ``hrp`` high-rank preheating: the first ``hrp_rounds`` rounds run as
        ``nonzero-compensated``; the SVD (mat) or nearest Kronecker product per
        block (kron) of their merged update then gives the frozen factors'
        directions for the remaining rounds (trained factors start at 0).
        For ``lora``/``ffa-lora``: ``zero`` is Init[A] (A drawn, B = 0), ``nonzero``
        Init[AB] (B drawn too, the initial product kept), ``hrp`` (``lora`` only)
        ``hrp_rounds`` rounds of rank-``hrp_rank`` LoRA, whose adapters' top-``lora_rank``
        SVD then initialises the rank-``lora_rank`` adapters.
    hrp_rounds: preheat length in rounds (``init=hrp`` only).
    lora_rank: rank r of every LoRA adapter (at most min(m, n) of the tensor's matrix view).
    lora_alpha: LoRA's scale numerator: the adapter adds (lora_alpha / r)·B·A.
    lora_init_scale: ``init=nonzero`` for the LoRA methods: the initial (α/r)·B·A has this
        times the std of PyTorch's default init of the weight (1: as large as a fresh weight).
    hrp_rank: the preheat adapters' rank (``lora`` with ``init=hrp``); above ``lora_rank``.
    init_scale: std of trained factors at init, in units of 1/sqrt(fan_in).
    frozen_scale: std of frozen factors, in units of the std that makes T -> ΔW
        an isometry in expectation; the subspace's effective learning rate grows
        with its square.
    """

    method: str = "fedmud"
    kind: str = "kron"
    pattern: str = "aad"
    ratio: float = 1 / 32
    dense_layers: tuple[str, ...] = ("auto",)
    init: str = "nonzero-compensated"
    init_scale: float = 0.1
    frozen_scale: float = 4.0
    hrp_rounds: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_init_scale: float = 1.0
    hrp_rank: int = 32


@dataclass(frozen=True)
class UplinkConfig:
    """How a client's upload is encoded (see :mod:`fedmud.codec`).

    codec: a scheme of :data:`fedmud.codec.SCHEMES`: ``float32`` (lossless), ``float16``,
        ``int8``, ``int4``, ``int2`` (a float32 scale per chunk of one tensor), ``sign`` (one
        bit a value and a scale a chunk) or ``topk`` (the largest-magnitude values with their
        indices); the lossy codecs encode the residual against the round-start values both
        parties know.
    error_feedback: keep what the codec lost and add it to the next upload; for
        decomposed layers the error is kept as a weight update and projected onto the
        next round's trainable factors (``aad``/``fab``).
    topk_ratio: ``topk`` sends this fraction of the dense float32 bytes (8 bytes per
        kept value: float32 value + int32 index).
    stochastic_rounding: the ``int*`` and ``sign`` codes round up or down at random
        (unbiased: their levels then span each chunk's largest magnitude) instead of to
        the nearest level; each client draws from its own generator, seeded by the round
        seed and its partition id.
    """

    codec: str = "float32"
    error_feedback: bool = False
    topk_ratio: float = 1 / 32
    stochastic_rounding: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client: plain SGD, as in the paper, or Adam.

    optimizer: ``sgd`` (with ``momentum``) or ``adam`` (PyTorch's defaults, betas (0.9, 0.999);
        ``momentum`` does not apply), created afresh every round: a client keeps no optimiser
        state between rounds. Adam is what LoRA fine-tuning usually runs with, and the setting
        the non-zero initialisation paper analyses.
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: int = 2
    batch_size: int = 32


@dataclass(frozen=True)
class DataConfig:
    """Dataset, held-out split and partitioning over clients (see :mod:`fedmud.data`).

    dataset: ``mnist5k`` and ``digits`` are embedded (no files, no network) and split
        into train/test with ``test_fraction`` and ``seed``; ``mnist``,
        ``fashionmnist``, ``svhn``, ``cifar10``, ``cifar100`` are read from ``root``
        in torchvision's layout (downloaded when missing) with their official
        train/test splits (``test_fraction`` does not apply); ``package.module:factory``
        is the user's own data (see :mod:`fedmud.data`).
    partition: ``iid``; ``dirichlet`` (label proportions ~ Dir(``alpha``)); or
        ``label-count``: each client holds max(1, round(``label_fraction`` ·
        classes)) classes.
    root: directory of the torchvision datasets; ``~`` is expanded and a relative
        path is resolved against the current directory of the process loading it.
    seed: the embedded sets' train/test split and the partitioners' draws.
    classes: keep only these class labels in train and test (built-in datasets; empty:
        all). Labels keep their values, so a model pretrained on 0-4 and fine-tuned on
        5-9 has one 10-way head.
    """

    dataset: str = "mnist5k"
    partition: str = "iid"
    alpha: float = 0.3
    num_partitions: int = 10
    test_fraction: float = 0.2
    seed: int = 42
    root: str = "data"
    label_fraction: float = 0.3
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class BoundsConfig:
    """What one valid reply may do to the global model (see :mod:`fedmud.bounds`).

    max_examples: a reply's ``num-examples`` above this counts as this. The server
        cannot check the claim, and it is the reply's weight in the mean. The default,
        100,000, is above every built-in training set (SVHN's 73,257 is the largest),
        so no honest client of a built-in dataset is ever capped, and a claim of 10^15
        weighs 100,000 instead; set it to your largest partition for a tighter bound.
    update_norm_bound: largest L2 norm of a reply's update (decoded upload minus the
        round-start values), over the whole upload vector; 0 turns the bound off.
    update_norm_action: ``clip`` scales a larger update down to the bound; ``reject``
        drops the reply (the node still holds the round's model).
    median_norm_bound: the bound in force by default: a reply's update norm is at most
        this multiple of the (lower) median update norm of the last round's valid replies
        (the round's own, in a round with no earlier replies), so one client cannot move
        the model by orders of magnitude more than its peers; ``update-norm-action``
        applies. 0 turns it off. Not under DP (``dp-clip`` bounds every update, and a bound
        drawn from the others' norms would change the sensitivity the accountant assumes)
        nor under secure aggregation (the server never sees one update).
    """

    max_examples: int = 100_000
    update_norm_bound: float = 0.0
    update_norm_action: str = "clip"
    median_norm_bound: float = 10.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Secure aggregation and client-level differential privacy (see :mod:`fedmud.privacy`).

    secure_aggregation: the server learns only the sum of the clients' updates (and of
        their weights), through Flower's SecAgg+ protocol.
    secagg_shares: each client secret-shares its keys with this fraction of the
        round's clients (1.0: all of them; SecAgg+ uses fewer to scale).
    secagg_threshold: the fraction of a client's shares needed to rebuild its keys:
        a round survives as long as that many of each client's neighbours answer,
        and fewer than that learn nothing.
    dp: ``off``; ``server``: the server adds Gaussian noise to the sum of clipped
        updates; ``client``: each client adds its share of it (with secure aggregation).
    dp_clip: the L2 norm each client's update is clipped to (factor space).
    dp_noise_multiplier: σ, the noise std over ``dp_clip``; or give ``dp_epsilon``.
    dp_epsilon: the ε to reach after ``num-server-rounds`` rounds; σ is calibrated.
    dp_delta: the δ ε is stated at.
    """

    secure_aggregation: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.5
    dp: str = "off"
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 0.0
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs.

    downlink: ``chain`` sends each client the aggregated updates it missed (or the
        full model when that is cheaper or its state is unknown); ``full`` always
        sends the full model.
    downlink_codec: how each chain link is coded (see :mod:`fedmud.codec`); ``auto``
        (the run-config default) is ``int4``, or ``float32`` under ``pattern=ab``, whose
        update is not linear in its factors, so the server cannot keep what a code lost; a lossy
        code is merged as decoded on every side, so clients stay bitwise in sync, and
        the server keeps what it lost (error feedback) for the next link.
    client_state: ``keep`` clients hold the global model between rounds (chains from
        the round they hold); ``none`` clients keep nothing (cross-device), so each
        download brings round 0, which every party builds from the seed, to the current round.
    round_timeout: seconds a round waits for replies.
    min_replies: valid replies a round needs to be merged; fewer and it is skipped.
    resume: a run directory whose checkpoint the run continues from ("" = new run).
    fault_corrupt_state_round: fault injection for tests; in that round every client
        perturbs the model it holds before applying the downlink (0 = off).
    bounds: what one reply may do to the model (weight cap, update norm bound).
    privacy: secure aggregation and differential privacy.
    task: ``classification`` (cross-entropy, accuracy), ``regression`` (MSE) or
        ``package.module:factory`` returning a :class:`fedmud.task.Task`.
    init_weights: a state_dict file every party loads into the model before round 0
        (fine-tuning a pretrained model); "" = the factory's own weights from ``seed``.
    """

    rounds: int = 20
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    seed: int = 0
    model: str = "auto"
    run_dir: str = "runs"
    downlink: str = "chain"
    downlink_codec: str = "int4"  # "auto" in the run config resolves to this, or float32 for pattern ab
    client_state: str = "keep"
    round_timeout: float = 600.0
    min_replies: int = 1
    resume: str = ""
    fault_corrupt_state_round: int = 0
    task: str = "classification"
    init_weights: str = ""
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# Where a run-config key's name is not its field's name with '_' -> '-'.
_KEY_NAMES = {
    ("rounds",): "num-server-rounds",
    ("uplink", "codec"): "uplink",
    ("data", "seed"): "data-seed",
    ("data", "root"): "data-root",
}


def run_config_key(path: tuple[str, ...]) -> str:
    """The run-config key of a :class:`RunConfig` field, e.g. ('train', 'local_epochs') -> 'local-epochs'."""
    return _KEY_NAMES.get(tuple(path), path[-1].replace("_", "-"))


def _field_paths(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf field of a config dataclass as a path, e.g. ('rounds',), ('train', 'lr')."""
    for f in fields(cls):
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            yield from _field_paths(f.default_factory, (*prefix, f.name))
        else:
            yield (*prefix, f.name)


# Every key :func:`parse_run_config` reads: one per RunConfig field (pyproject.toml declares the same set).
RUN_CONFIG_KEYS = frozenset(run_config_key(path) for path in _field_paths(RunConfig))
# What a misspelt key is matched against: the keys, and the field names people write instead
# ('rounds' for num-server-rounds, 'codec' for uplink), both in the keys' spelling.
_SPELLINGS = {
    **{path[-1].replace("_", "-"): run_config_key(path) for path in _field_paths(RunConfig)},
    **{key: key for key in RUN_CONFIG_KEYS},
}
APP_KEY_HINT = (
    "an app's own keys go under a name of its own, as 'myapp.key' (a [tool.flwr.app.config.myapp] table in "
    "pyproject.toml, or -c myapp.key=...), which FedMUD leaves to the app"
)


def _nearest_key(key: object) -> str | None:
    """The known key ``key`` most likely misspells, or None."""
    if not isinstance(key, str):
        return None
    spelt = key.strip().lower().replace("_", "-")
    if spelt in _SPELLINGS:
        return _SPELLINGS[spelt]
    near = difflib.get_close_matches(spelt, _SPELLINGS, n=1, cutoff=0.6)
    return _SPELLINGS[near[0]] if near else None


def _check_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse a key FedMUD does not know (a misspelt one would silently keep its default); dotted
    keys ('myapp.key', from a sub-table of the app's config) belong to the app and are left alone."""
    unknown = [key for key in cfg if key not in RUN_CONFIG_KEYS and not (isinstance(key, str) and "." in key)]
    if not unknown:
        return
    named = []
    for key in unknown:
        near = _nearest_key(key)
        named.append((f"{key}={cfg[key]!r}" if isinstance(key, str) else f"key {key!r}", near))
    known = f"Known keys: {', '.join(sorted(RUN_CONFIG_KEYS))}; {APP_KEY_HINT}"
    if len(named) == 1:
        (what, near), = named
        guess = f"; did you mean {near}?" if near else "."
        raise ConfigError(f"{what} is not allowed: there is no such key{guess} {known}")
    listed = ", ".join(what + (f" (did you mean {near}?)" if near else "") for what, near in named)
    raise ConfigError(f"{listed} are not allowed: there are no such keys. {known}")


def _choice(cfg: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def is_import_string(value: object) -> bool:
    """Whether ``value`` reads as ``package.module:factory`` (the import itself is checked later)."""
    return isinstance(value, str) and IMPORT_STRING.fullmatch(value) is not None


def _builtin_or_factory(cfg: Mapping[str, Any], key: str, default: str, builtins: tuple[str, ...]) -> str:
    """A built-in name or a user factory ``package.module:factory``; imported when the model/data are built."""
    value = cfg.get(key, default)
    if value not in builtins and not is_import_string(value):
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(builtins)} "
            "or give a factory as 'package.module:factory'"
        )
    return value


INT64_MAX = 2**63 - 1  # a run config's integers are TOML's and Flower's: 64-bit
# Bounds of the float keys whose values end up in float32 arithmetic, each orders of magnitude past any
# setting that trains; inside them the round-0 model, every noise draw and every optimiser step stays
# finite (far outside, a run fails or skips every round long after it started).
SCALE_RANGE = (1e-3, 1e3)  # init-scale, frozen-scale, lora-init-scale: multiples of a natural std
LORA_ALPHA_RANGE = (1e-3, 1e5)  # the adapter adds (α/r)·B·A, and init=nonzero divides B's std by α/r
MAX_STEP = 1e6  # lr, weight-decay: PyTorch applies them as float32; a client that diverges is left out
MAX_NORM = 1e6  # dp-clip, update-norm-bound: an update's L2 norm (SecAgg+ quantises within it)
MAX_NOISE_MULTIPLIER = 1e4  # σ: ε is at the accountant's floor (~0.0035) by 1e3; near 1e155 it overflows
MAX_ROUND_TIMEOUT = 43_200.0  # Flower's message TTL (flwr.app.DEFAULT_TTL, 12 h): no reply arrives later


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond every float
        return False


def _number(
    cfg: Mapping[str, Any],
    key: str,
    default: float,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> Any:
    value = cfg.get(key, default)
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {kind}")
    if not integer and not _finite(value):  # NaN passes every comparison below
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    cap = INT64_MAX if integer and high is None else high  # every integer key has one
    too_high = cap is not None and value > cap
    if too_low or too_high:
        high = cap if too_high else high  # an integer's implicit cap is named only when it bites
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(s for s in (lo, hi) if s)
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {kind} {rng}")
    return int(value) if integer else float(value)


def _parse_ratio(cfg: Mapping[str, Any], key: str = "ratio", default: float = DecompositionConfig.ratio) -> float:
    value = cfg.get(key, default)
    if isinstance(value, str):  # "1/32" reads better than 0.03125
        try:
            num, _, den = value.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(
                f"{key}={cfg[key]!r} is not allowed; it must be a number or a fraction like '1/32' in (0, 1]"
            ) from None
    return _number({key: value}, key, 0.0, low=0.0, high=1.0, low_open=True)


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be true or false")
    return value


def _init(cfg: Mapping[str, Any], method: str) -> str:
    """``init``: ``auto`` (the method's default: ``nonzero-compensated`` for fedmud, :data:`LORA_INIT`
    for the LoRA methods) or one of the method's options."""
    allowed = METHOD_INITS.get(method, INITS)
    value = cfg.get("init", "auto")
    if value == "auto":
        return LORA_INIT.get(method, DecompositionConfig.init)
    if value not in allowed:
        within = f" with method={method!r}" if method in METHOD_INITS else ""
        raise ConfigError(f"init={value!r} is not allowed{within}; choose one of auto, {', '.join(allowed)}")
    return value


def _classes(cfg: Mapping[str, Any], dataset: str) -> tuple[int, ...]:
    """``classes``: '' (all), '5-9', '0,2,4' or a mix ('0-2,7'); sorted, each once. Every label must
    be one of the built-in ``dataset``'s, which is checked before a range is expanded."""
    value = cfg.get("classes", "")
    wrong = ConfigError(
        f"classes={value!r} is not allowed; give class labels >= 0 as a comma-separated list of labels "
        "and ranges, e.g. '5-9' or '0,2,4', or '' for all"
    )
    if not isinstance(value, str):
        raise wrong
    ranges = []
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        low, dash, high = (part.strip() for part in item.partition("-"))
        if not low.isdecimal() or (dash and not high.isdecimal()):
            raise wrong
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:  # more digits than int() reads
            raise wrong from None
        if last < first:
            raise wrong
        ranges.append((first, last))
    if not ranges:
        return ()
    if is_import_string(dataset):
        raise ConfigError(
            f"classes={value!r} is not allowed with dataset={dataset!r}: it filters the built-in datasets; "
            "return the classes you want from your dataset factory instead"
        )
    count = DATASET_CLASSES[dataset]
    if max(last for _, last in ranges) >= count:
        raise ConfigError(f"classes={value!r} is not allowed with dataset={dataset!r}: its labels are 0-{count - 1}")
    return tuple(sorted({label for first, last in ranges for label in range(first, last + 1)}))


def _path(cfg: Mapping[str, Any], key: str, default: str, what: str, *, empty: bool = False) -> str:
    """A path key: a string (``~`` is expanded where it is used); '' only where ``empty``."""
    value = cfg.get(key, default)
    if not isinstance(value, str) or not (empty or value.strip()):
        raise ConfigError(f"{key}={value!r} is not allowed; give {what}" + ("" if empty else " (a non-empty path)"))
    return value


def _init_weights(cfg: Mapping[str, Any]) -> str:
    value = cfg.get("init-weights", RunConfig.init_weights)
    if not isinstance(value, str):
        raise ConfigError(f"init-weights={value!r} is not allowed; give the path of a state_dict file, or '' for none")
    return value.strip()


def _check_lora(d: DecompositionConfig) -> None:
    if d.method not in LORA_METHODS:
        return
    if d.init == "hrp" and d.hrp_rank <= d.lora_rank:
        raise ConfigError(
            f"hrp-rank={d.hrp_rank} is not allowed with lora-rank={d.lora_rank}: the preheat's rank must be "
            "above the adapters' rank (init='hrp')"
        )


def _check_combinations(d: DecompositionConfig, u: UplinkConfig) -> None:
    if d.init == "hrp" and d.method not in ("fedmud", "lora"):
        raise ConfigError(f"init='hrp' is not allowed with method={d.method!r}; it needs method='fedmud' or 'lora'")
    if d.method == "lora" and d.init == "hrp" and u.error_feedback:
        raise ConfigError(
            "error-feedback=true is not allowed with method='lora' and init='hrp': the adapters change rank "
            "after the preheat, and the carried error with them; set error-feedback=false or choose init zero or nonzero"
        )
    _check_lora(d)
    if u.error_feedback and not SCHEMES[u.codec].residual:
        raise ConfigError(
            f"error-feedback=true is not allowed with uplink={u.codec!r} (lossless, nothing to feed back); "
            f"choose a lossy uplink: {', '.join(LOSSY_UPLINKS)}"
        )
    if u.stochastic_rounding and u.codec not in LEVELLED_UPLINKS:
        raise ConfigError(
            f"stochastic-rounding=true is not allowed with uplink={u.codec!r}: it rounds to code levels, "
            f"which only {', '.join(LEVELLED_UPLINKS)} have"
        )
    if u.error_feedback and d.method == "fedmud" and d.pattern == "ab":
        raise ConfigError(
            "error-feedback=true is not allowed with pattern='ab': the error is projected onto the next "
            "round's factors, which needs an update linear in them; choose pattern aad or fab"
        )


def _link_codec(cfg: Mapping[str, Any], d: DecompositionConfig) -> str:
    value = _choice(cfg, "downlink-codec", "auto", ("auto", *LINK_CODECS))
    if value != "auto":
        return value
    return "float32" if d.method == "fedmud" and d.pattern == "ab" else RunConfig.downlink_codec


def _check_downlink(run: RunConfig) -> None:
    d = run.decomposition
    if run.client_state == "none" and run.uplink.error_feedback:
        raise ConfigError(
            "error-feedback=true is not allowed with client-state='none': a client keeps what its code lost "
            "until its next upload, and a client that keeps no state has nowhere to keep it; set "
            "error-feedback=false or client-state='keep'"
        )
    if SCHEMES[run.downlink_codec].residual and d.method == "fedmud" and d.pattern == "ab":
        raise ConfigError(
            f"downlink-codec={run.downlink_codec!r} is not allowed with pattern='ab': the server keeps what "
            "the code lost as a weight update and projects it onto the next round's factors, which needs an "
            "update linear in them; choose pattern aad or fab, or downlink-codec float32"
        )


def _task(cfg: Mapping[str, Any]) -> str:
    value = cfg.get("task", RunConfig.task)
    if not isinstance(value, str) or not (value in TASKS or is_import_string(value)):
        raise ConfigError(
            f"task={value!r} is not allowed; choose one of {', '.join(TASKS)} or give 'package.module:factory'"
        )
    return value


def _bounds(cfg: Mapping[str, Any]) -> BoundsConfig:
    multiple = _number(cfg, "median-norm-bound", BoundsConfig.median_norm_bound, low=0.0)
    if 0 < multiple < 1:  # below the median: half of the honest replies would be cut
        raise ConfigError(f"median-norm-bound={multiple!r} is not allowed; it must be 0 (off) or a number >= 1")
    return BoundsConfig(
        max_examples=_number(cfg, "max-examples", BoundsConfig.max_examples, integer=True, low=1),
        update_norm_bound=_number(cfg, "update-norm-bound", BoundsConfig.update_norm_bound, low=0.0, high=MAX_NORM),
        update_norm_action=_choice(cfg, "update-norm-action", BoundsConfig.update_norm_action, NORM_ACTIONS),
        median_norm_bound=multiple,
    )


DP_MODES = ("off", "server", "client")


def _privacy(cfg: Mapping[str, Any], uplink: UplinkConfig) -> PrivacyConfig:
    p = PrivacyConfig(
        secure_aggregation=_flag(cfg, "secure-aggregation", PrivacyConfig.secure_aggregation),
        secagg_shares=_number(cfg, "secagg-shares", PrivacyConfig.secagg_shares, low=0.0, high=1.0, low_open=True),
        secagg_threshold=_number(
            cfg, "secagg-threshold", PrivacyConfig.secagg_threshold, low=0.0, high=1.0, low_open=True
        ),
        dp=_choice(cfg, "dp", PrivacyConfig.dp, DP_MODES),
        dp_clip=_number(cfg, "dp-clip", PrivacyConfig.dp_clip, low=0.0, high=MAX_NORM, low_open=True),
        dp_noise_multiplier=_number(
            cfg, "dp-noise-multiplier", PrivacyConfig.dp_noise_multiplier, low=0.0, high=MAX_NOISE_MULTIPLIER
        ),
        dp_epsilon=_number(cfg, "dp-epsilon", PrivacyConfig.dp_epsilon, low=0.0),
        dp_delta=_number(cfg, "dp-delta", PrivacyConfig.dp_delta, low=0.0, high=0.1, low_open=True),
    )
    if p.secure_aggregation and SCHEMES[uplink.codec].sparse:
        raise ConfigError(
            f"secure-aggregation=true is not allowed with uplink={uplink.codec!r}: secure aggregation sums "
            "every client's whole vector, and a sparse upload's positions differ between clients; choose "
            f"a dense uplink: {', '.join(n for n, s in SCHEMES.items() if not s.sparse)}"
        )
    given = [key for key, value in (("dp-noise-multiplier", p.dp_noise_multiplier), ("dp-epsilon", p.dp_epsilon)) if value]
    if p.dp == "off" and given:
        raise ConfigError(
            f"{given[0]}={cfg[given[0]]!r} is not allowed with dp='off'; set dp to server or client to use it"
        )
    if p.dp != "off" and len(given) != 1:
        what = "both are" if given else "neither is"
        raise ConfigError(
            f"dp={p.dp!r} needs exactly one of dp-noise-multiplier > 0 (σ) or dp-epsilon > 0 (the ε to reach, σ "
            f"calibrated); {what} set"
        )
    if p.dp == "client" and not p.secure_aggregation:
        raise ConfigError(
            "dp='client' is not allowed with secure-aggregation=false: each client adds only its share of the "
            "noise, so the server would see every update nearly noise-free; set secure-aggregation=true, or dp='server'"
        )
    return p


def parse_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a flat Flower run config into a :class:`RunConfig`.

    Every key must be one of :data:`RUN_CONFIG_KEYS` or an app's own, dotted ('myapp.key'); a
    misspelt key is refused with the nearest known one rather than left at its default.
    """
    _check_keys(cfg)
    dense = cfg.get("dense-layers", "auto")
    if not isinstance(dense, str) or not dense.strip():
        raise ConfigError(
            f"dense-layers={dense!r} is not allowed; give auto, or a comma-separated list of first, last, "
            "tensor names and module names"
        )
    decomposition = DecompositionConfig(
        method=_choice(cfg, "method", "fedmud", METHODS),
        kind=_choice(cfg, "kind", "kron", KINDS),
        pattern=_choice(cfg, "pattern", "aad", PATTERNS),
        ratio=_parse_ratio(cfg),
        dense_layers=tuple(n.strip() for n in dense.split(",") if n.strip()),
        init=_init(cfg, cfg.get("method", "fedmud")),
        init_scale=_number(cfg, "init-scale", DecompositionConfig.init_scale, low=0.0, high=SCALE_RANGE[1]),
        frozen_scale=_number(
            cfg, "frozen-scale", DecompositionConfig.frozen_scale, low=SCALE_RANGE[0], high=SCALE_RANGE[1]
        ),
        hrp_rounds=_number(cfg, "hrp-rounds", DecompositionConfig.hrp_rounds, integer=True, low=1),
        lora_rank=_number(cfg, "lora-rank", DecompositionConfig.lora_rank, integer=True, low=1),
        lora_alpha=_number(
            cfg, "lora-alpha", DecompositionConfig.lora_alpha, low=LORA_ALPHA_RANGE[0], high=LORA_ALPHA_RANGE[1]
        ),
        lora_init_scale=_number(
            cfg, "lora-init-scale", DecompositionConfig.lora_init_scale, low=0.0, high=SCALE_RANGE[1]
        ),
        hrp_rank=_number(cfg, "hrp-rank", DecompositionConfig.hrp_rank, integer=True, low=1),
    )
    uplink = UplinkConfig(
        codec=_choice(cfg, "uplink", UplinkConfig.codec, UPLINKS),
        error_feedback=_flag(cfg, "error-feedback", UplinkConfig.error_feedback),
        topk_ratio=_parse_ratio(cfg, "topk-ratio", UplinkConfig.topk_ratio),
        stochastic_rounding=_flag(cfg, "stochastic-rounding", UplinkConfig.stochastic_rounding),
    )
    _check_combinations(decomposition, uplink)
    train = TrainConfig(
        optimizer=_choice(cfg, "optimizer", TrainConfig.optimizer, OPTIMIZERS),
        lr=_number(cfg, "lr", TrainConfig.lr, low=0.0, high=MAX_STEP, low_open=True),
        momentum=_number(cfg, "momentum", TrainConfig.momentum, low=0.0, high=1.0),
        weight_decay=_number(cfg, "weight-decay", TrainConfig.weight_decay, low=0.0, high=MAX_STEP),
        local_epochs=_number(cfg, "local-epochs", TrainConfig.local_epochs, integer=True, low=1),
        batch_size=_number(cfg, "batch-size", TrainConfig.batch_size, integer=True, low=1),
    )
    data_root = cfg.get("data-root", DataConfig.root)
    if not isinstance(data_root, str) or not data_root.strip():
        raise ConfigError(f"data-root={data_root!r} is not allowed; it must be a non-empty directory path")
    dataset = _builtin_or_factory(cfg, "dataset", DataConfig.dataset, DATASETS)
    data = DataConfig(
        dataset=dataset,
        partition=_choice(cfg, "partition", DataConfig.partition, PARTITIONS),
        alpha=_number(cfg, "alpha", DataConfig.alpha, low=0.0, low_open=True),
        num_partitions=_number(cfg, "num-partitions", DataConfig.num_partitions, integer=True, low=1),
        test_fraction=_number(cfg, "test-fraction", DataConfig.test_fraction, low=0.0, high=0.9, low_open=True),
        seed=_number(cfg, "data-seed", DataConfig.seed, integer=True, low=0),
        root=data_root,
        label_fraction=_number(
            cfg, "label-fraction", DataConfig.label_fraction, low=0.0, high=1.0, low_open=True
        ),
        classes=_classes(cfg, dataset),
    )
    run = RunConfig(
        rounds=_number(cfg, "num-server-rounds", RunConfig.rounds, integer=True, low=1),
        fraction_train=_number(cfg, "fraction-train", RunConfig.fraction_train, low=0.0, high=1.0, low_open=True),
        min_train_nodes=_number(cfg, "min-train-nodes", RunConfig.min_train_nodes, integer=True, low=1),
        seed=_number(cfg, "seed", RunConfig.seed, integer=True, low=0),
        model=_builtin_or_factory(cfg, "model", RunConfig.model, MODELS),
        run_dir=_path(cfg, "run-dir", RunConfig.run_dir, "the directory runs are written under"),
        downlink=_choice(cfg, "downlink", RunConfig.downlink, DOWNLINKS),
        downlink_codec=_link_codec(cfg, decomposition),
        client_state=_choice(cfg, "client-state", RunConfig.client_state, CLIENT_STATES),
        round_timeout=_number(
            cfg, "round-timeout", RunConfig.round_timeout, low=0.0, high=MAX_ROUND_TIMEOUT, low_open=True
        ),
        min_replies=_number(cfg, "min-replies", RunConfig.min_replies, integer=True, low=1),
        resume=_path(cfg, "resume", RunConfig.resume, "a run directory to continue, or '' for a new run", empty=True),
        fault_corrupt_state_round=_number(
            cfg, "fault-corrupt-state-round", RunConfig.fault_corrupt_state_round, integer=True, low=0
        ),
        task=_task(cfg),
        init_weights=_init_weights(cfg),
        bounds=_bounds(cfg),
        privacy=_privacy(cfg, uplink),
        decomposition=decomposition,
        uplink=uplink,
        train=train,
        data=data,
    )
    _check_downlink(run)
    return run
