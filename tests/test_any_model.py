"""FedMUD on any PyTorch model: every weight tensor can carry a decomposed update.

The five models a new user tried first (torchvision resnet18, mobilenet_v3_small, a
ViT, a text transformer, an LSTM) decompose at 1/32 with default settings and train;
aggregation stays exact for every new kind of tensor; impossible targets and unknown
names are refused with one message.
"""

import math

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from fedmud.aggregate import aggregate_factors
from fedmud.config import ConfigError, DecompositionConfig
from fedmud.mud import decompose


class TextTransformer(nn.Module):
    """nn.Embedding(5000, 128) + 2-layer nn.TransformerEncoder (dim 128, 4 heads) + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 128)
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class LSTMClassifier(nn.Module):
    """nn.Embedding(5000, 128) + 2-layer nn.LSTM(128) + linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 128)
        self.lstm = nn.LSTM(128, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


def _vit():
    return tvm.VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192, mlp_dim=384, num_classes=10
    )


IMAGES = lambda: torch.randn(4, 3, 32, 32)  # noqa: E731
TOKENS = lambda: torch.randint(0, 5000, (4, 16))  # noqa: E731
MODELS = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), IMAGES),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), IMAGES),
    "vit": (_vit, IMAGES),
    "text-transformer": (TextTransformer, TOKENS),
    "lstm": (LSTMClassifier, TOKENS),
}


def _dense_state_numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("kind", ["kron", "mat"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_decomposes_at_1_32_by_default_and_trains_a_step(name, kind):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    plain = build()
    dense = _dense_state_numel(plain)
    model = decompose(plain, DecompositionConfig(kind=kind))
    assert model.upload_layout().numel <= 1.05 * dense / 32
    assert len(model.parametrised_names) >= 5
    model.reset(1)
    model.train()
    before = {n: t.clone() for n, t in model.uploaded_state().items()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: torchvision's ViT starts with a zero head, so only the head moves first
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs()), torch.randint(0, 10, (4,))).backward()
        optimiser.step()
    after = model.uploaded_state()
    moved = [n for n in model.upload_layout().entries if not torch.equal(before[n[0]], after[n[0]])]
    assert any(n.endswith(".T1") for n, _ in moved) and any(n.endswith(".T2") for n, _ in moved)


def test_attention_in_proj_lstm_weights_and_embeddings_are_decomposed():
    assert {"encoder.layers.0.self_attn.in_proj_weight", "embed.weight"} <= set(
        decompose(TextTransformer(), DecompositionConfig()).parametrised_names
    )
    names = set(decompose(LSTMClassifier(), DecompositionConfig()).parametrised_names)
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"} <= names
    assert {"encoder.pos_embedding", "class_token"} <= set(decompose(_vit(), DecompositionConfig()).parametrised_names)


# --------------------------------------------------------------------------- exact aggregation
class Zoo(nn.Module):
    """One of every kind of tensor the planner can decompose."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 48)
        self.pos = nn.Parameter(torch.randn(1, 12, 48) * 0.02)  # a bare parameter
        self.attn = nn.MultiheadAttention(48, 4, batch_first=True)
        self.lstm = nn.LSTM(48, 32, batch_first=True)
        self.gru = nn.GRU(32, 32, batch_first=True)
        self.conv1d = nn.Conv1d(32, 64, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.transposed = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.conv3d = nn.Conv3d(32, 32, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(32, 10)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        x = self.attn(x, x, x)[0]
        x = self.gru(self.lstm(x)[0])[0]  # (N, 12, 32)
        x = self.conv1d(x.transpose(1, 2))  # (N, 64, 12)
        x = self.depthwise(self.grouped(x.reshape(len(x), 64, 3, 4)))
        x = self.conv3d(self.transposed(x).unsqueeze(2)).squeeze(2)  # (N, 32, 6, 8)
        return self.head(x.mean((2, 3)))


NEW_KINDS = [
    "embed.weight",
    "pos",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "gru.weight_hh_l0",
    "conv1d.weight",
    "grouped.weight",
    "depthwise.weight",
    "transposed.weight",
    "conv3d.weight",
]
WEIGHTS = [3.0, 1.0, 2.0]


@pytest.mark.parametrize("pattern", ["aad", "fab"])
@pytest.mark.parametrize("kind", ["kron", "mat"])
def test_merging_the_mean_of_factors_equals_the_mean_of_the_clients_updates_for_every_tensor_kind(kind, pattern):
    torch.manual_seed(0)
    model = decompose(Zoo(), DecompositionConfig(kind=kind, pattern=pattern, ratio=0.25, dense_layers=("head",)))
    assert set(NEW_KINDS) <= set(model.parametrised_names)
    start = {n: model.base_weight(n).clone() for n in NEW_KINDS}
    uploads, effective = [], []
    for c in range(len(WEIGHTS)):  # each client moves its trained factors from the same seed-drawn start
        model.reset(42)
        g = torch.Generator().manual_seed(100 + c)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        effective.append({n: model.effective_weight(n).detach().clone() for n in NEW_KINDS})
        uploads.append({n: t.clone() for n, t in model.uploaded_state().items()})
    mean = {
        n: torch.from_numpy(aggregate_factors((u[n].numpy().reshape(-1), w) for u, w in zip(uploads, WEIGHTS)))
        for n in uploads[0]
    }
    model.reset(42)
    model.load_uploaded_state({n: v.reshape(uploads[0][n].shape) for n, v in mean.items()})
    model.merge()
    for name in NEW_KINDS:
        expected = sum(w * e[name] for e, w in zip(effective, WEIGHTS)) / sum(WEIGHTS)
        assert not torch.allclose(expected, start[name])
        assert torch.allclose(model.base_weight(name), expected, atol=1e-5), name


# --------------------------------------------------------------------------- the planner's refusals
def test_a_ratio_the_model_cannot_reach_gives_the_smallest_ratio_and_what_uses_it():
    float32 = DecompositionConfig(ratio=1 / 64, vector_uplink="uplink")  # every value at 4 bytes
    with pytest.raises(ConfigError) as err:
        decompose(tvm.mobilenet_v3_small(num_classes=10), float32)
    message = str(err.value)
    assert message.startswith("ratio=0.015625 (1/64.0) cannot be reached")
    floor = float(message.split("allowed: ratio >= ")[1].split(" ")[0])
    assert 1 / 64 < floor < 1 / 32
    assert "1-D tensors and buffers (biases, norms, running statistics) 28146" in message
    assert message.endswith("or send the vectors at int8 (vector-uplink=int8)")
    reachable = DecompositionConfig(ratio=floor * 1.001, vector_uplink="uplink")
    decompose(tvm.mobilenet_v3_small(num_classes=10), reachable)  # and it is reachable


def test_vectors_go_to_int8_only_when_the_ratio_needs_it_and_the_plan_counts_their_bytes():
    """mobilenet_v3_small's vectors are 1.8% of it: 1/32 plans them at float32 as before, 1/64 at int8."""
    at_32 = decompose(tvm.mobilenet_v3_small(num_classes=10), DecompositionConfig())
    assert not at_32.plan.int8_names() and at_32.plan.upload_bytes == 4 * at_32.plan.upload
    at_64 = decompose(tvm.mobilenet_v3_small(num_classes=10), DecompositionConfig(ratio=1 / 64))
    vectors = {t.name for t in at_64.plan.tensors if t.reason in ("1-D", "buffer")}
    assert at_64.plan.int8_names() == vectors
    assert at_64.plan.upload_bytes <= at_64.plan.dense_reference_bytes / 64 < at_64.plan.upload * 4
    assert at_64.summary()[-1].endswith(f"bytes (float32): ratio {at_64.plan.upload_bytes / at_64.plan.dense_reference_bytes:.5f} (1/64.0)")
    assert any(line.endswith(" at int8, 20 bytes") for line in at_64.summary())  # 16 values and a scale


def test_a_ratio_out_of_reach_even_with_int8_vectors_is_refused_in_bytes():
    with pytest.raises(ConfigError) as err:
        decompose(tvm.mobilenet_v3_small(num_classes=10), DecompositionConfig(ratio=1 / 256))
    message = str(err.value)
    assert "bytes (vectors at int8, vector-uplink=auto) of the 6160872 float32 bytes of the model's 1540218 values" in message
    assert "1-D tensors and buffers (biases, norms, running statistics) at int8 " in message
    floor = float(message.split("allowed: ratio >= ")[1].split(" ")[0])
    decompose(tvm.mobilenet_v3_small(num_classes=10), DecompositionConfig(ratio=floor * 1.001))


def test_an_explicit_dense_layer_that_breaks_the_ratio_is_named():
    with pytest.raises(ConfigError, match=r"embed.weight \(dense: dense-layers: embed\) 2560000"):  # bytes
        decompose(TextTransformer(), DecompositionConfig(dense_layers=("embed",)))


def test_an_unknown_dense_layer_is_refused_listing_the_tensors():
    with pytest.raises(ConfigError) as err:
        decompose(LSTMClassifier(), DecompositionConfig(dense_layers=("first", "lstm.weight_ih_l9")))
    assert str(err.value).startswith("dense-layers contains 'lstm.weight_ih_l9'")
    assert "embed.weight, lstm.weight_ih_l0, lstm.weight_hh_l0" in str(err.value)


def test_a_module_name_keeps_every_weight_under_it_dense():
    model = decompose(LSTMClassifier(), DecompositionConfig(ratio=0.35, dense_layers=("lstm",)))
    assert not any(n.startswith("lstm.") for n in model.parametrised_names)
    assert "embed.weight" in model.parametrised_names


def test_too_small_tensors_stay_dense_and_say_why():
    tiny = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2), nn.Linear(2, 2))
    model = decompose(tiny, DecompositionConfig(ratio=0.99, dense_layers=("0",)))
    reasons = {t.name: t.reason for t in model.plan.tensors}
    assert reasons["2.weight"].startswith("too small: the smallest update uploads")
    assert "1.weight" in model.parametrised_names


class TiedLanguageModel(nn.Module):
    """A decoder tied to the embedding (``out.weight = embed.weight``), as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(400, 64)
        self.body = nn.Linear(64, 64)
        self.out = nn.Linear(64, 400, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.relu(self.body(self.embed(tokens))))


def test_a_tied_weight_is_one_update_trained_uploaded_and_counted_once_and_stays_tied():
    plain = TiedLanguageModel()
    model = decompose(plain, DecompositionConfig(ratio=1 / 4, dense_layers=("body",)))
    assert model.parametrised_names == ("embed.weight",)
    assert model.dense_reference_numel == 400 * 64 + 64 * 64 + 64  # the shared tensor once
    assert [n for n, _ in model.upload_layout().entries if n.startswith("out.")] == []
    model.reset(3)
    tokens = torch.randint(0, 400, (8, 5))
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = model.effective_weight("embed.weight").detach().clone()
    nn.functional.cross_entropy(model(tokens).reshape(-1, 400), tokens.reshape(-1)).backward()
    optimiser.step()
    assert not torch.equal(model.effective_weight("embed.weight"), before)  # the embedding trains
    assert torch.equal(plain.out.weight, plain.embed.weight)  # both modules read W + ΔW of one update
    model.merge()
    assert torch.equal(plain.out.weight, plain.embed.weight)  # and the tie holds after the merge
    assert set(model.global_state()) == {"embed.weight", "body.weight", "body.bias"}


def test_every_dense_tensor_has_a_reason_and_the_upload_is_the_plans():
    model = decompose(_vit(), DecompositionConfig())
    assert all(t.decomposed or t.reason for t in model.plan.tensors)
    assert model.plan.upload == model.upload_layout().numel
    assert math.isclose(model.plan.dense_reference, _dense_state_numel(_vit()))


# --------------------------------------------------------------------------- the federated round, any model
def _small_zoo():
    torch.manual_seed(0)  # ignored: build_decomposed seeds the factory; kept to show it does not matter
    return Zoo()


def _token_loader():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 300, (48, 12), generator=g), torch.randint(0, 10, (48,), generator=g))
    return DataLoader(data, batch_size=16)


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "kron", "init": "hrp", "hrp-rounds": 1},
        {"kind": "mat", "uplink": "int8", "error-feedback": True},
        {"method": "fedlmt", "kind": "mat"},
        {"method": "fedpara"},
    ],
)
def test_rounds_on_a_model_of_every_tensor_kind_reach_a_new_client_bitwise_through_the_chain(overrides):
    """Seed-drawn factors, codecs, error feedback, HRP and chains work for any tensor, not only Conv/Linear."""
    from fedmud.config import parse_run_config
    from fedmud.rounds import ClientModel, ServerModel
    from fedmud.sync import CHAIN, Downlink

    run = parse_run_config({"ratio": "1/4", "dense-layers": "head", "local-epochs": 1, **overrides})
    server = ServerModel(run, model_fn=_small_zoo)
    client = ClientModel(run, torch.device("cpu"), model_fn=_small_zoo)
    held, feedback, start = None, None, server.digest
    for round_ in (1, 2):
        base = 0 if held is None else held[0]
        held = (server.round, client.sync(held, server.downlink(Downlink(CHAIN, server.round, base, tuple(server.chain.since(base))), round_)))
        parts, _, feedback = client.train_round(1000 + round_, _token_loader(), feedback)
        server.apply_round(round_, 1000 + round_, [(server.codec.validate(parts), 48.0)])
    assert server.digest != start
    fresh = ClientModel(run, torch.device("cpu"), model_fn=_small_zoo)
    state = fresh.sync(None, server.downlink(Downlink(CHAIN, server.round, 0, tuple(server.chain.since(0))), 3))
    expected = server.global_state()
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    if run.decomposition.init == "hrp":
        assert fresh.global_model.hrp_ready


def test_a_regression_task_trains_through_the_round_api():
    """Another loss and metric: MSE on scikit-learn's diabetes data, a decomposed MLP, two rounds."""
    from sklearn.datasets import load_diabetes
    from torch.utils.data import DataLoader, TensorDataset

    from fedmud.config import parse_run_config
    from fedmud.rounds import ClientModel, ServerModel
    from fedmud.sync import FULL, Downlink
    from fedmud.task import REGRESSION

    x, y = load_diabetes(return_X_y=True)
    data = TensorDataset(torch.tensor(x * 10, dtype=torch.float32), torch.tensor(y / 100, dtype=torch.float32)[:, None])

    def mlp():
        return nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))

    run = parse_run_config({"ratio": "1/8", "lr": 0.01, "local-epochs": 2, "task": "regression"})
    server = ServerModel(run, model_fn=mlp, task=REGRESSION)
    client = ClientModel(run, torch.device("cpu"), model_fn=mlp, task=REGRESSION)
    assert server.model.parametrised_names == ("2.weight",)  # the hidden layer; first and last fit dense
    test = DataLoader(data, batch_size=256)
    start_loss, start_metric = server.evaluate(test)
    for round_ in (1, 2):
        client.sync(None, server.downlink(Downlink(FULL, server.round), round_))
        parts, _, _ = client.train_round(round_, DataLoader(data, batch_size=32, shuffle=True))
        server.apply_round(round_, round_, [(parts, float(len(data)))])
    loss, metric = server.evaluate(test)
    assert loss < 0.5 * start_loss and metric == pytest.approx(-loss, rel=1e-5)  # the metric is -MSE
    assert REGRESSION.metric_name == "neg_mse"
