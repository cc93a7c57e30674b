"""Frozen means frozen: a parameter with ``requires_grad=False`` is never parameterised, never
uploaded, and bitwise the same after any number of merges (a PEFT model's base weights)."""

from __future__ import annotations

import pytest
import torch

from fedmud.config import DecompositionConfig, parse_run_config
from fedmud.models import CNN
from fedmud.mud import decompose
from fedmud.rounds import build_decomposed, simulate_in_process

FROZEN = ("features.0.weight", "features.4.weight")


def frozen_cnn() -> CNN:
    """The paper's CNN with its first two convolutions frozen (as a fine-tuning user might)."""
    model = CNN(in_channels=1, num_classes=10, spatial=1)
    for name in FROZEN:
        model.get_parameter(name).requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["fedmud", "fedavg", "fedlmt", "lora"])
def test_a_frozen_tensor_is_planned_as_frozen_and_never_uploaded(method):
    model = decompose(frozen_cnn(), DecompositionConfig(method=method))
    plan = {t.name: t for t in model.plan.tensors}
    assert all(plan[n].frozen and plan[n].upload == 0 and not plan[n].decomposed for n in FROZEN)
    assert not set(FROZEN) & set(model.parametrised_names)
    assert not set(FROZEN) & {n for n, _ in model.upload_layout().entries}
    assert set(FROZEN) <= set(model.global_state())  # every party holds them
    frozen_numel = sum(plan[n].numel for n in FROZEN)
    assert model.plan.trained_reference == model.plan.dense_reference - frozen_numel
    assert "frozen (requires_grad=False)" in "\n".join(model.summary())


def test_fedmuds_ratio_is_of_the_trained_tensors():
    model = decompose(frozen_cnn(), DecompositionConfig())
    assert model.plan.upload <= model.plan.trained_reference / 32 < model.plan.dense_reference / 32
    assert model.summary()[-1].endswith("vs the 373120 trained values: ratio 0.03123 (1/32.0)")


def test_frozen_tensors_stay_bitwise_the_same_through_rounds_of_merges():
    run = parse_run_config({"num-partitions": 3, "num-server-rounds": 2, "local-epochs": 1, "test-fraction": 0.2})
    initial = build_decomposed(run, model_fn=frozen_cnn).global_state()
    server, history, _, _ = simulate_in_process(run, model_fn=frozen_cnn)
    after = server.model.global_state()
    assert all(torch.equal(after[n], initial[n]) for n in FROZEN)
    assert not torch.equal(after["features.8.weight"], initial["features.8.weight"])  # the rest trained
    assert history[-1] > 0.5


# --- a PEFT-wrapped Hugging Face model ------------------------------------------------------------


def peft_gpt2():
    """A small GPT-2 (random weights, from a config) with PEFT's LoRA on its attention."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(model, lora)


def _trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_fedavg_of_a_peft_model_federates_exactly_peft_s_trainable_tensors():
    wrapped = peft_gpt2()
    trainable = _trained(wrapped)
    model = decompose(wrapped, DecompositionConfig(method="fedavg"))
    uploaded = {n for n, _ in model.upload_layout().entries}
    assert uploaded == trainable and len(trainable) == 4  # lora_A and lora_B of 2 layers
    assert model.plan.upload == sum(p.numel() for n, p in wrapped.named_parameters() if n in trainable)


def test_fedmud_on_a_peft_model_keeps_its_base_bitwise_frozen_through_a_trained_merged_round():
    wrapped = peft_gpt2()
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    model = decompose(wrapped, DecompositionConfig(method="fedmud", ratio=0.25))
    assert not set(frozen) & {n for n, _ in model.upload_layout().entries}
    model.reset(7)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {n: t.clone() for n, t in model.global_state().items()}
    for _ in range(3):
        optimiser.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimiser.step()
    model.merge()
    after = model.global_state()
    assert all(torch.equal(after[n], frozen[n]) for n in frozen if n in after)
    assert any(not torch.equal(after[n], before[n]) for n in _trained(wrapped) & set(after))  # LoRA trained
