"""Which kernel computes a decode-sized 4-bit product (M <= 16 rows of x): a per-shape table.

Choices:

* ``cuda``: the CUDA C GEMV ``pk_gemv_4bit`` (csrc/gemv_4bit.cu) — CUDA tensors, the library
  loaded, K a multiple of 32, x and packed 16-byte aligned (else the Triton default runs);
* ``triton_gemv``: Triton's dot-free GEMV (``nt_gemv`` / ``lora_nt_gemv``), M == 1 only (for
  M > 1 the tiled kernel runs);
* ``triton_tiled``: Triton's fused 16-row tiled matmul (``nt_m16`` / ``lora_nt_m16``);
* ``triton``: what the Triton launcher picks by itself (the GEMV at M == 1, the tile above).

The table is JSON (``peft_kernels/assets/decode_dispatch.json``, or the file named by
``$PEFT_KERNELS_DECODE_TABLE``)::

    {"version": 1, "default": "triton",
     "entries": [{"capability": "sm_90", "dtype": "bfloat16", "m": 1, "n": 14336, "k": 4096,
                  "lora": false, "choice": "cuda", "us": {"cuda": 41.0, "triton_gemv": 55.2}}, ...]}

An entry matches a call by device capability, dtype, N, K and LoRA-or-not; among those, the entry
with the smallest measured ``m`` >= M wins (the largest when M exceeds them all). No match: the
table's ``default``. The shipped table holds no measurements (none were possible without a GPU),
so it says ``triton`` until ``bench/gpu_sections/decode.py`` (GPU suite section ``m``) writes
measured choices. ``$PEFT_KERNELS_DECODE`` (``auto`` or one choice) overrides the table.

:data:`counts` records how often each kernel actually ran (tests check that generate() takes
the decode path; ``reset_counts()`` clears it).
"""
from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

import torch

CHOICES = ("cuda", "triton_gemv", "triton_tiled", "triton")
ENV_VAR = "PEFT_KERNELS_DECODE"
TABLE_ENV = "PEFT_KERNELS_DECODE_TABLE"
TABLE_PATH = Path(__file__).resolve().parent.parent / "assets" / "decode_dispatch.json"
#: Largest M the decode path serves (the CUDA C GEMV's limit; Triton's 16-row tile).
MAX_M = 16

#: Kernel runs per resolved choice ('cuda', 'triton_gemv', 'triton_tiled').
counts: collections.Counter = collections.Counter()

_lock = threading.Lock()
_cache: dict = {}


def reset_counts() -> None:
    counts.clear()


def table_path() -> Path:
    override = os.environ.get(TABLE_ENV, "").strip()
    return Path(override) if override else TABLE_PATH


def _validate(table, path: Path) -> dict:
    if not isinstance(table, dict) or table.get("version") != 1:
        raise ValueError(f"decode dispatch table {path}: expected a JSON object with \"version\": 1")
    default = table.get("default", "triton")
    if default not in CHOICES:
        raise ValueError(f"decode dispatch table {path}: default {default!r} is not one of {CHOICES}")
    entries = table.get("entries", [])
    if not isinstance(entries, list):
        raise ValueError(f"decode dispatch table {path}: \"entries\" must be a list")
    index: dict = collections.defaultdict(list)
    for i, e in enumerate(entries):
        try:
            key = (str(e["capability"]), str(e["dtype"]), int(e["n"]), int(e["k"]), bool(e.get("lora", False)))
            m, choice = int(e["m"]), e["choice"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"decode dispatch table {path}: entry {i} lacks or mistypes a field ({err!r}); "
                             f"needs capability, dtype, m, n, k, choice") from err
        if choice not in CHOICES:
            raise ValueError(f"decode dispatch table {path}: entry {i} choice {choice!r} is not one of {CHOICES}")
        index[key].append((m, choice))
    for v in index.values():
        v.sort()
    return {"default": default, "index": dict(index)}


def load_table() -> dict:
    """The parsed table ({'default', 'index'}), cached per path; a missing file is an empty table."""
    path = table_path()
    with _lock:
        if path not in _cache:
            if path.is_file():
                _cache[path] = _validate(json.loads(path.read_text()), path)
            else:
                _cache[path] = {"default": "triton", "index": {}}
        return _cache[path]


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def capability(device: torch.device) -> str:
    """'sm_90' for a CUDA device, else the device type ('cpu')."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lookup(m: int, n: int, k: int, dtype: torch.dtype, cap: str, lora: bool) -> str:
    """The table's (or the env var's) choice for this shape, before eligibility: one of CHOICES."""
    forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in CHOICES:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected 'auto' or one of {CHOICES}")
        return forced
    table = load_table()
    rows = table["index"].get((cap, dtype_name(dtype), n, k, lora))
    if not rows:
        return table["default"]
    for mm, choice in rows:
        if mm >= m:
            return choice
    return rows[-1][1]


def resolve(x2: torch.Tensor, packed: torch.Tensor, n: int, lora: bool) -> str:
    """The kernel that will run y[M, N] = x2 W^T (+ LoRA) for x2 [M, K] with M <= MAX_M.

    Returns 'cuda', 'triton_gemv' or 'triton_tiled': the table's choice when the kernel can take
    the call, else Triton's own pick (a 'cuda' entry on a shape the C GEMV rejects, or a missing
    library, falls back silently: the table is a speed hint, never a reason to fail).
    """
    m, k = x2.shape
    choice = lookup(m, n, k, x2.dtype, capability(x2.device), lora)
    if choice == "cuda":
        from . import cuda_lib
        if x2.device.type == "cuda" and cuda_lib.gemv_unsupported_reason(x2, packed) is None \
                and cuda_lib.load() is not None:
            return "cuda"
        choice = "triton"
    if choice == "triton":
        return "triton_gemv" if m == 1 else "triton_tiled"
    if choice == "triton_gemv" and m != 1:
        return "triton_tiled"
    return choice
