"""Build hook: compile the optional C libraries while installing.

All metadata lives in pyproject.toml; this file only adds a ``build_py`` step
that runs peft_kernels/csrc_build.py: nvcc builds ``libpeft_kernels_cuda.so``
into the package's ``_cuda/`` folder, the system C compiler builds
``libpeft_kernels_cpu.so`` into ``_cpu/`` — in the build folder for a normal
install, in the source tree for ``pip install -e .``.

Both libraries are optional (Triton and the torch reference cover every op), so
an install never fails because of them: without the compiler, or when it
fails, a message is printed (pip shows it with ``-v``) and the install goes on.

Environment:
  PEFT_KERNELS_NO_CUDA=1        skip the CUDA build
  PEFT_KERNELS_CUDA_ARCHS=80,90  compute capabilities to build (default 80,86,89,90)
  PEFT_KERNELS_NO_CPU_LIB=1     skip the CPU C library build
  CC=...                        C compiler for the CPU library (default: Python's, then cc/gcc/clang)
"""
import importlib.util
import os
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 ships bdist_wheel; older ones rely on the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
LIB_REL = Path("peft_kernels", "_cuda", "libpeft_kernels_cuda.so")
CPU_LIB_REL = Path("peft_kernels", "_cpu", "libpeft_kernels_cpu.so")


def _say(msg: str) -> None:
    print(f"[peft_kernels] {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _csrc_build():
    # By file path: importing the package would run peft_kernels/__init__.py,
    # which may need torch, absent from an isolated build environment.
    spec = importlib.util.spec_from_file_location("_peft_kernels_csrc_build", HERE / "peft_kernels" / "csrc_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithCuda(build_py):
    """build_py, then the CUDA C library and the CPU C library (each best effort)."""

    def run(self):
        super().run()
        try:
            cb = _csrc_build()
        except Exception as e:  # a broken checkout must not break the install either
            _say(f"cannot load csrc_build.py ({e}); installing without the C libraries")
            cb = None
        self._build_cuda(cb)
        self._build_cpu(cb)

    def _target(self, rel: Path) -> Path:
        return (HERE if self.editable_mode else Path(self.build_lib)) / rel

    def _build_cuda(self, cb) -> None:
        target = self._target(LIB_REL)
        if _flag("PEFT_KERNELS_NO_CUDA"):
            _say("PEFT_KERNELS_NO_CUDA is set: not building the CUDA C library")
            self._drop_stale(target)
            return
        if cb is None:
            self._drop_stale(target)
            return
        nvcc = cb.nvcc_path()
        if nvcc is None:
            _say("nvcc not found (set CUDA_HOME or put nvcc on PATH to build it); "
                 "installing without the CUDA C library (Triton and the torch reference still work)")
            self._drop_stale(target)
            return
        archs = os.environ.get("PEFT_KERNELS_CUDA_ARCHS", "").replace(";", ",").replace(" ", ",")
        archs = tuple(a for a in archs.split(",") if a) or cb.DEFAULT_ARCHS
        _say(f"building the CUDA C library with {nvcc} for sm_{', sm_'.join(archs)} ...")
        t0 = time.perf_counter()
        try:
            path = cb.build(target.parent, archs=archs, verbose=bool(self.verbose and self.verbose > 1))
        except Exception as e:
            _say(f"CUDA C library build failed; installing without it.\n{e}")
            self._drop_stale(target)
            return
        _say(f"built {path} in {time.perf_counter() - t0:.1f} s")

    def _build_cpu(self, cb) -> None:
        target = self._target(CPU_LIB_REL)
        if _flag("PEFT_KERNELS_NO_CPU_LIB"):
            _say("PEFT_KERNELS_NO_CPU_LIB is set: not building the CPU C library")
            self._drop_stale(target)
            return
        if cb is None:
            self._drop_stale(target)
            return
        cc = cb.c_compiler()
        if cc is None:
            _say("no C compiler found (set CC or install gcc/clang to build it); "
                 "installing without the CPU C library (the torch reference still works)")
            self._drop_stale(target)
            return
        t0 = time.perf_counter()
        try:
            path = cb.build_cpu(target.parent, verbose=bool(self.verbose and self.verbose > 1))
        except Exception as e:
            _say(f"CPU C library build failed; installing without it.\n{e}")
            self._drop_stale(target)
            return
        _say(f"built {path} with {cc[0]} in {time.perf_counter() - t0:.1f} s")

    def _drop_stale(self, target: Path) -> None:
        # A normal build copies package data from the source tree, which may hold
        # a library from an earlier editable build: ship none rather than that one.
        if not self.editable_mode and target.exists():
            target.unlink()

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        for rel in (LIB_REL, CPU_LIB_REL):
            lib = str(Path(self.build_lib) / rel)
            if not self.editable_mode and Path(lib).exists() and lib not in outputs:
                outputs.append(lib)
        return outputs


cmdclass = {"build_py": BuildPyWithCuda}

if bdist_wheel is not None:
    class BdistWheelTagged(bdist_wheel):
        """Tag the wheel for the platform (py3-none-linux_x86_64) when it carries a library.

        The libraries do not depend on the Python version or ABI, only on the
        OS and CPU, so 'py3-none-<platform>' is exact; 'any' would be wrong.
        """

        def get_tag(self):
            tag = super().get_tag()
            build_lib = self.get_finalized_command("build_py").build_lib
            if any((Path(build_lib) / rel).exists() for rel in (LIB_REL, CPU_LIB_REL)):
                plat = (self.plat_name or sysconfig.get_platform()).replace("-", "_").replace(".", "_")
                return "py3", "none", plat
            return tag

    cmdclass["bdist_wheel"] = BdistWheelTagged

setup(cmdclass=cmdclass)
