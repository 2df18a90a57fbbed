"""``Embedding4bit``: a drop-in ``nn.Embedding`` whose frozen table [V, H] is stored in 4-bit NF4/FP4.

Storage is the ``Linear4bit`` format (``nn/_quant_weight.py``): ``weight`` is the packed uint8 Parameter
``[(V*H + 1) // 2, 1]`` plus block statistics, and ``state_dict()`` writes transformers' bitsandbytes keys
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``). The bytes equal ``bitsandbytes.functional.quantize_4bit`` of the
table, and equal those of a 4-bit output head [V, H] quantized from the same matrix: a tied head shares
them (``quant.model.quantize_model(..., quantize_embeddings=True, quantize_head=True)``).

Forward: ids (int64/int32, any shape) -> ``[*ids.shape, H]`` in the compute dtype (``compute_dtype``, else the
dtype the table was quantized from — what ``nn.Embedding`` returns). Only the looked-up rows are decoded
(``ops/embedding4bit.py``: a Triton gather-dequant on CUDA, a gather of the needed bytes and blocks on CPU).
The table has no gradient. Optional trainable token rows (``nn/trainable_tokens.py``) replace the frozen
rows of a few ids and are the only thing that trains; ``padding_idx`` behaves as in ``nn.Embedding``: its
row is read as stored (zero after ``from_embedding`` of a zero row) and, if it is a trainable row, gets no
gradient. Storage: ``V*H/2`` bytes of codes + absmax (``V*H/blocksize`` bytes with double quantization, else
4x that) + nested absmax and code books; ``bits_per_parameter`` reports it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..ops.functional import embedding_4bit
from ._quant_weight import QuantizedWeight
from .trainable_tokens import TokenRows


class Embedding4bit(TokenRows, QuantizedWeight, nn.Module):
    """Lookup of rows of a frozen 4-bit table W [num_embeddings, embedding_dim] (see the module doc).

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding`` (a negative padding_idx counts from
            the end).
        quant_type, blocksize, double_quant: the 4-bit format (as ``Linear4bit``; default NF4, 64, True).
        compute_dtype: output dtype; None: the dtype the table was quantized from.
        embed_scale: multiply the rows by this factor (transformers' scaled word embeddings, e.g. Gemma).
        dtype: dtype of the table before quantization (for ``reset_parameters``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, *,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, embed_scale: float | None = None, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got "
                                 f"{padding_idx!r}")
            padding_idx = padding_idx % num_embeddings
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32/float16/bfloat16 or None, got {compute_dtype}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.compute_dtype = compute_dtype
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self._init_quantized_weight(quant_type, blocksize, double_quant, device, dtype)
        self._init_token_rows()
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def _quant_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s initialisation (N(0, 1), zero padding row), then quantization."""
        w = torch.randn(self.num_embeddings, self.embedding_dim, device=self.weight.device, dtype=self.weight_dtype)
        if self.padding_idx is not None:
            w[self.padding_idx].zero_()
        self.quantize_(w)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "Embedding4bit":
        """Quantize an ``nn.Embedding`` (or a transformers subclass that only adds ``embed_scale``).

        Raises TypeError for other modules and ValueError for ``max_norm`` (it renormalises the table in place
        on lookup, which a frozen 4-bit table cannot do)."""
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"cannot quantize a {type(emb).__name__} as an embedding: expected nn.Embedding")
        scale = None
        if type(emb) is not nn.Embedding:
            if not hasattr(emb, "embed_scale"):
                raise TypeError(f"{type(emb).__name__} subclasses nn.Embedding with a forward of its own; only "
                                f"plain nn.Embedding and scaled word embeddings (embed_scale) can be quantized")
            s = emb.embed_scale
            scale = float(s.item() if isinstance(s, torch.Tensor) else s)
        if emb.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its rows on lookup; a frozen 4-bit table "
                             "cannot (quantize one without max_norm)")
        w = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, quant_type=quant_type,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, embed_scale=scale,
                    device="meta", dtype=w.dtype)
        layer.quantize_(w)
        layer.train(emb.training)
        return layer

    # ----------------------------------------------------------------- use
    @property
    def out_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"Embedding4bit input must be a tensor of token ids, got {type(ids).__name__}")
        out = embedding_4bit(ids, self.weight, self.quant_state, self.out_dtype)
        if self.has_trainable_tokens:
            out = self._with_trainable_rows(ids, out)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out

    def _with_trainable_rows(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the rows of trainable ids replaced by ``trainable_tokens_delta`` (differentiable)."""
        idx, rows = self.trainable_token_indices, self.trainable_tokens_delta
        flat = ids.reshape(-1).long()
        pos = torch.searchsorted(idx, flat).clamp_(max=idx.numel() - 1)
        hit = idx[pos] == flat
        where = hit.nonzero().squeeze(1)  # positions of trainable ids (one host sync, like the range check)
        if where.numel() == 0:
            return out
        vals = rows[pos[where]].to(out.dtype)
        if self.padding_idx is not None and rows.requires_grad:
            # nn.Embedding semantics: the padding row is read, never updated.
            pad = (flat[where] == self.padding_idx)[:, None]
            vals = torch.where(pad, vals.detach(), vals)
        # Only the hit positions are written (in place on the fresh lookup): no [M, H] gather of the rows.
        return out.view(-1, self.embedding_dim).index_put_((where,), vals).view(out.shape)

    def extra_repr(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, quant_type={self.quant_type}, "
             f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.has_trainable_tokens:
            s += f", trainable_tokens={self.trainable_token_indices.numel()}"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_token_rows(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
