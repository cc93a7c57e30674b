"""Decomposition of the paper's CNN: what trains, what uploads, how a round merges."""

import pytest
import torch

from fedmud.config import DecompositionConfig
from fedmud.mud import decompose
from fedmud.models import CNN


def _cnn():
    return CNN(in_channels=1, num_classes=10, spatial=1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return decompose(_cnn(), DecompositionConfig())


def test_first_and_last_layers_stay_dense_when_they_fit(model):
    assert model.parametrised_names == ("features.4.weight", "features.8.weight", "features.12.weight")
    reasons = {t.name: t.reason for t in model.plan.tensors}
    assert reasons["features.0.weight"] == reasons["classifier.weight"] == "first/last layer, fits the ratio"


def test_upload_is_within_the_ratio_and_excludes_base_weights(model):
    layout = model.upload_layout()
    names = {n for n, _ in layout.entries}
    assert layout.numel <= model.dense_reference_numel / 32
    assert "features.4.weight" not in names and "features.4.weight.T1" in names and "features.4.weight.F1" not in names
    assert {"features.0.weight", "classifier.weight", "features.1.running_mean"} <= names


def test_only_trained_factors_and_dense_tensors_have_gradients(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.features.4.parametrizations.weight.original" not in trainable
    assert {
        "model.features.4.parametrizations.weight.0.T1",
        "model.features.4.parametrizations.weight.0.T2",
        "model.features.0.weight",
    } <= trainable


@pytest.mark.parametrize("init", ["zero", "nonzero-compensated"])
def test_round_starts_from_the_global_weights(init):
    torch.manual_seed(0)
    model = decompose(_cnn(), DecompositionConfig(init=init))
    model.reset(5)
    name = "features.8.weight"
    assert torch.allclose(model.effective_weight(name), model.base_weight(name), atol=1e-6)


def test_nonzero_init_starts_trained_factors_away_from_zero(model):
    model.reset(5)
    update = model.updates()["features.8.weight"]
    assert update.factor("T1").abs().sum() > 0 and update.factor("T2").abs().sum() > 0


def test_merge_folds_the_update_into_the_base_weight(model):
    model.reset(3)
    name = "features.8.weight"
    with torch.no_grad():
        model.updates()[name].factor("T1").add_(0.5)
    before = model.effective_weight(name).detach().clone()
    model.merge()
    assert torch.allclose(model.base_weight(name), before, atol=1e-6)
    assert torch.equal(model.effective_weight(name), model.base_weight(name))


def test_fedavg_uploads_everything():
    dense = decompose(_cnn(), DecompositionConfig(method="fedavg"))
    assert dense.parametrised_names == ()
    assert dense.upload_layout().numel == dense.dense_reference_numel


def test_after_merge_the_model_computes_with_the_merged_weights_only(model):
    model.reset(3)
    with torch.no_grad():
        for update in model.updates().values():
            update.factor("T1").add_(0.5)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    before = model(x)
    model.merge()
    assert torch.allclose(model(x), before, atol=1e-4)
    undecomposed = _cnn().eval()
    undecomposed.load_state_dict(model.global_state())
    assert torch.allclose(undecomposed(x), before, atol=1e-4)


def test_a_fresh_decomposition_computes_like_the_model():
    torch.manual_seed(0)
    plain = _cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    expected = plain(x)
    assert torch.allclose(decompose(plain, DecompositionConfig()).eval()(x), expected)


def test_the_plan_prints_one_line_per_floating_tensor_and_the_total(model):
    lines = model.summary()
    floating = [n for n, t in _cnn().state_dict().items() if t.is_floating_point()]
    assert len(lines) == len(floating) + 1
    assert lines[0].startswith("features.0.weight (32, 1, 3, 3): dense (first/last layer, fits the ratio)")
    assert any(line.startswith("features.4.weight (64, 32, 3, 3): aad kron") for line in lines)
    assert lines[-1].startswith("upload ") and "(1/32." in lines[-1]
