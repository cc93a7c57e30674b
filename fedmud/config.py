"""Typed, validated configuration, parsed once at the edge.

Flower hands both apps a flat mapping of run-config keys (``pyproject.toml``'s
``[tool.flwr.app.config]`` merged with ``-c`` overrides). :func:`parse_run_config`
turns it into frozen dataclasses; a bad value stops here with one message naming
the key, the value and what is allowed.

Each key is declared once, on its field: ``lr: float = key(0.05, "local learning rate",
low=0.0, high=MAX_STEP, low_open=True)`` (:class:`Key`). The parser is a loop over the
fields; what depends on several keys (``init`` on ``method``, SecAgg+ on the uplink) is
checked after, in the ``_check_*`` functions. ``pyproject.toml``'s table and the README's
are written from the fields by ``scripts/config_docs.py``. Adding a key is its field and the
code that reads it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any

from .codec import SCHEMES
from .data import DATASETS, SPECS
from .errors import ConfigError, is_import_string
from .hf import is_hf_source
from .methods import BUILTIN_METHODS, INITS, METHODS, method_named
from .models import MODELS
from .secagg import GRID_HALVES
from .task import BUILTIN_TASKS

TASKS = tuple(BUILTIN_TASKS)

KINDS = ("kron", "mat")
PATTERNS = ("ab", "fab", "aad")
VECTOR_UPLINKS = ("auto", "int8", "uplink")
UPLINKS = tuple(SCHEMES)  # the codec's table of schemes
LINK_CODECS = tuple(name for name, scheme in SCHEMES.items() if not scheme.sparse)  # a chain link codes every value
LOSSY_UPLINKS = tuple(name for name, scheme in SCHEMES.items() if scheme.residual)
# codes with levels to round to: stochastic-rounding applies to these
LEVELLED_UPLINKS = tuple(n for n, scheme in SCHEMES.items() if scheme.residual and scheme.bits <= 8 and not scheme.sparse)
CLIENT_STATES = ("keep", "none")
# an anchor codes the model's change since round 0, a residual every value of which is sent
ANCHOR_CODECS = ("none", *(n for n, scheme in SCHEMES.items() if scheme.residual and not scheme.sparse))
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("iid", "dirichlet", "label-count", "natural")
DOWNLINKS = ("chain", "full")
NORM_ACTIONS = ("reject", "clip")
DP_MODES = ("off", "server", "client")


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


def _choice(cfg: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be true or false")
    return value


def _builtin_or_factory(cfg: Mapping[str, Any], key: str, default: str, builtins: tuple[str, ...]) -> str:
    """A built-in name or a user factory ``package.module:factory``; imported when the model/data are built."""
    value = cfg.get(key, default)
    if value not in builtins and not is_import_string(value):
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(builtins)} "
            "or give a factory as 'package.module:factory'"
        )
    return value


@dataclass(frozen=True)
class Key:
    """One run-config key, declared once on its field: its name, meaning and what it allows.

    The parser (:func:`parse_run_config`), ``pyproject.toml``'s ``[tool.flwr.app.config]`` and the
    README's configuration table all come from these (``scripts/config_docs.py`` writes the last two;
    tests/test_config.py checks them).

    name: the run-config key; by default the field's name with ``-`` for ``_``.
    help: what it means (Markdown: the README table's last column).
    choices: the allowed strings (a str field); ``factory``: or ``package.module:factory``.
    low, high, low_open: a number's range (an int field is also at most 2^63 - 1).
    shown: the value the run config holds when it is not the field's default, which is then
        resolved from it (``ratio = "1/32"``; ``init = "auto"``).
    parse: ``parse(cfg, name, default, parsed) -> value`` for a rule of its own; ``parsed`` holds
        the keys parsed before it (``init`` reads ``method``). ``allowed`` then says what it takes.
    """

    help: str
    name: str = ""
    choices: tuple[str, ...] = ()
    factory: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    shown: Any = None
    parse: Callable[[Mapping[str, Any], str, Any, Mapping[str, Any]], Any] | None = None
    allowed: str = ""


def key(default: Any, help: str, **declared: Any) -> Any:
    """A config field whose run-config key is declared by :class:`Key` (``help`` and ``declared``)."""
    return field(default=default, metadata={"key": Key(help=help, **declared)})


def section(cls: type) -> Any:
    """A field holding a group of keys (a config dataclass)."""
    return field(default_factory=cls)


# --- parsers of the keys with a rule of their own (parse=...) ------------------------------------


def _ratio(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> float:
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


def _dense_layers(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> tuple[str, ...]:
    value = cfg.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{key}={value!r} is not allowed; give auto, or a comma-separated list of first, last, "
            "tensor names and module names"
        )
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _method(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    """A registered method (:data:`fedmud.methods.METHODS`: the built-ins and any a program registered)."""
    return _choice(cfg, key, default, tuple(METHODS))


def _init(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    """``auto`` (the method's ``default_init``) or one of the method's ``inits``."""
    method = method_named(parsed["method"])
    value = cfg.get(key, default)
    if value == "auto":
        return method.default_init
    if value not in method.inits:
        within = f" with method={method.name!r}" if method.inits != INITS else ""
        raise ConfigError(f"{key}={value!r} is not allowed{within}; choose one of auto, {', '.join(method.inits)}")
    return value


def _classes(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> tuple[int, ...]:
    """'' (all), '5-9', '0,2,4' or a mix ('0-2,7'); sorted, each once. Every label must be one of the
    built-in dataset's, which is checked before a range is expanded."""
    value, dataset = cfg.get(key, default), parsed["dataset"]
    wrong = ConfigError(
        f"{key}={value!r} is not allowed; give class labels >= 0 as a comma-separated list of labels "
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
            f"{key}={value!r} is not allowed with dataset={dataset!r}: it filters the built-in datasets; "
            "return the classes you want from your dataset factory instead"
        )
    count = SPECS[dataset].num_classes
    if max(last for _, last in ranges) >= count:
        raise ConfigError(f"{key}={value!r} is not allowed with dataset={dataset!r}: its labels are 0-{count - 1}")
    return tuple(sorted({label for first, last in ranges for label in range(first, last + 1)}))


def _path(what: str, *, empty: bool = False, strip: bool = False) -> Callable[..., str]:
    """A path key: a string (``~`` is expanded where it is used); '' only where ``empty``."""

    def parse(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
        value = cfg.get(key, default)
        if not isinstance(value, str) or not (empty or value.strip()):
            raise ConfigError(f"{key}={value!r} is not allowed; {what}")
        return value.strip() if strip else value

    return parse


def _link_codec(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    value = _choice(cfg, key, default, ("auto", *LINK_CODECS))
    if value != "auto":
        return value
    carried = method_named(parsed["method"]).carries_error(parsed["pattern"])
    return RunConfig.downlink_codec if carried else "float32"  # a lossy link's residual must be carried


def _uplink(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    """``auto``: the method's ``default_uplink``. Under secure aggregation a code of a client's own
    would save nothing (the masks sum field elements), so a method whose default is a code sends
    ``int8`` codes on the round's shared grid where the run sets that grid (:func:`_grid_missing`),
    and ``float32`` values where it does not."""
    value = _choice(cfg, key, default, ("auto", *UPLINKS))
    if value != "auto":
        return value
    method_default = method_named(parsed["method"]).default_uplink
    if not parsed["secure-aggregation"] or method_default == "float32":
        return method_default
    return "float32" if _grid_missing(parsed["dp"], parsed["update-norm-bound"], parsed["max-examples"]) else "int8"


def _grid_missing(dp: str, update_norm_bound: float, max_examples: int) -> str:
    """Why a secure round's clients cannot round onto one shared grid (:class:`fedmud.secagg.CodeGrid`),
    or "" when they can: the grid is sized by the norm every update keeps (the DP clip, or
    ``update-norm-bound``) and, without DP, fills as a client's examples fill ``max-examples``."""
    if dp != "off":
        return ""
    if update_norm_bound <= 0:
        return (
            "needs update-norm-bound > 0 or dp: every client rounds onto one grid, sized by the norm every update "
            "keeps; set update-norm-bound (or dp-clip with dp), or uplink='float32'"
        )
    if max_examples == BoundsConfig().max_examples:
        return (
            f"needs max-examples set near your largest partition (it is at its default, {max_examples}): every "
            "client rounds weight/max-examples · update onto the same grid, so a client of E examples fills only "
            "E/max-examples of it"
        )
    return ""


def _stochastic_rounding(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> bool:
    """``auto``: unbiased rounding where a levelled code has no error memory to correct its bias."""
    value = cfg.get(key, default)
    if value == "auto":
        return parsed["uplink"] in LEVELLED_UPLINKS and not parsed["error-feedback"]
    return _flag(cfg, key, default)


def _model(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    """A built-in, ``package.module:factory`` or ``hf:SOURCE`` (checked when the model is built)."""
    value = cfg.get(key, default)
    if is_hf_source(value):
        return value.strip()
    if value not in MODELS and not is_import_string(value):
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(MODELS)}, give a factory as "
            "'package.module:factory', or a Hugging Face model as 'hf:DIRECTORY'"
        )
    return value


def _task(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    value = cfg.get(key, default)
    if not isinstance(value, str) or not (value in TASKS or is_import_string(value)):
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of {', '.join(TASKS)} or give 'package.module:factory'"
        )
    return value


def _tokenizer(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> str:
    """``auto``, ``bytes``, ``hf:SOURCE`` or ``package.module:factory`` (loaded with the text). ``auto``
    becomes the model's ``hf:SOURCE`` when the ``model`` key names one (its directory holds the tokenizer
    it was trained with); with any other model it stays ``auto``, refused only if the data is text."""
    value = cfg.get(key, default)
    if value == "auto":
        model = cfg.get("model", RunConfig.model)
        return model.strip() if is_hf_source(model) else value
    if isinstance(value, str) and (value == "bytes" or is_hf_source(value) or is_import_string(value)):
        return value.strip()
    raise ConfigError(
        f"{key}={value!r} is not allowed; choose auto, bytes, 'hf:DIRECTORY' (or a hub name) or give a factory "
        "as 'package.module:factory'"
    )


def _median_multiple(cfg: Mapping[str, Any], key: str, default: Any, parsed: Mapping[str, Any]) -> float:
    multiple = _number(cfg, key, default, low=0.0)
    if 0 < multiple < 1:  # below the median: half of the honest replies would be cut
        raise ConfigError(f"{key}={multiple!r} is not allowed; it must be 0 (off) or a number >= 1")
    return multiple


# --- the keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecompositionConfig:
    """How each round's model update is parameterised (the method and its shape)."""

    method: str = key(
        "fedmud",
        "; ".join(f"`{m.name}` {m.help}" for m in METHODS.values()),
        choices=BUILTIN_METHODS, parse=_method,
    )
    kind: str = key("kron", "`fedmud`: block-wise Kronecker (BKD) or low-rank matrix update", choices=KINDS)
    pattern: str = key(
        "aad",
        "`fedmud`: which factors are trained: `ab` both; `fab` one frozen seed-drawn factor and one trained; "
        "`aad` aggregation-aware, two branches each linear in its trained factor, so aggregation is exact",
        choices=PATTERNS,
    )
    ratio: float = key(
        1 / 32,
        "upload target in bytes vs dense FedAvg's float32 upload, dense layers and BatchNorm included, as the "
        "float32 `uplink` codes it (a lossy one sends fewer; not the LoRA methods: their size is `lora-rank`)",
        shown="1/32", parse=_ratio, allowed="(0, 1], as a number or a fraction",
    )
    dense_layers: tuple[str, ...] = key(
        ("auto",),
        "tensors trained densely; `auto`: the paper's first and last layers when they fit the ratio (see "
        "[Any model](#any-model-and-dataset)); for `lora`/`ffa-lora` the last layer (the head)",
        shown="auto", parse=_dense_layers, allowed="`auto`, `first`, `last`, tensor names, module names",
    )
    vector_uplink: str = key(
        "auto",
        "how 1-D tensors and buffers (biases, norm weights, running statistics), which always upload dense, "
        "travel when `uplink` codes at more than 8 bits: `int8` (their residual, 1 byte a value), `uplink` "
        "(as the rest), `auto` int8 only when `ratio` cannot be reached with them at float32 (see "
        "[Any model](#any-model-and-dataset))",
        choices=VECTOR_UPLINKS,
    )
    init: str = key(
        "nonzero-compensated",
        "how factors start (see [Initialisation](#initialisation)); `auto` is `nonzero-compensated` for "
        "`fedmud` and `zero` (Init[A]) for `lora` and `ffa-lora` "
        "([why](docs/finetune-lm.md)); the LoRA methods take `zero`, `nonzero` and (`lora` only) `hrp`",
        shown="auto", parse=_init, allowed=", ".join(f"`{i}`" for i in ("auto", *INITS)),
    )
    init_scale: float = key(
        0.1, "trained-factor std at init, in units of 1/√fan_in", low=0.0, high=SCALE_RANGE[1]
    )
    frozen_scale: float = key(
        4.0,
        "frozen-factor std, in units of the std that makes T → ΔW an isometry in expectation (the subspace's "
        "effective learning rate grows with its square)",
        low=SCALE_RANGE[0], high=SCALE_RANGE[1],
    )
    hrp_rounds: int = key(
        1,
        "`init=hrp`: preheat rounds whose merged update sets the frozen factors' directions (LoRA: the rounds "
        "at `hrp-rank`)",
        low=1,
    )
    lora_rank: int = key(8, "`lora`/`ffa-lora`: every adapter's rank r", low=1)
    lora_alpha: float = key(
        16.0, "`lora`/`ffa-lora`: the adapters' scale numerator: each adds (α/r)·B·A",
        low=LORA_ALPHA_RANGE[0], high=LORA_ALPHA_RANGE[1],
    )
    lora_init_scale: float = key(
        1.0,
        "`lora`/`ffa-lora` with `init=nonzero`: the initial (α/r)·B·A's std, in units of PyTorch's default "
        "init of the weight",
        low=0.0, high=SCALE_RANGE[1],
    )
    hrp_rank: int = key(
        32, "`lora` with `init=hrp`: the preheat adapters' rank, above `lora-rank`", low=1,
        allowed="> `lora-rank`",
    )


@dataclass(frozen=True)
class UplinkConfig:
    """How a client's upload is encoded (see :mod:`fedmud.codec`)."""

    codec: str = key(
        "int4",
        "upload codec (see [Compressed uploads](#compressed-uploads)); the lossy codecs code the residual "
        "against the round-start values both parties know; `auto` is `int4` for `fedmud` and `lora` and "
        "`float32` for the others. `secure-aggregation` takes `float32`, `int8` and `int4`: codes on a grid every "
        "client shares, set by `update-norm-bound` (with `max-examples`) or `dp-clip`; there `auto` is `int8` "
        "for `fedmud` and `lora` where the run sets that grid, else `float32` (see [Privacy](#privacy-secure-aggregation-and-"
        "differential-privacy))",
        name="uplink", shown="auto", parse=_uplink, allowed=", ".join(f"`{c}`" for c in ("auto", *UPLINKS)),
    )
    error_feedback: bool = key(
        False,
        "keep what a lossy codec lost and add it to the next upload (for decomposed layers, projected onto "
        "the next round's trainable factors)",
    )
    topk_ratio: float = key(
        1 / 32, "`uplink=topk`: bytes sent as a fraction of dense float32 bytes (8 bytes a kept value)",
        shown="1/32", parse=_ratio, allowed="(0, 1], as a number or a fraction",
    )
    stochastic_rounding: bool = key(
        True,
        "`int8`/`int4`/`int2`/`sign` round at random, unbiased, instead of to the nearest level (each "
        "client's generator seeded by the round seed and its partition); `auto`: on with those codes unless "
        "`error-feedback` carries their error",
        shown="auto", parse=_stochastic_rounding, allowed="`auto`, `true`, `false`",
    )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client; the optimiser is created afresh every round."""

    optimizer: str = key(
        "sgd",
        "local training's optimiser, created afresh every round: `sgd` (with `momentum`, as in the paper) or "
        "`adam` (PyTorch's defaults; what LoRA fine-tuning usually runs with)",
        choices=OPTIMIZERS,
    )
    lr: float = key(0.05, "local learning rate", low=0.0, high=MAX_STEP, low_open=True)
    momentum: float = key(0.0, "SGD momentum (`optimizer=sgd`)", low=0.0, high=1.0)
    weight_decay: float = key(0.0, "weight decay", low=0.0, high=MAX_STEP)
    local_epochs: int = key(2, "epochs over the client's partition each round", low=1)
    batch_size: int = key(32, "local batch size", low=1)
    autocast: str = key(
        "off",
        "local training's forward and loss in lower precision (`torch.autocast`): `bf16`, or `fp16` with "
        "a gradient scaler on CUDA; the factors, the merges and everything sent stay float32, so parties "
        "still agree bitwise",
        choices=("off", "bf16", "fp16"),
    )


@dataclass(frozen=True)
class DataConfig:
    """Dataset, the task its labels serve, text tokenisation, held-out split and partitioning over
    clients (see :mod:`fedmud.data`). The task is declared here because the data depends on it: under
    ``causal-lm`` a text's labels are its own tokens; :attr:`RunConfig.task` reads it."""

    dataset: str = key(
        "mnist5k",
        "`mnist5k` and `digits` are embedded (split with `test-fraction`); the others are read from "
        "`data-root` in torchvision's layout with their official splits; see [Datasets](#datasets) and "
        "[your own data](#your-own-model-and-data)",
        choices=DATASETS, factory=True,
    )
    task: str = key(
        "classification",
        "loss and metric, and what the data's labels are: cross-entropy and accuracy over class labels "
        "(`sequence-classification`: the same, over text's `label` column), MSE, next-token cross-entropy and "
        "accuracy over the predicted tokens (`causal-lm`: perplexity is exp(loss); the labels are the tokens), "
        "or a `fedmud.task.Task` (see [your own model](#your-own-model-and-data))",
        parse=_task, allowed=", ".join(f"`{t}`" for t in (*TASKS, "package.module:factory")),
    )
    tokenizer: str = key(
        "auto",
        "text datasets (a `text` column): `auto` is the tokenizer saved in the `hf:DIRECTORY` model's directory; "
        "`bytes` a built-in byte-level one (UTF-8 bytes and pad, bos, eos; no files); `hf:DIRECTORY` (or a hub "
        "name) what `save_pretrained` wrote; or a factory returning a Hugging Face tokenizer; see "
        "[Text](#text-datasets)",
        parse=_tokenizer, allowed="`auto`, `bytes`, `hf:DIRECTORY`, `package.module:factory`",
    )
    max_length: int = key(128, "text datasets: tokens kept of each text (special tokens included)", low=2)
    partition: str = key(
        "iid",
        "flwr-datasets partitioner: `dirichlet` draws label proportions from Dir(`alpha`); `label-count`: each "
        "client holds a fixed number of classes; `natural`: one partition per distinct label (a domain split; "
        "`num-partitions` must equal their number); at most one partition per train example (`dirichlet`: per "
        "two), checked where the data is loaded, the server's held-out split included",
        choices=PARTITIONS,
    )
    alpha: float = key(0.3, "`partition=dirichlet`: the concentration α", low=0.0, low_open=True)
    num_partitions: int = key(10, "how many partitions the data is split into (one per client)", low=1)
    test_fraction: float = key(
        0.2, "the embedded datasets' held-out split (it must hold out at least one example)",
        low=0.0, high=0.9, low_open=True,
    )
    seed: int = key(42, "the embedded sets' train/test split and the partitioners' draws", name="data-seed", low=0)
    root: str = key(
        "data",
        "where the torchvision datasets are read from (and downloaded to); `~` expanded, relative to the "
        "current directory",
        name="data-root", parse=_path("it must be a non-empty directory path"), allowed="a directory",
    )
    label_fraction: float = key(
        0.3, "`partition=label-count`: each client holds max(1, round(fraction × classes)) classes",
        low=0.0, high=1.0, low_open=True,
    )
    classes: tuple[int, ...] = key(
        (),
        "built-in datasets: keep only these labels in train and test (labels keep their values, so the head "
        "stays the dataset's); `\"\"`: all",
        shown="", parse=_classes, allowed="the dataset's labels and ranges of them, e.g. `5-9`, `0,2,4`",
    )


@dataclass(frozen=True)
class BoundsConfig:
    """What one valid reply may do to the global model (see :mod:`fedmud.bounds`)."""

    max_examples: int = key(
        100_000,
        "a reply's `num-examples` above this counts as this (logged, counted as `capped`): the server cannot "
        "check the claim, and it is the reply's weight; the default is above every built-in training set; set "
        "it to your largest partition",
        low=1,
    )
    update_norm_bound: float = key(
        0.0, "L2 bound on each reply's update (decoded upload − round-start values); `0` = off",
        low=0.0, high=MAX_NORM,
    )
    update_norm_action: str = key(
        "clip",
        "above a bound: scale the update to it (`clipped`), or drop the reply (`norm-rejected`; the node still "
        "holds the round's model)",
        choices=NORM_ACTIONS,
    )
    median_norm_bound: float = key(
        10.0,
        "the bound in force by default: each reply's update norm is at most this multiple of the (lower) "
        "median update norm of the last 3 rounds' valid replies (the round's own in the first), so one client "
        "cannot move the model by orders of magnitude more than its peers; `update-norm-action` applies; `0` = "
        "off; not under DP (`dp-clip` bounds every update) or secure aggregation (the server sees only the "
        "sum); see [Faults](#faults-checkpoints-resume)",
        parse=_median_multiple, allowed="0 or ≥ 1",
    )


@dataclass(frozen=True)
class PrivacyConfig:
    """Secure aggregation and client-level differential privacy (see :mod:`fedmud.privacy`)."""

    secure_aggregation: bool = key(
        False,
        "each round is Flower's SecAgg+: the server learns only the (weighted) sum of the clients' updates; not "
        "with `uplink=topk`; see [Privacy](#privacy-secure-aggregation-and-differential-privacy)",
    )
    secagg_shares: float = key(
        1.0,
        "the fraction of the round's clients each client secret-shares its keys with (SecAgg+'s neighbourhood)",
        low=0.0, high=1.0, low_open=True,
    )
    secagg_threshold: float = key(
        0.5,
        "the fraction of those shares that rebuild a dropped client's masks: more tolerates fewer dropouts, "
        "fewer trusts fewer colluders",
        low=0.0, high=1.0, low_open=True,
    )
    dp: str = key(
        "off",
        "client-level DP: Gaussian noise on the sum added by the server, or split over the clients (`client` "
        "needs `secure-aggregation=true`)",
        choices=DP_MODES,
    )
    dp_clip: float = key(
        1.0, "the L2 norm each client's update (factor space) is clipped to", low=0.0, high=MAX_NORM, low_open=True
    )
    dp_noise_multiplier: float = key(
        0.0, "σ: the noise std over `dp-clip`; give it or `dp-epsilon` when `dp` is on",
        low=0.0, high=MAX_NOISE_MULTIPLIER,
    )
    dp_epsilon: float = key(
        0.0, "the ε to reach after `num-server-rounds` rounds; σ is calibrated with the accountant", low=0.0
    )
    dp_delta: float = key(1e-5, "the δ ε is stated at", low=0.0, high=0.1, low_open=True)


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs: the run's own keys and its groups of keys."""

    rounds: int = key(10, "rounds", name="num-server-rounds", low=1)
    fraction_train: float = key(
        1.0, "the fraction of the clients sampled each round (by partition, seeded by `seed`)",
        low=0.0, high=1.0, low_open=True,
    )
    min_train_nodes: int = key(2, "the clients a round waits for before it samples", low=1)
    seed: int = key(0, "run seed (model init, round seeds, client sampling)", low=0)
    model: str = key(
        "auto",
        "`auto` picks the paper's CNN: `cnn-mnist` for 1×28×28 datasets, `cnn-cifar` for 3×32×32; see "
        "[built-in models](#built-in-models); `hf:DIRECTORY` loads what Hugging Face's `save_pretrained` "
        "wrote, with a head for the task and data (`causal-lm`: its language-model head; text: its tokenizer is "
        "`tokenizer=auto`) (`hf:NAME` from the hub, where reachable)",
        choices=MODELS, parse=_model,
        allowed=", ".join(f"`{m}`" for m in MODELS) + ", `package.module:factory`, `hf:DIRECTORY`",
    )
    run_dir: str = key(
        "runs", "where each run makes its own directory (`<run-dir>/<timestamp>`)",
        parse=_path("give the directory runs are written under (a non-empty path)"), allowed="a directory",
    )
    downlink: str = key(
        "chain", "send each client what it lacks (or the full model when that is cheaper), or the full model "
        "every round", choices=DOWNLINKS,
    )
    downlink_codec: str = key(
        "int4",
        "how each chain link is coded; `auto` is `int4` (`float32` under `pattern=ab`, whose update is not "
        "linear in its factors); see [Compressed downlink](#compressed-downlink)",
        shown="auto", parse=_link_codec, allowed=", ".join(f"`{c}`" for c in ("auto", *LINK_CODECS)),
    )
    client_state: str = key(
        "keep",
        "`none`: clients keep nothing between rounds (cross-device); every download starts from round 0 "
        "(the chain from there, or an anchor and the chain since it: `anchor-codec`)",
        choices=CLIENT_STATES,
    )
    anchor_codec: str = key(
        "int4",
        "with `client-state=none`: how the anchor a stateless client downloads with the chain since it is "
        "coded (then deflated; refreshed so that a download stays within 1/8 of the full model; see "
        "[Compressed downlink](#compressed-downlink)); `none`: the chain from round 0, or the full model",
        choices=ANCHOR_CODECS,
    )
    round_timeout: float = key(
        600.0, "seconds a round waits for replies (at most 12 h, the life of a Flower message)",
        low=0.0, high=MAX_ROUND_TIMEOUT, low_open=True,
    )
    min_replies: int = key(
        1, "valid replies a round needs to be merged; fewer and it is skipped, with the reason logged", low=1
    )
    resume: str = key(
        "", "continue that run from its checkpoint (`\"\"`: a new run)",
        parse=_path("give a run directory to continue, or '' for a new run", empty=True),
        allowed="a run directory",
    )
    fault_corrupt_state_round: int = key(
        0, "fault injection for tests: clients corrupt their copy in that round (`0` = off)", low=0
    )
    init_weights: str = key(
        "",
        "pretrained weights every party loads as round 0 (see "
        "[Fine-tuning](#fine-tuning-a-pretrained-model-lora)); `\"\"`: the model factory's weights from `seed`",
        parse=_path("give the path of a state_dict file, or '' for none", empty=True, strip=True), allowed="a state_dict file",
    )
    bounds: BoundsConfig = section(BoundsConfig)
    privacy: PrivacyConfig = section(PrivacyConfig)
    decomposition: DecompositionConfig = section(DecompositionConfig)
    uplink: UplinkConfig = section(UplinkConfig)
    train: TrainConfig = section(TrainConfig)
    data: DataConfig = section(DataConfig)

    @property
    def task(self) -> str:
        """The ``task`` key (declared on :class:`DataConfig`, whose labels depend on it)."""
        return self.data.task


def _is_section(f: Field) -> bool:
    return isinstance(f.default_factory, type) and is_dataclass(f.default_factory)


def _key_fields(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Field]]:
    """Every key's field of a config dataclass with its path, e.g. (('train', 'lr'), <field lr>)."""
    for f in fields(cls):
        if _is_section(f):
            yield from _key_fields(f.default_factory, (*prefix, f.name))
        else:
            yield (*prefix, f.name), f


def _type(f: Field) -> str:
    """A key's type by name ('int', 'float', 'bool', 'str', ...), annotated as a string or not."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _name(f: Field) -> str:
    return f.metadata["key"].name or f.name.replace("_", "-")


def keys(schema: type) -> dict[tuple[str, ...], Field]:
    """Every key of a schema (:class:`RunConfig`, or one that extends it) by its field's path, in
    declaration order."""
    return dict(_key_fields(schema))


KEYS = keys(RunConfig)
# Every key :func:`parse_run_config` reads (pyproject.toml declares the same set).
RUN_CONFIG_KEYS = frozenset(_name(f) for f in KEYS.values())


def run_config_key(path: tuple[str, ...]) -> str:
    """The run-config key of a :class:`RunConfig` field, e.g. ('train', 'local_epochs') -> 'local-epochs'."""
    return _name(KEYS[tuple(path)])


APP_KEY_HINT = (
    "an app's own keys go under a name of its own, as 'myapp.key' (a [tool.flwr.app.config.myapp] table in "
    "pyproject.toml, or -c myapp.key=...), which FedMUD leaves to the app"
)


def _nearest_key(key: object, declared: dict[tuple[str, ...], Field]) -> str | None:
    """The known key ``key`` most likely misspells, or None. It is matched against the keys and the
    field names people write instead ('rounds' for num-server-rounds, 'codec' for uplink)."""
    if not isinstance(key, str):
        return None
    spellings = {path[-1].replace("_", "-"): _name(f) for path, f in declared.items()}
    spellings |= {_name(f): _name(f) for f in declared.values()}
    spelt = key.strip().lower().replace("_", "-")
    if spelt in spellings:
        return spellings[spelt]
    near = difflib.get_close_matches(spelt, spellings, n=1, cutoff=0.6)
    return spellings[near[0]] if near else None


def _check_keys(cfg: Mapping[str, Any], schema: type) -> None:
    """Refuse a key FedMUD does not know (a misspelt one would silently keep its default); dotted
    keys ('myapp.key', from a sub-table of the app's config) belong to the app and are left alone."""
    declared = keys(schema)
    known = {_name(f) for f in declared.values()}
    unknown = [key for key in cfg if key not in known and not (isinstance(key, str) and "." in key)]
    if not unknown:
        return
    named = []
    for key in unknown:
        near = _nearest_key(key, declared)
        named.append((f"{key}={cfg[key]!r}" if isinstance(key, str) else f"key {key!r}", near))
    listing = f"Known keys: {', '.join(sorted(known))}; {APP_KEY_HINT}"
    if len(named) == 1:
        (what, near), = named
        guess = f"; did you mean {near}?" if near else "."
        raise ConfigError(f"{what} is not allowed: there is no such key{guess} {listing}")
    listed = ", ".join(what + (f" (did you mean {near}?)" if near else "") for what, near in named)
    raise ConfigError(f"{listed} are not allowed: there are no such keys. {listing}")


def _check_combinations(run: RunConfig) -> None:
    d, u = run.decomposition, run.uplink
    method = method_named(d.method)
    if d.init == "hrp" and not method.preheats:
        preheating = " or ".join(repr(m.name) for m in METHODS.values() if m.preheats)
        raise ConfigError(f"init='hrp' is not allowed with method={d.method!r}; it needs method={preheating}")
    method.check(run)  # its own rules first: they say why in its terms
    if not method.carries_error(d.pattern):
        lossy = [f"{k}={v!r}" for k, v, on in (
            ("error-feedback", True, u.error_feedback), ("downlink-codec", run.downlink_codec, SCHEMES[run.downlink_codec].residual)
        ) if on]
        if lossy:
            raise ConfigError(
                f"{lossy[0]} is not allowed with method={d.method!r}: it cannot carry what a lossy code lost into "
                "the next round; set error-feedback=false and downlink-codec float32"
            )
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


def _check_downlink(run: RunConfig) -> None:
    if run.client_state == "none" and run.uplink.error_feedback:
        raise ConfigError(
            "error-feedback=true is not allowed with client-state='none': a client keeps what its code lost "
            "until its next upload, and a client that keeps no state has nowhere to keep it; set "
            "error-feedback=false or client-state='keep'"
        )
    if run.client_state == "none" and run.anchor_codec != "none" and run.decomposition.init == "hrp":
        raise ConfigError(
            f"anchor-codec={run.anchor_codec!r} is not allowed with init='hrp' and client-state='none': the "
            "anchor is coded against round 0, and the preheat changes the model's layout; set anchor-codec='none'"
        )


def _check_secure_uplink(run: RunConfig) -> None:
    """Under secure aggregation the masks sum what every client sends: float32 values (one field
    element each) or int8/int4 codes on one grid every client shares (:class:`fedmud.secagg.CodeGrid`),
    which the norm every update keeps sets."""
    u, p = run.uplink, run.privacy
    if not p.secure_aggregation:
        return
    if SCHEMES[u.codec].sparse:
        raise ConfigError(
            f"secure-aggregation=true is not allowed with uplink={u.codec!r}: secure aggregation sums "
            "every client's whole vector, and a sparse upload's positions differ between clients; choose "
            f"float32 or one of {', '.join(GRID_HALVES)}"
        )
    if u.codec != "float32" and u.codec not in GRID_HALVES:
        raise ConfigError(
            f"uplink={u.codec!r} is not allowed with secure-aggregation=true: the masks sum every client's values, "
            f"so a value travels as float32 (a field element) or as a code on a grid every client shares: "
            f"float32, {', '.join(GRID_HALVES)}"
        )
    missing = _grid_missing(p.dp, run.bounds.update_norm_bound, run.bounds.max_examples)
    if u.codec in GRID_HALVES and missing:
        raise ConfigError(f"uplink={u.codec!r} with secure-aggregation=true {missing}")
    if u.error_feedback:
        raise ConfigError(
            "error-feedback=true is not allowed with secure-aggregation=true: a client's upload is summed under "
            "masks, not coded on its own, so there is no code error for it to carry; set error-feedback=false"
        )
    if u.codec in GRID_HALVES and not u.stochastic_rounding:
        raise ConfigError(
            f"stochastic-rounding=false is not allowed with secure-aggregation=true and uplink={u.codec!r}: codes summed "
            "under masks are rounded without bias, so that their sum's error averages out; set stochastic-rounding=auto"
        )


def _check_privacy(p: PrivacyConfig, uplink: UplinkConfig, cfg: Mapping[str, Any]) -> None:
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


def _parse(cfg: Mapping[str, Any], f: Field, parsed: Mapping[str, Any]) -> Any:
    """One key's value from ``cfg`` (or its default), checked as its :class:`Key` declares."""
    k, name = f.metadata["key"], _name(f)
    default = f.default if k.shown is None else k.shown
    if k.parse is not None:
        return k.parse(cfg, name, default, parsed)
    if _type(f) == "bool":
        return _flag(cfg, name, default)
    if _type(f) in ("int", "float"):
        return _number(cfg, name, default, integer=_type(f) == "int", low=k.low, high=k.high, low_open=k.low_open)
    if k.factory:
        return _builtin_or_factory(cfg, name, default, k.choices)
    return _choice(cfg, name, default, k.choices)


def _build(cls: type, cfg: Mapping[str, Any], parsed: dict[str, Any]) -> Any:
    """A config dataclass from ``cfg``: its sections first (a run's own keys may read them:
    ``downlink-codec`` reads ``pattern``), then its keys in declaration order."""
    values = {f.name: _build(f.default_factory, cfg, parsed) for f in fields(cls) if _is_section(f)}
    for f in fields(cls):
        if not _is_section(f):
            values[f.name] = parsed[_name(f)] = _parse(cfg, f, parsed)
    return cls(**values)


def parse_run_config(cfg: Mapping[str, Any], schema: type[RunConfig] = RunConfig) -> RunConfig:
    """Validate a flat Flower run config into a :class:`RunConfig` (or ``schema``, a subclass
    that declares more keys).

    Every key must be one of :data:`RUN_CONFIG_KEYS` or an app's own, dotted ('myapp.key'); a
    misspelt key is refused with the nearest known one rather than left at its default. Each key is
    checked as its field declares; what depends on several keys is checked after.
    """
    _check_keys(cfg, schema)
    run = _build(schema, cfg, {})
    _check_combinations(run)
    _check_privacy(run.privacy, run.uplink, cfg)
    _check_secure_uplink(run)
    _check_downlink(run)
    return run


# --- the keys as documentation: pyproject.toml's [tool.flwr.app.config] and the README's table ---

# The order a reader meets them in: the method first, the safeguards last.
_SECTION_ORDER = ("decomposition", "uplink", "train", "data", "", "bounds", "privacy")
_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _documented(schema: type) -> list[Field]:
    declared = keys(schema)
    rank = {name: i for i, name in enumerate(_SECTION_ORDER)}
    paths = sorted(declared, key=lambda path: rank.get(path[0] if len(path) > 1 else "", len(rank)))
    return [declared[path] for path in paths]


def _shown(f: Field) -> Any:
    k = f.metadata["key"]
    return f.default if k.shown is None else k.shown


def _number_text(x: float) -> str:
    if x >= 1e4 and math.log10(x).is_integer():
        return "10" + str(int(math.log10(x))).translate(_SUPERSCRIPT)
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def allowed_text(f: Field) -> str:
    """What a key allows, in Markdown (the README table's third column)."""
    k = f.metadata["key"]
    if k.allowed:
        return k.allowed
    if _type(f) == "bool":
        return "`true`, `false`"
    if _type(f) in ("int", "float"):
        low = "" if k.low is None else _number_text(k.low)
        if k.high is None:
            return f"{'>' if k.low_open else '≥'} {low}"
        return f"{'(' if k.low_open else '['}{low}, {_number_text(k.high)}]"
    names = [*k.choices, *(["package.module:factory"] if k.factory else [])]
    return ", ".join(f"`{n}`" for n in names)


def markdown_table(schema: type = RunConfig) -> str:
    """The README's table of every key: key, default, what it allows, what it means."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in _documented(schema):
        value = _shown(f)
        default = "true" if value is True else "false" if value is False else value
        default = '""' if default == "" else _number_text(default) if isinstance(default, float) else default
        rows.append(f"| `{_name(f)}` | `{default}` | {allowed_text(f)} | {f.metadata['key'].help} |")
    return "\n".join(rows) + "\n"


def toml_table(schema: type = RunConfig) -> str:
    """``pyproject.toml``'s ``[tool.flwr.app.config]``: every key at its default, with what it allows."""
    lines = ["[tool.flwr.app.config]"]
    for f in _documented(schema):
        value = _shown(f)
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, bool)) else repr(value)
        lines.append(f"{_name(f)} = {text}".ljust(28) + " # " + allowed_text(f).replace("`", ""))
    return "\n".join(lines) + "\n"
