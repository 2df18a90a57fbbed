"""Trainable token rows over a 4-bit embedding table (and head): add, save, load — PEFT's TRAINABLE_TOKENS files.

    quantize_model(model, quantize_embeddings=True, quantize_head=True)   # after resize_token_embeddings
    report = add_trainable_tokens(model, n_new=2)          # the 2 ids a resize added; or token_ids=[...]
    ...                                                    # train: only these rows (and your method's params)
    save_trainable_tokens(model, "out/tokens")             # adapter_config.json + adapter_model.safetensors
    load_trainable_tokens(fresh_quantized_model, "out/tokens")

What trains (``nn/trainable_tokens.py``): one float32 (or ``dtype``) row per token id in the embedding,
replacing the frozen 4-bit row; for the output head, the logits of those ids come from trainable rows too:
the same Parameter when the head is tied to the embeddings (as PEFT's tied adapter), a row set of the head's
own when it is not (``train_head=True``, the default; it needs a 4-bit head, ``quantize_head=True``). Rows
start from the current (dequantized) rows, so an untrained set changes nothing.

Files (Hugging Face PEFT 0.21's ``TrainableTokensModel`` format, so PEFT reads them on a dense model and we
read PEFT's): ``adapter_config.json`` with ``peft_type: "TRAINABLE_TOKENS"``, ``token_indices``,
``target_modules`` (the embedding, plus the head when it has rows of its own), ``init_weights`` and the base
model's fingerprint; ``adapter_model.safetensors`` with ``base_model.model.<module>.trainable_tokens_delta``
[n, H] per module (a tied head's key holds the embedding's rows, as PEFT writes it). Written atomically and
read back through ``io/method_files.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..io.method_files import (FINGERPRINT_KEY, AdapterLoadError, check_fingerprint, check_peft_type,
                               model_fingerprint, name_or_path, read_method_files, write_method_files)
from ..nn.embedding4bit import Embedding4bit
from ..nn.trainable_tokens import Linear4bitHead, TokenRows

PEFT_TYPE = "TRAINABLE_TOKENS"
KEY_PREFIX = "base_model.model."
DELTA = "trainable_tokens_delta"


@dataclass
class TrainableTokensReport:
    """What :func:`add_trainable_tokens` set up."""

    token_indices: list[int]
    embeddings: str
    head: Optional[str]          # the head whose logits for these ids train (None: head unchanged)
    tied: bool                   # the head uses the embedding's rows
    trainable_params: int        # elements of the new Parameters (tied rows once)
    bytes: int                   # their storage (gradients and optimizer state come on top)


def _tables(model: nn.Module) -> tuple[str, Embedding4bit, Optional[str], Optional[nn.Module], bool]:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, Embedding4bit):
        raise TypeError(f"trainable token rows live beside a 4-bit table: the input embeddings are "
                        f"{type(emb).__name__}, not Embedding4bit (quantize_model(model, quantize_embeddings=True) "
                        f"first; for a dense table use PEFT's TrainableTokensConfig)")
    head = get_out() if callable(get_out) else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    return names[id(emb)], emb, (names[id(head)] if head is not None else None), head, tied


def add_trainable_tokens(model: nn.Module, token_ids: Optional[Sequence[int]] = None, *, n_new: Optional[int] = None,
                         train_head: bool = True, dtype: torch.dtype = torch.float32) -> TrainableTokensReport:
    """Make the rows of ``token_ids`` (or of the last ``n_new`` ids of the vocabulary: the tokens a
    ``resize_token_embeddings`` added before quantization) trainable; see the module doc.

    Raises TypeError when the embeddings are not ``Embedding4bit``, ValueError for bad ids (empty, duplicate,
    out of range), both or neither of ``token_ids`` / ``n_new``, rows already present, or ``train_head`` with an
    untied head that is not a ``Linear4bitHead``.
    """
    emb_name, emb, head_name, head, tied = _tables(model)
    if (token_ids is None) == (n_new is None):
        raise ValueError("give exactly one of token_ids (a list of ids) and n_new (the last n_new ids)")
    if n_new is not None:
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 0 < n_new <= emb.num_embeddings:
            raise ValueError(f"n_new must be an int in [1, {emb.num_embeddings}], got {n_new!r}")
        token_ids = list(range(emb.num_embeddings - n_new, emb.num_embeddings))
    if not isinstance(train_head, bool):
        raise ValueError(f"train_head must be True or False, got {train_head!r}")
    train_own_head = train_head and not tied and head is not None
    if train_own_head and not isinstance(head, Linear4bitHead):
        raise ValueError(f"train_head=True needs a 4-bit head (quantize_model(..., quantize_head=True)); "
                         f"{head_name} is a {type(head).__name__}. Pass train_head=False to train the "
                         f"embedding rows only")
    emb.set_trainable_tokens(list(token_ids), dtype=dtype)
    modules: list[TokenRows] = [emb]
    if tied and isinstance(head, Linear4bitHead):
        head.share_trainable_tokens(emb)
    elif train_own_head:
        try:
            head.set_trainable_tokens(list(token_ids), dtype=dtype)
        except ValueError:
            emb.clear_trainable_tokens()  # all or nothing
            raise
        modules.append(head)
    params = [m.trainable_tokens_delta for m in modules]
    return TrainableTokensReport(token_indices=emb.trainable_token_indices.tolist(), embeddings=emb_name,
                                 head=head_name if (tied or train_own_head) else None, tied=bool(tied),
                                 trainable_params=sum(p.numel() for p in params),
                                 bytes=sum(p.numel() * p.element_size() for p in params))


def _row_modules(model: nn.Module) -> dict[str, TokenRows]:
    """name -> module for every module holding trainable rows (a tied head included)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TokenRows) and m.has_trainable_tokens}


def save_trainable_tokens(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the trained rows in PEFT's TRAINABLE_TOKENS format (module doc), atomically."""
    rows = _row_modules(model)
    if not rows:
        raise ValueError(f"{type(model).__name__} has no trainable token rows (add_trainable_tokens first)")
    emb_name, emb, _, _, _ = _tables(model)
    if emb_name not in rows:
        raise ValueError("the input embeddings have no trainable rows; nothing to save in PEFT's format")
    indices = emb.trainable_token_indices.tolist()
    for name, m in rows.items():
        if m.trainable_token_indices.tolist() != indices:
            raise ValueError(f"{name} trains ids {m.trainable_token_indices.tolist()} but the embeddings train "
                             f"{indices}: PEFT's file has one token_indices list")
    own = [n for n, m in rows.items() if n == emb_name or m.trainable_tokens_delta is not emb.trainable_tokens_delta]
    config = {"peft_type": PEFT_TYPE, "token_indices": indices, "target_modules": own if len(own) > 1 else own[0],
              "init_weights": True, "task_type": None, "inference_mode": True,
              "base_model_name_or_path": name_or_path(model), FINGERPRINT_KEY: model_fingerprint(model)}
    tensors = {f"{KEY_PREFIX}{n}.{DELTA}": m.trainable_tokens_delta.detach() for n, m in rows.items()}
    return write_method_files(directory, config, tensors)


def load_trainable_tokens(model: nn.Module, directory: Union[str, os.PathLike], *, is_trainable: bool = False
                          ) -> TrainableTokensReport:
    """Put rows saved by :func:`save_trainable_tokens` (or by PEFT's TrainableTokensModel) onto a model with a
    4-bit embedding (and head); returns what was set. Rows follow the file's ``token_indices`` order (PEFT's
    list may be unsorted). ``is_trainable=False`` (PEFT's default) freezes them. Everything is checked before
    the model changes: AdapterLoadError names the file, key or module that does not fit."""
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    check_fingerprint(config, model, directory)
    emb_name, emb, head_name, head, tied = _tables(model)
    indices = config.get("token_indices")
    if not isinstance(indices, list) or not indices or not all(isinstance(i, int) for i in indices):
        raise AdapterLoadError(f"{directory}: token_indices must be a non-empty list of ints, got {indices!r}")
    n, dim = len(indices), emb.embedding_dim
    want = {emb_name} | ({head_name} if head_name else set())
    got: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mod = key[len(KEY_PREFIX):-len("." + DELTA)] if key.startswith(KEY_PREFIX) and key.endswith("." + DELTA) else None
        if mod not in want:
            raise AdapterLoadError(f"{directory}: tensor {key} is not a trainable-token row set of this model's "
                                   f"embeddings ({emb_name}) or head ({head_name})")
        if tuple(t.shape) != (n, dim) or not t.is_floating_point():
            raise AdapterLoadError(f"{directory}: {key} is {t.dtype} {tuple(t.shape)}, expected a float "
                                   f"[{n}, {dim}] tensor for {n} token ids")
        got[mod] = t
    if emb_name not in got:
        raise AdapterLoadError(f"{directory}: no rows for the input embeddings {emb_name}")
    if head_name in got and not tied and not isinstance(head, Linear4bitHead):
        raise AdapterLoadError(f"{directory} holds trained rows for {head_name}, which is a {type(head).__name__}; "
                               f"quantize it with quantize_head=True first")
    for m in (emb, head):
        if isinstance(m, TokenRows) and m.has_trainable_tokens:
            m.clear_trainable_tokens()
    def row_dtype(t: torch.Tensor) -> torch.dtype:
        # PEFT saves the rows in the dense table's dtype, float64 included: those train here in float32
        return t.dtype if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32

    try:
        emb.set_trainable_tokens(indices, values=got[emb_name].float(), dtype=row_dtype(got[emb_name]))
        if tied and isinstance(head, Linear4bitHead):
            head.share_trainable_tokens(emb)
        elif head_name in got:
            head.set_trainable_tokens(indices, values=got[head_name].float(), dtype=row_dtype(got[head_name]))
    except (ValueError, TypeError) as e:
        raise AdapterLoadError(f"{directory}: {e}") from None
    params = [m.trainable_tokens_delta for m in {id(m): m for m in (emb, head) if isinstance(m, TokenRows)
                                                 and m.has_trainable_tokens}.values()]
    for p in params:
        p.requires_grad_(is_trainable)
    trained_head = tied or head_name in got
    return TrainableTokensReport(token_indices=emb.trainable_token_indices.tolist(), embeddings=emb_name,
                                 head=head_name if trained_head else None, tied=bool(tied),
                                 trainable_params=sum(p.numel() for p in params),
                                 bytes=sum(p.numel() * p.element_size() for p in params))


__all__ = ["add_trainable_tokens", "save_trainable_tokens", "load_trainable_tokens", "TrainableTokensReport",
           "PEFT_TYPE"]
