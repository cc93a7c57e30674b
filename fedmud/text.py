"""Text datasets: a ``text`` column, tokenised once per process into padded dict batches.

A dataset factory (``dataset = "package.module:factory"``, see :mod:`fedmud.data`) may return
Hugging Face ``datasets.Dataset`` (train, test) with a string column ``text``, and a ``label``
column of integer class labels (a ``ClassLabel`` names them) for classification tasks. Other
columns are ignored. The ``tokenizer`` key says how texts become token ids:

- ``auto``: the tokenizer saved beside the model, when ``model = "hf:DIRECTORY"`` (the directory
  ``save_pretrained`` of the model and of its tokenizer wrote); with any other model, text is refused
  with a message asking for a tokenizer;
- ``bytes``: :class:`ByteTokenizer`, UTF-8 bytes and three specials (pad, bos, eos), 259 ids, no
  files: for shipped data and models built for it;
- ``hf:DIRECTORY`` (or a hub name, where the hub is reachable): ``AutoTokenizer.from_pretrained``;
- ``package.module:factory``: a callable returning a Hugging Face tokenizer.

Each text keeps at most ``max-length`` tokens (special tokens included). A batch is a dict
``{input_ids, attention_mask, labels}`` padded to its longest text with the tokenizer's pad id
(its eos id when it has none, as GPT-2's): ``labels`` are the ``label`` column's, or under
``task = "causal-lm"`` the input ids themselves with ``-100`` at padding (the task shifts them).
Under ``causal-lm`` the ``label`` column is optional and only partitions the data (``natural``:
one client per domain).

What the data tells a model (:class:`~fedmud.data.DatasetInfo`): ``vocab_size`` is the tokenizer's
vocabulary (``len(tokenizer)``, added tokens included), ``input_shape`` is ``(max-length,)``,
``num_classes`` the ``label`` column's (a ``ClassLabel``'s ``num_classes``, else the largest label
+ 1; 1 for unlabelled text). A model whose token embedding is smaller than the vocabulary is
refused when it is built (:func:`check_vocabulary`), naming both sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import ConfigError, is_import_string
from .factories import call_factory, class_count, class_labels, load_factory, refusal, type_phrase
from .hf import is_hf_source, source_of, transformers_for
from .task import IGNORE

TEXT, LABEL = "text", "label"
CAUSAL_LM = "causal-lm"  # the task whose labels are the tokens themselves
TOKENIZERS = "bytes, 'hf:DIRECTORY' or 'package.module:factory'"  # what the tokenizer key takes besides auto


def is_text(split: object) -> bool:
    """Whether a factory's split is text: a Hugging Face ``datasets.Dataset`` with a ``text`` column."""
    from datasets import Dataset as HuggingFaceDataset  # comes with flwr-datasets

    return isinstance(split, HuggingFaceDataset) and TEXT in split.column_names


class ByteTokenizer:
    """The built-in tokenizer (``tokenizer = "bytes"``): a text's UTF-8 bytes as ids 3-258, between
    bos (1) and eos (2); pad is 0. No vocabulary file, no training, every text and language. It
    answers the part of a Hugging Face tokenizer's interface this module uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    OFFSET = 3  # ids below are the specials

    def __len__(self) -> int:
        return 256 + self.OFFSET

    def encode(self, text: str, max_length: int) -> list[int]:
        body = text.encode("utf-8")[: max(max_length - 2, 0)]
        return [self.bos_token_id, *(b + self.OFFSET for b in body), self.eos_token_id][:max_length]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 128) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t, max_length) for t in texts]}


def load_tokenizer(value: str, dataset: str):
    """The tokenizer the ``tokenizer`` key names (already resolved from ``auto`` where it could be:
    :func:`fedmud.config` turns ``auto`` into the model's ``hf:`` source)."""
    if value == "auto":
        raise ConfigError(
            f"tokenizer='auto' is not allowed with dataset={dataset!r}: its text needs a tokenizer, and auto is "
            f"the one saved beside a model given as model='hf:DIRECTORY', which this run's model is not; choose "
            f"{TOKENIZERS}"
        )
    if value == "bytes":
        return ByteTokenizer()
    if is_hf_source(value):
        return _from_pretrained(value)
    if not is_import_string(value):
        raise ConfigError(f"tokenizer={value!r} is not allowed; choose auto, {TOKENIZERS}")
    tokenizer = call_factory("tokenizer", value, load_factory("tokenizer", value))
    if not (callable(tokenizer) and hasattr(tokenizer, "__len__") and hasattr(tokenizer, "pad_token_id")):
        raise refusal("tokenizer", value, f"the factory returned {type_phrase(tokenizer)}", "a Hugging Face tokenizer")
    return tokenizer


def _from_pretrained(value: str):
    source = source_of(value)
    transformers = transformers_for("tokenizer", value)
    local = Path(source).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(
            f"tokenizer={value!r} is not allowed: the directory {source} holds no tokenizer (no tokenizer.json or "
            f"tokenizer_config.json; tokenizer=auto reads the one saved beside an hf: model); save the model's "
            f"tokenizer there with tokenizer.save_pretrained, or choose {TOKENIZERS}"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(local) if local.is_dir() else source)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"tokenizer={value!r} is not allowed: {source} gives no tokenizer ({str(err).splitlines()[0]}); "
            f"choose {TOKENIZERS}"
        ) from None


def pad_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else its eos (GPT-2 has no pad), else 0."""
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


class TokenisedText(Dataset):
    """One split's token ids (an int64 array per text) and labels; items are ``(ids, label)``."""

    def __init__(self, sequences: list[np.ndarray], labels: np.ndarray) -> None:
        self.sequences, self.labels = sequences, labels

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.sequences[i]), int(self.labels[i])


@dataclass(frozen=True)
class PaddedBatches:
    """The loaders' ``collate_fn``: items ``(ids, label)`` as ``{input_ids, attention_mask, labels}``,
    padded to the batch's longest text; ``causal``: labels are the ids, ``-100`` at padding."""

    pad_id: int
    causal: bool

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        if self.causal:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        else:
            labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class Text:
    """A text dataset, tokenised: what :mod:`fedmud.data` makes its loaders and info from."""

    train: TokenisedText
    test: TokenisedText
    labelled: bool  # a label column: classes, and what non-iid partitions split by
    num_classes: int
    vocab_size: int
    collate: PaddedBatches


def tokenise(dataset: str, train, test, tokenizer_value: str, max_length: int, task: str) -> Text:
    """Both splits tokenised with the ``tokenizer`` key's tokenizer (see the module docstring).

    Refused with one ConfigError: a split without text, an empty split, a text without tokens, and,
    under any task but ``causal-lm``, a split without a ``label`` column or with labels that are not
    integers >= 0.
    """
    causal = task == CAUSAL_LM
    for split, data in (("train", train), ("test", test)):
        if not is_text(data):
            raise refusal(
                "dataset", dataset, f"the train set is text but the {split} set is {type_phrase(data)}"
                + (f" with columns {list(data.column_names)}" if hasattr(data, "column_names") else ""),
                "train and test sets with a 'text' column",
            )
        if len(data) == 0:
            raise refusal("dataset", dataset, f"the {split} set is empty", "non-empty train and test sets")
    labelled = LABEL in train.column_names and (causal or LABEL in test.column_names)
    if not causal and not labelled:
        where = "train" if LABEL not in train.column_names else "test"
        columns = list((train if where == "train" else test).column_names)
        raise refusal(
            "dataset", dataset,
            f"with task={task!r} every text needs a class label, and the {where} set has no {LABEL!r} column "
            f"(its columns: {columns})",
            f"a {LABEL!r} column of integer class labels >= 0 beside {TEXT!r} (task='causal-lm' needs none)",
        )
    tokenizer = load_tokenizer(tokenizer_value, dataset)
    sequences = {split: _encode(dataset, split, tokenizer, data, max_length) for split, data in (("train", train), ("test", test))}
    labels = {"train": _labels(dataset, "train", train, labelled), "test": _labels(dataset, "test", test, labelled and not causal)}
    if labelled:
        observed = int(max(labels["train"].max(), labels["test"].max())) + 1
        classes = class_count(dataset, getattr(train.features[LABEL], "num_classes", None), observed)
    else:
        classes = 1
    return Text(
        TokenisedText(sequences["train"], labels["train"]),
        TokenisedText(sequences["test"], labels["test"]),
        labelled,
        classes,
        len(tokenizer),
        PaddedBatches(pad_id(tokenizer), causal),
    )


def _encode(dataset: str, split: str, tokenizer, data, max_length: int) -> list[np.ndarray]:
    texts = data[TEXT]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise refusal(
            "dataset", dataset, f"the {split} set's text {bad} is {type_phrase(texts[bad])}", f"a {TEXT!r} column of strings"
        )
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    empty = next((i for i, row in enumerate(ids) if len(row) == 0), None)
    if empty is not None:
        raise refusal(
            "dataset", dataset, f"the {split} set's text {empty} ({texts[empty]!r}) gives no tokens",
            "texts that give at least one token",
        )
    return [np.asarray(row, dtype=np.int64) for row in ids]


def _labels(dataset: str, split: str, data, labelled: bool) -> np.ndarray:
    """The ``label`` column as int64 (zeros where the split is not labelled: causal-lm's)."""
    if not labelled:
        return np.zeros(len(data), dtype=np.int64)
    allowed = f"a {LABEL!r} column of integer class labels >= 0 (a datasets.ClassLabel names them)"
    return class_labels(dataset, split, data.with_format("numpy")[LABEL], len(data), allowed)


def check_vocabulary(model: nn.Module, vocab_size: int, tokenizer: str | None, model_value: str, dataset: str) -> None:
    """Refuse a model whose token embedding has fewer rows than the data has token ids.

    ``tokenizer`` is the key's value for text data (None for token tensors). Models without
    ``get_input_embeddings`` (Hugging Face's and PEFT's have it) are not checked here; an id past their
    embedding fails in the first batch's check instead.
    """
    try:
        embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    except NotImplementedError:
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if not isinstance(rows, int) or rows >= vocab_size:
        return
    if tokenizer is not None:
        raise ConfigError(
            f"tokenizer={tokenizer!r} is not allowed with model={model_value!r}: the tokenizer's vocabulary has "
            f"{vocab_size} tokens, the model's token embedding {rows}; give the tokenizer the model was built "
            f"with, or a model whose vocabulary holds at least {vocab_size} tokens"
        )
    raise ConfigError(
        f"dataset={dataset!r} is not allowed with model={model_value!r}: its token ids go up to {vocab_size - 1}, "
        f"the model's token embedding has {rows} rows; give a model whose vocabulary holds at least {vocab_size} tokens"
    )
