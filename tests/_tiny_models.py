"""Tiny transformers models built from configs (no downloads) for the quantization tests.

Not collected by pytest (leading underscore). Every builder is seeded, so two calls give the
same weights; hidden size 64, 2 layers, vocabulary 128.
"""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert")
VOCAB = 128


def tiny_config(arch: str, **overrides):
    """A transformers config of ``arch`` with hidden 64, 2 layers, vocabulary 128 (``overrides`` win)."""
    import transformers as tf

    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**decoder, **overrides})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**decoder, **overrides})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**decoder, **overrides})
    elif arch == "gpt2":
        cfg = tf.GPT2Config(**{**dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0), **overrides})
    elif arch == "bert":
        cfg = tf.BertConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64),
                               **overrides})
    else:
        raise ValueError(arch)
    return cfg


def model_class(arch: str):
    """The head class used for ``arch``: a causal LM, or BERT's masked LM (its decoder is tied)."""
    import transformers as tf

    return tf.BertForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A freshly initialised tiny ``arch`` model in eval mode."""
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    cls = model_class(arch)
    model = cls.from_config(cfg, dtype=dtype) if cls.__name__.startswith("Auto") else cls._from_config(cfg, dtype=dtype)
    return model.eval()


def sample_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
