"""``vector-uplink``: the 1-D tensors and buffers (biases, norms, running statistics) at int8 beside
float32 factors, counted in bytes by the plan, as the codec sends them, and a run that stays in sync.

The models that need it (ShuffleNet-V2, MobileViT-v2, MobileViT-XXS) plan, train and upload a 32nd of
dense FedAvg's bytes in ``tests/test_model_zoo.py``; ``tests/test_any_model.py`` has the planner's
choice and refusals.
"""

import numpy as np
import pytest
import torch
from torch import nn

from fedmud.codec import INT8_CHUNK, Codec
from fedmud.config import ConfigError, parse_run_config
from fedmud.layout import UploadLayout
from fedmud.rounds import build_codec, build_decomposed, build_link_codec, simulate_in_process

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

LAYOUT = UploadLayout((("conv.T1", (40, 30)), ("bn.weight", (30,)), ("bn.running_var", (1500,))))
VECTORS = frozenset({"bn.weight", "bn.running_var"})
RUN = {**FLOAT32_UP, "dataset": "digits", "num-partitions": 2, "num-server-rounds": 2, "local-epochs": 1, "batch-size": 32}


def test_a_float32_upload_sends_the_named_tensors_as_int8_residuals_and_counts_their_bytes():
    codec = Codec(LAYOUT, "float32", int8_names=VECTORS)
    assert codec.residual  # the int8 part is a residual, so the whole upload is one
    assert codec.payload_nbytes == 4 * 1200 + (30 + 4) + (1500 + 4 * 2)  # a scale per 1024 values of a tensor
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(LAYOUT.numel).astype(np.float32)
    values = reference + 0.01 * rng.standard_normal(LAYOUT.numel).astype(np.float32)
    decoded = codec.decode(codec.validate(codec.pack(codec.encode(values - reference))), reference)
    factors, vectors = slice(0, 1200), slice(1200, None)
    assert np.allclose(decoded[factors], values[factors], rtol=0, atol=1e-6)  # float32, up to rounding
    step = np.abs(values - reference)[vectors].max() / 127
    assert np.abs(decoded[vectors] - values[vectors]).max() <= step / 2 + 1e-7  # int8's half step
    assert INT8_CHUNK == 1024


def test_codes_at_8_bits_or_fewer_ignore_the_names():
    for scheme in ("int8", "int4", "sign", "topk"):
        k = 100 if scheme == "topk" else 0
        assert Codec(LAYOUT, scheme, k, VECTORS).payload_nbytes == Codec(LAYOUT, scheme, k).payload_nbytes


def test_an_unknown_vector_uplink_is_refused_naming_what_is_allowed():
    with pytest.raises(ConfigError, match=r"vector-uplink='int4' is not allowed.*auto, int8, uplink"):
        parse_run_config({"vector-uplink": "int4"})


@pytest.fixture(scope="module")
def int8_run():
    """The paper CNN with its vectors at int8 (it reaches 1/32 without: ``auto`` keeps them at float32)."""
    return parse_run_config({**RUN, "vector-uplink": "int8"})


def test_the_uplink_sends_what_the_plan_counts_and_the_chain_links_stay_as_they_were(int8_run):
    model = build_decomposed(int8_run)
    vectors = {t.name for t in model.plan.tensors if t.reason in ("1-D", "buffer")}
    assert vectors and model.plan.int8_names() == vectors
    assert build_codec(int8_run, model).payload_nbytes == model.plan.upload_bytes <= model.plan.dense_reference_bytes / 32
    link = build_link_codec(int8_run, model)  # the aggregated upload goes down as downlink-codec says, vectors too
    assert link.payload_nbytes == build_link_codec(parse_run_config({**FLOAT32_UP, "dataset": "digits"}), model).payload_nbytes


def test_auto_keeps_the_paper_cnn_as_it_planned_every_value_at_4_bytes():
    model = build_decomposed(parse_run_config({**FLOAT32_UP, "dataset": "digits"}))
    assert not model.plan.int8_names() and model.plan.upload_bytes == 4 * model.plan.upload


def _small_bn_net():
    """Two convolutions with BatchNorm on 1×28×28: a round trains in a second."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_a_run_with_int8_vectors_trains_and_every_client_reaches_the_servers_model_by_digest():
    """simulate_in_process syncs each client through the chain and raises if a digest differs."""
    run = parse_run_config({**RUN, "vector-uplink": "int8", "ratio": "1/8"})
    server, _, uploaded, _ = simulate_in_process(run, model_fn=_small_bn_net)
    assert server.model.plan.int8_names() and uploaded == [2 * server.model.plan.upload_bytes] * 2
    state = server.global_state()
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert not torch.equal(state["1.running_var"], torch.ones(16))  # the int8 statistics merged
