"""Text datasets (a ``text`` column): tokenised once with the ``tokenizer`` key's tokenizer into padded
dict batches; labels from the ``label`` column, or the tokens themselves under ``causal-lm``; the
``natural`` partition; and one message for each way text, tokenizer and model fail to fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmud.config import ConfigError, DataConfig, parse_run_config
from fedmud.data import DatasetInfo, client_loader, custom_data, dataset_info, partition_indices
from fedmud.data import test_loader as eval_loader
from fedmud.model_io import ModelIOError, check_first, split_batch
from fedmud.models import build_model
from fedmud.task import BUILTIN_TASKS, CLASSIFICATION, IGNORE, resolve_task
from fedmud.text import ByteTokenizer

from . import text_factories
from .text_factories import NAMES, word_tokenizer

transformers = pytest.importorskip("transformers")

LABELLED = "tests.text_factories:labelled_text"
UNLABELLED = "tests.text_factories:unlabelled_text"


def text(dataset: str = LABELLED, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, **{"tokenizer": "bytes", "num_partitions": 3, **kw})


def distilbert(vocab_size: int) -> transformers.PreTrainedModel:
    config = transformers.DistilBertConfig(
        vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=128, num_labels=4,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny DistilBERT and the WordPiece tokenizer it was built for, saved side by side."""
    tokenizer = word_tokenizer()
    path = tmp_path_factory.mktemp("distilbert")
    distilbert(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 language model and its tokenizer."""
    tokenizer = word_tokenizer()
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- batches -----------------------------------------------------------------------------------


def test_text_batches_are_padded_dicts_with_labels_from_the_label_column():
    config = text()
    batch = next(iter(client_loader(config, 0, batch_size=8, seed=0)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()  # padded to the batch's longest text
    assert torch.equal(batch["input_ids"][batch["attention_mask"] == 0], torch.zeros(int((lengths.max() - lengths).sum()), dtype=torch.long))
    train, _ = text_factories.labelled_text(seed=DataConfig().seed)
    own = partition_indices(config)[0]
    assert sorted(batch["labels"].tolist()) != [] and set(batch["labels"].tolist()) <= {train["label"][i] for i in own}


def test_byte_tokens_are_utf8_bytes_between_bos_and_eos():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("héllo", max_length=128)
    assert ids == [1, *(b + 3 for b in "héllo".encode()), 2] and len(tokenizer) == 259
    assert tokenizer.decode(ids) == "héllo"


def test_causal_lm_labels_are_the_tokens_with_padding_ignored():
    config = text(UNLABELLED, task="causal-lm")
    batch = next(iter(client_loader(config, 1, batch_size=8, seed=0)))
    padding = batch["attention_mask"] == 0
    assert padding.any()  # texts of different lengths
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])
    assert (batch["labels"][padding] == IGNORE).all()


def test_max_length_truncates_every_text():
    batch = next(iter(eval_loader(text(max_length=9))))
    assert batch["input_ids"].shape[1] == 9
    assert (batch["input_ids"][batch["attention_mask"].sum(1) == 9, -1] == ByteTokenizer.eos_token_id).all()


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_order():
    config = text()
    first, again, other = ([b["input_ids"] for b in client_loader(config, 2, batch_size=4, seed=s)] for s in (5, 5, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))


# --- what the data tells the model ---------------------------------------------------------


def test_info_gives_the_tokenizers_vocabulary_the_declared_classes_and_max_length():
    assert dataset_info(text(max_length=64)) == DatasetInfo((64,), len(NAMES), 259)
    assert dataset_info(text("tests.text_factories:plain_labels_text")).num_classes == 3  # the largest label + 1
    assert dataset_info(text(UNLABELLED, task="causal-lm")).num_classes == 1


def test_text_is_tokenised_once_per_process():
    config = text(tokenizer="tests.text_factories:counting_tokenizer")
    before = text_factories.CALLS["tokenizer"]
    data = custom_data(config)
    assert custom_data(text(tokenizer="tests.text_factories:counting_tokenizer", partition="dirichlet")) is data
    eval_loader(config), client_loader(config, 0, batch_size=4, seed=0)
    assert text_factories.CALLS["tokenizer"] == before + 1


def test_a_tokenizer_factory_and_a_saved_tokenizer_give_the_tokenizers_own_ids(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = text_factories.labelled_text(seed=DataConfig().seed)[1]["text"]
    expected = tokenizer(texts[:4], truncation=True, max_length=128)["input_ids"]
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in expected)
    for value in ("tests.text_factories:word_tokenizer", f"hf:{model_dir}"):
        batch = next(iter(eval_loader(text(tokenizer=value), batch_size=4)))
        assert [row[mask == 1].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])] == expected
        assert dataset_info(text(tokenizer=value)).vocab_size == len(tokenizer)


def test_tokenizer_auto_is_the_one_saved_beside_an_hf_model(model_dir):
    run = parse_run_config({"model": f"hf:{model_dir}", "dataset": LABELLED, "task": "sequence-classification"})
    assert run.data.tokenizer == f"hf:{model_dir}"
    assert parse_run_config({}).data.tokenizer == "auto"  # another model: auto until text needs one


# --- tasks and partitions ------------------------------------------------------------------


def test_sequence_classification_is_a_built_in_task_with_classifications_loss_and_accuracy():
    assert "sequence-classification" in BUILTIN_TASKS
    assert parse_run_config({"task": "sequence-classification"}).task == "sequence-classification"
    assert resolve_task("sequence-classification") is CLASSIFICATION


def test_the_natural_partition_gives_each_client_one_label():
    config = text(partition="natural")
    labels = custom_data(config).train_labels
    assert [sorted(set(labels[p].tolist())) for p in partition_indices(config)] == [[0], [1], [2]]


def test_the_natural_partition_needs_one_partition_per_label():
    with pytest.raises(ConfigError, match=r"num-partitions=4 is not allowed with partition='natural' .* the train split has 3; set num-partitions=3"):
        partition_indices(text(partition="natural", num_partitions=4))


def test_causal_lm_text_partitions_by_its_label_column_when_it_has_one():
    config = text(task="causal-lm", partition="natural")
    labels = custom_data(config).train_labels
    assert [set(labels[p].tolist()) for p in partition_indices(config)] == [{0}, {1}, {2}]
    batch = next(iter(client_loader(config, 0, batch_size=4, seed=0)))
    assert batch["labels"].shape == batch["input_ids"].shape  # the tokens, not the domain


def test_unlabelled_text_is_split_iid_and_a_split_by_label_is_refused():
    assert len(np.concatenate(partition_indices(text(UNLABELLED, task="causal-lm")))) == 45
    with pytest.raises(ConfigError, match="partition='dirichlet' is not allowed with dataset=.*: it splits by the 'label' column"):
        partition_indices(text(UNLABELLED, task="causal-lm", partition="dirichlet"))


# --- Hugging Face models on text -------------------------------------------------------------


def test_an_hf_model_gets_a_language_model_head_under_causal_lm(gpt2_dir):
    model = build_model(f"hf:{gpt2_dir}", text(UNLABELLED, task="causal-lm", tokenizer=f"hf:{gpt2_dir}"))
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_an_hf_sequence_classifier_learns_text_through_the_round_code(model_dir):
    from fedmud.rounds import simulate_in_process

    run = parse_run_config({
        "model": f"hf:{model_dir}", "dataset": LABELLED, "task": "sequence-classification", "num-partitions": 3,
        "optimizer": "adam", "lr": 0.01, "ratio": "1/4", "local-epochs": 2, "batch-size": 8, "num-server-rounds": 2,
    })
    server, history, _, _ = simulate_in_process(run)
    assert server.model.plan.upload <= server.model.plan.dense_reference / 4
    assert history[-1] > 0.6 > history[0]  # three topics: chance is a third; 0.87 when written


# --- one message for each misfit --------------------------------------------------------------


def test_a_tokenizer_larger_than_the_models_embedding_is_refused_naming_both_sizes(model_dir):
    config = text(tokenizer="bytes")
    with pytest.raises(ConfigError, match=(
        rf"tokenizer='bytes' is not allowed with model='hf:{model_dir}': the tokenizer's vocabulary has 259 tokens, "
        rf"the model's token embedding {len(word_tokenizer())}; give the tokenizer the model was built with"
    )):
        build_model(f"hf:{model_dir}", config)


def test_text_without_a_label_column_is_refused_under_a_classification_task():
    with pytest.raises(ConfigError, match=(
        r"dataset='tests.text_factories:unlabelled_text' is not allowed: with task='sequence-classification' every "
        r"text needs a class label, and the train set has no 'label' column \(its columns: \['text'\]\); expected a "
        r"'label' column of integer class labels >= 0 beside 'text' \(task='causal-lm' needs none\)"
    )):
        custom_data(text(UNLABELLED, task="sequence-classification"))


def test_a_dict_batch_without_the_forwards_inputs_names_the_missing_keys_and_the_parameters():
    batch = split_batch({"tokens": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])})
    with pytest.raises(ModelIOError, match=(
        r"it lacks input_ids; tokens is not among the forward's parameters; DistilBertForSequenceClassification"
        r".forward takes input_ids, attention_mask, inputs_embeds, labels, position_ids"
    )):
        check_first(distilbert(60), batch, CLASSIFICATION, "local training")


def test_tokenizer_auto_with_a_model_saved_without_its_tokenizer_is_refused(tmp_path):
    distilbert(60).save_pretrained(tmp_path)
    run = parse_run_config({"model": f"hf:{tmp_path}", "dataset": LABELLED, "task": "sequence-classification"})
    with pytest.raises(ConfigError, match=(
        rf"tokenizer='hf:{tmp_path}' is not allowed: the directory {tmp_path} holds no tokenizer .*tokenizer=auto "
        r"reads the one saved beside an hf: model\); save the model's tokenizer there"
    )):
        custom_data(run.data)


def test_tokenizer_auto_with_a_model_not_from_a_directory_asks_for_a_tokenizer():
    run = parse_run_config({"dataset": LABELLED, "model": "text-transformer"})
    with pytest.raises(ConfigError, match=(
        r"tokenizer='auto' is not allowed with dataset=.*: its text needs a tokenizer, .*choose bytes, 'hf:DIRECTORY' "
        r"or 'package.module:factory'"
    )):
        custom_data(run.data)


@pytest.mark.parametrize("value", ["", "byte", 3])
def test_a_bad_tokenizer_value_is_refused_at_parse_naming_what_is_allowed(value):
    with pytest.raises(ConfigError, match=rf"tokenizer={value!r} is not allowed; choose auto, bytes, 'hf:DIRECTORY'"):
        parse_run_config({"tokenizer": value})


def test_a_tokenizer_factory_that_returns_something_else_is_refused():
    with pytest.raises(ConfigError, match="tokenizer='tests.text_factories:not_a_tokenizer' is not allowed: the factory returned a dict; expected a Hugging Face tokenizer"):
        custom_data(text(tokenizer="tests.text_factories:not_a_tokenizer"))
