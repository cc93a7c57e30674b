"""Bad configuration stops with one message naming the key, the value and what is allowed."""

import pytest

from fedmud.config import ConfigError, parse_run_config
from fedmud.model import decompose
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
        ({"error-feedback": True}, "error-feedback=true is not allowed with uplink='float32'"),
        ({"error-feedback": True, "uplink": "int8", "pattern": "ab"}, "not allowed with pattern='ab'"),
        ({"downlink-codec": "int4", "pattern": "ab"}, "downlink-codec='int4' is not allowed with pattern='ab'"),
        (
            {"client-state": "none", "uplink": "sign", "error-feedback": True},
            "error-feedback=true is not allowed with client-state='none'",
        ),
        ({"stochastic-rounding": True}, "stochastic-rounding=true is not allowed with uplink='float32'"),
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
