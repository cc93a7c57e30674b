"""The models users bring (:mod:`tests.zoo_factories`: seven Hugging Face ``transformers``, five ``timm``
and a PEFT-wrapped GPT-2, each with its own head and forward), planned, trained and merged.

Each plans within 1.05 × 1/32 of dense FedAvg's bytes (ShuffleNet-V2 and the MobileViTs, whose norms and
biases alone exceed 1/32, send those at int8), or is refused with the smallest ratio it can reach and
the tensors that use it up; each trains a round of the federated loop at 1/32 (a refused one at a
ratio it can reach); ties stay one tensor and frozen tensors stay bitwise frozen through the merge.
At the end, GPT-2, DistilBERT and PEFT's GPT-2 federate through ``flwr run``.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from fedmud.config import ConfigError, parse_run_config
from fedmud.data import test_loader as held_out_loader
from fedmud.rounds import build_codec, build_decomposed, run_model_factory, simulate_in_process
from fedmud.training import evaluate

from bench.suites import FLOAT32_UP  # float32 uploads: the tests build or read them by hand

from .conftest import finished_run

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("peft")

DATA = {  # model -> the dataset it reads
    "gpt2": "tokens",
    "bert": "tokens",
    "distilbert": "tokens",
    "t5": "tokens",
    "llama": "tokens",
    "vit": "images",
    "whisper": "features",
    "efficientnet": "images",
    "convnext": "images",
    "deit": "images",
    "regnet": "images",
    "mobilevit": "images",
    "shufflenet": "images",
    "mobilevitv2": "images",
    "peft_gpt2": "tokens",
}
# Their 1-D tensors and buffers (biases, norms, running statistics) and smallest updates exceed 1/32 at
# float32 (MobileViT-XXS 1/30.5, ShuffleNet-V2 1/28.5, MobileViT-v2 1/27.6): vector-uplink=auto sends
# the vectors at int8
INT8_VECTORS = ("mobilevit", "shufflenet", "mobilevitv2")
# Refused at 1/32, with what the refusal names: PEFT's GPT-2 trains only rank-4 LoRA matrices and a
# head, which no update can shrink to 1/32 of themselves.
REFUSED = {
    "peft_gpt2": "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight (smallest kron/aad update)",
}
PLANNED = [name for name in DATA if name not in REFUSED]
TIED = {  # one tensor, its names
    "t5": ("transformer.shared.weight", "transformer.encoder.embed_tokens.weight", "transformer.decoder.embed_tokens.weight"),
}
FROZEN = {  # what the model's owner froze
    "whisper": "encoder.embed_positions.weight",  # Hugging Face's sinusoidal positions
    "peft_gpt2": "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight",  # PEFT's base weights
}
TRAIN_RATIO = {"peft_gpt2": "1/8"}  # what the refused ones train at


def zoo_run(name: str, **overrides):
    return parse_run_config({**FLOAT32_UP, 
        "model": f"tests.zoo_factories:{name}",
        "dataset": f"tests.zoo_factories:{DATA[name]}",
        "num-partitions": 2,
        "num-server-rounds": 1,
        "local-epochs": 2,
        "batch-size": 8,
        "optimizer": "adam",
        "lr": 0.01,
        **overrides,
    })


@functools.cache
def one_round(name: str) -> dict:
    """Round 0 and the server after one round of :func:`simulate_in_process`, with the held-out loss of each."""
    run = zoo_run(name, ratio=TRAIN_RATIO.get(name, "1/32"))
    initial = build_decomposed(run)
    server, _, uploaded, _ = simulate_in_process(run)
    loader = held_out_loader(run.data)
    return {
        "initial": initial.global_state(),
        "server": server,
        "uploaded": uploaded,
        "loss": (evaluate(initial, loader, torch.device("cpu"), server.task)[0], server.evaluate(loader)[0]),
    }


@pytest.mark.parametrize("name", PLANNED)
def test_a_model_plans_its_uploads_within_1_05_of_a_32nd_of_dense_fedavg(name):
    run = zoo_run(name, ratio="1/32")
    model = build_decomposed(run)
    uploaded = sum(t.numel() for t in model.uploaded_state().values())
    dense = sum(t.numel() for t in model.global_state().values() if t.is_floating_point())  # a tied tensor once
    assert uploaded == model.plan.upload and dense == model.plan.dense_reference
    coded = build_codec(run, model).payload_nbytes  # float32 values, and int8 vectors where planned
    assert coded == model.plan.upload_bytes <= 1.05 * 4 * dense / 32
    assert bool(model.plan.int8_names()) == (name in INT8_VECTORS)  # the others plan as they did


@pytest.mark.parametrize("name", INT8_VECTORS)
def test_a_model_whose_norms_and_biases_exceed_a_32nd_uploads_a_32nd_of_dense_bytes_in_a_round(name):
    done = one_round(name)
    model = done["server"].model
    vectors = {t.name for t in model.plan.tensors if t.reason in ("1-D", "buffer")}
    assert model.plan.int8_names() == vectors
    assert max(done["uploaded"]) / 2 <= 1.05 * model.plan.dense_reference_bytes / 32  # two clients


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_model_that_cannot_reach_a_32nd_is_refused_naming_what_uses_it_up_and_a_ratio_that_plans(name):
    with pytest.raises(ConfigError) as refusal:
        build_decomposed(zoo_run(name, ratio="1/32"))
    message = str(refusal.value)
    assert message.startswith("ratio=0.03125 (1/32.0) cannot be reached") and REFUSED[name] in message
    floor = float(re.search(r"allowed: ratio >= ([0-9.]+)", message)[1])  # printed to 4 digits
    ratio = math.ceil(floor * 1e4) / 1e4
    model = build_decomposed(zoo_run(name, ratio=ratio))
    assert model.plan.upload <= ratio * model.plan.trained_reference


def test_a_refusal_counts_the_values_that_train_and_says_how_many_are_frozen():
    wrapped = run_model_factory(zoo_run("peft_gpt2"))()
    trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in wrapped.parameters() if not p.requires_grad)
    counted = rf"of the model's {trained} trained values \(its {frozen} frozen ones upload nothing\) must upload"
    with pytest.raises(ConfigError, match=counted):
        build_decomposed(zoo_run("peft_gpt2", ratio="1/32"))


@pytest.mark.parametrize("name", list(DATA))
def test_a_model_trains_a_round_with_its_own_forward_and_stays_finite(name):
    done = one_round(name)
    after = done["server"].global_state()
    before_loss, after_loss = done["loss"]
    assert math.isfinite(after_loss) and after_loss != before_loss
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())
    assert any(not torch.equal(after[n], done["initial"][n]) for n in after)  # the merge moved the model


@pytest.mark.parametrize("name", list(TIED))
def test_tied_weights_stay_one_trained_tensor_after_the_merge(name):
    done = one_round(name)
    model = done["server"].model
    first, *others = TIED[name]
    assert all(model.base_weight(n) is model.base_weight(first) for n in others)  # one W under every name
    assert all(_update_on(model, n) is _update_on(model, first) for n in others)  # and one update of it
    assert not torch.equal(done["server"].global_state()[first], done["initial"][first])  # and it trained
    assert not set(others) & set(done["server"].global_state())  # uploaded and merged once


@pytest.mark.parametrize("name", list(FROZEN))
def test_frozen_tensors_stay_bitwise_frozen_through_the_merge(name):
    done = one_round(name)
    plan = done["server"].model.plan
    frozen = {t.name for t in plan.tensors if t.frozen}
    assert FROZEN[name] in frozen
    after = done["server"].global_state()
    assert all(torch.equal(after[n], done["initial"][n]) for n in frozen)


def _update_on(model, name: str):
    """The update registered on tensor ``name``, an alias or not."""
    owner, attr = model.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
    return owner.parametrizations[attr][0]


# --- through Flower's simulation: `flwr run` ----------------------------------------------------

FLOWER = 'num-server-rounds=2 local-epochs=2 batch-size=8 optimizer="adam" lr=0.01'


def _uploads(run: dict) -> list[int]:
    return [r["bytes"] for r in run["ledger"]["records"] if r["direction"] == "up"]


@pytest.mark.parametrize("name", ["gpt2", "distilbert"])
def test_a_transformer_trains_two_rounds_through_flowers_simulation_within_a_32nd(simulation_superlink, tmp_path, name):
    config = f'model="tests.zoo_factories:{name}" dataset="tests.zoo_factories:tokens" {FLOWER}'
    run = finished_run(simulation_superlink, tmp_path, config)
    rows = run["results"]
    assert [r["accepted"] for r in rows[1:]] == [3, 3]
    assert rows[2]["loss"] < rows[0]["loss"] and all(math.isfinite(r["loss"]) for r in rows)
    assert max(_uploads(run)) <= 1.05 * run["ledger"]["dense_up_bytes"] / 32


def _round_0(method: str, ratio: str) -> dict[str, torch.Tensor]:
    """Round 0 of the PEFT run as every party builds it (same factory and seed)."""
    return build_decomposed(zoo_run("peft_gpt2", method=method, ratio=ratio)).global_state()


@pytest.mark.parametrize("method, ratio", [("fedavg", "1"), ("fedmud", "1/8")])  # fedavg has no ratio
def test_a_peft_model_federates_through_flowers_simulation_with_its_base_bitwise_frozen(
    simulation_superlink, tmp_path, method, ratio
):
    model = 'model="tests.zoo_factories:peft_gpt2" dataset="tests.zoo_factories:tokens"'
    config = f'{model} method="{method}" ratio="{ratio}" {FLOWER}'
    run = finished_run(simulation_superlink, tmp_path, config)
    initial = _round_0(method, ratio)
    final = torch.load(run["dir"] / "checkpoint.pt", weights_only=True)["server"]["global_state"]
    wrapped = run_model_factory(zoo_run("peft_gpt2"))()  # PEFT's model as the factory builds it
    frozen = {n for n, p in wrapped.named_parameters() if not p.requires_grad} & set(initial)
    assert FROZEN["peft_gpt2"] in frozen and all(torch.equal(final[n], initial[n]) for n in frozen)
    lora = [n for n in initial if ".lora_B." in n]
    assert lora and all(not torch.equal(final[n], initial[n]) for n in lora)  # the adapters trained
    values = run["summary"]["values"]
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert values["trained"] == trainable < values["dense"]
    if method == "fedavg":  # exactly PEFT's trainable tensors
        assert values["upload"] == trainable
    else:  # PEFT's trainable matrices, decomposed
        assert values["upload"] <= trainable / 8
    assert max(_uploads(run)) <= 1.05 * run["ledger"]["dense_up_bytes"] / 32
