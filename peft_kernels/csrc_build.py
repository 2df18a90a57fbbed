"""Build the C libraries: CUDA (``csrc/``, nvcc) and CPU (``csrc/cpu/``, the system C compiler).

Used by ``setup.py`` at install time and by ``tests/test_csrc.py`` / ``tests/test_cpu_lib.py``. Standard
library only, and imported by file path from setup.py, so that building needs
neither torch nor an importable ``peft_kernels``.

The CUDA library is a fat binary: SASS for every requested arch plus PTX for the
highest one, so that newer GPUs JIT-compile it. The CUDA runtime is linked
statically and every symbol except the ``pk_*`` C ABI is hidden, so the file
depends only on libc/libstdc++ and the driver (loaded at first use): it runs
beside any torch build and does not bind to the libcudart torch loads.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

LIB_NAME = "libpeft_kernels_cuda.so"
DEFAULT_ARCHS = ("80", "86", "89", "90")
_ROOT = Path(__file__).resolve().parent.parent
CSRC_DIR = _ROOT / "csrc"
SOURCES = ("dequant_4bit.cu", "gemv_4bit.cu")
PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "_cuda"

_COMMON_FLAGS = (
    "-O3", "-std=c++17", "-shared",
    "-Xcompiler", "-fPIC,-fvisibility=hidden",
    "-cudart", "static",
    # Hide the statically linked cudart's symbols: they must neither be exported
    # nor resolve to another libcudart already loaded in the process.
    "-Xlinker", "--exclude-libs,ALL",
    "-t", "0",  # compile the archs in parallel
)


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message holds the command and its output."""


def nvcc_path() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, ``/usr/local/cuda/bin``; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if os.access(fallback, os.X_OK) else None


def _gencode_flags(archs) -> list[str]:
    archs = [str(a).strip().removeprefix("sm_") for a in archs]
    if not archs:
        raise ValueError("archs is empty: give at least one compute capability such as '80'")
    for a in archs:
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise ValueError(f"bad CUDA arch {a!r}: expected a compute capability like '80', '90' or '90a'")
    flags = []
    for a in sorted(set(archs), key=lambda s: (int(re.sub(r"\D", "", s)), s)):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX only for the highest plain arch: 'a'/'f' variants are not forward compatible.
    plain = [a for a in archs if a.isdigit()]
    if plain:
        top = max(plain, key=int)
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _run_nvcc(extra: list[str], out: Path, verbose: bool) -> Path:
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin)")
    srcs = [CSRC_DIR / s for s in SOURCES]
    missing = [str(s) for s in srcs if not s.is_file()]
    if missing:
        raise BuildError(f"CUDA sources not found: {missing} (building needs a source checkout)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a failed build never leaves a truncated
    # library, and a process that has the old one mapped keeps its (old) inode.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [nvcc, *_COMMON_FLAGS, *extra, "-I", str(CSRC_DIR), "-o", str(tmp), *map(str, srcs)]
    if verbose:
        print("[peft_kernels] " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"could not run {nvcc}: {e}") from e
    if verbose and (proc.stdout or proc.stderr):
        print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"nvcc failed with exit code {proc.returncode}\ncommand: {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)
    return out


def build(out_dir: str | os.PathLike | None = None, archs=DEFAULT_ARCHS, verbose: bool = False) -> Path:
    """Compile ``csrc/`` into ``out_dir/libpeft_kernels_cuda.so`` and return its path.

    ``out_dir`` defaults to the package's ``_cuda/`` folder (where the loader
    looks). ``archs`` are compute capabilities ('80', '86', '89', '90', ...):
    SASS for each, PTX for the highest. One nvcc invocation for all archs.
    Raises :class:`BuildError` when nvcc is absent or fails.
    """
    out = Path(out_dir if out_dir is not None else PACKAGE_LIB_DIR) / LIB_NAME
    return _run_nvcc(_gencode_flags(archs), out, verbose)


def build_emulator(out_dir: str | os.PathLike, verbose: bool = False) -> Path:
    """Test-only: the library built with ``-DPK_HOST_EMULATION`` (PTX only, fast).

    It additionally exports ``pk_emulate_dequantize_4bit`` and ``pk_emulate_gemv_4bit``, which run
    the kernels' per-thread (per-lane) code on the CPU over host pointers.
    """
    flags = ["-DPK_HOST_EMULATION", "-gencode", "arch=compute_80,code=compute_80"]
    return _run_nvcc(flags, Path(out_dir) / "libpeft_kernels_cuda_emu.so", verbose)


# ----------------------------------------------------------------- CPU library
CPU_LIB_NAME = "libpeft_kernels_cpu.so"
CPU_SOURCES = ("dequant_4bit_cpu.c", "gemv_4bit_cpu.c")
CPU_CSRC_DIR = CSRC_DIR / "cpu"
CPU_PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "_cpu"

# Baseline ISA only (no -march): the AVX2 / AVX-512 kernels carry their own target
# attributes and are picked at run time. Results must round exactly like torch:
# never -ffast-math, and no FMA contraction (gnu11 would allow it).
_CPU_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden", "-Wall",
              "-Wextra")


def c_compiler() -> list[str] | None:
    """The C compiler command (argv prefix): ``$CC``, Python's configured CC, cc, gcc, clang; None if absent."""
    candidates = [os.environ.get("CC", ""), sysconfig.get_config_var("CC") or ""]
    candidates += ["cc", "gcc", "clang"]
    for cand in candidates:
        argv = shlex.split(cand)
        if argv and shutil.which(argv[0]):
            return [shutil.which(argv[0]), *argv[1:]]
    return None


def build_cpu(out_dir: str | os.PathLike | None = None, verbose: bool = False, *,
              openmp: bool | None = None) -> Path:
    """Compile ``csrc/cpu/`` into ``out_dir/libpeft_kernels_cpu.so`` and return its path.

    ``out_dir`` defaults to the package's ``_cpu/`` folder (where the loader
    looks). ``openmp``: True requires OpenMP, False builds single-threaded, None
    (default) tries OpenMP and falls back without it (e.g. clang without libomp).
    Raises :class:`BuildError` when no C compiler is found or the build fails.
    """
    cc = c_compiler()
    if cc is None:
        raise BuildError("no C compiler found (looked at $CC, Python's CC, cc, gcc, clang)")
    srcs = [CPU_CSRC_DIR / s for s in CPU_SOURCES]
    missing = [str(s) for s in srcs if not s.is_file()]
    if missing:
        raise BuildError(f"C sources not found: {missing} (building needs a source checkout)")
    out = Path(out_dir if out_dir is not None else CPU_PACKAGE_LIB_DIR) / CPU_LIB_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # rename into place, as for the CUDA library
    attempts = [["-fopenmp"], []] if openmp is None else [["-fopenmp"] if openmp else []]
    failures = []
    for extra in attempts:
        cmd = [*cc, *_CPU_FLAGS, *extra, "-I", str(CPU_CSRC_DIR), "-o", str(tmp), *map(str, srcs)]
        if verbose:
            print("[peft_kernels] " + " ".join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise BuildError(f"could not run {cc[0]}: {e}") from e
        if verbose and (proc.stdout or proc.stderr):
            print(proc.stdout + proc.stderr, flush=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
            return out
        tmp.unlink(missing_ok=True)
        failures.append(f"command: {' '.join(cmd)}\nexit code {proc.returncode}\n{proc.stdout}{proc.stderr}")
    raise BuildError("C compiler failed\n" + "\n".join(failures))
