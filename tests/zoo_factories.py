"""The models users bring, as small random-weight configs of their real architectures, with the data
each takes; named in run configs as ``tests.zoo_factories:NAME``.

Hugging Face ``transformers`` (GPT-2, BERT, DistilBERT, T5, Llama, ViT, Whisper), ``timm``
(EfficientNet, ConvNeXt, DeiT, RegNet, MobileViT) and GPT-2 wrapped by ``peft``'s LoRA, each with its
own classification head and forward. Widths are 128 (text, ViT, DeiT, Whisper) and the timm models
are their smallest published variants, so each trains a round in seconds on a CPU; a narrower model
is all norms and biases, which alone exceed 1/32 of it (at width 64 the planner refuses 1/32 for
all but Llama and RegNet).

Data: :func:`tokens` (token ids, the label in the first tokens, every sequence ending with
:data:`EOS`: T5's head reads the last end-of-sequence token, GPT-2's and Llama's the last token
that is not :data:`PAD`), :func:`images` (3×32×32 floats) and :func:`features` (Whisper's
log-mel features, float (:data:`MEL_BINS`, :data:`FRAMES`)); each class has its own pattern.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

WIDTH = 128
LAYERS = 2
HEADS = 2
LENGTH = 16  # tokens a sequence
VOCAB = 256
PAD, EOS = 0, 2  # token ids the data never uses elsewhere: padding (GPT-2, Llama), end of sequence (T5)
FIRST_TOKEN = 3
MEL_BINS, FRAMES = 8, 32  # Whisper's input: FRAMES = 2 × max_source_positions
CLASSES = 4
TRAIN, TEST = 48, 16


# --- datasets ------------------------------------------------------------------------------------


def _split(x: torch.Tensor, y: torch.Tensor) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])


def tokens():
    """Sequences of :data:`LENGTH` token ids over :data:`VOCAB`; the first four tokens name the class."""
    g = torch.Generator().manual_seed(0)
    n = TRAIN + TEST
    labels = torch.arange(n) % CLASSES
    ids = torch.randint(FIRST_TOKEN + CLASSES, VOCAB, (n, LENGTH), generator=g)
    ids[:, :4] = FIRST_TOKEN + labels[:, None]
    ids[:, -1] = EOS
    ids[0, 4] = VOCAB - 1  # the data's vocabulary (its largest id + 1) is VOCAB
    return _split(ids, labels)


def _blobs(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's own mean pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(TRAIN + TEST) % CLASSES
    means = torch.randn(CLASSES, *shape, generator=g)
    return means[labels] + 0.5 * torch.randn(len(labels), *shape, generator=g), labels


def images():
    """3×32×32 float images."""
    return _split(*_blobs((3, 32, 32), seed=1))


def features():
    """Float log-mel features, (:data:`MEL_BINS`, :data:`FRAMES`) each."""
    return _split(*_blobs((MEL_BINS, FRAMES), seed=2))


# --- Hugging Face transformers -------------------------------------------------------------------


def gpt2(num_classes, vocab_size):
    """GPT-2 with its sequence-classification head (reads the last token that is not padding)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=vocab_size, n_positions=LENGTH,
        pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, num_labels=num_classes,
    )
    return transformers.GPT2ForSequenceClassification(config)


def bert(num_classes, vocab_size):
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, max_position_embeddings=LENGTH, pad_token_id=PAD, num_labels=num_classes,
    )
    return transformers.BertForSequenceClassification(config)


def distilbert(num_classes, vocab_size):
    import transformers

    config = transformers.DistilBertConfig(
        vocab_size=vocab_size, dim=WIDTH, n_layers=LAYERS, n_heads=HEADS, hidden_dim=4 * WIDTH,
        max_position_embeddings=LENGTH, pad_token_id=PAD, num_labels=num_classes,
    )
    return transformers.DistilBertForSequenceClassification(config)


def t5(num_classes, vocab_size):
    """T5 (encoder and decoder) with its classification head; its token embedding is one tensor tied
    under three names (``shared``, the encoder's and the decoder's ``embed_tokens``)."""
    import transformers

    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=4 * WIDTH, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD, num_labels=num_classes,
    )
    return transformers.T5ForSequenceClassification(config)


def llama(num_classes, vocab_size):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=LENGTH,
        pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, num_labels=num_classes,
    )
    return transformers.LlamaForSequenceClassification(config)


def vit(num_classes, input_shape):
    import transformers

    channels, size, _ = input_shape
    config = transformers.ViTConfig(
        image_size=size, patch_size=8, num_channels=channels, hidden_size=WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * WIDTH, num_labels=num_classes,
    )
    return transformers.ViTForImageClassification(config)


def whisper(num_classes, input_shape):
    """Whisper's encoder with its audio-classification head; HF freezes its sinusoidal positions
    (``encoder.embed_positions.weight``, ``requires_grad=False``)."""
    import transformers

    mel_bins, frames = input_shape
    config = transformers.WhisperConfig(
        num_mel_bins=mel_bins, max_source_positions=frames // 2, d_model=WIDTH, encoder_layers=LAYERS,
        encoder_attention_heads=HEADS, encoder_ffn_dim=4 * WIDTH, decoder_layers=1, decoder_attention_heads=HEADS,
        decoder_ffn_dim=4 * WIDTH, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
        decoder_start_token_id=EOS, num_labels=num_classes,
    )
    return transformers.WhisperForAudioClassification(config)


# --- timm ----------------------------------------------------------------------------------------


def _timm(name: str, num_classes: int, input_shape, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)


def efficientnet(num_classes, input_shape):
    return _timm("efficientnet_b0", num_classes, input_shape)


def convnext(num_classes, input_shape):
    return _timm("convnext_atto", num_classes, input_shape)


def deit(num_classes, input_shape):
    """DeiT-Tiny's architecture at this data's image size, two blocks of width 128."""
    return _timm(
        "deit_tiny_patch16_224", num_classes, input_shape, img_size=input_shape[1], patch_size=8,
        depth=LAYERS, embed_dim=WIDTH, num_heads=HEADS,
    )


def regnet(num_classes, input_shape):
    return _timm("regnetx_002", num_classes, input_shape)


def mobilevit(num_classes, input_shape):
    return _timm("mobilevit_xxs", num_classes, input_shape)


# --- PEFT ----------------------------------------------------------------------------------------


def peft_gpt2(num_classes, vocab_size):
    """:func:`gpt2` with PEFT's LoRA (rank 4) on its attention; PEFT freezes every base weight and
    trains the adapters and (a copy of) the classification head."""
    import peft

    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(gpt2(num_classes, vocab_size), lora)


# --- models whose norms and biases alone exceed 1/32 (they send them at int8: ``vector-uplink``) ---


def shufflenet(num_classes, input_shape):
    """torchvision's ShuffleNet-V2 x1.0: its 1-D tensors and BatchNorm statistics are 2.5% of it."""
    import torchvision

    return torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes)


def mobilevitv2(num_classes, input_shape):
    """MobileViT-v2 0.5: its 1-D tensors and BatchNorm statistics are 2.2% of it."""
    return _timm("mobilevitv2_050", num_classes, input_shape)
