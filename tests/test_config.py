"""Bad configuration stops with one message naming the key, the value and what is allowed."""

import math
from dataclasses import asdict

import pytest

from fedmud.config import (
    INT64_MAX,
    LORA_ALPHA_RANGE,
    MAX_NOISE_MULTIPLIER,
    RUN_CONFIG_KEYS,
    SCALE_RANGE,
    ConfigError,
    RunConfig,
    parse_run_config,
)
from fedmud.mud import decompose
from fedmud.models import CNN


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("pattern", "abc", "ab, fab, aad"),
        ("kind", "tucker", "kron, mat"),
        ("method", "fedprox", "fedmud, fedavg, fedlmt, fedpara"),
        ("init", "random", "auto, zero, nonzero, nonzero-compensated, hrp"),
        ("uplink", "int3", "float32, float16, int8, int4, int2, sign, topk"),
        ("downlink-codec", "topk", "float32, float16, int8, int4, int2, sign"),
        ("error-feedback", "yes", "true or false"),
        ("topk-ratio", 2, "<= 1.0"),
        ("hrp-rounds", 0, ">= 1"),
        ("ratio", 0, "> 0.0"),
        ("ratio", -0.5, "> 0.0"),
        ("ratio", 1.5, "<= 1.0"),
        ("ratio", "one/32", "fraction like '1/32'"),
        ("lr", 0.0, "> 0.0"),
        ("local-epochs", 1.5, "an integer"),
        ("partition", "pathological", "iid, dirichlet"),
        ("max-examples", 0, "an integer >= 1"),
        ("max-examples", 1e6, "an integer"),
        ("update-norm-bound", -1.0, "a number >= 0.0"),
        ("update-norm-bound", "10", "a number"),
        ("update-norm-bound", float("nan"), "a finite number"),
        ("update-norm-action", "drop", "choose one of reject, clip"),
        # values that used to pass and crash later (issue 24, point 11)
        ("classes", "0-1000000000000", "its labels are 0-9"),
        ("dp-noise-multiplier", 1e300, "<= 10000.0"),
        ("lora-alpha", 1e300, "<= 100000.0"),
        ("lora-alpha", 1e-300, ">= 0.001"),
        ("lora-init-scale", 1e300, "<= 1000.0"),
        ("init-scale", 1e300, "<= 1000.0"),
        ("frozen-scale", 1e300, "<= 1000.0"),
        ("frozen-scale", 1e-300, ">= 0.001"),
        ("lr", 1e300, "<= 1000000.0"),
        ("weight-decay", 1e300, "<= 1000000.0"),
        ("dp-clip", 1e300, "<= 1000000.0"),
        ("update-norm-bound", 1e300, "<= 1000000.0"),
        ("round-timeout", 1e300, "<= 43200.0"),
        ("seed", 2**64, "an integer >= 0 and <= 9223372036854775807"),
        ("data-seed", 2**64, "<= 9223372036854775807"),
        ("num-server-rounds", 2**64, "<= 9223372036854775807"),
        ("alpha", 10**400, "a finite number"),
        ("run-dir", 3, "give the directory runs are written under (a non-empty path)"),
        ("run-dir", "", "a non-empty path"),
        ("resume", None, "give a run directory to continue, or '' for a new run"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    message = str(err.value)
    assert message.startswith(f"{key}={value!r}")
    assert allowed in message


def test_ratio_accepts_fractions():
    assert parse_run_config({"ratio": "1/32"}).decomposition.ratio == 1 / 32
    assert parse_run_config({"ratio": 0.25}).decomposition.ratio == 0.25


def test_unknown_dense_layer_lists_the_model_tensors():
    run = parse_run_config({"dense-layers": "first,features.99"})
    with pytest.raises(ConfigError, match=r"'features.99'.*allowed: auto, first, last, .*features.0.weight, features.4.weight"):
        decompose(CNN(), run.decomposition)


def test_ratio_below_what_the_model_can_reach_is_refused_with_the_smallest_ratio():
    run = parse_run_config({"ratio": "1/1000"})
    with pytest.raises(ConfigError, match=r"ratio=0.001 \(1/1000.0\) cannot be reached .* allowed: ratio >= "):
        decompose(CNN(), run.decomposition)


def test_an_empty_dense_layers_is_refused():
    with pytest.raises(ConfigError, match="dense-layers='' is not allowed; give auto"):
        parse_run_config({"dense-layers": ""})


def test_defaults_parse():
    run = parse_run_config({})
    assert (run.decomposition.kind, run.decomposition.pattern, run.decomposition.ratio) == ("kron", "aad", 1 / 32)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"init": "hrp", "method": "fedavg"}, "init='hrp' is not allowed with method='fedavg'"),
        ({"error-feedback": True, "uplink": "float32"}, "error-feedback=true is not allowed with uplink='float32'"),
        ({"error-feedback": True, "uplink": "int8", "pattern": "ab"}, "not allowed with pattern='ab'"),
        ({"downlink-codec": "int4", "pattern": "ab"}, "downlink-codec='int4' is not allowed with pattern='ab'"),
        (
            {"client-state": "none", "uplink": "sign", "error-feedback": True},
            "error-feedback=true is not allowed with client-state='none'",
        ),
        ({"stochastic-rounding": True, "uplink": "float32"}, "stochastic-rounding=true is not allowed with uplink='float32'"),
        ({"stochastic-rounding": True, "uplink": "topk"}, "stochastic-rounding=true is not allowed with uplink='topk'"),
    ],
)
def test_combinations_that_cannot_work_are_refused(cfg, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(cfg)


def test_reply_bounds_default_to_a_finite_examples_cap_and_no_norm_bound():
    bounds = parse_run_config({}).bounds
    assert (bounds.max_examples, bounds.update_norm_bound, bounds.update_norm_action) == (100_000, 0.0, "clip")
    bounds = parse_run_config({"max-examples": 500, "update-norm-bound": 3, "update-norm-action": "reject"}).bounds
    assert (bounds.max_examples, bounds.update_norm_bound, bounds.update_norm_action) == (500, 3.0, "reject")


def test_the_pyproject_defaults_are_the_parsers_defaults_for_the_reply_bounds():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(config).bounds == parse_run_config({}).bounds
    assert {"max-examples", "update-norm-bound", "update-norm-action"} <= set(config)


def test_downlink_codec_auto_is_int4_and_float32_where_the_server_cannot_keep_the_error():
    assert parse_run_config({}).downlink_codec == "int4"
    assert parse_run_config({"pattern": "ab"}).downlink_codec == "float32"
    assert parse_run_config({"pattern": "ab", "downlink-codec": "float32"}).downlink_codec == "float32"
    assert parse_run_config({"method": "fedavg", "pattern": "ab"}).downlink_codec == "int4"  # no factors: dense error


def test_the_pyproject_defaults_are_the_parsers_defaults():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # only the rounds differ: the app runs 10, a RunConfig built in code 20
    assert parse_run_config(config) == parse_run_config({"num-server-rounds": config["num-server-rounds"]})


# --- keys: a misspelt key is refused, not left at its default (issue 24, point 10) -----------------


@pytest.mark.parametrize(
    ("key", "value", "meant"),
    [
        ("secure-aggregaton", True, "secure-aggregation"),
        ("update-norm-bnd", 25, "update-norm-bound"),
        ("update_norm_bound", 25, "update-norm-bound"),  # the field's spelling
        ("rounds", 5, "num-server-rounds"),  # the field's name
    ],
)
def test_a_misspelt_key_is_refused_naming_the_key_it_is_nearest(key, value, meant):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    message = str(err.value)
    assert message.startswith(f"{key}={value!r} is not allowed: there is no such key; did you mean {meant}? Known keys: ")
    assert "alpha, anchor-codec, autocast, batch-size, classes" in message and "'myapp.key'" in message


def test_every_unknown_key_is_named_in_one_message():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"secure-aggregaton": True, "lr": 0.1, "zzz": 1})
    assert str(err.value).startswith(
        "secure-aggregaton=True (did you mean secure-aggregation?), zzz=1 are not allowed: there are no such keys. Known keys: "
    )


def test_an_apps_own_dotted_keys_are_left_to_the_app():
    # [tool.flwr.app.config.myapp] in pyproject.toml reaches the apps as 'myapp.<key>'
    assert parse_run_config({"myapp.schedule": "cosine", "myapp.warmup": 3}) == parse_run_config({})


def test_the_known_keys_are_the_config_fields_and_exactly_what_pyproject_declares():
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == RUN_CONFIG_KEYS
    assert len(RUN_CONFIG_KEYS) == len(_leaves(asdict(RunConfig())))  # one key per field


def test_every_app_in_the_repository_passes_only_keys_fedmud_knows_or_its_own_dotted_ones():
    """What reaches parse_run_config from an app: its [tool.flwr.app.config], flattened as Flower does."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    root = Path(__file__).parents[1]
    for app in ("pyproject.toml", "examples/custom-app/pyproject.toml", "tests/apps/secure_probe/pyproject.toml"):
        declared = tomllib.loads((root / app).read_text())["tool"]["flwr"]["app"]["config"]
        parse_run_config(flatten_dict(declared))  # raises ConfigError on a key FedMUD does not know


def test_run_server_refuses_a_misspelt_key_before_any_round(tmp_path):
    from server.app import RunFailed, run_server

    with pytest.raises(RunFailed, match="secure-aggregaton=True is not allowed: .* did you mean secure-aggregation"):
        run_server(None, {"secure-aggregaton": True, "run-dir": str(tmp_path)})  # no grid: no round can start


# --- values: no number a run config can hold crashes a run later (issue 24, point 11) ------------


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, value in tree.items():
        out.update(_leaves(value, (*prefix, name)) if isinstance(value, dict) else {(*prefix, name): value})
    return out


def _numeric_keys() -> list[str]:
    from fedmud.config import run_config_key

    leaves = _leaves(asdict(RunConfig()))
    return sorted(run_config_key(p) for p, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


@pytest.mark.parametrize("key", _numeric_keys())
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, -(10**400)])
def test_every_numeric_key_refuses_non_finite_and_unbounded_values(key, value):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert str(err.value).startswith(f"{key}={value!r} is not allowed")


def test_the_largest_run_config_integer_is_a_valid_seed():
    run = parse_run_config({"seed": INT64_MAX, "data-seed": INT64_MAX})
    assert (run.seed, run.data.seed) == (INT64_MAX, INT64_MAX)


def test_a_huge_class_range_is_refused_at_once_in_a_short_message():
    import time

    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        parse_run_config({"classes": "0-1000000"})  # used to expand to a million labels, then a 6.9 MB message
    assert time.monotonic() - started < 1 and len(str(err.value)) < 100
    assert parse_run_config({"classes": "99", "dataset": "cifar100"}).data.classes == (99,)


@pytest.mark.parametrize(
    "cfg",
    [
        {"init-scale": SCALE_RANGE[1], "frozen-scale": SCALE_RANGE[0]},
        {"init-scale": SCALE_RANGE[1], "frozen-scale": SCALE_RANGE[1], "kind": "mat"},
        {"method": "lora", "lora-alpha": LORA_ALPHA_RANGE[0], "lora-init-scale": SCALE_RANGE[1]},
        {"method": "lora", "lora-alpha": LORA_ALPHA_RANGE[1], "lora-init-scale": SCALE_RANGE[1]},
        {"method": "ffa-lora", "init": "nonzero", "lora-alpha": LORA_ALPHA_RANGE[0], "lora-init-scale": SCALE_RANGE[1]},
    ],
)
def test_the_round_0_model_is_finite_at_the_ends_of_the_scale_ranges(cfg):
    import torch

    from fedmud.rounds import build_decomposed
    from fedmud.seeds import round_seed

    run = parse_run_config(cfg)
    model = build_decomposed(run)
    model.reset(round_seed(run.seed, 1))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("rate", "rounds"), [(1.0, 1), (0.2, 1000), (0.001, 1)])
def test_the_accountant_states_an_epsilon_at_the_largest_noise_multiplier(rate, rounds):
    from fedmud.privacy import epsilon

    assert 0 <= epsilon(MAX_NOISE_MULTIPLIER, rate, rounds, 1e-5) < 1  # 1e300 raised OverflowError at the first log


# --- one place per key: the schema (issue 25) ----------------------------------------------------


def test_pyproject_and_the_readme_table_are_what_the_schema_declares():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    check = subprocess.run(
        [sys.executable, "scripts/config_docs.py", "--check"], cwd=root, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_the_values_pyproject_declares_parse_to_the_schemas_defaults():
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(declared) == parse_run_config({}) == RunConfig()


def test_a_new_key_is_one_field_and_reaches_the_parser_its_checks_and_both_documents():
    """What adding a key takes: its field, declared with key(); nothing else in fedmud/config.py."""
    from dataclasses import dataclass

    from fedmud.config import key, markdown_table, toml_table

    @dataclass(frozen=True)
    class WithWarmup(RunConfig):
        warmup_rounds: int = key(0, "rounds of learning-rate warm-up", low=0)

    assert parse_run_config({"warmup-rounds": 3, "lr": 0.1}, WithWarmup).warmup_rounds == 3
    assert parse_run_config({}, WithWarmup).warmup_rounds == 0
    with pytest.raises(ConfigError, match=r"^warmup-rounds=-1 is not allowed; it must be an integer >= 0$"):
        parse_run_config({"warmup-rounds": -1}, WithWarmup)
    with pytest.raises(ConfigError, match="warmup-round=3 is not allowed: there is no such key; did you mean warmup-rounds"):
        parse_run_config({"warmup-round": 3}, WithWarmup)
    with pytest.raises(ConfigError, match="warmup-rounds=3 is not allowed: there is no such key"):
        parse_run_config({"warmup-rounds": 3})  # not a key of the shipped schema
    assert "| `warmup-rounds` | `0` | ≥ 0 | rounds of learning-rate warm-up |" in markdown_table(WithWarmup)
    assert "\nwarmup-rounds = 0" in toml_table(WithWarmup)


def test_every_key_declares_what_it_means_and_what_it_allows():
    from fedmud.config import KEYS, allowed_text

    for path, f in KEYS.items():
        assert f.metadata["key"].help.strip(), path
        assert allowed_text(f).strip(), path


def test_the_model_and_dataset_keys_allow_exactly_their_registries_names():
    """fedmud.models and fedmud.data own the built-in names; the schema reads them from there."""
    from fedmud import data, models
    from fedmud.config import KEYS

    assert KEYS[("model",)].metadata["key"].choices == ("auto", *models.BUILTIN_MODELS)
    assert KEYS[("data", "dataset")].metadata["key"].choices == tuple(data.SPECS)
    with pytest.raises(ConfigError, match=r"dataset='tinyimagenet' is not allowed; choose one of mnist5k, digits, .*cifar100"):
        parse_run_config({"dataset": "tinyimagenet"})
    with pytest.raises(ConfigError, match=r"classes='0-99' is not allowed with dataset='cifar10': its labels are 0-9"):
        parse_run_config({"dataset": "cifar10", "classes": "0-99"})
