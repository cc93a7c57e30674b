"""FedPara baseline (method=fedpara): every planned weight is a low-rank Hadamard product.

W = (X1·Y1ᵀ) ⊙ (X2·Y2ᵀ) in the tensor's matrix view, all four factors trained and
averaged like FedLMT's U, V; 2r(m+n) values reach rank up to r².
"""

import math

import pytest
import torch
from torch import nn

from fedmud.config import ConfigError, DecompositionConfig, parse_run_config
from fedmud.decomposition import matrix_shape
from fedmud.methods.factorised import HadamardLowRankWeight
from fedmud.mud import decompose
from fedmud.models import build_model

FEDPARA = DecompositionConfig(method="fedpara")


def _fedpara(model: str = "cnn-mnist", data: str = "mnist5k", config: DecompositionConfig = FEDPARA, seed: int = 0):
    torch.manual_seed(seed)
    return decompose(build_model(model, data), config)


def _parametrisation(model, name: str) -> HadamardLowRankWeight:
    module_name, _, attr = name.rpartition(".")
    return model.model.get_submodule(module_name).parametrizations[attr][0]


@pytest.fixture
def cnn():
    return _fedpara()


def test_the_weight_is_the_hadamard_product_of_two_low_rank_products(cnn):
    name = "features.12.weight"
    p = _parametrisation(cnn, name)
    m, n = matrix_shape(p.shape)
    assert p.X1.shape == p.X2.shape == (m, p.rank) and p.Y1.shape == p.Y2.shape == (n, p.rank)
    expected = ((p.X1 @ p.Y1.T) * (p.X2 @ p.Y2.T)).reshape(256, 128, 3, 3)
    assert torch.equal(cnn.effective_weight(name), expected)


def test_the_product_reaches_rank_r_squared_from_2r_m_plus_n_values():
    torch.manual_seed(0)
    p = HadamardLowRankWeight((64, 48), rank=5, device=torch.device("cpu"))
    assert torch.linalg.matrix_rank(p(torch.empty(64, 48)), rtol=1e-4) == 25  # a U·V of the same r: rank 5
    assert sum(t.numel() for t in p.parameters()) == 2 * 5 * (64 + 48)


@pytest.mark.parametrize("model", ["cnn-mnist", "vit"])
def test_everything_uploaded_meets_the_ratio(model):
    decomposed = _fedpara(model)
    assert len(decomposed.parametrised_names) >= 3
    assert decomposed.upload_layout().numel <= decomposed.dense_reference_numel / 32
    assert decomposed.plan.upload == decomposed.upload_layout().numel
    for t in decomposed.plan.tensors:
        if t.decomposed:
            assert t.upload == 2 * t.sizes[0] * sum(matrix_shape(t.shape))


def test_the_factors_are_uploaded_and_held_under_the_tensors_name_and_w_is_not(cnn):
    factors = {f"features.12.weight.{f}" for f in ("X1", "Y1", "X2", "Y2")}
    uploaded = {n for n, _ in cnn.upload_layout().entries}
    assert factors <= uploaded and factors <= set(cnn.global_state())
    assert "features.12.weight" not in uploaded and "features.12.weight" not in cnn.global_state()
    assert {"features.0.weight", "classifier.weight"} <= uploaded  # first and last layers dense, as fedlmt


def test_forward_and_backward_give_every_factor_a_gradient(cnn):
    cnn.train()
    loss = nn.functional.cross_entropy(cnn(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
    loss.backward()
    for name in cnn.parametrised_names:
        p = _parametrisation(cnn, name)
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in (p.X1, p.Y1, p.X2, p.Y2)), name


def test_init_variance_is_within_a_factor_1_5_of_pytorchs_default_init():
    """Each weight's variance against the same layer's PyTorch default init (the unused base weight)."""
    model = _fedpara(config=DecompositionConfig(method="fedpara", ratio=1 / 8))
    for name in model.parametrised_names:
        default = model.base_weight(name).var().item()
        assert default == pytest.approx(1 / (3 * math.prod(model.base_weight(name).shape[1:])), rel=0.1)
        assert 2 / 3 < model.effective_weight(name).var().item() / default < 3 / 2, name


def test_a_few_sgd_steps_lower_the_loss_on_a_batch(cnn):
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimiser = torch.optim.SGD([p for p in cnn.parameters() if p.requires_grad], lr=0.05)
    cnn.train()
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(cnn(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_method_fedpara_parses_and_refuses_hrp():
    assert parse_run_config({"method": "fedpara"}).decomposition.method == "fedpara"
    with pytest.raises(ConfigError, match="init='hrp' is not allowed with method='fedpara'"):
        parse_run_config({"method": "fedpara", "init": "hrp"})
