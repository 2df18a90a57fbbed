"""Prefix tuning (Li & Liang, 2021): trainable keys and values in front of every layer's attention.

    cfg = PrefixTuningConfig(num_virtual_tokens=20)                  # or prefix_projection=True
    model = PrefixTuningModel(base, cfg)       # base frozen; only the prefix (or its MLP) trains
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
    save_prefix_tuning(model, "adapter/"); model = load_prefix_tuning(base, "adapter/")

How it reaches the model: through transformers' cache API, not by patching attention. Each call
builds a fresh ``DynamicCache`` holding layer i's prefix keys/values ([B, kv_heads, p, head_dim],
views of the parameters, so gradients flow back to them) and passes it as the model's cache
(``cache=`` in transformers >= 5.2x, ``past_key_values=`` before). The model's attention then
concatenates its own keys after the prefix exactly as it would after earlier tokens: the mask gets p
leading ones, and positions continue after the prefix (p..p+L-1; explicit ``position_ids`` are
shifted by p). The prefix keys are used as given — no rotary embedding is applied to them.

This is Hugging Face PEFT 0.21.2's PrefixTuning, value for value: its ``PrefixEncoder`` (the flat
prefix ``[p, 2·L·token_dim]``, or Embedding → Linear → Tanh → Linear with ``prefix_projection``),
its key layout (per virtual token ``[layer, k|v, kv_head, head_dim]``), ``token_dim =
num_key_value_heads · head_dim`` for grouped-query models, its position handling. Files are PEFT's:
``adapter_model.safetensors`` holds ``prompt_embeddings`` = the flat prefix (with projection: the
MLP's output, which is all inference needs — as in PEFT, the MLP itself is not saved).

Refused, with the reason: encoder-decoder models (PEFT's two-submodule layout is not implemented);
models whose forward takes no cache; gradient checkpointing (the cache is updated in place during
the forward, so recomputing a layer in backward would append its keys a second time — PEFT refuses
it too); a cache passed by the caller (the prefix must be its start).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..io.method_files import (CONFIG_NAME, AdapterLoadError, check_fingerprint, check_peft_type,
                               read_method_files, write_method_files)
from ..nn.prompt import PrefixEncoder
from ._common import freeze, print_trainable_parameters, trainable_parameters  # noqa: F401 (re-exported)
from .prompt_tuning import (TENSOR_KEY, PromptModel, _config_int, _file_int, _peft_common_fields, check_context,
                            check_per_token, check_position_ids, check_prompt_model, check_single_submodule,
                            check_tensor_file, forward_accepts, input_batch_and_length, new_token_lengths,
                            prepend_ones, reject_cache)

PEFT_TYPE = "PREFIX_TUNING"


@dataclass
class PrefixTuningConfig:
    """Prefix length and encoder; the geometry fields are filled from the model when left None.

    Args:
        num_virtual_tokens: p >= 1.
        prefix_projection: train an MLP that produces the prefix (PEFT's P-tuning v2 style) instead
            of the prefix itself.
        encoder_hidden_size: the MLP's width (default ``token_dim``).
        init_weights: None (random) or ``"zero"`` (PEFT's option: the prefix starts at zero).
        num_layers, token_dim, num_attention_heads: PEFT's geometry — layers, width of one layer's
            keys (``num_key_value_heads · head_dim``) and key/value heads. Derived from the model as
            PEFT does; if given they must agree with it.
    """

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    init_weights: Optional[str] = None
    num_layers: Optional[int] = None
    token_dim: Optional[int] = None
    num_attention_heads: Optional[int] = None

    def __post_init__(self):
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {p!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        for name in ("encoder_hidden_size", "num_layers", "token_dim", "num_attention_heads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")


def model_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, token_dim, kv_heads) of ``model``'s attention, derived as PEFT 0.21.2 does.

    ``token_dim = kv_heads · head_dim`` where the config has ``num_key_value_heads`` (grouped-query
    attention; ``head_dim`` from the config or hidden / heads), else ``hidden_size`` with
    ``num_attention_heads`` heads. Raises ValueError naming the missing config field.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    layers = _config_int(cfg, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _config_int(cfg, "num_attention_heads", "n_head", "num_heads")
    for what, v in (("number of layers (num_hidden_layers)", layers), ("hidden size (hidden_size)", hidden),
                    ("number of attention heads (num_attention_heads)", heads)):
        if v is None:
            raise ValueError(f"{type(model).__name__}'s config has no {what}; prefix tuning needs it")
    kv_heads = _config_int(cfg, "num_key_value_heads")
    if kv_heads is None:
        return layers, hidden, heads
    head_dim = _config_int(cfg, "head_dim") or hidden // heads
    return layers, head_dim * kv_heads, kv_heads


def resolve_config(model: nn.Module, cfg: PrefixTuningConfig) -> PrefixTuningConfig:
    """``cfg`` with num_layers / token_dim / num_attention_heads / encoder_hidden_size filled from ``model``.

    Raises ValueError when a given value disagrees with the model (the prefix would not fit its keys).
    """
    layers, token_dim, kv_heads = model_geometry(model)
    for name, want in (("num_layers", layers), ("token_dim", token_dim), ("num_attention_heads", kv_heads)):
        got = getattr(cfg, name)
        if got is not None and got != want:
            raise ValueError(f"PrefixTuningConfig.{name}={got} does not match the model ({want}: "
                             f"{layers} layers, {kv_heads} key/value heads x {token_dim // kv_heads} head dims)")
    return dataclasses.replace(cfg, num_layers=layers, token_dim=token_dim, num_attention_heads=kv_heads,
                               encoder_hidden_size=cfg.encoder_hidden_size or token_dim)


def _cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if forward_accepts(model, name):
            return name
    raise ValueError(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`); "
                     f"prefix tuning feeds the prefix through transformers' cache API")


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


_CHECKPOINTING_ERROR = ("prefix tuning does not work with gradient checkpointing: the prefix lives in a KV cache that "
                        "attention updates in place during the forward, so recomputing a layer in backward would "
                        "append its keys a second time (PEFT refuses this too). Disable it with "
                        "model.gradient_checkpointing_disable()")


class PrefixTuningModel(PromptModel):
    """A frozen decoder-only model with trainable per-layer key/value prefixes.

    Attributes: ``base_model`` (frozen), ``prompt_encoder``
    (:class:`~peft_kernels.nn.prompt.PrefixEncoder`), ``peft_config`` (resolved from the model).

    Raises ValueError (before changing ``model``) for encoder-decoder models, models without a cache
    argument, gradient checkpointing, a geometry that does not match, or a prefix that fills the context.
    """

    def __init__(self, model: nn.Module, cfg: PrefixTuningConfig):
        super().__init__()
        if not isinstance(cfg, PrefixTuningConfig):
            raise TypeError(f"cfg must be a PrefixTuningConfig, got {type(cfg).__name__}")
        emb = check_prompt_model(model)
        cache_kw = _cache_keyword(model)
        if _checkpointing(model):
            raise ValueError(_CHECKPOINTING_ERROR)
        cfg = resolve_config(model, cfg)
        ctx = _config_int(getattr(model, "config", None), "max_position_embeddings", "n_positions", "n_ctx")
        if ctx is not None and cfg.num_virtual_tokens >= ctx:
            raise ValueError(f"num_virtual_tokens={cfg.num_virtual_tokens} leaves no room for input in the model's "
                             f"context of {ctx} positions")
        encoder = PrefixEncoder(cfg.num_virtual_tokens, cfg.num_layers, cfg.token_dim,
                                prefix_projection=cfg.prefix_projection, encoder_hidden_size=cfg.encoder_hidden_size,
                                init_weights=cfg.init_weights, device=emb.weight.device)
        freeze(model)
        self.base_model = model
        self.prompt_encoder = encoder
        self.peft_config = cfg
        self._cache_kw = cache_kw

    # ------------------------------------------------------------------ small API
    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_config.num_virtual_tokens

    def prefix_cache(self, batch_size: int):
        """A new ``DynamicCache`` whose layer i holds the prefix keys/values [B, kv_heads, p, head_dim].

        Built from the parameters on every call (gradients flow through it), in the base model's dtype
        (PEFT casts the prefix the same way).
        """
        from transformers import DynamicCache

        dtype = getattr(self.base_model, "dtype", None)
        kv = self.prompt_encoder.key_values(batch_size, self.peft_config.num_attention_heads, dtype=dtype)
        return DynamicCache(kv)

    def _common_checks(self, input_ids, inputs_embeds, attention_mask, position_ids, where) -> tuple[int, int]:
        if _checkpointing(self.base_model):
            raise ValueError(_CHECKPOINTING_ERROR)
        batch, length = input_batch_and_length(input_ids, inputs_embeds, self.get_input_embeddings().weight.shape[1])
        check_context(self.base_model, self.num_virtual_tokens, length, where)
        check_per_token(attention_mask, batch, length, "attention_mask")
        check_position_ids(position_ids, batch, length)
        return batch, length

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, **kwargs):
        """The base model with the prefix cache.

        Args (L = input length, B = batch): input_ids long [B, L] or inputs_embeds [B, L, hidden];
        attention_mask [B, L] or None (gets p leading ones); labels [B, L] or None (unchanged: the
        prefix has no output positions); position_ids [B or 1, L] or None (shifted by p; None lets
        the model number the inputs p..p+L-1 from the cache length). Logits are [B, L, vocab].

        Raises ValueError for bad shapes, p + L beyond the context, a caller's cache, checkpointing.
        """
        reject_cache(kwargs, "PrefixTuningModel.forward", "generate()")
        batch, length = self._common_checks(input_ids, inputs_embeds, attention_mask, position_ids, "forward")
        check_per_token(labels, batch, length, "labels")
        p = self.num_virtual_tokens
        if position_ids is not None:
            position_ids = position_ids + p
        kwargs[self._cache_kw] = self.prefix_cache(batch)
        return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                               attention_mask=prepend_ones(attention_mask, p), labels=labels,
                               position_ids=position_ids, **kwargs)

    def _expand_size(self, kwargs: dict) -> int:
        """Rows per input in generate (beams / returned sequences): the cache must have that many."""
        gc = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(gc, "num_beams", None) or 1
        seqs = kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", None) or 1
        return max(int(beams), int(seqs))

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 inputs_embeds: Optional[torch.Tensor] = None, **kwargs):
        """The base model's ``generate`` starting from the prefix cache.

        Returns ``[input_ids, new tokens]`` given ``input_ids`` (PEFT's convention), only the new tokens
        given ``inputs_embeds``. ``max_length`` / ``min_length`` count the L input tokens (as PEFT).
        transformers treats ``inputs_embeds`` as the whole sequence including what the cache already
        holds, so p zero rows stand in front of them for the prefix (they are sliced off, never run).
        """
        reject_cache(kwargs, "PrefixTuningModel.generate", "a fresh call")
        position_ids = kwargs.pop("position_ids", None)
        batch, length = self._common_checks(input_ids, inputs_embeds, attention_mask, position_ids, "generate")
        p = self.num_virtual_tokens
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids + p
        if inputs_embeds is not None:
            inputs_embeds = torch.cat([inputs_embeds.new_zeros(batch, p, inputs_embeds.shape[2]), inputs_embeds], 1)
        kwargs = new_token_lengths(kwargs, length)
        kwargs[self._cache_kw] = self.prefix_cache(batch * self._expand_size(kwargs))
        return self.base_model.generate(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                        attention_mask=prepend_ones(attention_mask, p), **kwargs)


# ====================================================================== save / load
def save_prefix_tuning(model: PrefixTuningModel, directory: str | os.PathLike) -> Path:
    """Write ``model``'s prefix to ``directory`` in PEFT's format (atomically); returns the directory.

    ``adapter_model.safetensors``: ``prompt_embeddings`` [p, 2·L·token_dim], the flat prefix (with
    ``prefix_projection``, the MLP's output). ``adapter_config.json``: PEFT's PrefixTuningConfig
    fields + the base model's fingerprint.
    """
    if not isinstance(model, PrefixTuningModel):
        raise TypeError(f"save_prefix_tuning needs a PrefixTuningModel, got {type(model).__name__}")
    cfg = model.peft_config
    config = _peft_common_fields(model.base_model)
    config.update({
        "peft_type": PEFT_TYPE,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_layers": cfg.num_layers,
        "token_dim": cfg.token_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "prefix_projection": cfg.prefix_projection,
        "init_weights": cfg.init_weights,
    })
    with torch.no_grad():
        flat = model.prompt_encoder()
    return write_method_files(directory, config, {TENSOR_KEY: flat})


def load_prefix_tuning(model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False
                       ) -> PrefixTuningModel:
    """A :class:`PrefixTuningModel` over ``model`` with the prefix from ``directory`` (ours or PEFT's files).

    Checked before ``model`` is touched: ``peft_type`` PREFIX_TUNING; the fingerprint when recorded;
    ``num_layers`` / ``token_dim`` / ``num_attention_heads`` against the model; one submodule; exactly
    ``prompt_embeddings`` [p, 2·num_layers·token_dim], finite. The loaded encoder holds the flat prefix
    (files never carry the projection MLP, as in PEFT), so ``is_trainable=True`` with
    ``prefix_projection`` is refused. Raises AdapterLoadError / FileNotFoundError.
    """
    directory = Path(directory)
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    check_fingerprint(config, model, directory)
    check_single_submodule(config, directory)
    p = _file_int(config, "num_virtual_tokens", directory)
    projection = bool(config.get("prefix_projection", False))
    if is_trainable and projection:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: prefix_projection=true, but the file holds only the "
                               f"projected prefix, not the MLP (PEFT saves the same); it can be loaded for inference "
                               f"only (is_trainable=False)")
    try:
        cfg = PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=False,
                                 encoder_hidden_size=config.get("encoder_hidden_size"),
                                 num_layers=config.get("num_layers"), token_dim=config.get("token_dim"),
                                 num_attention_heads=config.get("num_attention_heads"))
        check_prompt_model(model)
        _cache_keyword(model)
        cfg = resolve_config(model, cfg)
    except ValueError as e:
        raise AdapterLoadError(f"{directory}: {e} (a file for another model?)") from None
    flat = check_tensor_file(tensors, directory, (p, 2 * cfg.num_layers * cfg.token_dim),
                             f"num_virtual_tokens={p} x 2 x {cfg.num_layers} layers x token_dim {cfg.token_dim}")
    try:
        out = PrefixTuningModel(model, cfg)
    except ValueError as e:
        raise AdapterLoadError(f"{directory}: {e}") from None
    weight = out.prompt_encoder.embedding.weight
    with torch.no_grad():
        weight.copy_(flat)
    weight.requires_grad_(is_trainable)
    init_weights = config.get("init_weights") if config.get("init_weights") in (None, "zero") else None
    out.peft_config = dataclasses.replace(cfg, prefix_projection=projection, init_weights=init_weights)
    return out


__all__ = ["PrefixTuningConfig", "PrefixTuningModel", "save_prefix_tuning", "load_prefix_tuning",
           "model_geometry", "resolve_config"]
