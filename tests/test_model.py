"""Decomposition of a model: what trains, what uploads, how a round merges."""

import pytest
import torch

from fedmud.config import DecompositionConfig
from fedmud.model import decompose
from fedmud.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return decompose(build_model("cnn-mnist"), DecompositionConfig())


def test_first_and_last_layers_stay_dense_by_default(model):
    assert model.decomposed_names == ("features.4", "features.8", "features.12")


def test_upload_is_within_the_ratio_and_excludes_base_weights(model):
    layout = model.upload_layout()
    names = {n for n, _ in layout.entries}
    assert layout.numel <= model.dense_reference_numel / 32
    assert "features.4.weight" not in names and "features.4.T1" in names and "features.4.F1" not in names
    assert {"features.0.weight", "classifier.weight", "features.1.running_mean"} <= names


def test_only_trained_factors_and_dense_tensors_have_gradients(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.features.4.base.weight" not in trainable
    assert {"model.features.4.T1", "model.features.4.T2", "model.features.0.weight"} <= trainable


@pytest.mark.parametrize("init", ["zero", "nonzero-compensated"])
def test_round_starts_from_the_global_weights(init):
    torch.manual_seed(0)
    model = decompose(build_model("cnn-mnist"), DecompositionConfig(init=init))
    model.reset(5)
    layer = model.layers()["features.8"]
    assert torch.allclose(layer.effective_weight(), layer.base.weight, atol=1e-6)


def test_nonzero_init_starts_trained_factors_away_from_zero(model):
    model.reset(5)
    layer = model.layers()["features.8"]
    assert layer.factor("T1").abs().sum() > 0 and layer.factor("T2").abs().sum() > 0


def test_merge_folds_the_update_into_the_base_weight(model):
    model.reset(3)
    layer = model.layers()["features.8"]
    with torch.no_grad():
        layer.factor("T1").add_(0.5)
    before = layer.effective_weight().clone()
    model.merge()
    assert torch.allclose(layer.base.weight, before, atol=1e-6)


def test_fedavg_uploads_everything(model):
    dense = decompose(build_model("cnn-mnist"), DecompositionConfig(method="fedavg"))
    assert dense.decomposed_names == ()
    assert dense.upload_layout().numel == dense.dense_reference_numel


def test_after_merge_the_model_computes_with_the_merged_weights_only(model):
    model.reset(3)
    with torch.no_grad():
        for layer in model.layers().values():
            layer.factor("T1").add_(0.5)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    before = model(x)
    model.merge()
    assert torch.allclose(model(x), before, atol=1e-4)
    undecomposed = build_model("cnn-mnist").eval()
    undecomposed.load_state_dict(model.global_state())
    assert torch.allclose(undecomposed(x), before, atol=1e-4)


def test_a_fresh_decomposition_computes_like_the_model():
    torch.manual_seed(0)
    plain = build_model("cnn-mnist").eval()
    x = torch.randn(2, 1, 28, 28)
    expected = plain(x)
    assert torch.allclose(decompose(plain, DecompositionConfig()).eval()(x), expected)
