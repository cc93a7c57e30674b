"""Real text that ships with Python itself: corpora for language tasks with no download.

Two dataset factories (``dataset = "fedmud.corpora:NAME"``), each returning ``(train, test)``
Hugging Face ``datasets.Dataset`` with a ``text`` column, tokenised by the run's ``tokenizer``:

- :func:`python_reference`: the Python Language Reference as ``pydoc`` serves it
  (``pydoc_data.topics``: 79 topics, about 465,000 characters of English technical prose in
  Python 3.11), cut into passages of whole paragraphs. A corpus to pretrain a small language model on.
- :func:`stdlib_docstrings`: the docstrings of the modules, classes and functions of twelve
  standard-library packages (:data:`PACKAGES`), read from their source with :mod:`ast` (nothing is
  imported), with a ``label`` column naming the package (a ``ClassLabel``). One text task, two
  uses: sequence classification (which package wrote this?) and causal language modelling split
  by domain (``partition = "natural"``: one client per package, each with its own vocabulary —
  MIME headers, event loops, XML trees — and its own size, from 50 to 300 docstrings).

Both are real prose written by many authors over decades, and both are fixed by the Python
version (the texts change between releases: results name the version they ran on). They are small
(a CPU trains on them in minutes), which is what they are for: the study of initialisations in
their home setting (``docs/finetune-lm.md``) and the text example (``examples/hf-text``).
"""

from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

# Twelve packages present from Python 3.11 on (distutils and lib2to3 are gone in 3.12 / 3.13).
PACKAGES = (
    "asyncio", "email", "encodings", "http", "importlib", "logging",
    "multiprocessing", "unittest", "urllib", "wsgiref", "xml", "xmlrpc",
)  # fmt: skip
MIN_CHARS = 40  # shorter docstrings ("Return self.") say nothing about their package
PASSAGE_CHARS = 600  # python_reference joins paragraphs up to about this length


def python_reference(seed: int = 0, test_fraction: float = 0.1):
    """The Python Language Reference's topics as passages of whole paragraphs: ``(train, test)``
    with one column, ``text``, split at random by ``seed``."""
    return _split({"text": list(_reference_passages())}, seed, test_fraction)


def stdlib_docstrings(seed: int = 0, test_fraction: float = 0.2):
    """Docstrings of :data:`PACKAGES`: ``(train, test)`` with columns ``text`` and ``label`` (the
    package, a ``ClassLabel``), split at random by ``seed``."""
    from datasets import ClassLabel, Features, Value

    texts, labels = _docstrings()
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(PACKAGES))})
    return _split({"text": list(texts), "label": list(labels)}, seed, test_fraction, features)


def _split(columns: dict[str, list], seed: int, test_fraction: float, features=None):
    from datasets import Dataset

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} is not allowed; it must be in (0, 1)")
    n = len(columns["text"])
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(test_fraction * n))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])

    def take(rows: np.ndarray) -> Dataset:
        return Dataset.from_dict({k: [v[i] for i in rows] for k, v in columns.items()}, features=features)

    return take(train), take(test)


@lru_cache(maxsize=1)
def _reference_passages() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        current = ""
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if not paragraph:
                continue
            if current and len(current) + len(paragraph) > PASSAGE_CHARS:
                passages.append(current)
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current:
            passages.append(current)
    return tuple(dict.fromkeys(passages))  # topics share passages: each once, in order


@lru_cache(maxsize=1)
def _docstrings() -> tuple[tuple[str, ...], tuple[int, ...]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, labels, seen = [], [], set()
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for label, package in enumerate(PACKAGES):
        for path in sorted((stdlib / package).rglob("*.py")):
            if "test" in path.relative_to(stdlib).parts[1:-1] or path.name.startswith("test"):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                doc = ast.get_docstring(node) if isinstance(node, kinds) else None
                if doc and len(doc) >= MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
                    labels.append(label)
    if not texts:
        raise FileNotFoundError(f"no standard-library sources under {stdlib} (a Python without its .py files)")
    return tuple(texts), tuple(labels)
