"""Methods are plug-ins: one registered from this file trains through the same round code.

The method below is not built in. It is dense FedAvg through a fixed random projection:
each weight's round update is ``reshape(P·z)``, with ``P`` (numel × k) drawn from the round
seed and ``z`` (k values) trained, uploaded and averaged, then merged into ``W``. Everything
it needs is in this file: its parametrisation, its plan and one call to ``register``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmud.config import ConfigError, DecompositionConfig, parse_run_config
from fedmud.methods import METHODS, Method
from fedmud.mud import decompose
from fedmud.models import CNN
from fedmud.plan import DecompositionPlan, TensorPlan, floating_shapes, weight_tensors
from fedmud.rounds import simulate_in_process
from fedmud.seeds import draw_normal

NAME = "random-projection"


class ProjectedUpdate(nn.Module):
    """``W -> W + reshape(P·z)``: ``z`` (k values) trained, ``P`` drawn from the round seed."""

    def __init__(self, shape: tuple[int, ...], k: int, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.z = nn.Parameter(torch.zeros(k, device=device))
        self.register_buffer("P", torch.zeros(math.prod(shape), k, device=device), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.P @ self.z).reshape(self.shape)

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        self.P.copy_(draw_normal(tuple(self.P.shape), seed, 1 / math.sqrt(self.P.shape[1]), self.P.device))
        self.z.zero_()

    @torch.no_grad()
    def merged_increment(self) -> torch.Tensor:
        return (self.P * self.z).sum(1).reshape(self.shape)  # elementwise, in a fixed order: bitwise on every party

    @torch.no_grad()
    def clear(self) -> None:
        self.z.zero_()


class RandomProjection(Method):
    """Every weight of two or more dimensions but the last trains k = min(128, numel/64) projected
    values a round; the last (the classifier) is dense."""

    name = NAME
    help = "dense FedAvg through a fixed random projection (a test's method)"
    merges = True

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        weights = weight_tensors(model)
        last = list(weights)[-1]
        tensors = []
        for name, shape in floating_shapes(model).items():
            if name in weights and name != last:
                k = min(128, max(1, math.prod(shape) // 64))
                tensors.append(TensorPlan(name, shape, k, (k,), how=f"projection k={k}"))
            else:
                tensors.append(TensorPlan(name, shape, math.prod(shape), reason="the last layer, 1-D or a buffer"))
        return DecompositionPlan(tuple(tensors), self.name, None)

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        return ProjectedUpdate(tensor.shape, tensor.sizes[0], device)


@pytest.fixture
def registered(monkeypatch):
    """The method registered for one test (the registry is as before after it)."""
    monkeypatch.setitem(METHODS, NAME, RandomProjection())
    return METHODS[NAME]


def test_a_method_that_cannot_carry_a_lossy_codes_error_gets_a_float32_downlink_and_no_error_feedback(registered):
    assert parse_run_config({"method": NAME}).downlink_codec == "float32"
    with pytest.raises(ConfigError, match=f"error-feedback=True is not allowed with method='{NAME}'"):
        parse_run_config({"method": NAME, "error-feedback": True, "uplink": "int8"})
    with pytest.raises(ConfigError, match=f"downlink-codec='int4' is not allowed with method='{NAME}'"):
        parse_run_config({"method": NAME, "downlink-codec": "int4"})


def test_an_unregistered_method_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=f"method='{NAME}' is not allowed; choose one of fedmud, fedavg, fedlmt"):
        parse_run_config({"method": NAME})


def test_a_registered_method_plans_and_parametrises_any_model_without_a_branch_on_its_name(registered):
    run = parse_run_config({"method": NAME})
    model = decompose(CNN(in_channels=1, num_classes=10, spatial=1), run.decomposition)
    weights = [t for t in model.plan.tensors if t.decomposed]
    assert set(model.parametrised_names) == {t.name for t in weights} and len(weights) == 4
    uploaded = {n for n, _ in model.upload_layout().entries}
    assert {f"{t.name}.z" for t in weights} <= uploaded and not any(t.name in uploaded for t in weights)
    assert model.upload_layout().numel == model.plan.upload  # z of every weight, the rest dense
    assert set(model.global_state()) == set(CNN(in_channels=1, num_classes=10, spatial=1).state_dict())
    assert "projection k=" in "\n".join(model.summary())


def test_a_registered_method_trains_through_the_round_code_and_merges_into_w(registered):
    run = parse_run_config(
        {"method": NAME, "num-partitions": 3, "num-server-rounds": 2, "local-epochs": 1, "test-fraction": 0.2}
    )
    server, history, uploaded, _ = simulate_in_process(run)
    assert history[0] < 0.2 and history[-1] > 0.5  # it learns (0.10 -> 0.79 when written)
    assert uploaded == [3 * server.codec.payload_nbytes] * 2  # three clients a round
    assert server.model.upload_layout().numel < server.model.dense_reference_numel / 8
    assert all(float(u.z.detach().abs().sum()) == 0 for u in server.model.updates().values())  # merged, then cleared
