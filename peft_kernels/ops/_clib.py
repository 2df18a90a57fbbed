"""Shared ctypes loading for the project's C libraries (CUDA in ``csrc/``, CPU in ``csrc/cpu/``).

A :class:`CLibrary` finds its shared object (an environment variable overrides
the package folder), declares the C signatures, checks the ABI version, and
caches the result — the library or the reason it is unavailable — so callers
can fall back cleanly and say why.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Callable

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class CLibrary:
    """One optional C library.

    Args:
        what: words for messages ("CUDA C library").
        env_var: variable whose value, when set, is the library path.
        folder, lib_name: the default location ``peft_kernels/<folder>/<lib_name>``.
        abi_version: the version the Python side was written against.
        declare: sets argtypes/restype on the loaded CDLL (AttributeError = missing symbol).
        version_symbol: the C function returning the ABI version.
        build_hint: how to build it, appended to "not found" messages.
    """

    def __init__(self, *, what: str, env_var: str, folder: str, lib_name: str, abi_version: int,
                 declare: Callable[[ctypes.CDLL], None], version_symbol: str, build_hint: str):
        self.what, self.env_var, self.folder, self.lib_name = what, env_var, folder, lib_name
        self.abi_version, self.declare, self.version_symbol = abi_version, declare, version_symbol
        self.build_hint = build_hint
        self._lock = threading.Lock()
        self._done, self._lib, self._reason = False, None, None

    def path(self) -> Path:
        override = os.environ.get(self.env_var, "").strip()
        return Path(override) if override else _PACKAGE_DIR / self.folder / self.lib_name

    def _open(self) -> tuple[ctypes.CDLL | None, str | None]:
        path = self.path()
        how = f"${self.env_var}" if os.environ.get(self.env_var, "").strip() else f"the package's {self.folder}/ folder"
        if not path.is_file():
            return None, f"{self.what} not found at {path} (from {how}); {self.build_hint}"
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            return None, f"cannot load {self.what} {path}: {e}"
        try:
            self.declare(lib)
        except AttributeError as e:
            return None, f"{self.what} {path} lacks a C ABI symbol ({e}); rebuild it"
        version = getattr(lib, self.version_symbol)()
        if version != self.abi_version:
            return None, (f"{self.what} {path} has ABI version {version} but this peft_kernels expects "
                          f"{self.abi_version}; rebuild it")
        return lib, None

    def load(self) -> ctypes.CDLL | None:
        """The loaded library (cached), or None when unavailable."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._lib, self._reason = self._open()
                    self._done = True
        return self._lib

    def unavailable_reason(self) -> str | None:
        self.load()
        return self._reason

    def clear_cache(self) -> None:
        with self._lock:
            self._done, self._lib, self._reason = False, None, None
