"""Training checkpoints: safetensors + JSON only (never pickle), written atomically, last k kept.

A checkpoint is the directory ``<output_dir>/checkpoint-<step>/``:

==========================  ==============================================================================
``adapter/``                the adapters in each method's own format (``registry.save_adapters``): what a
                            user loads for inference or hands to PEFT
``trainable.safetensors``   every trainable parameter by name, plus the buffers of the modules that own
                            them (e.g. sparse delta indices), bit for bit: what resume restores
``state.safetensors``       optimizer state tensors (``optim.<param index>.<key>``) and RNG states
                            (``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``)
``trainer_state.json``      step, data position, loss history, config, run fingerprint, optimizer
                            param groups and scalar state, scheduler, grad scaler, Python RNG
==========================  ==============================================================================

The whole directory is staged next to its final place and renamed in one step
(``io.atomic.replace_directory``): an error while writing — a full disk, a NaN refused by the adapter
writer — removes the staging directory and leaves every earlier checkpoint untouched.
``trainer_state.json`` carries ``format_version``; a checkpoint directory that lacks any of the files is
refused by :func:`read_checkpoint` with a :class:`CheckpointError` naming what is missing.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..io.atomic import fsync_file, replace_directory

FORMAT_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
TRAINABLE_TENSORS = "trainable.safetensors"
ADAPTER_DIR = "adapter"
REQUIRED = (STATE_JSON, STATE_TENSORS, TRAINABLE_TENSORS)
_NAME_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing or corrupt files, or one made by another run."""


# ============================================================================ optimizer state
def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _flatten(prefix: str, value: Any, tensors: dict, where: str) -> Any:
    """Move the tensors of a nested dict into ``tensors`` (keys ``prefix/sub/...``); return the JSON rest."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return None
    if isinstance(value, dict):  # e.g. bitsandbytes' "__bnb_optimizer_quant_state__" sub-dict
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or "/" in k:
                raise TypeError(f"optimizer state {where}: key {k!r} cannot be stored")
            rest = _flatten(f"{prefix}/{k}", v, tensors, f"{where}.{k}")
            if rest is not None or not isinstance(v, torch.Tensor):
                out[k] = rest
        return out
    if isinstance(value, tuple):
        value = list(value)
    if not _jsonable(value):
        raise TypeError(f"optimizer state {where} is a {type(value).__name__}: cannot store it without pickle")
    return value


def _unflatten(meta: dict, key: str, t: torch.Tensor) -> None:
    parts = key.split("/")
    for p in parts[:-1]:
        meta = meta.setdefault(p, {})
    meta[parts[-1]] = t


def optimizer_state_split(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<idx>.<key>[/<subkey>]``, ``group.<i>.<key>``)
    and a JSON-able dict of everything else. Raises TypeError for values neither can hold."""
    tensors: dict[str, torch.Tensor] = {}
    state = {}
    for idx, st in sd["state"].items():
        state[str(idx)] = {k: _flatten(f"optim.{idx}.{k}", v, tensors, f"{idx}.{k}") for k, v in st.items()
                           if not isinstance(v, torch.Tensor)}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        out = {}
        for k, v in g.items():
            if isinstance(v, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"group.{gi}.{k}"] = v
            else:
                out[k] = _flatten(f"group.{gi}.{k}", v, tensors, f"param group {gi}.{k}")
        groups.append(out)
    return tensors, {"state": state, "param_groups": groups}


def optimizer_state_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_split` (a dict ``optimizer.load_state_dict`` accepts)."""
    state: dict[int, dict] = {int(i): json.loads(json.dumps(v)) for i, v in meta["state"].items()}
    groups = [json.loads(json.dumps(g)) for g in meta["param_groups"]]
    for key, t in tensors.items():
        kind, idx, name = key.split(".", 2)
        if kind == "optim":
            _unflatten(state.setdefault(int(idx), {}), name, t)
        elif kind == "group":
            _unflatten(groups[int(idx)], name, t)
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# ============================================================================ RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of the torch, CUDA, NumPy and Python random states."""
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    meta: dict[str, Any] = {}
    version, internal, gauss = random.getstate()
    meta["python"] = [version, list(internal), gauss]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Set the random states :func:`capture_rng` recorded."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


# ============================================================================ files
def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``output_dir``, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in REQUIRED):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (None keeps all); returns the deleted paths.

    Each is first renamed to a hidden name, so that an interrupted deletion never leaves a directory
    that looks like a checkpoint with files missing."""
    if keep_last is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(0, len(found) - keep_last)]]
    for p in doomed:
        trash = p.with_name(f".{p.name}.deleting")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def whole_cpu_tensor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``t`` owning its storage; a DTensor (FSDP2) is gathered first (a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): the whole tensor, gathered
        t = t.full_tensor()
    t = t.to("cpu")
    return t.contiguous().clone()


def write_checkpoint(directory: str | os.PathLike, *, trainable: dict[str, torch.Tensor],
                     state_tensors: dict[str, torch.Tensor], state: dict,
                     save_adapter=None) -> Path:
    """Atomically write one checkpoint directory (see the module docstring); returns its absolute path.

    ``save_adapter(path)`` (optional) writes the method-format adapters into ``path``. Nothing appears at
    ``directory`` unless every file was written and fsynced; on any error the staging directory is
    removed and an existing ``directory`` is left as it was.
    """
    for k, t in trainable.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"trainable tensor {k} holds NaN or Inf; refusing to checkpoint a diverged run")
    text = json.dumps({"format_version": FORMAT_VERSION, **state}, indent=1, sort_keys=True) + "\n"
    with replace_directory(directory, owned=lambda name: True) as staging:
        if save_adapter is not None:
            save_adapter(staging / ADAPTER_DIR)
        for name, tensors in ((TRAINABLE_TENSORS, trainable), (STATE_TENSORS, state_tensors)):
            save_file({k: whole_cpu_tensor(v) for k, v in tensors.items()}, str(staging / name),
                      metadata={"format": "pt"})
            fsync_file(staging / name)
        (staging / STATE_JSON).write_text(text)  # last: its presence marks a complete checkpoint
        fsync_file(staging / STATE_JSON)
    return Path(os.path.abspath(directory))


@dataclass
class CheckpointData:
    path: Path
    state: dict                              # trainer_state.json
    trainable: dict[str, torch.Tensor]       # name -> tensor
    state_tensors: dict[str, torch.Tensor]   # optim.* / group.* / rng.*

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_checkpoint(directory: str | os.PathLike) -> CheckpointData:
    """Read a checkpoint written by :func:`write_checkpoint`; :class:`CheckpointError` for anything wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    missing = [f for f in REQUIRED if not (directory / f).is_file()]
    if missing:
        extra = f" (it holds pickle files {pickles}, which are never read)" if pickles else ""
        raise CheckpointError(f"{directory} is not a complete peft_kernels checkpoint: missing {missing}{extra}")
    try:
        state = json.loads((directory / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_JSON}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / STATE_JSON}: unsupported format_version "
                              f"{state.get('format_version') if isinstance(state, dict) else None!r} "
                              f"(this version reads {FORMAT_VERSION})")
    for key in ("step", "fingerprint", "position", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{directory / STATE_JSON}: missing {key!r}")
    return CheckpointData(directory, state, _read_tensors(directory / TRAINABLE_TENSORS),
                          _read_tensors(directory / STATE_TENSORS))


__all__ = ["CheckpointError", "CheckpointData", "FORMAT_VERSION", "ADAPTER_DIR", "checkpoint_name",
           "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "write_checkpoint", "read_checkpoint",
           "optimizer_state_split", "optimizer_state_join", "capture_rng", "restore_rng"]
