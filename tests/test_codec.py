"""Upload codecs (float32, float16, int8, top-k), error feedback and the projections behind it."""

import numpy as np
import pytest
import torch

from fedmud.codec import INT8_CHUNK, Codec, PayloadError, topk_count
from fedmud.config import DecompositionConfig, parse_run_config
from fedmud.feedback import ErrorFeedback
from fedmud.model import decompose
from fedmud.models import build_model
from fedmud.projection import linear_delta, project_to_trained
from fedmud.rounds import ClientModel, ServerModel


def _model(**kw):
    torch.manual_seed(0)
    return decompose(build_model("cnn-mnist"), DecompositionConfig(**kw))


def _codec(model, scheme):
    layout = model.upload_layout()
    k = topk_count(layout.numel, model.dense_reference_numel, 1 / 32) if scheme == "topk" else 0
    return Codec(layout, scheme, k)


@pytest.fixture
def vector():
    model = _model()
    return model, np.random.default_rng(0).standard_normal(model.upload_layout().numel).astype(np.float32)


@pytest.mark.parametrize("scheme", ["float32", "float16", "int8", "topk"])
def test_bytes_on_the_wire_are_what_the_scheme_promises(scheme, vector):
    model, x = vector
    codec = _codec(model, scheme)
    parts = codec.encode(x)
    nbytes = sum(a.nbytes for a in parts.values())
    assert nbytes == codec.payload_nbytes == codec.stats.payload_bytes
    n = x.size
    chunks = sum(-(-int(np.prod(shape)) // INT8_CHUNK) for _, shape in codec.layout.entries)
    expected = {"float32": 4 * n, "float16": 2 * n, "int8": n + 4 * chunks, "topk": 8 * codec.k}[scheme]
    assert nbytes == expected


def test_float32_is_lossless_and_the_lossy_schemes_are_bounded(vector):
    model, x = vector
    assert np.array_equal(_codec(model, "float32").decode(_codec(model, "float32").encode(x)), x)
    half = _codec(model, "float16")
    assert np.abs(half.decode_vector(half.encode(x)) - x).max() <= 1e-3 * np.abs(x).max()
    int8 = _codec(model, "int8")
    parts = int8.encode(x)
    err = np.abs(int8.decode_vector(parts) - x)
    assert (err <= np.repeat(parts["scales"], int8._chunk_sizes) / 2 + 1e-7).all()
    assert parts["scales"].max() <= np.abs(x).max() / 127 + 1e-7


def test_topk_never_sends_more_than_float32_of_the_same_values():
    """FedMUD's upload is already 1/32: top-k at 1/32 of dense bytes would keep every value at 8 bytes."""
    model = _model()  # fedmud
    numel = model.upload_layout().numel
    codec = _codec(model, "topk")
    assert codec.k == numel // 2 and codec.payload_nbytes <= 4 * numel


def test_an_int8_upload_whose_scales_overflow_is_rejected_before_it_decodes_to_inf(vector):
    model, x = vector
    int8 = _codec(model, "int8")
    parts = int8.encode(x)
    parts["scales"] = parts["scales"].copy()
    parts["scales"][3] = np.float32(1e38)
    with pytest.raises(PayloadError, match="1 scales overflow float32"):
        int8.validate(parts)


def test_topk_keeps_the_largest_magnitudes_within_a_32nd_of_dense_bytes():
    model = _model(method="fedavg")
    x = np.random.default_rng(1).standard_normal(model.upload_layout().numel).astype(np.float32)
    codec = _codec(model, "topk")
    assert 8 * codec.k <= model.dense_reference_numel * 4 / 32
    decoded = codec.decode_vector(codec.encode(x))
    kept = decoded != 0
    assert kept.sum() == codec.k
    assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()


def test_lossy_schemes_decode_against_the_reference(vector):
    model, x = vector
    codec = _codec(model, "int8")
    with pytest.raises(PayloadError, match="reference"):
        codec.decode(codec.encode(x))
    ref = np.ones_like(x)
    assert np.allclose(codec.decode(codec.encode(x), ref), codec.decode_vector(codec.encode(x)) + 1)


def test_malformed_compressed_uploads_are_rejected(vector):
    model, x = vector
    int8, topk = _codec(model, "int8"), _codec(model, "topk")
    bad = int8.encode(x)
    bad["scales"][0] = np.inf
    with pytest.raises(PayloadError, match="non-finite"):
        int8.validate(bad)
    bad = int8.encode(x)
    bad["scales"][0] = -1
    with pytest.raises(PayloadError, match="non-negative"):
        int8.validate(bad)
    with pytest.raises(PayloadError, match="expected"):
        int8.validate({"payload": bad["payload"]})
    bad = topk.encode(x)
    bad["indices"][1] = bad["indices"][0]
    with pytest.raises(PayloadError, match="repeat"):
        topk.validate(bad)
    bad = topk.encode(x)
    bad["indices"][0] = x.size
    with pytest.raises(PayloadError, match="must lie in"):
        topk.validate(bad)
    bad = topk.encode(x)
    bad["indices"] = bad["indices"].astype(np.int64)
    with pytest.raises(PayloadError, match="dtype"):
        topk.validate(bad)


# --------------------------------------------------------------------------- projections
@pytest.mark.parametrize("kind", ["kron", "mat"])
@pytest.mark.parametrize("pattern", ["aad", "fab"])
def test_projection_recovers_updates_in_the_subspace_and_leaves_an_orthogonal_rest(kind, pattern):
    model = _model(kind=kind, pattern=pattern)
    model.reset(7)
    layer = model.updates()["features.8.weight"]
    anchors = layer.anchors()
    g = torch.Generator().manual_seed(3)
    z = {f.name: torch.randn(f.shape, generator=g) for f in layer.update.factors if f.trainable}
    u = layer.update
    # the padded tail of the last Kronecker block is not part of the weight: compare full blocks
    n = (u.blocks - 1) * (u.a * u.b) ** 2 if kind == "kron" else u.numel
    inside = linear_delta(u, anchors, z)
    if kind == "kron":
        inside.reshape(-1)[n:] = 0
    back = linear_delta(u, anchors, project_to_trained(u, anchors, inside))
    assert torch.allclose(back.reshape(-1)[:n], inside.reshape(-1)[:n], atol=1e-4 * inside.abs().max())
    e = torch.randn(u.weight_shape, generator=g)
    e.reshape(-1)[n:] = 0
    rest = (e - linear_delta(u, anchors, project_to_trained(u, anchors, e))).reshape(-1)[:n]
    assert abs(float((rest * inside.reshape(-1)[:n]).sum())) < 1e-3 * float(rest.norm() * inside.norm())


# --------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize(("scheme", "kw"), [("int8", {}), ("topk", {"method": "fedavg"}), ("int8", {"kind": "mat"})])
def test_error_feedback_loses_nothing_only_delays_it(scheme, kw):
    """Σ ΔW(sent) + carried error == Σ ΔW(residual), per decomposed layer and for dense values."""
    model = _model(**kw)
    codec = _codec(model, scheme)
    ef = ErrorFeedback(model, codec)
    rng = np.random.default_rng(5)
    sums = {"res": {}, "sent": {}}
    dense_res = np.zeros(codec.layout.numel, np.float32)
    dense_sent = np.zeros_like(dense_res)
    for t in range(4):
        model.reset(100 + t)
        r = (0.01 * rng.standard_normal(codec.layout.numel)).astype(np.float32)
        target = ef.compensate(r)
        sent = codec.decode_vector(codec.encode(target))
        ef.update(target, sent)
        dense_res += np.where(ef.dense_mask, r, 0)
        dense_sent += np.where(ef.dense_mask, sent, 0)
        for name, layer in model.updates().items():
            anchors = layer.anchors()
            for key, vec in (("res", r), ("sent", sent)):
                trained = {f: torch.from_numpy(vec[sl].copy()).reshape(layer.factor(f).shape) for f, sl in ef.slices[name].items()}
                sums[key][name] = sums[key].get(name, 0) + linear_delta(layer.update, anchors, trained)
    assert np.allclose(dense_sent + ef.dense_error, dense_res, atol=1e-5)
    for name in model.updates():
        assert torch.allclose(sums["sent"][name] + ef.weight_error[name], sums["res"][name], atol=1e-4), name
    assert np.abs(ef.dense_error).max() > 0  # the codec did lose something


# --------------------------------------------------------------------------- through a round
def _tiny_loader():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataLoader(data, batch_size=32)


@pytest.mark.parametrize(
    "overrides",
    [
        {"uplink": "float16"},
        {"uplink": "int8", "error-feedback": True},
        {"method": "fedavg", "uplink": "topk", "error-feedback": True},
        {"method": "fedlmt", "kind": "mat"},
    ],
)
def test_a_compressed_round_merges_close_to_the_lossless_one_and_chains_bitwise(overrides):
    """Server decodes against its own reference; a client's chain reaches the digest bitwise."""
    merged = {}
    for name, extra in (("lossless", {}), ("lossy", overrides)):
        run = parse_run_config({"local-epochs": 1, "lr": 0.05, **({"method": overrides.get("method")} if "method" in overrides else {}), **extra})
        server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
        parts, _, feedback = client.train_round(123, _tiny_loader())
        assert (feedback is not None) == run.uplink.error_feedback
        assert sum(a.nbytes for a in parts.values()) == server.codec.payload_nbytes
        server.apply_round(1, 123, [(server.codec.validate(parts), 64.0)])
        fresh = ClientModel(run, torch.device("cpu"))
        fresh.sync(None, "chain", server.digest, base_round=0, links=server.chain.links)
        merged[name] = server.global_state()
    start = ServerModel(run).global_state()
    floats = [key for key, value in merged["lossless"].items() if value.is_floating_point()]
    if overrides.get("uplink") == "topk":
        # the k largest of n residuals hold at least k/n of their energy: what is dropped is at most
        # sqrt(1 - k/n) of the round's step, over the whole model (one tensor may be dropped whole)
        step = torch.cat([(merged["lossless"][k] - start[k]).reshape(-1) for k in floats]).norm()
        gap = torch.cat([(merged["lossy"][k] - merged["lossless"][k]).reshape(-1) for k in floats]).norm()
        k, n = ServerModel(run).codec.k, ServerModel(run).codec.layout.numel
        assert 0 < gap <= (1 - k / n) ** 0.5 * step
        return
    for key in floats:
        step = (merged["lossless"][key] - start[key]).norm()
        gap = (merged["lossy"][key] - merged["lossless"][key]).norm()
        assert gap <= 0.05 * step + 1e-6, key


# --------------------------------------------------------------------------- HRP directions
def test_hrp_finds_the_kronecker_factors_of_each_block_and_the_singular_vectors_of_a_matrix():
    from fedmud.decomposition import BlockKroneckerUpdate, LowRankUpdate
    from fedmud.projection import hrp_directions

    g = torch.Generator().manual_seed(0)
    kron = BlockKroneckerUpdate((16, 16, 3, 3), "aad", 3, 4)
    left, right = torch.randn(kron.blocks, 3, 3, generator=g), torch.randn(kron.blocks, 4, 4, generator=g)
    delta = kron.product(left, right)[: kron.numel].reshape(kron.weight_shape)
    found = hrp_directions(kron, delta, scale=2.0)
    for k in range(kron.blocks - 1):  # the last block is padded
        cos = (found["F1"][k] * left[k]).sum() / (found["F1"][k].norm() * left[k].norm())
        assert abs(float(cos)) > 0.999 and abs(float(found["F1"][k].norm()) - 2.0) < 1e-4
        cos = (found["F2"][k] * right[k]).sum() / (found["F2"][k].norm() * right[k].norm())
        assert abs(float(cos)) > 0.999
    mat = LowRankUpdate((32, 24), "aad", rank=3)
    u = torch.linalg.qr(torch.randn(32, 3, generator=g))[0]
    delta = u @ torch.randn(3, 24, generator=g)
    f1 = hrp_directions(mat, delta, scale=1.0)["F1"]
    assert torch.allclose(f1 @ f1.T @ u, u, atol=1e-4)  # same column space
