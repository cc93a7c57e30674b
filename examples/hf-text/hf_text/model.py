"""The model factory the run config names (``model = "hf_text.model:distilbert"``).

A DistilBERT sequence classifier built from a small config: FedMUD calls the factory with the data's
``num_classes`` (the ``label`` column's 12 packages), ``vocab_size`` (the tokenizer's: 259 for
``tokenizer = "bytes"``) and ``input_shape`` (``(max-length,)``, the longest sequence it sees), under
``torch.manual_seed(seed)``, so every party builds the same round-0 weights.
"""

from __future__ import annotations

from transformers import DistilBertConfig, DistilBertForSequenceClassification


def distilbert(num_classes: int, vocab_size: int, input_shape: tuple[int, ...]) -> DistilBertForSequenceClassification:
    """DistilBERT, 1 layer of width 64 (4 heads, feed-forward 128): 169k parameters with 2,000 words."""
    config = DistilBertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=input_shape[0],
        dim=64,
        n_layers=1,
        n_heads=4,
        hidden_dim=128,
        num_labels=num_classes,
    )
    return DistilBertForSequenceClassification(config)
