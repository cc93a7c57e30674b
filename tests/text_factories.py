"""Text datasets and tokenizers as a user would write them, named in tests as ``tests.text_factories:NAME``.

The texts are short sentences whose content words come from one topic per class, so a small model
learns them; the tokenizer is built here, offline, with ``tokenizers``.
"""

from __future__ import annotations

import random

TOPICS = {  # label -> content words
    0: ("apple", "pear", "plum", "fig", "grape", "melon", "cherry", "lime"),
    1: ("river", "lake", "sea", "brook", "pond", "creek", "bay", "delta"),
    2: ("iron", "gold", "tin", "lead", "zinc", "copper", "nickel", "silver"),
}
FILLER = ("the", "a", "and", "of", "with", "near", "some", "every")
NAMES = ["fruit", "water", "metal", "unused"]  # a ClassLabel naming four classes, three of them used
CALLS = {"tokenizer": 0}  # how often the counting tokenizer factory ran


def sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences of 3 to 14 words, label i % 3: content words of the label's topic among fillers."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % len(TOPICS)
        words = [rng.choice(TOPICS[label] if rng.random() < 0.6 else FILLER) for _ in range(rng.randint(3, 14))]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _datasets(columns_train: dict, columns_test: dict, features=None):
    from datasets import Dataset

    return Dataset.from_dict(columns_train, features=features), Dataset.from_dict(columns_test, features=features)


def labelled_text(seed=0):
    """120 train and 30 test texts with ``text`` and a ``label`` ClassLabel of four names (three used)."""
    from datasets import ClassLabel, Features, Value

    texts, labels = sentences(150, seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=NAMES)})
    return _datasets(
        {"text": texts[:120], "label": labels[:120]}, {"text": texts[120:], "label": labels[120:]}, features
    )


def plain_labels_text():
    """As :func:`labelled_text`, its labels plain integers (no ClassLabel)."""
    texts, labels = sentences(60, 1)
    return _datasets({"text": texts[:45], "label": labels[:45]}, {"text": texts[45:], "label": labels[45:]})


def unlabelled_text():
    """Text only: for causal-lm, or refused under classification."""
    texts, _ = sentences(60, 2)
    return _datasets({"text": texts[:45]}, {"text": texts[45:]})


def word_tokenizer():
    """A word-level tokenizer over the topics' words and fillers, with BERT's specials ([PAD] is 0) and
    post-processing ([CLS] text [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *FILLER, *(w for topic in TOPICS.values() for w in topic)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def counting_tokenizer():
    """:func:`word_tokenizer`, counting its calls in :data:`CALLS`."""
    CALLS["tokenizer"] += 1
    return word_tokenizer()


def not_a_tokenizer():
    return {"vocab": 3}
