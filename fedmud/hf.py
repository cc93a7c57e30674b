"""Hugging Face models by name or directory: ``model = "hf:SOURCE"``.

``SOURCE`` is a directory that ``save_pretrained`` wrote (``config.json`` and the weights), or a
hub name where the hub is reachable (``hf:distilbert-base-uncased``). The head follows the task
and the data: ``task = "causal-lm"`` gets ``AutoModelForCausalLM`` (the saved language-model head);
otherwise token data (a ``vocab_size``: text, tokenised by :mod:`fedmud.text` with the tokenizer
saved in the same directory by default) gets ``AutoModelForSequenceClassification``, images get
``AutoModelForImageClassification``, each with ``num_labels`` = the data's classes. A head whose
size differs from the saved one (a new task) is drawn fresh from torch's global generator, which
every party seeds with the run seed, so round 0 is the same everywhere (the digest checks it).

``transformers`` is imported only when such a model is built (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .errors import ConfigError

PREFIX = "hf:"


def is_hf_source(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX) and bool(source_of(value))


def transformers_for(key: str, value: str):
    """The ``transformers`` module, or one ConfigError naming the key that needs it and how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{key}={value!r} needs Hugging Face transformers, which is not installed: pip install -e \".[hf]\""
        ) from None
    return transformers


def source_of(value: str) -> str:
    """What follows ``hf:``: a directory or a hub name."""
    return value[len(PREFIX):].strip()


def hf_factory(value: str, num_classes: int, vocab_size: int | None, task: str = "classification") -> Callable[[], nn.Module]:
    """A zero-argument callable loading ``value``'s model with a head for the task and data; the source
    is checked now (one :class:`ConfigError` naming it and what is allowed)."""
    source = source_of(value)
    transformers = transformers_for("model", value)
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        what = "does not exist" if not local.exists() else "holds no config.json"
        raise ConfigError(
            f"model={value!r} is not allowed: the directory {source} {what}; give 'hf:DIRECTORY' with what "
            "save_pretrained wrote (config.json and the weights), or 'hf:NAME' of a hub model"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(local) if looks_local else source)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model={value!r} is not allowed: {source} is not a local directory and the hub did not give it "
            f"({str(err).splitlines()[0]}); give 'hf:DIRECTORY' with what save_pretrained wrote"
        ) from None
    where = str(local) if looks_local else source
    if task == "causal-lm":
        head = transformers.AutoModelForCausalLM

        def build() -> nn.Module:
            return head.from_pretrained(where)

        within = "with task='causal-lm'"
    else:
        head = transformers.AutoModelForSequenceClassification if vocab_size else transformers.AutoModelForImageClassification

        def build() -> nn.Module:
            return head.from_pretrained(where, num_labels=num_classes, ignore_mismatched_sizes=True)

        within = f"with {'token' if vocab_size else 'image'} data"
    if type(config) not in head._model_mapping:  # the architecture has no such head
        raise ConfigError(
            f"model={value!r} is not allowed {within}: {type(config).__name__} has no "
            f"{head.__name__.removeprefix('AutoModelFor')} head; give a model that has one"
        )
    return build
