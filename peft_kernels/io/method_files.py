"""The on-disk pair every method's files use: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA writes Hugging Face PEFT's keys into it (``io/peft_format.py``); prompt tuning, prefix tuning
and IA3 write PEFT's too; BitFit, sparse deltas, bottleneck adapters and layer freezing write the
same two files with their own documented keys and ``"peft_type"`` (``"BITFIT"``, ``"SPARSE"``,
``"BOTTLENECK"``, ...). This module only reads and writes the pair safely:

* :func:`write_method_files` replaces the directory's two files atomically (an existing adapter is
  never half overwritten; other files there are kept) and refuses NaN/Inf tensors.
* :func:`read_method_files` reads JSON and safetensors only — a pickle checkpoint is refused — and
  turns every malformed input into :class:`AdapterLoadError` naming the file.
* :func:`model_fingerprint` / :func:`check_fingerprint`: the base model's shape facts stored in the
  config, so a file made for another model is refused with a clear error before any tensor is used.
* :func:`name_or_path` (the ``base_model_name_or_path`` a save records) and :func:`is_peft_model`
  (savers and loaders refuse a ``peft.PeftModel``: it has its own).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import fsync_file, replace_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
#: Key in a config holding :func:`model_fingerprint` of the model the file was made for.
FINGERPRINT_KEY = "peft_kernels_base_fingerprint"
#: ``model.config`` fields that make up the fingerprint (those present are used).
_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head")


class AdapterLoadError(ValueError):
    """The adapter files cannot be loaded into this model (the message names the file, tensor or module)."""


def owned(name: str) -> bool:
    """Files of the adapter itself (replaced by a save); anything else in the directory is kept."""
    return name in (CONFIG_NAME, WEIGHTS_NAME) or name in PICKLE_NAMES


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its whole storage (safetensors refuses views and shared storage)."""
    t = t.detach().to("cpu")
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.contiguous().clone()


def write_method_files(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write ``config`` (JSON) and ``tensors`` (safetensors) into ``directory``; returns its path.

    Raises ValueError (before writing anything) when a floating tensor holds NaN or Inf, or when
    ``config`` is not JSON-serialisable.
    """
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"adapter tensor {key} contains NaN or Inf values; refusing to save it "
                             f"(the file could not be loaded back)")
    try:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter config is not JSON-serialisable: {e}") from None
    own, seen = {}, set()
    for k, t in tensors.items():
        t = _standalone(t)
        if t.data_ptr() in seen and t.numel():  # the same tensor under two keys (tied weights)
            t = t.clone()
        seen.add(t.data_ptr())
        own[k] = t
    with replace_directory(directory, owned=owned) as staging:
        save_file(own, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        fsync_file(staging / WEIGHTS_NAME)
        path = staging / CONFIG_NAME
        path.write_text(text)
        fsync_file(path)
    return Path(os.path.abspath(directory))


def read_method_files(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, name -> CPU tensor) from ``directory``; clear errors for anything missing or corrupt."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no adapter at {directory}")
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory} is not a directory (expected one holding {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME})")
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not w_path.is_file():
        pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickles:
            raise AdapterLoadError(f"{directory} holds only a pickle-based adapter ({pickles[0]}): refusing to "
                                   f"read it (unpickling can run arbitrary code). Re-save it as safetensors from a "
                                   f"trusted environment (PeftModel.save_pretrained(..., safe_serialization=True))")
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{w_path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not tensors:
        raise AdapterLoadError(f"{w_path} holds no tensors")
    return config, tensors


def check_peft_type(config: dict, expected: str, directory: str | os.PathLike) -> None:
    """Raise AdapterLoadError unless ``config["peft_type"]`` is ``expected`` (case-insensitive)."""
    got = config.get("peft_type")
    if not isinstance(got, str) or got.upper() != expected.upper():
        raise AdapterLoadError(f"{Path(directory) / CONFIG_NAME}: peft_type is {got!r}, this loader reads "
                               f"{expected!r} adapters")


def model_fingerprint(model: nn.Module) -> dict:
    """Shape facts of ``model`` (``model.config`` fields that exist) that a method file records."""
    cfg = getattr(model, "config", None)
    out = {}
    for f in _FINGERPRINT_FIELDS:
        v = getattr(cfg, f, None) if cfg is not None else None
        if isinstance(v, (int, str)):
            out[f] = v
    return out


def check_fingerprint(config: dict, model: nn.Module, directory: str | os.PathLike) -> None:
    """Raise AdapterLoadError if the config's recorded fingerprint disagrees with ``model``'s on any field both have."""
    saved: Optional[dict] = config.get(FINGERPRINT_KEY)
    if not saved:
        return
    if not isinstance(saved, dict):
        raise AdapterLoadError(f"{Path(directory) / CONFIG_NAME}: {FINGERPRINT_KEY} must be an object")
    mine = model_fingerprint(model)
    diff = {k: (saved[k], mine[k]) for k in saved if k in mine and saved[k] != mine[k]}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise AdapterLoadError(f"{directory} was made for another model ({detail})")


def name_or_path(model: nn.Module) -> Optional[str]:
    """The model's hub name or local path (``name_or_path`` / ``config._name_or_path``), or None."""
    for obj in (model, getattr(model, "config", None)):
        for attr in ("name_or_path", "_name_or_path"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, str) and v:
                return v
    return None


def is_peft_model(model: nn.Module, *, tuner: bool = True) -> bool:
    """Whether ``model`` looks like a ``peft.PeftModel`` (a ``peft_config`` and a ``base_model`` module); with
    ``tuner`` (the default) its ``base_model`` must also hold the transformers model as ``.model`` (a tuner
    such as PEFT's LoraModel)."""
    if not (hasattr(model, "peft_config") and isinstance(getattr(model, "base_model", None), nn.Module)):
        return False
    return not tuner or isinstance(getattr(model.base_model, "model", None), nn.Module)
