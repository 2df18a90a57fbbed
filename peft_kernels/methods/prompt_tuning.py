"""Prompt tuning (Lester et al., 2021): p trainable virtual tokens prepended to the input embeddings.

    cfg = PromptTuningConfig(num_virtual_tokens=20, init="text", init_text="Classify the review:",
                             tokenizer_name_or_path=tokenizer)      # a name/path or a tokenizer object
    model = PromptTuningModel(base, cfg)     # base frozen; only P [p, hidden] trains
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
    save_prompt_tuning(model, "adapter/")    # PEFT's adapter_config.json + adapter_model.safetensors
    model = load_prompt_tuning(base, "adapter/")                     # ours or PEFT's files

The forward is the base model called on ``[P; embed(input_ids)]`` with the attention mask extended
by p ones, labels by p ``-100`` and explicit position ids by ``0..p-1`` (the real tokens' positions
shifted by p) — nothing else is computed, so the cost is exactly p extra positions. P stays float32
and is cast to the embeddings' dtype when concatenated (as PEFT), so it trains in full precision over
a 16-bit or 4-bit base.

Files: ``adapter_config.json`` with PEFT's PromptTuningConfig fields (``peft_type: PROMPT_TUNING``,
``task_type``, ``num_virtual_tokens``, ``token_dim``, ``prompt_tuning_init`` ...) plus
:data:`~peft_kernels.io.method_files.FINGERPRINT_KEY`; ``adapter_model.safetensors`` holds one tensor,
``prompt_embeddings`` [p, hidden] — the key ``peft.PeftModel`` reads and writes, so files move both
ways. The helpers at the bottom (context length, mask and length handling) are shared with
``prefix_tuning.py``.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..io.method_files import (CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError, check_fingerprint,
                               check_peft_type, model_fingerprint, read_method_files, write_method_files)
from ..io.method_files import name_or_path  # noqa: F401 (re-exported: part of this module's API)
from ..nn.prompt import PromptEmbedding, repeat_to_length
from ._common import freeze, print_trainable_parameters, trainable_parameters

PEFT_TYPE = "PROMPT_TUNING"
TENSOR_KEY = "prompt_embeddings"
#: our init names -> PEFT's ``prompt_tuning_init`` values
_INIT_TO_PEFT = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}
_INIT_ALIASES = {"random": "random", "text": "text", "vocab": "vocab", "sample_vocab": "vocab"}
#: config key recording our init when PEFT's field cannot hold it (TEXT without a tokenizer path)
_OWN_INIT_KEY = "peft_kernels_prompt_tuning_init"


@dataclass
class PromptTuningConfig:
    """What to build: p virtual tokens and how to initialise them.

    Args:
        num_virtual_tokens: p >= 1.
        init: ``"random"`` (N(0, 1), PEFT's RANDOM), ``"vocab"`` (rows of the word embeddings at ids
            drawn uniformly from the vocabulary with torch's global generator, PEFT's SAMPLE_VOCAB) or
            ``"text"`` (the embeddings of ``init_text``'s tokens, cut or repeated to p, PEFT's TEXT).
            PEFT's upper-case names are accepted too.
        init_text: the text for ``init="text"``.
        tokenizer_name_or_path: a tokenizer name/path (loaded with ``AutoTokenizer``, never with
            ``trust_remote_code``) or a tokenizer object (anything that ``tok(text)["input_ids"]``
            answers); needed only for ``init="text"``.
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments.
    """

    num_virtual_tokens: int
    init: str = "random"
    init_text: Optional[str] = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: Optional[dict] = None
    #: the tokenizer object when one was given (not saved; its ``name_or_path`` is)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {p!r}")
        if not isinstance(self.init, str) or self.init.lower() not in _INIT_ALIASES:
            raise ValueError(f"init must be one of 'random', 'text', 'vocab' (or PEFT's RANDOM, TEXT, "
                             f"SAMPLE_VOCAB), got {self.init!r}")
        self.init = _INIT_ALIASES[self.init.lower()]
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, (str, os.PathLike)):
            if not callable(tok):
                raise TypeError(f"tokenizer_name_or_path must be a str, a path or a tokenizer object, got "
                                f"{type(tok).__name__}")
            self.tokenizer = tok
            name = getattr(tok, "name_or_path", None)
            self.tokenizer_name_or_path = name if isinstance(name, str) and name else None
        elif isinstance(tok, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(tok)
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError("init='text' needs a non-empty init_text")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("init='text' needs tokenizer_name_or_path (a name, a path or a tokenizer object)")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise TypeError(f"tokenizer_kwargs must be a dict, got {type(self.tokenizer_kwargs).__name__}")

    @property
    def peft_init(self) -> str:
        """PEFT's ``prompt_tuning_init`` value for :attr:`init`."""
        return _INIT_TO_PEFT[self.init]

    def load_tokenizer(self):
        """The tokenizer object (given, or loaded from ``tokenizer_name_or_path`` without remote code)."""
        if self.tokenizer is not None:
            return self.tokenizer
        from transformers import AutoTokenizer

        kwargs = dict(self.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a saved config must not be able to run code when loaded
        return AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kwargs)

    def init_token_ids(self) -> list[int]:
        """The p token ids of ``init_text`` (cut or repeated, special tokens included, as PEFT)."""
        enc = self.load_tokenizer()(self.init_text)
        ids = enc["input_ids"]
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return repeat_to_length(ids, self.num_virtual_tokens)


class PromptModel(nn.Module):
    """What PromptTuningModel and PrefixTuningModel share: a frozen ``base_model`` and PEFT's small API."""

    base_model: nn.Module

    @property
    def config(self):
        """The base model's transformers config (what trainers and generation utilities look for)."""
        return self.base_model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameters; 4-bit weights count their logical weights (as PEFT)."""
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self)


class PromptTuningModel(PromptModel):
    """A frozen model with a trainable soft prompt in front of every input.

    Attributes: ``base_model`` (the wrapped model, frozen), ``prompt_encoder``
    (:class:`~peft_kernels.nn.prompt.PromptEmbedding`, P [p, hidden] float32), ``peft_config``.
    ``initialize=False`` skips the init (used when loading weights from a file).

    Raises ValueError (before changing ``model``) for encoder-decoder models, models without input
    embeddings, a prompt that alone fills the context, or an initialisation that cannot run.
    """

    def __init__(self, model: nn.Module, cfg: PromptTuningConfig, *, initialize: bool = True):
        super().__init__()
        if not isinstance(cfg, PromptTuningConfig):
            raise TypeError(f"cfg must be a PromptTuningConfig, got {type(cfg).__name__}")
        word_embeddings = check_prompt_model(model)
        p = cfg.num_virtual_tokens
        ctx = context_length(model)
        if ctx is not None and p >= ctx:
            raise ValueError(f"num_virtual_tokens={p} leaves no room for input in the model's context of {ctx} "
                             f"positions ({_context_field(model)})")
        hidden = word_embeddings.weight.shape[1]
        text_ids = cfg.init_token_ids() if initialize and cfg.init == "text" else None
        # Built before any random draw of the init, in PEFT's order, so the same seed gives PEFT's prompt.
        prompt = PromptEmbedding(p, hidden, device=word_embeddings.weight.device)
        if initialize and cfg.init == "vocab":
            ids = torch.randint(0, word_embeddings.num_embeddings, (p,), dtype=torch.long)
            prompt.init_from_tokens(word_embeddings, ids)
        elif text_ids is not None:
            prompt.init_from_tokens(word_embeddings, torch.tensor(text_ids, dtype=torch.long))
        freeze(model)
        self.base_model = model
        self.prompt_encoder = prompt
        self.peft_config = cfg

    # ------------------------------------------------------------------ small API
    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_encoder.num_virtual_tokens

    def get_prompt(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """P as [batch_size, p, hidden] in ``dtype`` (default the word embeddings' dtype)."""
        if dtype is None:
            dtype = self.get_input_embeddings().weight.dtype
        return self.prompt_encoder(batch_size, dtype)

    # ------------------------------------------------------------------ inputs
    def _prompted_inputs(self, input_ids, inputs_embeds, attention_mask, labels, position_ids, token_type_ids,
                         where: str) -> dict:
        """The base model's inputs with the prompt prepended (shapes checked first)."""
        emb = self.get_input_embeddings()
        batch, length = input_batch_and_length(input_ids, inputs_embeds, emb.weight.shape[1])
        p = self.num_virtual_tokens
        check_context(self.base_model, p, length, where)
        check_per_token(attention_mask, batch, length, "attention_mask")
        check_per_token(labels, batch, length, "labels")
        check_per_token(token_type_ids, batch, length, "token_type_ids")
        check_position_ids(position_ids, batch, length)
        if inputs_embeds is None:
            inputs_embeds = emb(input_ids)
        prompts = self.get_prompt(batch, inputs_embeds.dtype)
        out = {"inputs_embeds": torch.cat([prompts, inputs_embeds], dim=1)}
        out["attention_mask"] = prepend_ones(attention_mask, p)
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((batch, p), -100), labels], dim=1)
        if position_ids is not None:
            out["position_ids"] = prompt_position_ids(position_ids, p)
        if token_type_ids is not None:
            out["token_type_ids"] = torch.cat([token_type_ids.new_zeros((batch, p)), token_type_ids], dim=1)
        return out

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                **kwargs):
        """The base model on ``[P; embeddings]``.

        Args (L = input length, B = batch):
            input_ids: long [B, L], or inputs_embeds: [B, L, hidden] (exactly one).
            attention_mask: [B, L] or None; gets p leading ones.
            labels: long [B, L] or None; gets p leading -100 (the prompt is never a target).
            position_ids: [B or 1, L] or None; becomes ``[0..p-1, position_ids + p]``. None lets the model
                number the p + L positions itself (0..p+L-1), as PEFT does.
            token_type_ids: [B, L] or None; gets p leading zeros.
            kwargs: passed to the base model (a KV cache is refused: the prompt must be at its start).

        Returns the base model's output; logits cover the p + L positions ([B, p + L, vocab]).
        Raises ValueError when shapes disagree or p + L exceeds the model's context.
        """
        reject_cache(kwargs, "PromptTuningModel.forward", "generate()")
        inputs = self._prompted_inputs(input_ids, inputs_embeds, attention_mask, labels, position_ids,
                                       token_type_ids, "forward")
        return self.base_model(**inputs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 inputs_embeds: Optional[torch.Tensor] = None, **kwargs):
        """The base model's ``generate`` on ``[P; embeddings]`` with the mask extended by p ones.

        Output convention (PEFT's ``PeftModelForCausalLM.generate``): given ``input_ids`` [B, L], the
        result is ``[input_ids, new tokens]`` ([B, L + n]) — never the virtual tokens; given only
        ``inputs_embeds``, just the new tokens (transformers' convention for embeddings). ``max_length``
        / ``min_length`` count the L real input tokens (as PEFT) and are turned into
        ``max_new_tokens`` / ``min_new_tokens``. The prompt is fed once, in the prefill; every decoding
        step runs on the new token only, through the KV cache.

        Raises ValueError for bad shapes, when p + L exceeds the model's context, or when the length
        arguments leave nothing to generate.
        """
        reject_cache(kwargs, "PromptTuningModel.generate", "a fresh call")
        position_ids = kwargs.pop("position_ids", None)
        token_type_ids = kwargs.pop("token_type_ids", None)
        if kwargs.get("labels") is not None:
            raise ValueError("generate() takes no labels")
        inputs = self._prompted_inputs(input_ids, inputs_embeds, attention_mask, None, position_ids, token_type_ids,
                                       "generate")
        batch, length = input_batch_and_length(input_ids, inputs_embeds, None)
        if inputs["attention_mask"] is None:  # generate needs the mask to number positions past the prompt
            inputs["attention_mask"] = torch.ones(batch, self.num_virtual_tokens + length, dtype=torch.long,
                                                  device=inputs["inputs_embeds"].device)
        kwargs = new_token_lengths(kwargs, length)
        if input_ids is not None:
            # transformers uses inputs_embeds for the prefill and input_ids for the returned sequence
            inputs["input_ids"] = input_ids
        return self.base_model.generate(**inputs, **kwargs)


# ====================================================================== save / load
def _peft_common_fields(model: nn.Module) -> dict:
    """The PromptLearningConfig fields PEFT writes for every prompt-learning method."""
    cfg = getattr(model, "config", None)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": name_or_path(model),
        "inference_mode": True,
        "modules_to_save": None,
        "num_layers": _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "num_transformer_submodules": 1,
        "revision": None,
        "task_type": task_type(model),
        FINGERPRINT_KEY: model_fingerprint(model),
    }


def save_prompt_tuning(model: PromptTuningModel, directory: str | os.PathLike) -> Path:
    """Write ``model``'s prompt to ``directory`` in PEFT's format (atomically); returns the directory.

    ``adapter_model.safetensors``: ``prompt_embeddings`` [p, hidden] (P's dtype, float32 by default).
    ``adapter_config.json``: PEFT's PromptTuningConfig fields + the base model's fingerprint. A TEXT
    init without a tokenizer path is written as PEFT's RANDOM (PEFT refuses TEXT without one; the init
    does not matter for a trained prompt) with ``peft_kernels_prompt_tuning_init: "TEXT"`` kept.
    """
    if not isinstance(model, PromptTuningModel):
        raise TypeError(f"save_prompt_tuning needs a PromptTuningModel, got {type(model).__name__}")
    cfg, base = model.peft_config, model.base_model
    config = _peft_common_fields(base)
    init = cfg.peft_init
    if init == "TEXT" and not cfg.tokenizer_name_or_path:
        config[_OWN_INIT_KEY] = init
        init = "RANDOM"
    config.update({
        "peft_type": PEFT_TYPE,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": model.prompt_encoder.hidden,
        "num_attention_heads": _config_int(getattr(base, "config", None), "num_attention_heads", "n_head"),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": cfg.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path if init == "TEXT" else None,
        "tokenizer_kwargs": cfg.tokenizer_kwargs if init == "TEXT" else None,
    })
    return write_method_files(directory, config, {TENSOR_KEY: model.prompt_encoder.embedding.weight})


def load_prompt_tuning(model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False
                       ) -> PromptTuningModel:
    """A :class:`PromptTuningModel` over ``model`` with the prompt from ``directory`` (ours or PEFT's files).

    Everything is checked before ``model`` is touched (a failed load leaves it as it was):
    ``peft_type`` PROMPT_TUNING; the recorded fingerprint, when there is one (PEFT's own files have
    none), must match ``model``; ``num_virtual_tokens``; one submodule (encoder-decoder prompts are
    not supported); exactly the tensor ``prompt_embeddings`` of shape [p, hidden] with finite values.
    The prompt trains only with ``is_trainable=True``. Raises AdapterLoadError / FileNotFoundError.
    """
    directory = Path(directory)
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    check_fingerprint(config, model, directory)
    word_embeddings = check_prompt_model(model)
    p = _file_int(config, "num_virtual_tokens", directory)
    check_single_submodule(config, directory)
    hidden = word_embeddings.weight.shape[1]
    prompt = check_tensor_file(tensors, directory, (p, hidden),
                               f"num_virtual_tokens={p} x the model's hidden size {hidden}")
    if config.get("token_dim") not in (None, hidden):
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: token_dim is {config['token_dim']}, the model's hidden "
                               f"size is {hidden} (a file for another model)")
    init = str(config.get(_OWN_INIT_KEY) or config.get("prompt_tuning_init") or "RANDOM")
    try:
        cfg = PromptTuningConfig(num_virtual_tokens=p, init="random" if init.upper() == "TEXT" else init)
    except ValueError as e:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: {e}") from None
    if init.upper() == "TEXT":  # recorded for re-saving; never re-run (the weights come from the file)
        cfg.init, cfg.init_text = "text", config.get("prompt_tuning_init_text")
        cfg.tokenizer_name_or_path = config.get("tokenizer_name_or_path")
        cfg.tokenizer_kwargs = config.get("tokenizer_kwargs")
    try:
        out = PromptTuningModel(model, cfg, initialize=False)
    except ValueError as e:
        raise AdapterLoadError(f"{directory}: {e}") from None
    weight = out.prompt_encoder.embedding.weight
    with torch.no_grad():
        weight.copy_(prompt)
    weight.requires_grad_(is_trainable)
    return out


# ====================================================================== helpers shared with prefix tuning
def check_prompt_model(model: nn.Module) -> nn.Embedding:
    """The model's word embeddings; ValueError for models prompt learning here cannot wrap."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module (a transformers model), got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; prompt learning here supports "
                         f"decoder-only and encoder-only models")
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input embeddings (get_input_embeddings())")
    return emb


def _config_int(cfg, *names) -> Optional[int]:
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(model: nn.Module) -> Optional[int]:
    """The model's context in positions (``max_position_embeddings`` / ``n_positions``), or None if unknown."""
    return _config_int(getattr(model, "config", None), *_CONTEXT_FIELDS)


def _context_field(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return next((f for f in _CONTEXT_FIELDS if _config_int(cfg, f) is not None), "context")


def check_context(model: nn.Module, p: int, length: int, where: str) -> None:
    """ValueError when p virtual tokens + ``length`` input positions exceed the model's context."""
    ctx = context_length(model)
    if ctx is not None and p + length > ctx:
        raise ValueError(f"{where}: {p} virtual tokens + {length} input tokens = {p + length} positions exceed the "
                         f"model's context of {ctx} ({_context_field(model)}); shorten the input to at most "
                         f"{ctx - p} tokens")


def input_batch_and_length(input_ids, inputs_embeds, hidden: Optional[int]) -> tuple[int, int]:
    """(B, L) of exactly one of ``input_ids`` (integer [B, L]) / ``inputs_embeds`` ([B, L, hidden])."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor [batch, length], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        return input_ids.shape[0], input_ids.shape[1]
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or \
            (hidden is not None and inputs_embeds.shape[2] != hidden):
        raise ValueError(f"inputs_embeds must be [batch, length, {hidden}], got "
                         f"{tuple(getattr(inputs_embeds, 'shape', ()))}")
    return inputs_embeds.shape[0], inputs_embeds.shape[1]


def check_per_token(t: Optional[torch.Tensor], batch: int, length: int, what: str) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, length)):
        raise ValueError(f"{what} must be [batch, length] = [{batch}, {length}] like the input, got "
                         f"{tuple(getattr(t, 'shape', ()))}")


def check_position_ids(position_ids: Optional[torch.Tensor], batch: int, length: int) -> None:
    if position_ids is None:
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
            position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(f"position_ids must be [{batch} or 1, {length}], "
                         f"got {tuple(getattr(position_ids, 'shape', ()))}")


def prepend_ones(mask: Optional[torch.Tensor], p: int) -> Optional[torch.Tensor]:
    """[B, L] mask -> [B, p + L] with p leading ones (the virtual tokens are always attended); None stays None."""
    if mask is None:
        return None
    return torch.cat([mask.new_ones((mask.shape[0], p)), mask], dim=1)


def prompt_position_ids(position_ids: torch.Tensor, p: int) -> torch.Tensor:
    """``[0..p-1, position_ids + p]``: the prompt first, the real tokens after it."""
    head = torch.arange(p, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat([head.expand(position_ids.shape[0], p), position_ids + p], dim=1)


def reject_cache(kwargs: dict, where: str, instead: str) -> None:
    """ValueError if the caller passed a KV cache: the virtual tokens must come first in it."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{where}: passing {key} is not supported (the virtual tokens must come first in "
                             f"the cache); use {instead}")


def new_token_lengths(kwargs: dict, length: int) -> dict:
    """Turn ``max_length`` / ``min_length`` (counting the L real input tokens, PEFT's meaning) into
    ``max_new_tokens`` / ``min_new_tokens``, which mean the same with or without virtual tokens."""
    kwargs = dict(kwargs)
    max_length = kwargs.pop("max_length", None)
    if max_length is not None and kwargs.get("max_new_tokens") is None:
        if max_length - length < 1:
            raise ValueError(f"max_length={max_length} leaves nothing to generate after the {length} input tokens; "
                             f"use max_new_tokens")
        kwargs["max_new_tokens"] = max_length - length
    min_length = kwargs.pop("min_length", None)
    if min_length is not None and kwargs.get("min_new_tokens") is None:
        kwargs["min_new_tokens"] = max(min_length - length, 0)
    return kwargs


def task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type for ``model``: CAUSAL_LM for generative decoder-only heads, else None."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def check_single_submodule(config: dict, directory: Path) -> None:
    n = config.get("num_transformer_submodules", 1)
    if n not in (None, 1):
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: num_transformer_submodules={n} (an encoder-decoder "
                               f"prompt); only decoder-only / encoder-only prompts (1) are supported")


def _file_int(config: dict, key: str, directory: Path) -> int:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: {key} must be a positive int, got {v!r}")
    return v


def check_tensor_file(tensors: dict, directory: Path, shape: tuple, meaning: str) -> torch.Tensor:
    """The one ``prompt_embeddings`` tensor, checked: present, alone, floating, finite, of ``shape``."""
    w_file = directory / WEIGHTS_NAME
    if TENSOR_KEY not in tensors:
        raise AdapterLoadError(f"{w_file} has no tensor {TENSOR_KEY!r} (found {sorted(tensors)}); not a "
                               f"prompt-learning adapter file")
    extra = sorted(set(tensors) - {TENSOR_KEY})
    if extra:
        raise AdapterLoadError(f"{w_file} holds unexpected tensors {extra} next to {TENSOR_KEY!r}")
    t = tensors[TENSOR_KEY]
    if not t.is_floating_point():
        raise AdapterLoadError(f"{w_file}: {TENSOR_KEY} has dtype {t.dtype}, expected a floating dtype")
    if tuple(t.shape) != tuple(shape):
        raise AdapterLoadError(f"{w_file}: {TENSOR_KEY} has shape {tuple(t.shape)}, this model needs "
                               f"{tuple(shape)} ({meaning}); a file for another model?")
    if not torch.isfinite(t).all():
        raise AdapterLoadError(f"{w_file}: {TENSOR_KEY} contains NaN or Inf")
    return t


def forward_accepts(model: nn.Module, name: str) -> bool:
    """True when ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["PromptTuningConfig", "PromptTuningModel", "save_prompt_tuning", "load_prompt_tuning"]
