"""Upload codecs (float32, float16, int8/int4/int2, sign, top-k), error feedback and the projections behind it."""

import math

import numpy as np
import pytest
import torch

from fedmud.codec import SCHEMES, Codec, PayloadError, topk_count
from fedmud.layout import UploadLayout
from fedmud.config import LINK_CODECS, UPLINKS, DecompositionConfig, parse_run_config
from fedmud.feedback import ErrorFeedback
from fedmud.mud import decompose
from fedmud.models import build_model
from fedmud.projection import linear_delta, project_to_trained
from fedmud.rounds import ClientModel, ServerModel
from fedmud.sync import CHAIN, Downlink

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

LOSSY = [name for name, scheme in SCHEMES.items() if scheme.residual]
SCALED = [name for name, scheme in SCHEMES.items() if scheme.chunk]  # int8, int4, int2, sign
INTS = ["int8", "int4", "int2"]
PACKED = ["int4", "int2", "sign"]
# tensors of odd sizes, one longer than every chunk: chunks end at tensor ends, packed bytes are padded
ODD = UploadLayout((("conv", (37, 29)), ("bias", (3,)), ("fc", (1030,)), ("scalar", ())))


def _model(**kw):
    torch.manual_seed(0)
    return decompose(build_model("cnn-mnist"), DecompositionConfig(**kw))


def _codec(model, scheme):
    layout = model.upload_layout()
    k = topk_count(layout.numel, model.dense_reference_numel, 1 / 32) if scheme == "topk" else 0
    return Codec(layout, scheme, k)


def _gaussian(layout, seed=0):
    return np.random.default_rng(seed).standard_normal(layout.numel).astype(np.float32)


def _per_chunk(codec, reduce, x):
    """``reduce`` (np.max, np.mean) of |x| over each chunk, computed tensor by tensor."""
    out, offset = [], 0
    for _, shape in codec.layout.entries:
        size = math.prod(shape)
        for start in range(0, size, codec.spec.chunk):
            out.append(reduce(np.abs(x[offset + start : offset + min(size, start + codec.spec.chunk)]).astype(np.float64)))
        offset += size
    return np.asarray(out)


@pytest.fixture
def vector():
    model = _model()
    return model, np.random.default_rng(0).standard_normal(model.upload_layout().numel).astype(np.float32)


# --------------------------------------------------------------------------- the table
def test_the_config_allows_every_scheme_of_the_table_and_links_all_but_topk():
    assert UPLINKS == tuple(SCHEMES) == ("float32", "float16", "int8", "int4", "int2", "sign", "topk")
    assert LINK_CODECS == tuple(name for name in SCHEMES if name != "topk")
    assert [name for name in SCHEMES if not SCHEMES[name].residual] == ["float32"]


@pytest.mark.parametrize("layout", ["model", "odd"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_bytes_on_the_wire_are_what_the_scheme_promises(scheme, layout):
    model = _model()
    layout = model.upload_layout() if layout == "model" else ODD
    k = topk_count(layout.numel, model.dense_reference_numel, 1 / 32) if scheme == "topk" else 0
    codec = Codec(layout, scheme, k)
    x = _gaussian(layout)
    parts = codec.encode(x)
    nbytes = sum(a.nbytes for a in parts.values())
    assert nbytes == codec.payload_nbytes == codec.stats.payload_bytes
    # codes below 8 bits send norm layers' running statistics as int8 (the model layout has them)
    stats = [shape for name, shape in layout.entries if name in layout.statistics]
    coded = [shape for name, shape in layout.entries if name not in layout.statistics]
    if scheme in ("float32", "float16", "int8", "topk"):
        coded, stats = coded + stats, []
    n = sum(math.prod(shape) for shape in coded)
    # one float32 scale per chunk, chunks never crossing a tensor
    chunks = sum(-(-math.prod(shape) // (SCHEMES[scheme].chunk or 1)) for shape in coded)
    expected = {
        "float32": 4 * n,
        "float16": 2 * n,
        "int8": n + 4 * chunks,
        "int4": -(-n // 2) + 4 * chunks,
        "int2": -(-n // 4) + 4 * chunks,
        "sign": -(-n // 8) + 4 * chunks,
        "topk": 8 * codec.k,
    }[scheme]
    expected += sum(math.prod(shape) + 4 * -(-math.prod(shape) // 1024) for shape in stats)
    assert (layout == ODD) or bool(stats) == (scheme in ("int4", "int2", "sign"))
    assert nbytes == expected


@pytest.mark.parametrize("scheme", ["int4", "int2", "sign"])
def test_low_bit_codes_keep_an_unchanged_running_variance_unchanged(scheme):
    """No zero level in sign/int2: the statistics ride as int8, so a variance that did not move stays put."""
    model = _model()
    layout = model.upload_layout()
    codec = Codec(layout, scheme)
    x = _gaussian(layout)
    offset = 0
    for name, shape in layout.entries:
        size = math.prod(shape)
        if name.endswith("running_var"):
            x[offset : offset + size] = 0.0
            x[offset] = 1.0  # one channel moved: a sign code would send every other one ± its mean
        offset += size
    decoded = codec.decode_vector(codec.encode(x))
    offset = 0
    for name, shape in layout.entries:
        size = math.prod(shape)
        if name.endswith("running_var"):
            assert np.all(decoded[offset + 1 : offset + size] == 0.0), name
        offset += size


def test_the_scales_cost_what_the_table_says_per_value():
    assert {name: SCHEMES[name].chunk for name in SCALED} == {"int8": 1024, "int4": 512, "int2": 512, "sign": 512}
    assert {name: SCHEMES[name].bits_per_value for name in SCALED} == {
        "int8": 8 + 1 / 32, "int4": 4 + 1 / 16, "int2": 2 + 1 / 16, "sign": 1 + 1 / 16
    }


# --------------------------------------------------------------------------- nearest rounding
def test_float32_is_lossless_and_float16_is_close(vector):
    model, x = vector
    assert np.array_equal(_codec(model, "float32").decode(_codec(model, "float32").encode(x)), x)
    half = _codec(model, "float16")
    assert np.abs(half.decode_vector(half.encode(x)) - x).max() <= 1e-3 * np.abs(x).max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int8_and_int4_span_each_chunks_largest_magnitude_and_err_by_half_a_step(scheme):
    codec = Codec(ODD, scheme)
    x = 3 * _gaussian(ODD)
    parts = codec.encode(x)
    top = {"int8": 127, "int4": 7}[scheme]
    assert np.allclose(parts["scales"], _per_chunk(codec, np.max, x) / top, rtol=1e-6)
    err = np.abs(codec.decode_vector(parts) - x)
    assert (err <= codec.chunks.spread(parts["scales"]) * (0.5 + 1e-5)).all()


def test_int2_has_four_levels_a_step_of_1_25_mean_magnitudes_and_clips_beyond_the_outer_ones():
    codec = Codec(ODD, "int2")
    x = _gaussian(ODD)
    x[:5] = [40.0, -40.0, 0.0, 1e-3, -1e-3]  # outliers in the first chunk
    parts = codec.encode(x)
    step = np.minimum(1.25 * _per_chunk(codec, np.mean, x), _per_chunk(codec, np.max, x) / 1.5)
    assert np.allclose(parts["scales"], step, rtol=1e-6)
    scale = codec.chunks.spread(parts["scales"])
    decoded = codec.decode_vector(parts)
    assert set(np.unique(np.round(decoded / scale, 6))) <= {-1.5, -0.5, 0.5, 1.5}
    inside = np.abs(x) <= 1.5 * scale
    assert (np.abs(decoded - x)[inside] <= scale[inside] * (0.5 + 1e-5)).all()
    assert np.array_equal(decoded[~inside], (np.sign(x) * 1.5 * scale)[~inside].astype(np.float32))
    assert decoded[0] == 1.5 * parts["scales"][0] and decoded[1] == -decoded[0]


def test_sign_decodes_the_sign_times_each_chunks_mean_magnitude():
    codec = Codec(ODD, "sign")
    x = _gaussian(ODD)
    x[0] = 0.0  # counts as +
    parts = codec.encode(x)
    assert np.allclose(parts["scales"], _per_chunk(codec, np.mean, x), rtol=1e-6)
    scale = codec.chunks.spread(parts["scales"])
    assert np.array_equal(codec.decode_vector(parts), np.where(x >= 0, scale, -scale))
    assert np.array_equal(parts["payload"], np.packbits(x >= 0))


@pytest.mark.parametrize(
    ("scheme", "relative_error"), [("int8", 1.1e-4), ("int4", 0.019), ("int2", 0.125), ("sign", 0.37)]
)
def test_each_code_loses_what_the_module_docstring_says_on_a_gaussian_vector(scheme, relative_error):
    """Relative squared error ||x - decoded||² / ||x||² of nearest rounding, 391,840 values (FedAvg's CNN)."""
    codec = _codec(_model(method="fedavg"), scheme)
    x = _gaussian(codec.layout)
    err = codec.decode_vector(codec.encode(x)) - x
    assert np.sum(err.astype(np.float64) ** 2) / np.sum(x.astype(np.float64) ** 2) <= relative_error


def test_chunks_never_cross_a_tensor():
    """A tiny tensor after a large one gets its own scale, so it is not rounded to zero."""
    layout = UploadLayout((("big", (100,)), ("small", (3,))))
    x = np.concatenate([np.full(100, 1000.0), [0.1, -0.2, 0.3]]).astype(np.float32)
    for scheme in SCALED:
        codec = Codec(layout, scheme)
        decoded = codec.decode_vector(codec.encode(x))
        assert np.abs(decoded[100:] - x[100:]).max() <= 0.2, scheme


# --------------------------------------------------------------------------- stochastic rounding
DRAWS = 4000


def _draws(scheme, x):
    """``DRAWS`` stochastic encodings of ``x`` at once: one tensor per draw, so each gets x's scales."""
    layout = UploadLayout(tuple((f"draw{i}", (x.size,)) for i in range(DRAWS)))
    codec = Codec(layout, scheme)
    parts = codec.encode(np.tile(x, DRAWS), np.random.default_rng(11))
    return codec.decode_vector(parts).reshape(DRAWS, x.size), parts["scales"][0]


@pytest.mark.parametrize("scheme", INTS)
def test_stochastic_int_codes_are_unbiased_and_err_by_less_than_a_step(scheme):
    x = _gaussian(UploadLayout((("x", (300,)),)), seed=4)
    decoded, step = _draws(scheme, x)
    top = (SCHEMES[scheme].codes - 1) / 2
    assert np.isclose(step, np.abs(x).max() / top, rtol=1e-6)  # spans max|x|: nothing clipped, also for int2
    assert (np.abs(decoded - x) < step * (1 + 1e-5)).all()
    tolerance = 5 * (step / 2) / np.sqrt(DRAWS)  # 5 standard errors of a mean of DRAWS roundings
    assert np.abs(decoded.mean(axis=0) - x).max() <= tolerance
    nearest = Codec(UploadLayout((("x", (300,)),)), scheme)
    assert np.abs(nearest.decode_vector(nearest.encode(x)) - x).mean() > tolerance  # the test can tell


def test_stochastic_sign_is_unbiased_decoding_plus_or_minus_the_largest_magnitude():
    x = _gaussian(UploadLayout((("x", (300,)),)), seed=4)
    decoded, peak = _draws("sign", x)
    assert np.isclose(peak, np.abs(x).max(), rtol=1e-6)
    assert set(np.unique(decoded)) == {-peak, peak}
    assert np.abs(decoded.mean(axis=0) - x).max() <= 5 * peak / np.sqrt(DRAWS)


def test_the_same_generator_seed_rounds_the_same_and_another_differently():
    codec = Codec(ODD, "int4")
    x = _gaussian(ODD)
    first, again = (codec.encode(x, np.random.default_rng(1)) for _ in range(2))
    other = codec.encode(x, np.random.default_rng(2))
    assert np.array_equal(first["payload"], again["payload"])
    assert not np.array_equal(first["payload"], other["payload"])


def test_stochastic_rounding_in_a_round_is_seeded_by_the_round_and_the_client():
    run = parse_run_config({"uplink": "int2", "stochastic-rounding": True, "local-epochs": 1})
    client = ClientModel(run, torch.device("cpu"))
    first = client.train_round(123, _tiny_loader(), client_id=0)[0]
    again = client.train_round(123, _tiny_loader(), client_id=0)[0]
    other = client.train_round(123, _tiny_loader(), client_id=1)[0]
    assert np.array_equal(first["payload"], again["payload"])
    assert not np.array_equal(first["payload"], other["payload"])
    nearest = ClientModel(parse_run_config({"uplink": "int2", "stochastic-rounding": False, "local-epochs": 1}), torch.device("cpu"))
    assert np.array_equal(nearest.train_round(123, _tiny_loader(), client_id=0)[0]["payload"],
                          nearest.train_round(123, _tiny_loader(), client_id=1)[0]["payload"])


def test_a_model_of_1_5_million_values_round_trips_within_each_codes_error():
    """Size, not speed (scripts/codec_speed.py times it): every value comes back, finite, within
    the code's relative error, nearest and stochastic rounding alike."""
    layout = UploadLayout((("a", (1000, 1000)), ("b", (500, 999)), ("c", (7,))))
    x = _gaussian(layout)
    bound = {"int8": 2e-4, "int4": 0.04, "int2": 0.9, "sign": 10.0}  # stochastic: README's figures
    for scheme in SCALED:
        codec = Codec(layout, scheme)
        for rng in (None, np.random.default_rng(0)):
            back = codec.decode_vector(codec.encode(x, rng))
            assert back.shape == x.shape and np.isfinite(back).all(), scheme
            err = np.sum((back - x).astype(np.float64) ** 2) / np.sum(x.astype(np.float64) ** 2)
            assert err <= bound[scheme], (scheme, rng, err)


# --------------------------------------------------------------------------- top-k
def test_topk_never_sends_more_than_float32_of_the_same_values():
    """FedMUD's upload is already 1/32: top-k at 1/32 of dense bytes would keep every value at 8 bytes."""
    model = _model()  # fedmud
    numel = model.upload_layout().numel
    codec = _codec(model, "topk")
    assert codec.k == numel // 2 and codec.payload_nbytes <= 4 * numel


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


# --------------------------------------------------------------------------- validation
def _replace(parts, name, array):
    return {**parts, name: array}


@pytest.mark.parametrize("scheme", SCALED)
def test_uploads_of_the_wrong_size_or_dtype_are_rejected(scheme):
    codec = Codec(ODD, scheme)
    parts = codec.encode(_gaussian(ODD))
    payload, scales = parts["payload"], parts["scales"]
    for name, array, says in [
        ("payload", payload[:-1], "shape"),
        ("payload", np.append(payload, payload[:1]), "shape"),
        ("payload", payload.reshape(1, -1), "shape"),
        ("payload", payload.view(np.uint8 if payload.dtype == np.int8 else np.int8), "dtype"),
        ("scales", scales[:-1], "shape"),
        ("scales", scales.astype(np.float64), "dtype"),
    ]:
        with pytest.raises(PayloadError, match=says):
            codec.validate(_replace(parts, name, array))
    with pytest.raises(PayloadError, match="expected"):
        codec.validate({"payload": payload})
    codec.validate(parts)  # the untouched upload passes


@pytest.mark.parametrize("scheme", SCALED)
def test_negative_non_finite_and_overflowing_scales_are_rejected(scheme):
    codec = Codec(ODD, scheme)
    parts = codec.encode(_gaussian(ODD))
    top = (SCHEMES[scheme].codes - 1) / 2 if scheme in INTS else 1.0
    bad_values = [(-1.0, "non-negative"), (np.nan, "non-finite"), (np.inf, "non-finite")]
    if scheme in INTS:  # sign decodes ±scale: a finite scale cannot overflow
        bad_values.append((np.float32(np.finfo(np.float32).max / top * 1.001), "1 scales overflow float32"))
    for value, says in bad_values:
        scales = parts["scales"].copy()
        scales[-1] = value
        with pytest.raises(PayloadError, match=says):
            codec.validate(_replace(parts, "scales", scales))


def test_the_largest_scale_that_does_not_overflow_decodes_to_finite_values():
    for scheme in INTS:
        codec = Codec(ODD, scheme)
        parts = codec.encode(_gaussian(ODD))
        top = np.float32((SCHEMES[scheme].codes - 1) / 2)
        largest = np.float32(np.finfo(np.float32).max / top)
        with np.errstate(over="ignore"):
            while not np.isfinite(largest * top):
                largest = np.nextafter(largest, np.float32(0))
        parts["scales"][:] = largest
        assert np.isfinite(codec.decode_vector(parts)).all(), scheme


@pytest.mark.parametrize("scheme", PACKED)
def test_the_padding_bits_of_the_last_byte_must_be_zero(scheme):
    codec = Codec(ODD, scheme)
    parts = codec.encode(_gaussian(ODD))
    assert ODD.numel % (8 // SCHEMES[scheme].bits)  # the last byte is padded
    payload = parts["payload"].copy()
    payload[-1] |= 1
    with pytest.raises(PayloadError, match="padding bits must be zero"):
        codec.validate(_replace(parts, "payload", payload))


def test_codes_beyond_the_outer_levels_are_rejected():
    """The encoder never sends them; times the largest scale they would overflow."""
    int4 = Codec(ODD, "int4")
    parts = int4.encode(_gaussian(ODD))
    payload = parts["payload"].copy()
    payload[0] |= 0xF0  # the first value's code: 15
    with pytest.raises(PayloadError, match="payload holds code 15; int4 codes must lie in"):
        int4.validate(_replace(parts, "payload", payload))
    int8 = Codec(ODD, "int8")
    parts = int8.encode(_gaussian(ODD))
    parts["payload"][0] = -128
    with pytest.raises(PayloadError, match="payload holds -128; int8 values must lie in"):
        int8.validate(parts)
    int2 = Codec(ODD, "int2")  # four codes, four levels: every byte but the padding is valid
    parts = int2.encode(_gaussian(ODD))
    parts["payload"][:-1] = 0xFF
    int2.validate(parts)


def test_malformed_topk_uploads_are_rejected(vector):
    model, x = vector
    topk = _codec(model, "topk")
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
@pytest.mark.parametrize(
    ("scheme", "kw", "stochastic"),
    [(scheme, kw, False) for scheme in LOSSY for kw in ({}, {"method": "fedavg"})]
    + [("int2", {"kind": "mat"}, False), ("sign", {}, True), ("int4", {"method": "fedavg"}, True)],
)
def test_error_feedback_loses_nothing_only_delays_it(scheme, kw, stochastic):
    """Σ ΔW(sent) + carried error == Σ ΔW(residual), per decomposed layer and for dense values."""
    model = _model(**kw)
    codec = _codec(model, scheme)
    ef = ErrorFeedback(model, codec)
    rng = np.random.default_rng(5)
    rounding = np.random.default_rng(6) if stochastic else None
    sums = {"res": {}, "sent": {}}
    dense_res = np.zeros(codec.layout.numel, np.float32)
    dense_sent = np.zeros_like(dense_res)
    for t in range(4):
        model.reset(100 + t)
        r = (0.01 * rng.standard_normal(codec.layout.numel)).astype(np.float32)
        target = ef.compensate(r)
        sent = codec.decode_vector(codec.encode(target, rounding))
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
        run = parse_run_config({**FLOAT32_UP, "local-epochs": 1, "lr": 0.05, "downlink-codec": "float32", **({"method": overrides.get("method")} if "method" in overrides else {}), **extra})
        server, client = ServerModel(run), ClientModel(run, torch.device("cpu"))
        parts, _, feedback = client.train_round(123, _tiny_loader())
        assert (feedback is not None) == run.uplink.error_feedback
        assert sum(a.nbytes for a in parts.values()) == server.codec.payload_nbytes
        server.apply_round(1, 123, [(server.codec.validate(parts), 64.0)])
        fresh = ClientModel(run, torch.device("cpu"))
        fresh.sync(None, server.downlink(Downlink(CHAIN, server.round, 0, tuple(server.chain.links)), 2))
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
