"""Trainable virtual tokens: soft prompts (prompt tuning) and per-layer key/value prefixes (prefix tuning).

Both modules keep Hugging Face PEFT 0.21.2's parameter layout (``embedding.weight``, and for the
projected prefix ``transform.0`` / ``transform.2``), so weights move between the two libraries
without renaming. They are plain torch: nothing here knows about transformers' caches or configs
(``methods/prompt_tuning.py`` and ``methods/prefix_tuning.py`` wire them into a model).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def repeat_to_length(token_ids: Sequence[int], length: int) -> list[int]:
    """``token_ids`` cut to ``length`` or repeated until it is that long (PEFT's TEXT initialisation rule).

    Raises ValueError when ``token_ids`` is empty (nothing to repeat).
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("the initialisation text tokenizes to no tokens; give a non-empty init_text")
    if len(ids) < length:
        ids = ids * math.ceil(length / len(ids))
    return ids[:length]


class PromptEmbedding(nn.Module):
    """The soft prompt P of prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` trainable vectors.

    Parameter: ``embedding.weight`` [p, hidden] (float32 unless ``dtype`` says otherwise), initialised
    N(0, 1) like ``nn.Embedding`` — PEFT's ``RANDOM`` initialisation. :meth:`init_from_tokens` copies
    rows of the model's word embeddings instead (PEFT's ``TEXT`` and ``SAMPLE_VOCAB``).
    """

    def __init__(self, num_virtual_tokens: int, hidden: int, *, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        self.num_virtual_tokens = _check_positive_int(num_virtual_tokens, "num_virtual_tokens")
        self.hidden = _check_positive_int(hidden, "hidden")
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, dtype=dtype, device=device)

    @torch.no_grad()
    def init_from_tokens(self, word_embeddings: nn.Module, token_ids: torch.Tensor) -> None:
        """Set P to ``word_embeddings(token_ids)`` (``token_ids`` long [p]); P keeps its own dtype.

        Raises ValueError when ``token_ids`` is not [p] or holds ids outside the vocabulary.
        """
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.shape != (self.num_virtual_tokens,):
            raise ValueError(f"init token ids must have shape ({self.num_virtual_tokens},), "
                             f"got {tuple(token_ids.shape)}")
        vocab = getattr(word_embeddings, "num_embeddings", None)
        if vocab is not None and (token_ids.min() < 0 or token_ids.max() >= vocab):
            raise ValueError(f"init token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")
        rows = word_embeddings(token_ids.to(self.embedding.weight.device))
        if rows.shape != self.embedding.weight.shape:
            raise ValueError(f"word embeddings give rows of shape {tuple(rows.shape)}, the prompt is "
                             f"{tuple(self.embedding.weight.shape)}")
        self.embedding.weight.copy_(rows.to(self.embedding.weight.dtype))

    def forward(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """P broadcast to [batch_size, p, hidden], cast to ``dtype``.

        Without a cast this is an expanded view (no copy per row). The cast comes after the broadcast,
        as in PEFT: the backward then sums the rows' gradients in P's own (float32) dtype, not in a
        16-bit one.
        """
        w = self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)


class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes of prefix tuning (Li & Liang, 2021), in PEFT 0.21.2's layout.

    Args:
        num_virtual_tokens: p, the prefix length.
        num_layers: L, transformer layers that receive a prefix.
        token_dim: width of one layer's keys (``num_kv_heads * head_dim``; PEFT's ``token_dim`` after
            its grouped-query adjustment).
        prefix_projection: False — the prefix itself is the parameter, ``embedding.weight``
            [p, 2·L·token_dim]. True — ``embedding.weight`` [p, token_dim] goes through
            ``transform = Linear(token_dim, encoder_hidden_size) → Tanh → Linear(encoder_hidden_size,
            2·L·token_dim)``.
        encoder_hidden_size: the MLP's width (default ``token_dim``, as PEFT).
        init_weights: None (random, torch defaults) or ``"zero"`` (the prefix, or the MLP's last layer,
            starts at zero).

    The flat row of one virtual token is ``[layer, k|v, head, head_dim]`` row-major: layer i's keys
    are feature block 2i, its values block 2i+1 (PEFT's ``view(..., 2L, heads, head_dim)``).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, token_dim: int, *, prefix_projection: bool = False,
                 encoder_hidden_size: Optional[int] = None, init_weights: Optional[str] = None,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        self.num_virtual_tokens = _check_positive_int(num_virtual_tokens, "num_virtual_tokens")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.token_dim = _check_positive_int(token_dim, "token_dim")
        if init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {init_weights!r}")
        self.prefix_projection = bool(prefix_projection)
        self.out_features = 2 * num_layers * token_dim
        if self.prefix_projection:
            hidden = _check_positive_int(encoder_hidden_size if encoder_hidden_size is not None else token_dim,
                                         "encoder_hidden_size")
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, self.out_features, device=device))
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, self.out_features, device=device)
            if init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        """The flat prefix [p, 2·L·token_dim] in the parameters' dtype (computed once, not per batch row)."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self, batch_size: int, num_heads: int, dtype: Optional[torch.dtype] = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch_size, num_heads, p, token_dim // num_heads] (expanded views).

        Raises ValueError when ``num_heads`` does not divide ``token_dim``.
        """
        if self.token_dim % num_heads:
            raise ValueError(f"token_dim {self.token_dim} is not a multiple of num_heads {num_heads}")
        flat = self.forward()
        p, head_dim = self.num_virtual_tokens, self.token_dim // num_heads
        # [p, 2L, H, D] -> [2L, B, H, p, D]; the batch dimension is a broadcast, not a copy
        kv = flat.view(p, 2 * self.num_layers, num_heads, head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        if dtype is not None and kv.dtype != dtype:
            # cast after the broadcast (as PEFT): the batch rows' gradients are summed in float32
            kv = kv.to(dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]
