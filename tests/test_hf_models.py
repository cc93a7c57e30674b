"""Hugging Face models by directory (``model = "hf:DIR"``): what ``save_pretrained`` wrote is round 0,
with a head for the data; a source that is not there is refused with one message."""

from __future__ import annotations

import pytest
import torch

from fedmud.config import ConfigError, parse_run_config
from fedmud.rounds import build_decomposed, simulate_in_process
from fedmud.sync import state_digest

from .conftest import finished_run

transformers = pytest.importorskip("transformers")

RUN = {"num-partitions": 3, "local-epochs": 1, "test-fraction": 0.2, "lr": 0.02, "optimizer": "adam", "ratio": 0.125}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A small ViT for 1×28×28 images with 10 labels, as save_pretrained writes it."""
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, num_labels=10,
    )
    torch.manual_seed(123)
    model = transformers.ViTForImageClassification(config)
    path = tmp_path_factory.mktemp("vit")
    model.save_pretrained(path)
    return path, {n: t.clone() for n, t in model.state_dict().items()}


def test_a_saved_model_is_round_0_on_every_party_whatever_the_seed(vit_dir):
    path, saved = vit_dir
    built = [build_decomposed(parse_run_config({**RUN, "model": f"hf:{path}", "seed": s})) for s in (0, 1)]
    states = [b.global_state() for b in built]
    assert all(torch.equal(states[0][n], saved[n]) for n in saved)  # the saved weights, not the seed's
    assert state_digest(states[0]) == state_digest(states[1])


def test_a_saved_model_federates_through_the_round_code(vit_dir):
    path, _ = vit_dir
    run = parse_run_config({**RUN, "model": f"hf:{path}", "num-server-rounds": 1})
    server, history, _, _ = simulate_in_process(run)
    assert server.model.plan.upload <= 0.125 * server.model.plan.dense_reference
    assert history[-1] > history[0]


def test_a_new_task_gets_a_head_drawn_from_the_run_seed(tmp_path):
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=7,  # another task's head: 7 labels
    )
    saved = transformers.ViTForImageClassification(config)
    saved.save_pretrained(tmp_path)
    run = parse_run_config({**RUN, "model": f"hf:{tmp_path}", "ratio": 0.25})
    first, again = (build_decomposed(run).global_state() for _ in range(2))
    assert first["classifier.weight"].shape == (10, 32)  # MNIST's 10 classes
    assert torch.equal(first["classifier.weight"], again["classifier.weight"])  # drawn from the run seed
    assert torch.equal(first["vit.embeddings.cls_token"], saved.state_dict()["vit.embeddings.cls_token"])


def test_a_directory_that_is_not_there_is_refused_naming_it_and_what_is_allowed(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"model='hf:{missing}' is not allowed: the directory {missing} does not exist; give 'hf:DIRECTORY'"):
        build_decomposed(parse_run_config({"model": f"hf:{missing}"}))
    with pytest.raises(ConfigError, match="holds no config.json"):
        build_decomposed(parse_run_config({"model": f"hf:{tmp_path}"}))


def test_a_text_model_on_image_data_is_refused_naming_the_head_it_lacks(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2Model(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="with image data: GPT2Config has no ImageClassification head"):
        build_decomposed(parse_run_config({"model": f"hf:{tmp_path}"}))


def test_the_model_key_names_the_hf_form_when_a_value_is_not_allowed():
    with pytest.raises(ConfigError, match="or a Hugging Face model as 'hf:DIRECTORY'"):
        parse_run_config({"model": "no-such-model"})


def test_a_timm_model_trains_through_flowers_simulation_within_the_ratio(simulation_superlink, tmp_path):
    pytest.importorskip("timm")
    run = finished_run(
        simulation_superlink, tmp_path, 'model="tests.factories:timm_resnet" num-server-rounds=2 local-epochs=1'
    )
    rows = run["results"]
    assert all(r["accepted"] == 3 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3  # 0.12 -> 0.86 in process when written
    uploads = [r["bytes"] for r in run["ledger"]["records"] if r["direction"] == "up"]
    assert max(uploads) <= 1.05 * run["ledger"]["dense_up_bytes"] / 32
    values = run["summary"]["values"]  # nothing frozen: dense FedAvg of the whole model is of what trains
    assert values["trained"] == values["dense"] and values["upload"] <= values["dense"] / 32
