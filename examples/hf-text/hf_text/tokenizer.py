"""The tokenizer factory the run config names (``tokenizer = "hf_text.tokenizer:docstring_words"``).

A word-level Hugging Face tokenizer over the docstrings' most frequent words: lowercased words and
punctuation as Hugging Face's ``Whitespace`` pre-tokenizer splits them, the :data:`VOCABULARY` most
frequent in the train split (ties by the word), then ``[PAD]`` ``[UNK]`` ``[CLS]`` ``[SEP]``; a
text is ``[CLS] words [SEP]``. Counted, not trained, so every party builds the same one from the
same data (``data-seed`` 42 and ``test-fraction`` 0.2, this app's settings; ``fedmud.corpora`` reads
the Python that runs it).
"""

from __future__ import annotations

import re
from collections import Counter

VOCABULARY = 2000
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on


def docstring_words(seed: int = 42, test_fraction: float = 0.2):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fedmud.corpora import stdlib_docstrings

    train, _ = stdlib_docstrings(seed=seed, test_fraction=test_fraction)
    counts = Counter(w for text in train["text"] for w in WORD.findall(text.lower()))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: VOCABULARY - len(SPECIALS)]
    vocabulary = {w: i for i, w in enumerate((*SPECIALS, *words))}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
