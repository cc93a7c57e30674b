"""Pretrain a model centrally on some classes of an embedded dataset: the fine-tuning task's start.

    python scripts/pretrain.py --model cnn-mnist --out pretrained/cnn-mnist-0to4.pt
    python scripts/pretrain.py --model vit --epochs 12 --out pretrained/vit-0to4.pt

Trains on MNIST-5k's train split restricted to ``--classes`` (default digits 0-4) with
AdamW, seeded (model init from ``--seed`` as every party builds it, batches from
``--seed``), on the CPU, and saves the undecomposed model's ``state_dict``. Federated
fine-tuning then starts from it on the other classes::

    flwr run . --stream -c 'init-weights="/abs/path/pretrained/cnn-mnist-0to4.pt" classes="5-9" method="lora"'

The same architecture is built as the run's (``fedmud.models.model_factory`` with the
dataset's shape and all of its classes, so the head has a row for every class).
Prints the held-out accuracy on the pretraining classes and on the others, and the time.

``--model llama`` is the text counterpart (:func:`pretrain_lm`): a byte-level BPE tokenizer
and a small Llama-style causal language model (half a million parameters, CPU-trainable),
both trained on the Python Language Reference (``fedmud.corpora.python_reference``, shipped
with Python), saved with ``save_pretrained`` into the directory ``--out``, from which
``model="hf:DIR" tokenizer="auto"`` loads them::

    python scripts/pretrain.py --model llama --out pretrained/llama-python-reference

It prints the perplexity on the reference's held-out passages and on the standard library's
docstrings (``fedmud.corpora.stdlib_docstrings``, the fine-tuning task) before any fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from fedmud.config import parse_run_config
from fedmud.data import client_loader, test_loader
from fedmud.models import model_factory
from fedmud.training import evaluate


def pretrain(model_name: str, classes: str, epochs: int, lr: float, seed: int, dataset: str = "mnist5k") -> tuple[torch.nn.Module, dict]:
    run = parse_run_config({"model": model_name, "dataset": dataset, "classes": classes, "num-partitions": 1, "seed": seed})
    torch.manual_seed(run.seed)  # as build_decomposed draws round 0 on every party
    model = model_factory(run.model, run.data)()
    loader = client_loader(run.data, 0, batch_size=64, seed=seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.monotonic()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimiser.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            schedule.step()
    seconds = time.monotonic() - started
    seen = evaluate(model, test_loader(run.data), torch.device("cpu"))[1]
    others = ",".join(str(c) for c in range(10) if c not in run.data.classes)
    unseen_run = parse_run_config({"model": model_name, "dataset": dataset, "classes": others})
    unseen = evaluate(model, test_loader(unseen_run.data), torch.device("cpu"))[1]
    return model, {"seconds": seconds, "accuracy_pretrain_classes": seen, "accuracy_other_classes": unseen}


# ---------------------------------------------------------------------------- language model

LM = "llama"  # --model llama: the causal language model of the text study (docs/finetune-lm.md)
SPECIALS = ("<pad>", "<s>", "</s>")  # pad, bos, eos: ids 0, 1, 2
# the study's model: sized so that 105 federated runs fit about half an hour on two CPU cores
LM_SHAPE = {"vocab_size": 2048, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 256}
LM_TRAINING = {"epochs": 10, "lr": 3e-3, "batch_size": 16, "block": 128, "weight_decay": 0.1}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme: every text encodes, no unknown token) trained on
    ``texts``, as a ``transformers.PreTrainedTokenizerFast`` that wraps every text as ``<s> text </s>``
    (truncation keeps both) and pads with ``<pad>``. Deterministic: the same texts give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    pad, bos, eos = SPECIALS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(s, tok.token_to_id(s)) for s in (bos, eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, model_max_length=1024)


def _blocks(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """``texts`` as ``<s> text </s>`` one after another, cut into rows of ``block`` tokens (the tail dropped)."""
    ids = [i for row in tokenizer(texts, verbose=False)["input_ids"] for i in row]
    rows = len(ids) // block
    return torch.tensor(ids[: rows * block], dtype=torch.long).view(rows, block)


@torch.no_grad()
def lm_perplexity(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int | None = None, block: int = 128) -> float:
    """exp(mean next-token loss over predicted tokens): over packed blocks of ``block`` tokens when
    ``max_length`` is None, else over each text alone, truncated to ``max_length`` tokens and padded
    (labels -100 at padding), as ``task=causal-lm`` evaluates a federated run."""
    from fedmud.task import CAUSAL_LM, IGNORE

    model.eval()
    if max_length is None:
        batches = [(rows, rows) for rows in _blocks(tokenizer, texts, block).split(32)]
    else:
        batches = []
        for start in range(0, len(texts), 64):
            enc = tokenizer(texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            batches.append((enc["input_ids"], enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE)))
    total, count = 0.0, 0
    for ids, labels in batches:
        logits = model(input_ids=ids, attention_mask=(labels != IGNORE).long()).logits
        n = CAUSAL_LM.count(labels)
        total += CAUSAL_LM.loss(logits, labels).item() * n
        count += n
    return math.exp(total / count)


def pretrain_lm(out: Path, seed: int = 0, epochs: int | None = None, lr: float | None = None, eval_length: int = 64) -> dict:
    """Train the tokenizer and the model (:data:`LM_SHAPE`) on the Python Language Reference's train
    passages (``fedmud.corpora.python_reference(seed=0)``), save both into ``out`` with
    ``save_pretrained`` and return (and write to ``out/pretrain.json``) what it took and scored.

    The model is a ``LlamaForCausalLM`` (RMSNorm, rotary positions, SwiGLU, no biases) with the output
    layer tied to the token embedding: a quarter of its parameters, which the untied head would double
    on 90k training tokens; small Llama-style models (Llama 3.2 1B/3B, SmolLM) tie it too. Training:
    AdamW (weight decay 0.1 on matrices), one-cycle schedule, packed blocks of ``block`` tokens, batch
    order and init from ``seed``, on the CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmud.corpora import python_reference, stdlib_docstrings

    epochs = LM_TRAINING["epochs"] if epochs is None else epochs
    lr = LM_TRAINING["lr"] if lr is None else lr
    block, batch_size = LM_TRAINING["block"], LM_TRAINING["batch_size"]
    train, held_out = python_reference(seed=0)
    tokenizer = train_tokenizer(list(train["text"]), LM_SHAPE["vocab_size"])
    pad, bos, eos = (tokenizer.convert_tokens_to_ids(s) for s in SPECIALS)
    config = LlamaConfig(
        **{**LM_SHAPE, "vocab_size": len(tokenizer)}, num_key_value_heads=LM_SHAPE["num_attention_heads"],
        max_position_embeddings=block, tie_word_embeddings=True, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    data = _blocks(tokenizer, list(train["text"]), block)
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": LM_TRAINING["weight_decay"]}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    started, curve = time.monotonic(), []
    for epoch in range(1, epochs + 1):
        model.train()
        for rows in data[torch.randperm(len(data), generator=generator)].split(batch_size):
            optimiser.zero_grad(set_to_none=True)
            model(input_ids=rows, labels=rows).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
        curve.append(lm_perplexity(model, tokenizer, list(held_out["text"]), block=block))
        print(f"epoch {epoch}: held-out reference perplexity {curve[-1]:.2f} ({time.monotonic() - started:.0f} s)", flush=True)
    seconds = time.monotonic() - started
    docstrings = [t for split in stdlib_docstrings(seed=0) for t in split["text"]]
    figures = {
        "python": platform.python_version(),
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "shape": {**LM_SHAPE, "vocab_size": len(tokenizer), "tie_word_embeddings": True},
        "training": {**LM_TRAINING, "epochs": epochs, "lr": lr},
        "train_tokens": int(data.numel()),
        "seconds": round(seconds, 1),
        "perplexity_reference_held_out_per_epoch": curve,
        "perplexity_reference_train": lm_perplexity(model, tokenizer, list(train["text"]), block=block),
        "perplexity_reference_held_out": curve[-1],
        f"perplexity_docstrings_max_length_{eval_length}": lm_perplexity(model, tokenizer, docstrings, max_length=eval_length),
        "perplexity_docstrings_packed": lm_perplexity(model, tokenizer, docstrings, block=block),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(figures, indent=1))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn-mnist", help=f"a built-in model name (default cnn-mnist), or {LM!r}")
    parser.add_argument("--classes", default="0-4", help="classes to pretrain on (default 0-4; not for llama)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default 4; {LM}: {LM_TRAINING['epochs']}")
    parser.add_argument("--lr", type=float, default=None, help=f"default 3e-3; {LM}: {LM_TRAINING['lr']}")
    parser.add_argument("--seed", type=int, default=0, help="the run seed the fine-tuning runs will use too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-length", type=int, default=64, help=f"{LM}: the docstrings' max-length in its perplexity")
    parser.add_argument("--out", type=Path, required=True, help=f"the state_dict file ({LM}: the directory)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == LM:
        figures = pretrain_lm(args.out, args.seed, args.epochs, args.lr, args.eval_length)
        print(json.dumps(figures, indent=1))
        print(f"saved model and tokenizer in {args.out}")
        return
    epochs = 4 if args.epochs is None else args.epochs
    lr = 3e-3 if args.lr is None else args.lr
    model, figures = pretrain(args.model, args.classes, epochs, lr, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(
        f"{args.model} pretrained on classes {args.classes} in {figures['seconds']:.1f} s: held-out accuracy "
        f"{figures['accuracy_pretrain_classes']:.4f} on them, {figures['accuracy_other_classes']:.4f} on the others; "
        f"saved {args.out}"
    )


if __name__ == "__main__":
    main()
