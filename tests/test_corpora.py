"""The corpora that ship with Python: real text, fixed by the seed, train and test disjoint."""

from __future__ import annotations

import sys

import pytest

from fedmud.corpora import PACKAGES, python_reference, stdlib_docstrings


@pytest.mark.parametrize("factory", [python_reference, stdlib_docstrings])
def test_a_corpus_is_the_same_for_the_same_seed_and_splits_into_disjoint_sets(factory):
    train, test = factory(seed=3)
    again, _ = factory(seed=3)
    other, _ = factory(seed=4)
    assert train["text"] == again["text"]
    assert train["text"] != other["text"]
    assert not set(train["text"]) & set(test["text"])
    assert len(test) > 0 and len(train) >= 3 * len(test)


def test_docstrings_are_labelled_with_their_package_and_every_package_holds_some():
    train, test = stdlib_docstrings(seed=0)
    assert train.features["label"].names == list(PACKAGES)
    counts = [train["label"].count(i) for i in range(len(PACKAGES))]
    assert min(counts) >= 20, counts  # enough for one client per package
    asyncio = PACKAGES.index("asyncio")
    assert any("event loop" in t for t, y in zip(train["text"], train["label"]) if y == asyncio)


def test_docstrings_are_read_from_source_without_importing_the_packages():
    before = set(sys.modules)
    stdlib_docstrings(seed=1)
    assert "xmlrpc.server" not in sys.modules or "xmlrpc.server" in before
    assert "wsgiref.simple_server" not in sys.modules or "wsgiref.simple_server" in before


def test_the_reference_is_passages_of_whole_paragraphs_of_prose():
    train, _ = python_reference(seed=0)
    text = " ".join(train["text"])
    assert len(text) > 300_000
    assert "assignment statement" in text
    assert max(len(t) for t in train["text"]) < 20_000  # passages, not whole topics


def test_a_test_fraction_outside_0_and_1_is_refused():
    with pytest.raises(ValueError, match=r"test_fraction=1.0 is not allowed; it must be in \(0, 1\)"):
        python_reference(test_fraction=1.0)
