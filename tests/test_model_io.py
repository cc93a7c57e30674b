"""Model I/O: batches that are tensor pairs or dicts, outputs that are tensors, tuples, dicts or
Hugging Face ``ModelOutput``s, and one clear message when a model and its task do not fit."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader

from fedmud.config import TrainConfig, parse_run_config
from fedmud.model_io import ModelIOError, predictions, split_batch
from fedmud.rounds import simulate_in_process
from fedmud.task import CLASSIFICATION
from fedmud.training import evaluate, train_local

from .conftest import ROOT

transformers = pytest.importorskip("transformers")


def test_a_tensor_pair_a_dict_with_labels_and_a_dict_beside_its_target_are_batches():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    pair = split_batch((x, y))
    assert pair.args[0] is x and pair.target is y and not pair.kwargs
    mapping = split_batch({"input_ids": x, "attention_mask": x, "labels": y})
    assert set(mapping.kwargs) == {"input_ids", "attention_mask"} and mapping.target is y and not mapping.args
    beside = split_batch(({"input_ids": x}, y))
    assert set(beside.kwargs) == {"input_ids"} and beside.target is y


def test_a_dict_batch_without_a_target_is_refused_naming_its_keys_and_the_allowed_ones():
    with pytest.raises(ModelIOError, match=r"keys \['attention_mask', 'input_ids'\], without a target: .* labels, label"):
        split_batch({"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)})


def test_predictions_are_read_from_a_tensor_a_tuple_a_dict_and_a_model_output():
    logits = torch.randn(2, 5)
    output = transformers.modeling_outputs.SequenceClassifierOutput(loss=torch.tensor(1.0), logits=logits)
    for out in (logits, (logits, None), {"logits": logits}, output):
        assert predictions(out) is logits
    hidden = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=logits)
    with pytest.raises(ModelIOError, match="BaseModelOutput with keys \\['last_hidden_state'\\]; the task reads"):
        predictions(hidden)


def _token_task(n: int = 64, seed: int = 0) -> list[dict]:
    """Sequences of 8 tokens whose label is whether token 3 appears: learnable by a small transformer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, torch.randint(0, 8, (int(labels.sum()),), generator=g)] = 3
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": y} for i, y in zip(ids, labels)]


def _distilbert(cls=None):
    config = transformers.DistilBertConfig(
        vocab_size=40, dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=16, num_labels=2
    )
    torch.manual_seed(0)
    return (cls or transformers.DistilBertForSequenceClassification)(config)


def test_a_hugging_face_classifier_trains_on_dict_batches_with_no_task_of_its_own():
    loader = DataLoader(_token_task(128), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = _distilbert()
    before = evaluate(model, loader, torch.device("cpu"), CLASSIFICATION)
    train_local(model, loader, TrainConfig(lr=3e-3, local_epochs=10, optimizer="adam"), torch.device("cpu"))
    after = evaluate(model, loader, torch.device("cpu"), CLASSIFICATION)
    assert before[1] < 0.6 and after[1] > 0.9  # batches and outputs were read right (0.52 -> 1.0 when written)


def test_a_model_whose_output_the_task_cannot_read_stops_at_its_first_batch_with_one_message():
    loader = DataLoader(_token_task(16), batch_size=8)
    with pytest.raises(ModelIOError) as caught:
        evaluate(_distilbert(transformers.DistilBertModel), loader, torch.device("cpu"), CLASSIFICATION)
    assert "the model returned a BaseModelOutput with keys ['last_hidden_state']" in str(caught.value)
    with pytest.raises(ModelIOError, match=r"local training: the model DistilBertForSequenceClassification cannot take"):
        bad = DataLoader([{"pixel_values": torch.zeros(3), "labels": torch.tensor(0)}] * 4, batch_size=2)
        train_local(_distilbert(), bad, TrainConfig(), torch.device("cpu"))


def hf_vit(num_classes, input_shape):
    """Hugging Face's ViT image classifier (random weights, from a config): returns ImageClassifierOutput."""
    channels, size, _ = input_shape
    config = transformers.ViTConfig(
        image_size=size, patch_size=7, num_channels=channels, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, num_labels=num_classes,
    )
    return transformers.ViTForImageClassification(config)


def test_a_hugging_face_vit_federates_through_the_round_code_within_the_ratio():
    run = parse_run_config(
        {"num-partitions": 3, "num-server-rounds": 2, "local-epochs": 1, "test-fraction": 0.2, "lr": 0.02,
         "optimizer": "adam", "ratio": 0.125}
    )
    server, history, uploaded, _ = simulate_in_process(run, model_fn=lambda: hf_vit(10, (1, 28, 28)))
    plan = server.model.plan
    assert plan.upload <= 0.125 * plan.dense_reference and len(server.model.parametrised_names) >= 8
    assert history[-1] > history[0] + 0.1, history


def test_flwr_run_with_a_model_whose_output_the_task_cannot_read_fails_before_round_1_and_exits_1(
    simulation_superlink, tmp_path
):
    result = subprocess.run(
        [str(ROOT / "scripts" / "flwr-run.sh"), ".", "test", "-c", f'model="tests.factories:no_logits" run-dir="{tmp_path}"'],
        cwd=ROOT, env=simulation_superlink, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    assert "the model returned a dict with keys ['hidden_states']" in result.stderr
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and "hidden_states" in summary["error"]
    assert not list(tmp_path.glob("*/results.json"))  # it stopped at the round-0 evaluation: no round ran


# --- causal language modelling ---------------------------------------------------------------------


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=24, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _lm_batches() -> list[dict]:
    """Counting sequences (t, t+1, ...) mod 24, the later ones padded (-100 labels) at the end."""
    out = []
    for start in range(16):
        ids = (torch.arange(12) + start) % 24
        labels = ids.clone()
        labels[12 - start % 5 :] = -100  # 0 to 4 padded positions
        out.append({"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels})
    return out


def test_causal_lm_loss_is_hugging_faces_own_next_token_loss():
    from fedmud.task import CAUSAL_LM

    model, batch = _gpt2(), torch.utils.data.default_collate(_lm_batches()[:4])
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.allclose(CAUSAL_LM.loss(output.logits, batch["labels"]), output.loss, atol=1e-6)


def test_causal_lm_means_are_over_predicted_tokens_not_sequences():
    from fedmud.task import CAUSAL_LM

    model, rows = _gpt2(), _lm_batches()
    loss, _ = evaluate(model, DataLoader(rows, batch_size=3), torch.device("cpu"), CAUSAL_LM)
    whole = torch.utils.data.default_collate(rows)
    with torch.no_grad():
        logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    assert loss == pytest.approx(CAUSAL_LM.loss(logits, whole["labels"]).item(), rel=1e-5)  # one mean over all tokens


def test_a_language_model_learns_under_the_causal_lm_task_and_its_perplexity_falls():
    from fedmud.task import CAUSAL_LM

    assert parse_run_config({"task": "causal-lm"}).task == "causal-lm"
    model, loader = _gpt2(), DataLoader(_lm_batches(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    before, _ = evaluate(model, loader, torch.device("cpu"), CAUSAL_LM)
    train_local(model, loader, TrainConfig(lr=3e-3, local_epochs=15, optimizer="adam"), torch.device("cpu"), CAUSAL_LM)
    after, accuracy = evaluate(model, loader, torch.device("cpu"), CAUSAL_LM)
    assert math.exp(after) < math.exp(before) / 4 and accuracy > 0.5  # perplexity


def test_bf16_autocast_trains_and_leaves_everything_sent_float32():
    from fedmud.models import CNN
    from fedmud.mud import decompose

    run = parse_run_config({"autocast": "bf16", "local-epochs": 1})
    model = decompose(CNN(in_channels=1, num_classes=10, spatial=1), run.decomposition)
    model.reset(3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    before = {n: t.clone() for n, t in model.uploaded_state().items()}
    loss = train_local(model, loader, run.train, torch.device("cpu"))
    after = model.uploaded_state()
    assert math.isfinite(loss) and all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # it trained
