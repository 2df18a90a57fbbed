"""4-bit checkpoints in transformers' bitsandbytes format: atomic saving and streaming loading.

On disk (what ``transformers`` writes for a bitsandbytes 4-bit model)::

    config.json                         model config + ``quantization_config`` (quant_method "bitsandbytes")
    model.safetensors                   one file, or
    model-00001-of-0000N.safetensors    shards, listed by
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {key: file}}

Each 4-bit linear ``L`` has the keys ``L.weight`` (uint8 [(N*K+1)//2, 1]), ``L.weight.absmax``,
``L.weight.quant_map``, [``L.weight.nested_absmax``, ``L.weight.nested_quant_map``] and
``L.weight.quant_state.bitsandbytes__nf4`` (JSON in a uint8 tensor); everything else is stored dense.
A 4-bit input embedding (``Embedding4bit``) is stored under the same keys (its [V, H] table); a 4-bit head
tied to it is not stored at all (transformers drops tie targets, and the head reads the embedding's
bytes), and trainable token rows are stored as ``<module>.trainable_token_indices`` (int64 [n]) and
``<module>.trainable_tokens_delta`` ([n, H]). transformers itself has no 4-bit embedding: such checkpoints
load with :func:`load_quantized` only.

Only safetensors and JSON are ever read; pickle-based files (.bin, .pt, ...) are refused.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import fsync_dir as _fsync_dir, fsync_file as _fsync_file, publish_directory
from ..io.atomic import rename_exchange as _rename_exchange
from ..nn._quant_weight import QuantizedWeight
from ..nn.embedding4bit import Embedding4bit
from ..nn.linear4bit import Linear4bit
from ..nn.trainable_tokens import Linear4bitHead, TokenRows
from .model import (DEFAULT_SKIP, _Default, _table_and_head, _tied_weight_ids, describe_quantization,
                    is_quantizable_linear, linear_shape, record_quantization_config, select_linears)
from .quantize import quantize_4bit
from .state import QuantState, parse_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Default shard size limit of :func:`save_quantized` (a tensor larger than this gets a shard of its own).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Reopen a shard after this many bytes were read from it: safetensors memory-maps the file,
# and the pages a read touches stay resident (they count in the process RSS) until it closes.
_REOPEN_BYTES = 16 * 2**20


# "<module>.weight" and its bitsandbytes statistics "<module>.weight.<stat>".
_QUANT_KEY = re.compile(r"^(?P<mod>.+)\.weight(?:\.(?P<stat>absmax|quant_map|nested_absmax|nested_quant_map|"
                        r"quant_state\.bitsandbytes__\w+))?$")
_QUANT_STATE_KEY = re.compile(r"^(?P<mod>.+)\.weight\.quant_state\.bitsandbytes__(?P<qt>\w+)$")
_INT8_KEY = re.compile(r"\.weight\.(SCB|weight_format)$")
_ST_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                   "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """The files are not a checkpoint this model can be loaded from (named tensor, file and reason)."""


# =====================================================================  save
def save_quantized(model: nn.Module, directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   overwrite: bool = False) -> Path:
    """Write ``model`` (4-bit layers and all) as a transformers bitsandbytes checkpoint in ``directory``.

    Keys are the module ``state_dict`` keys; tied weights are stored once (transformers re-ties them).
    Shards hold at most ``max_shard_bytes`` each (one ``model.safetensors`` when everything fits),
    and a 4-bit weight never straddles two shards.

    Atomic: everything is written and fsynced in a temporary directory next to ``directory``, which
    then takes its place by a rename, so readers see the old checkpoint or the new one, never a mix.
    Other files already in ``directory`` (a tokenizer, say) are carried over. An existing
    checkpoint there is replaced only with ``overwrite=True`` (FileExistsError otherwise).
    Returns the directory path.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"save_quantized needs a transformers model (with a .config); got {type(model).__name__}")
    directory = Path(directory)
    if directory.is_symlink():
        directory = directory.resolve()  # replace the directory it points to, not the link
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if _has_checkpoint(directory) and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")
    _ensure_quantization_config(model)
    tensors = _checkpoint_tensors(model)
    shards = _plan_shards(tensors, max_shard_bytes)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write_shards(staging, tensors, shards)
        config.save_pretrained(staging)
        _fsync_dir(staging)
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _ensure_quantization_config(model: nn.Module) -> None:
    """A model holding Linear4bit layers gets a quantization_config if it has none (built by hand, say)."""
    if not getattr(model.config, "quantization_config", None):
        cfg = describe_quantization(model)
        if cfg is not None:
            record_quantization_config(model, cfg)


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with aliases removed (safetensors stores no shared tensors)."""
    state = model.state_dict()
    # Drop transformers' tie targets first (lm_head.weight when tied to the embeddings) so the
    # surviving name is the one transformers expects; any other alias keeps its first name.
    tie_targets = set(getattr(model, "all_tied_weights_keys", None) or ())
    order = sorted(state, key=lambda k: k in tie_targets)
    seen: set[tuple] = set()
    keep: set[str] = set()
    for key in order:
        t = state[key]
        if t.is_meta:
            raise ValueError(f"cannot save {key}: it is on the meta device (never loaded)")
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident not in seen:
            seen.add(ident)
            keep.add(key)
    # A tied 4-bit weight dropped as an alias takes its statistics along: its quant-state JSON is a fresh
    # tensor each time (so not deduplicated above) and would describe a weight the file does not hold.
    dropped = {k for k in state if k not in keep and k.endswith(".weight")}
    return {k: v for k, v in state.items() if k in keep and not any(k.startswith(d + ".") for d in dropped)}


def _group_of(key: str) -> str:
    """Keys that must stay in one shard share a group: a 4-bit weight and its statistics."""
    m = _QUANT_KEY.match(key)
    return f"{m['mod']}.weight" if m else key


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(_group_of(key), []).append(key)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in groups.values():
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += nbytes
    return shards


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_shards(staging: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]]) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(shards):
        name = _shard_name(i, len(shards))
        # One shard at a time on the host: a GPU model is copied over shard by shard.
        part = {k: _own_storage(tensors[k]) for k in keys}
        path = staging / name
        save_file(part, str(path), metadata={"format": "pt"})
        _fsync_file(path)
        for k, t in part.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        path = staging / INDEX_FILE
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _fsync_file(path)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its whole storage (safetensors rejects views into shared storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _is_checkpoint_file(name: str) -> bool:
    return (name == CONFIG_FILE or name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
            or name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json"))


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(_is_checkpoint_file(p.name) for p in directory.iterdir())


def _publish(staging: Path, directory: Path) -> None:
    """Move the finished ``staging`` directory to ``directory`` in one step (see io/atomic.py)."""
    # _rename_exchange is looked up here at call time so tests can monkeypatch it on this module.
    publish_directory(staging, directory, owned=_is_checkpoint_file, exchange=_rename_exchange)


# =====================================================================  load
@dataclass
class _Checkpoint:
    """The safetensors files of a checkpoint and what their headers say (no tensor data read)."""

    files: list[Path]
    keys: dict[Path, list[str]]  # file -> its tensor names
    nbytes: dict[str, int]  # tensor name -> bytes
    where: dict[str, Path] = field(default_factory=dict)  # tensor name -> file
    rename: dict[str, str] = field(default_factory=dict)  # tensor name -> name in the model, where they differ

    def model_name(self, key: str) -> str:
        return self.rename.get(key, key)

    @property
    def quantized_modules(self) -> dict[str, str]:
        """module name -> its quant-state key (model names), for every 4-bit weight in the checkpoint."""
        out = {}
        for key in map(self.model_name, self.where):
            m = _QUANT_STATE_KEY.match(key)
            if m:
                out[m["mod"]] = key
        return out

    def match_prefix(self, model: nn.Module) -> None:
        """Map names between a base-model checkpoint and a model with a head, as transformers does.

        A checkpoint saved from ``LlamaModel`` has ``layers.0...`` where ``LlamaForCausalLM`` has
        ``model.layers.0...`` (``base_model_prefix``); the other way round the prefix is dropped.
        """
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix:
            return
        children = {n for n, _ in model.named_children()}
        in_model = prefix in children
        in_ckpt = any(k.startswith(prefix + ".") for k in self.where)
        if in_model and not in_ckpt:
            # Keys of the head (lm_head, cls, ...) keep their names; the rest move under the prefix.
            self.rename = {k: f"{prefix}.{k}" for k in self.where if k.split(".")[0] not in children - {prefix}}
        elif in_ckpt and not in_model and not any(k.split(".")[0] in children for k in self.where):
            self.rename = {k: k[len(prefix) + 1:] for k in self.where if k.startswith(prefix + ".")}


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(f"{path} is a pickle-based checkpoint: refusing to read it (unpickling can run "
                          f"arbitrary code). Convert it to safetensors first, from a trusted environment.")


def _resolve_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], Path | None]:
    """(safetensors files, directory holding config.json or None) of a directory, file or list of files."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.is_dir():
            if (path / INDEX_FILE).is_file():
                return _files_from_index(path / INDEX_FILE), path
            if (path / SINGLE_FILE).is_file():
                return [path / SINGLE_FILE], path
            found = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))
            if found:
                return found, path
            pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise CheckpointError(f"{path} holds only pickle-based weights ({', '.join(pickles[:4])}): refusing "
                                      f"to read them (unpickling can run arbitrary code); save the model as "
                                      f"safetensors instead")
            raise FileNotFoundError(f"no safetensors checkpoint in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")
        source = [path]
    files: list[Path] = []
    for item in source:
        p = Path(item)
        if p.name.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            files.extend(_files_from_index(p))
        elif p.name.endswith(".safetensors"):
            if not p.is_file():
                raise FileNotFoundError(f"checkpoint file {p} does not exist")
            files.append(p)
        else:
            raise CheckpointError(f"{p}: not a .safetensors file or a safetensors index")
    if not files:
        raise FileNotFoundError("no checkpoint files given")
    parents = {f.parent for f in files}
    return files, parents.pop() if len(parents) == 1 else None


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
        names = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: {e!r}") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{index_path} lists {name!r}: shards must be plain file names in its directory")
        if name.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(index_path.parent / name)
        if not (index_path.parent / name).is_file():
            raise CheckpointError(f"{index_path} lists shard {name}, which does not exist")
    return [index_path.parent / n for n in names]


def _read_headers(files: list[Path]) -> _Checkpoint:
    ckpt = _Checkpoint(files=files, keys={}, nbytes={})
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for k in keys:
                    sl = f.get_slice(k)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    ckpt.nbytes[k] = numel * _ST_DTYPE_BYTES.get(sl.get_dtype(), 8)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        for k in keys:
            if k in ckpt.where:
                raise CheckpointError(f"tensor {k} appears in both {ckpt.where[k].name} and {path.name}")
            ckpt.where[k] = path
        ckpt.keys[path] = keys
    return ckpt


def _iter_tensors(path: Path, keys: list[str], nbytes: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time. The tensors view the memory-mapped file: copy what you keep."""
    start = 0
    while start < len(keys):
        stop, size = start, 0
        while stop < len(keys) and (stop == start or size + nbytes[keys[stop]] <= _REOPEN_BYTES):
            size += nbytes[keys[stop]]
            stop += 1
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys[start:stop]:
                t = f.get_tensor(key)
                yield key, t
                del t
        start = stop


def _load_config(config, config_dir: Path | None):
    if config is not None:
        return config
    if config_dir is None or not (config_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} next to the checkpoint files; pass config=")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(config_dir))  # reads config.json only


def _meta_skeleton(model_cls, config, dtype: torch.dtype | None) -> nn.Module:
    """The model built from ``config`` with every tensor on the meta device (no memory, no init)."""
    if model_cls is None:
        from transformers import AutoModelForCausalLM
        model_cls = AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        if model_cls.__name__.startswith("Auto") and hasattr(model_cls, "from_config"):
            return model_cls.from_config(config, **kwargs)
        if hasattr(model_cls, "_from_config"):
            return model_cls._from_config(config, **kwargs)
    raise TypeError(f"model_cls must be a transformers model class or Auto class, got {model_cls!r}")


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the quantization
    temporaries of successive layers then fragment the heap: peak RSS creeps up layer by layer)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _StreamLoader:
    """Moves checkpoint tensors into a meta-device skeleton one at a time."""

    def __init__(self, model: nn.Module, ckpt: _Checkpoint, prequantized: dict[str, str], dense_targets: set[str],
                 conv1d: set[str], device: torch.device, strict: bool):
        self.model, self.ckpt, self.device, self.strict = model, ckpt, device, strict
        self.modules = dict(model.named_modules())
        self.prequantized, self.dense_targets, self.conv1d = prequantized, dense_targets, conv1d
        # The keys of each 4-bit weight (packed bytes + statistics), which may span shards.
        self.group_keys: dict[str, set[str]] = {m: set() for m in prequantized}
        for key in map(ckpt.model_name, ckpt.where):
            m = _QUANT_KEY.match(key)
            if m and m["mod"] in self.group_keys:
                self.group_keys[m["mod"]].add(key)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        self.ignore = [re.compile(p) for p in ignore]
        self.unexpected: list[str] = []
        self.rows: dict[str, dict[str, torch.Tensor]] = {}  # module -> trainable token rows, set in finish()
        self.tied_head: tuple[str, str] | None = None  # (head, embedding): the head shares the 4-bit table

    def take(self, key: str, t: torch.Tensor, path: Path) -> None:
        mod_name, _, attr = key.rpartition(".")
        if attr in _ROW_KEYS and isinstance(self.modules.get(mod_name), TokenRows):
            self.rows.setdefault(mod_name, {})[attr] = t.to(self.device, copy=True)
            return
        if self.tied_head is not None and mod_name == self.tied_head[0] and attr == "weight":
            return  # a dense copy of the tied table (some checkpoints store both): the head shares the 4-bit one
        m = _QUANT_KEY.match(key)
        if m and m["mod"] in self.prequantized:
            self._stash_4bit(m["mod"], key, t, path)
        elif m and m["stat"] is None and m["mod"] in self.dense_targets:
            self._quantize_dense(m["mod"], key, t, path)
        else:
            self._set_tensor(key, t, path)

    # ---------------------------------------------------------- 4-bit weights
    def _stash_4bit(self, mod: str, key: str, t: torch.Tensor, path: Path) -> None:
        group = self.pending.setdefault(mod, {})
        group[key] = t.to(self.device, copy=True)  # own memory: the file mapping can go
        if len(group) == len(self.group_keys[mod]):
            del self.pending[mod]
            wkey = f"{mod}.weight"
            try:
                packed, state = QuantState.from_checkpoint(group, wkey)
                self.modules[mod].set_quantized(packed, state)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"corrupt or mismatched 4-bit weight {wkey} in {path.name}: {e}") from None

    def _quantize_dense(self, mod: str, key: str, t: torch.Tensor, path: Path) -> None:
        layer: QuantizedWeight = self.modules[mod]
        rows, cols = layer._quant_shape()
        want = (cols, rows) if mod in self.conv1d else (rows, cols)
        if tuple(t.shape) != want:
            hint = " (it looks like packed 4-bit bytes without their quant_state)" if t.dtype == torch.uint8 else ""
            raise CheckpointError(f"tensor {key} in {path.name} has shape {tuple(t.shape)} but "
                                  f"{type(self.model).__name__} expects {want}{hint}")
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key} in {path.name} is {t.dtype}, expected a floating-point weight")
        w = t.t() if mod in self.conv1d else t  # Conv1D stores [in, out]
        # At most this layer's 16-bit weight plus one chunk's temporaries are alive here.
        packed, state = quantize_4bit(w.to(self.device, layer.weight_dtype), layer.blocksize,
                                      layer.quant_type, layer.double_quant)
        layer.set_quantized(packed, state)
        del w  # a converted copy, if the dtype or device differed
        _return_freed_memory()

    # ------------------------------------------------------ everything else
    def _set_tensor(self, key: str, t: torch.Tensor, path: Path) -> None:
        mod_name, _, attr = key.rpartition(".")
        module = self.modules.get(mod_name)
        if module is None or not (attr in module._parameters or attr in module._buffers):
            if not any(p.search(key) for p in self.ignore):
                self.unexpected.append(key)
            return
        if attr in module._non_persistent_buffers_set:
            return  # recomputed after loading, as transformers does (e.g. an old rotary inv_freq)
        old = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
        if old is None:
            self.unexpected.append(key)
            return
        if tuple(t.shape) != tuple(old.shape):
            hint = ""
            if attr == "weight" and t.dtype == torch.uint8 and is_quantizable_linear(module):
                hint = " (it looks like packed 4-bit bytes without their quant_state)"
            raise CheckpointError(f"tensor {key} in {path.name} has shape {tuple(t.shape)} but "
                                  f"{type(self.model).__name__} expects {tuple(old.shape)}{hint}")
        if t.is_floating_point() != old.is_floating_point():
            raise CheckpointError(f"tensor {key} in {path.name} is {t.dtype}, the model expects {old.dtype}")
        new = t.to(self.device, old.dtype if old.is_floating_point() else t.dtype, copy=True)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new

    # ---------------------------------------------------------------- finish
    def _finish_tables(self) -> None:
        """Trainable token rows onto their modules; a tied 4-bit head onto the embedding's tensors."""
        for mod, got in self.rows.items():
            if set(got) != set(_ROW_KEYS):
                raise CheckpointError(f"{mod}: the checkpoint holds {sorted(got)} but trainable token rows need both "
                                      f"{list(_ROW_KEYS)}")
            delta = got["trainable_tokens_delta"]
            try:
                self.modules[mod].set_trainable_tokens(got["trainable_token_indices"], values=delta.float(),
                                                       dtype=delta.dtype)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{mod}: bad trainable token rows: {e}") from None
        if self.tied_head is not None:
            head, emb = (self.modules[n] for n in self.tied_head)
            if emb.weight.is_meta:
                raise CheckpointError(f"the checkpoint lacks the 4-bit table {self.tied_head[1]}.weight")
            head.share_quantized_weight(emb)
            if emb.has_trainable_tokens and not head.has_trainable_tokens:
                head.share_trainable_tokens(emb)

    def finish(self) -> None:
        self._finish_tables()
        if self.unexpected:
            msg = (f"{len(self.unexpected)} checkpoint tensors have no place in {type(self.model).__name__} "
                   f"and were not loaded: {self.unexpected[:8]}")
            if self.strict:
                raise CheckpointError(msg)
            # Like transformers: a head the model lacks, or an obsolete buffer, is not an error.
            warnings.warn(msg, stacklevel=3)
        missing = {n for n, p in self.model.named_parameters(remove_duplicate=False) if p.is_meta}
        if hasattr(self.model, "tie_weights"):
            # With missing_keys, transformers ties symmetrically (whichever side was stored) and
            # leaves untied two stored copies that differ.
            try:
                self.model.tie_weights(missing_keys=set(missing))
            except TypeError:  # older transformers: no missing_keys
                self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta]
        missing += [n for n, b in _persistent_buffers(self.model) if b.is_meta]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors that {type(self.model).__name__} "
                                  f"needs: {missing[:8]}")
        _init_non_persistent_buffers(self.model, self.device)


#: State-dict attributes of trainable token rows (nn/trainable_tokens.py).
_ROW_KEYS = ("trainable_token_indices", "trainable_tokens_delta")


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield f"{mod_name}.{name}" if mod_name else name, b


def _init_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute the buffers no checkpoint holds (rotary ``inv_freq``, ``position_ids`` ...).

    Done the way transformers' own ``from_pretrained`` does it: give them memory, flag every
    loaded tensor as initialised, and run the model's ``initialize_weights``, whose per-module
    ``_init_weights`` recomputes exactly the unflagged tensors from the config.
    """
    todo = []
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)
                todo.append(module._buffers[name])
    if not todo:
        return
    if not hasattr(model, "initialize_weights"):
        raise TypeError(f"{type(model).__name__} has buffers that only its initialize_weights can compute, "
                        f"but it has no such method")
    fresh = {id(b) for b in todo}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in fresh:
            t._is_hf_initialized = True
    model.initialize_weights()


@dataclass
class _Plan:
    """What becomes 4-bit on load, and how."""

    prequantized: dict[str, str]        # module -> quant-state key, for every 4-bit weight stored
    dense_targets: set[str]             # dense weights to quantize on arrival (linears, the embedding, the head)
    embeddings: str | None = None       # the input embedding becomes Embedding4bit
    head: str | None = None             # the output head becomes Linear4bitHead
    tied: bool = False                  # ... sharing the embedding's table


def _plan_quantization(model: nn.Module, ckpt: _Checkpoint, skip_modules, target_modules, quantize_embeddings,
                       quantize_head) -> _Plan:
    """The :class:`_Plan` of a checkpoint: a 4-bit one decides itself; a dense one follows the arguments."""
    prequantized = ckpt.quantized_modules
    if not prequantized:
        emb, head, tied = _table_and_head(model, bool(quantize_embeddings), bool(quantize_head))
        handled = {head: "quantize_head"} if head else {}
        targets = set(select_linears(model, skip_modules, target_modules, handled=handled).targets)
        targets |= {n for n in (emb, None if tied else head) if n}
        return _Plan({}, targets, emb, head, bool(tied and emb))
    if quantize_embeddings is not None or quantize_head is not None:
        raise ValueError("the checkpoint is already 4-bit and decides which tables are 4-bit; quantize_embeddings "
                         "and quantize_head apply to dense checkpoints only")
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb_mod = get_in() if callable(get_in) else None
    head_mod = get_out() if callable(get_out) else None
    plan = _Plan(prequantized, set())
    tied = _tied_weight_ids(model)
    for mod, key in prequantized.items():
        module = modules.get(mod)
        if module is not None and module is emb_mod and isinstance(module, nn.Embedding):
            plan.embeddings = mod
            continue
        if module is None or not is_quantizable_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise CheckpointError(f"checkpoint tensor {key} holds a 4-bit weight for {mod}, but in "
                                  f"{type(model).__name__} that is {what} (wrong architecture?)")
        if id(module.weight) in tied:
            raise CheckpointError(f"the checkpoint stores {mod}.weight in 4-bit, but the model ties it to another "
                                  f"module; load it with a config that has tie_word_embeddings=False")
        if module is head_mod:
            plan.head = mod
    if plan.embeddings is not None and head_mod is not None and head_mod.weight is emb_mod.weight:
        plan.head, plan.tied = names[id(head_mod)], True  # stored once, as the embedding
    return plan


def load_quantized(source: str | os.PathLike | Sequence[str | os.PathLike], *, model_cls=None, config=None,
                   dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                   skip_modules: str | Iterable[str] | None = _Default(DEFAULT_SKIP),
                   target_modules: str | Iterable[str] | None = None, quant_type: str | None = None,
                   blocksize: int | None = None, double_quant: bool | None = None,
                   quantize_embeddings: bool | None = None, quantize_head: bool | None = None,
                   device: str | torch.device = "cpu", strict: bool = False) -> nn.Module:
    """Build a model from a safetensors checkpoint with its linear layers in 4-bit, streaming.

    ``source``: a checkpoint directory (``model.safetensors.index.json`` or ``model.safetensors``
    plus ``config.json``), or safetensors file(s) / an index file (pass ``config=`` if no
    config.json sits next to them).

    The model is built on the meta device (``model_cls``, default ``AutoModelForCausalLM``; the
    config's ``dtype`` unless ``dtype`` is given), its linears are replaced by empty
    :class:`Linear4bit` shells, and the tensors are read one by one:

    * a 4-bit weight (transformers/bitsandbytes keys) is adopted as stored, byte for byte;
    * a dense linear weight is quantized on arrival (``quant_type``/``blocksize``/``double_quant``,
      defaults nf4/64/True; layers chosen by ``skip_modules``/``target_modules`` as in
      :func:`quantize_model`), so at most one layer's 16-bit weight is alive at a time;
    * anything else (embeddings, norms, biases, a dense lm_head) is copied in, cast to the model dtype;
    * a 4-bit input embedding becomes an :class:`~peft_kernels.nn.Embedding4bit` and a 4-bit head a
      :class:`~peft_kernels.nn.Linear4bitHead`; a head tied to a 4-bit embedding shares its tensors, and
      stored trainable token rows are put back. For a dense checkpoint ``quantize_embeddings`` /
      ``quantize_head`` quantize the tables on arrival as :func:`quantize_model` does.

    Tied weights are re-tied and non-persistent buffers (rotary ``inv_freq``...) recomputed. A
    checkpoint of the base model loads into a model with a head and vice versa (``base_model_prefix``);
    tensors the model has no place for are skipped with a warning, or raise with ``strict=True``.
    ``compute_dtype`` defaults to the checkpoint's ``bnb_4bit_compute_dtype``. Returns the model
    in eval mode on ``device``.

    Raises :class:`CheckpointError` for pickle files, a tensor of the wrong shape (naming both
    shapes), missing tensors, or a corrupt quant state; FileNotFoundError when
    there is no safetensors checkpoint.
    """
    device = torch.device(device)
    files, config_dir = _resolve_files(source)
    ckpt = _read_headers(files)
    config = _load_config(config, config_dir)
    stored = _stored_quantization_config(config, ckpt)
    if compute_dtype is None and isinstance((stored or {}).get("bnb_4bit_compute_dtype"), str):
        compute_dtype = parse_dtype(stored["bnb_4bit_compute_dtype"])

    model = _meta_skeleton(model_cls, config, dtype)
    ckpt.match_prefix(model)
    plan = _plan_quantization(model, ckpt, skip_modules, target_modules, quantize_embeddings, quantize_head)
    prequantized, dense_targets = plan.prequantized, plan.dense_targets
    if prequantized and (target_modules is not None
                         or (skip_modules is not None and not isinstance(skip_modules, _Default))):
        raise ValueError("the checkpoint is already 4-bit and decides which layers are 4-bit; skip_modules and "
                         "target_modules apply to dense checkpoints only")
    shells = list(prequantized) + sorted(dense_targets)
    if plan.tied:
        shells.append(plan.head)
    conv1d = _install_shells(model, shells, compute_dtype, tables=plan, quant_type=quant_type or "nf4",
                             blocksize=blocksize or 64, double_quant=True if double_quant is None else double_quant)

    loader = _StreamLoader(model, ckpt, prequantized, dense_targets, conv1d, device, strict)
    if plan.tied:
        loader.tied_head = (plan.head, plan.embeddings)
    for path in ckpt.files:
        for key, t in _iter_tensors(path, ckpt.keys[path], ckpt.nbytes):
            loader.take(ckpt.model_name(key), t, path)
    loader.finish()

    if prequantized:
        _check_stored_settings(model, prequantized, quant_type, blocksize, double_quant)
    if not (prequantized and stored):
        record_quantization_config(model, describe_quantization(model))
    return model.eval()


def _stored_quantization_config(config, ckpt: _Checkpoint) -> dict | None:
    """The config's quantization_config as a dict; raises for anything but bitsandbytes 4-bit."""
    qcfg = getattr(config, "quantization_config", None)
    qcfg = qcfg.to_dict() if hasattr(qcfg, "to_dict") else qcfg
    if isinstance(qcfg, dict):
        method = str(getattr(qcfg.get("quant_method"), "value", qcfg.get("quant_method")))
        if method != "bitsandbytes" or qcfg.get("load_in_8bit"):
            raise CheckpointError(f"unsupported quantization_config in the checkpoint config ({method}, "
                                  f"load_in_8bit={qcfg.get('load_in_8bit')}): only bitsandbytes 4-bit is supported")
    int8 = [k for k in ckpt.where if _INT8_KEY.search(k)]
    if int8:
        raise CheckpointError(f"this is a bitsandbytes 8-bit checkpoint ({int8[0]}); only 4-bit is supported")
    return qcfg if isinstance(qcfg, dict) else None


def _install_shells(model: nn.Module, names: list[str], compute_dtype, tables: _Plan | None = None,
                    **quant) -> set[str]:
    """Replace the named meta linears by empty meta Linear4bit layers (the input embedding by an Embedding4bit,
    the output head by a Linear4bitHead, as ``tables`` says); returns the names that were Conv1D."""
    conv1d = set()
    for name in names:
        old = model.get_submodule(name)
        if tables is not None and name == tables.embeddings:
            scale = getattr(old, "embed_scale", None) if type(old) is not nn.Embedding else None
            if isinstance(scale, torch.Tensor):
                # A buffer of the skeleton, still on the meta device: its value is not known here.
                raise CheckpointError(f"{name} is a {type(old).__name__} with an embed_scale buffer: a 4-bit copy "
                                      f"of it cannot be loaded by streaming yet (quantize it with quantize_model "
                                      f"after loading the dense model)")
            shell = Embedding4bit(old.num_embeddings, old.embedding_dim, old.padding_idx, **quant,
                                  compute_dtype=compute_dtype, embed_scale=scale, device="meta", dtype=old.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, shell)
            continue
        out_f, in_f = linear_shape(old)
        if not isinstance(old, nn.Linear):
            conv1d.add(name)
        cls = Linear4bitHead if tables is not None and name == tables.head else Linear4bit
        shell = cls(in_f, out_f, bias=old.bias is not None, **quant, compute_dtype=compute_dtype,
                    device="meta", dtype=old.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
    return conv1d


def _check_stored_settings(model: nn.Module, layers: Iterable[str], quant_type, blocksize, double_quant) -> None:
    """Explicit quantization settings must agree with a 4-bit checkpoint (it is never requantized)."""
    want = {k: v for k, v in dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant).items()
            if v is not None}
    for name in layers:
        layer = model.get_submodule(name)
        have = {k: getattr(layer, k) for k in want}
        if have != want:
            raise ValueError(f"the checkpoint stores {name} as {have}, but {want} was asked for; a 4-bit checkpoint "
                             f"is loaded as stored (leave these arguments unset)")
