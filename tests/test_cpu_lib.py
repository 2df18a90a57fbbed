"""The CPU C library (csrc/cpu/): build, exported ABI, loader, dispatch, and results bit for bit.

* the system C compiler builds it (with and without OpenMP); it exports exactly
  the C ABI, links no Python or torch, and shares torch's OpenMP runtime;
* every instruction-set tier this CPU has (portable C, AVX2, AVX-512) against
  ``reference.dequantize_4bit`` bit for bit: fp32/fp16/bf16, NF4/FP4, every
  blocksize, odd and ragged sizes, double-quantized absmax, conversion edge
  cases (ties, subnormals, overflow), chunks over several threads;
* argument validation in C (return codes, messages) and in the wrapper;
* the loader when the library is missing, broken or of another ABI version;
* the fused GEMVs (``pk_cpu_gemv_4bit_nt`` / ``_nn``) on every tier against a
  float64 product of the dequantized weight (tolerance policy), their decoded
  weights bit for bit (x = identity rows), thread-count independence, every
  output written, argument errors;
* ``backend.select`` and ``Linear4bit`` under ``cpu`` vs ``reference``:
  identical outputs and gradients above ``CPU_GEMV_MAX_M`` rows, the GEMV path
  to tolerance below.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from _dequant_checks import assert_bit_exact, random_weight
from _tolerance import assert_close_to_reference
from peft_kernels import csrc_build
from peft_kernels.nn import Linear4bit
from peft_kernels.ops import backend, cpu_lib, reference
from peft_kernels.ops.functional import dequantize
from peft_kernels.quant import VALID_BLOCKSIZES, code4, dynamic_map, quantize_4bit

CC = csrc_build.c_compiler()
NO_CC = "no C compiler: the CPU C library cannot be built on this machine"
ABI_SYMBOLS = {"pk_cpu_dequantize_4bit", "pk_cpu_dequantize_4bit_nested", "pk_cpu_last_error", "pk_cpu_version",
               "pk_cpu_isa", "pk_cpu_set_max_isa", "pk_cpu_max_threads", "pk_cpu_gemv_4bit_nt",
               "pk_cpu_gemv_4bit_nn"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_ELEMS_PER_THREAD = 1 << 17  # PK_MIN_ELEMS_PER_THREAD in the C source


def _dt_id(d):
    return str(d).split(".")[-1]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The library built from csrc/cpu/ into a temporary folder, once per module."""
    if CC is None:
        pytest.skip(NO_CC)
    return csrc_build.build_cpu(tmp_path_factory.mktemp("cpu_lib"))


@pytest.fixture(scope="module")
def lib(built):
    """cpu_lib loading the freshly built library (through $PEFT_KERNELS_CPU_LIB); restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cpu_lib.ENV_LIB, str(built))
        cpu_lib.clear_cache()
        loaded = cpu_lib.load()
        assert loaded is not None, cpu_lib.unavailable_reason()
        yield loaded
        loaded.pk_cpu_set_max_isa(-1)
    cpu_lib.clear_cache()


@pytest.fixture
def fresh_loader(monkeypatch):
    """cpu_lib with an empty load cache, restored afterwards."""
    cpu_lib.clear_cache()
    yield monkeypatch
    monkeypatch.undo()
    cpu_lib.clear_cache()


def _tiers(lib) -> list[int]:
    lib.pk_cpu_set_max_isa(-1)
    return list(range(lib.pk_cpu_isa() + 1))


@contextmanager
def _isa(lib, tier):
    try:
        assert lib.pk_cpu_set_max_isa(tier) == tier
        yield
    finally:
        lib.pk_cpu_set_max_isa(-1)


def _raw(lib, packed, absmax, code, blocksize, numel, dtype, threads, *, guard=5):
    """Call the C function directly with an explicit thread count into a NaN-poisoned buffer."""
    buf = torch.full((numel + guard,), float("nan"), dtype=dtype)
    rc = lib.pk_cpu_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), numel, blocksize,
                                    cpu_lib.DTYPE_CODES[dtype], buf.data_ptr(), threads)
    assert rc == 0, lib.pk_cpu_last_error()
    assert torch.isnan(buf[numel:]).all(), "wrote past numel"
    return buf[:numel]


# ------------------------------------------------------- build and ABI
def test_exports_exactly_the_c_abi(built):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(built)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if re.search(r" [TDBRVW] ", line)}
    assert exported == ABI_SYMBOLS


def test_links_no_python_or_torch(built):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run([readelf, "-d", str(built)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", out)
    assert needed, out
    for name in needed:
        assert not re.match(r"lib(python|torch|c10|stdc\+\+)", name), f"links {name}: {needed}"


def test_shares_torchs_openmp_runtime(lib, built):
    """Both need libgomp.so.1: the dynamic loader hands ours the copy torch loaded, so one thread pool."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps")
    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, f"two OpenMP runtimes mapped: {gomp}"
    if gomp:
        assert lib.pk_cpu_max_threads() >= 1


def test_builds_without_openmp(tmp_path):
    if CC is None:
        pytest.skip(NO_CC)
    path = csrc_build.build_cpu(tmp_path, openmp=False)
    single = ctypes.CDLL(str(path))
    cpu_lib._declare(single)
    assert single.pk_cpu_max_threads() == 1
    numel, blocksize = 3 * MIN_ELEMS_PER_THREAD + 5, 64
    packed, absmax = random_weight(numel, blocksize, seed=9)
    code = code4("nf4")
    want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, torch.bfloat16)
    assert_bit_exact(_raw(single, packed, absmax, code, blocksize, numel, torch.bfloat16, threads=4), want)


def test_build_reports_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(csrc_build, "c_compiler", lambda: None)
    with pytest.raises(csrc_build.BuildError, match="no C compiler"):
        csrc_build.build_cpu(tmp_path)


def test_detects_this_cpus_isa(lib):
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    lib.pk_cpu_set_max_isa(-1)
    if {"avx512f", "avx512bw"} <= flags:
        want = "avx512"
    elif {"avx2", "f16c"} <= flags:
        want = "avx2"
    elif flags:
        want = "baseline"
    else:
        pytest.skip("no /proc/cpuinfo flags")
    assert cpu_lib.isa() == want
    assert lib.pk_cpu_set_max_isa(0) == 0 and cpu_lib.isa() == "baseline"
    tier = {name: t for t, name in cpu_lib.ISA_NAMES.items()}[want]
    assert lib.pk_cpu_set_max_isa(-1) == tier


# ------------------------------------------------ results, bit for bit
# 1-3 elements (tail only), odd, around one 32-element group and one 64-element
# chunk unit, partial last quantization blocks, larger ragged sizes.
SIZES = (1, 2, 3, 7, 31, 32, 33, 63, 65, 1001, 4096 * 3 + 65, 70001)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_matches_reference_every_tier(lib, blocksize, dtype):
    for tier in _tiers(lib):
        with _isa(lib, tier):
            for i, numel in enumerate(SIZES):
                packed, absmax = random_weight(numel, blocksize, seed=blocksize + i)
                for qt in ("nf4", "fp4"):
                    code = code4(qt)
                    want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
                    got = cpu_lib.dequantize_4bit_cpu(packed, absmax, code, blocksize, numel, dtype)
                    assert_bit_exact(got, want)
                    assert_bit_exact(_raw(lib, packed, absmax, code, blocksize, numel, dtype, threads=1), want)


@pytest.mark.parametrize("threads", (2, 3, 7))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_large_tensor_split_over_threads(lib, threads, dtype):
    """Chunk boundaries of several threads (more threads than cores is fine for a test) are seamless."""
    numel = 7 * MIN_ELEMS_PER_THREAD + 12345  # odd, last block partial for every blocksize below
    for blocksize in (32, 4096):
        packed, absmax = random_weight(numel, blocksize, seed=threads)
        code = code4("nf4")
        want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
        for tier in (0, _tiers(lib)[-1]):
            with _isa(lib, tier):
                assert_bit_exact(_raw(lib, packed, absmax, code, blocksize, numel, dtype, threads), want)


def _edge_floats() -> torch.Tensor:
    """float32 values at the rounding edges of fp16 and bf16: ties, subnormals, overflow, zeros."""
    vals = []
    for e in list(range(95, 145)) + [1, 2, 120, 127, 130, 141, 142, 143, 200, 254]:  # fp16's range is 102..142
        for m in (0, 1, 0x7FF, 0xFFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000,
                  0x7FE000, 0x7FF000, 0x7FFFFF, 0x400000, 0x401000, 0x3FF000):
            vals.append((e << 23) | m)
    vals += [0, 1, 0x7FFFFF, 0x00800000]  # zero, float32 subnormals, least normal
    bits = torch.tensor(vals, dtype=torch.int64)
    bits = torch.cat([bits, bits | (1 << 31)])  # both signs
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 0x7F800000, (20000,), generator=g, dtype=torch.int64)  # any finite magnitude
    bits = torch.cat([bits, rand, rand | (1 << 31)])
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_rounding_edges_match_torch_casts(lib, dtype):
    """absmax = the edge values and codes +-1: the products are the edge values themselves."""
    absmax = _edge_floats()
    blocksize = 32
    numel = absmax.numel() * blocksize - 7
    code = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, 2.0 ** -10, 3.0, 0.75] * 2)
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=g)
    want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
    for tier in _tiers(lib):
        with _isa(lib, tier):
            assert_bit_exact(cpu_lib.dequantize_4bit_cpu(packed, absmax, code, blocksize, numel, dtype), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_inf_and_nan_propagate(lib, dtype):
    # NaNs whose payload would carry into the exponent if rounded like numbers (0x7FFFFFFF -> -0.0).
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001], dtype=torch.int32).view(torch.float32)
    absmax = torch.cat([torch.tensor([float("inf"), float("nan"), 1.0, -float("inf")]), nans])
    numel = absmax.numel() * 64
    packed = torch.arange(numel // 2, dtype=torch.uint8)  # covers code 0.0 (-> NaN with inf)
    code = code4("nf4")
    want = reference.dequantize_4bit(packed, absmax, code, 64, numel, dtype)
    for tier in _tiers(lib):
        with _isa(lib, tier):
            assert_bit_exact(cpu_lib.dequantize_4bit_cpu(packed, absmax, code, 64, numel, dtype), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_double_quantized_absmax_matches_reference(lib, dtype):
    g = torch.Generator().manual_seed(5)
    ncode = dynamic_map()
    for blocksize, numel in ((32, 70001), (64, 257 * 64 * 3 + 9), (4096, 4096 * 300 + 1)):
        nblocks = -(-numel // blocksize)
        packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
        absmax_q = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
        nested_absmax = torch.rand(-(-nblocks // 256), generator=g) * 3
        offset = 0.123456789  # not a float32: both sides round it to float32 first
        scales = reference.decode_absmax(absmax_q, nested_absmax, ncode, offset)
        want = reference.dequantize_4bit(packed, scales, code4("nf4"), blocksize, numel, dtype)
        for tier in _tiers(lib):
            with _isa(lib, tier):
                got = cpu_lib.dequantize_4bit_cpu(packed, absmax_q, code4("nf4"), blocksize, numel, dtype,
                                                  nested_absmax=nested_absmax, nested_code=ncode,
                                                  nested_offset=offset)
                assert_bit_exact(got, want)


def test_quantized_weights_through_functional(lib, monkeypatch):
    w = torch.randn(67, 129)  # odd numel, rows not a multiple of the block
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            packed, st = quantize_4bit(w, 64, qt, dq)
            for dtype in DTYPES:
                monkeypatch.setenv(backend.ENV_VAR, "reference")
                want = dequantize(packed, st, dtype)
                monkeypatch.setenv(backend.ENV_VAR, "cpu")
                assert_bit_exact(dequantize(packed, st, dtype), want)


# ------------------------------------------------------- argument errors
def test_c_validates_arguments(lib):
    assert lib.pk_cpu_version() == cpu_lib.ABI_VERSION
    fake = 0x1000  # never dereferenced: each call below fails validation first
    cases = [
        ((None, fake, fake, 10, 64, 0, fake, 1), 1, "null pointer"),
        ((fake, None, fake, 10, 64, 0, fake, 1), 1, "null pointer (absmax)"),
        ((fake, fake, fake, 10, 64, 0, None, 1), 1, "null pointer"),
        ((fake, fake, fake, 10, 48, 0, fake, 1), 2, "blocksize 48"),
        ((fake, fake, fake, 10, 16, 0, fake, 1), 2, "blocksize 16"),
        ((fake, fake, fake, 10, 8192, 0, fake, 1), 2, "blocksize 8192"),
        ((fake, fake, fake, 0, 64, 0, fake, 1), 3, "numel"),
        ((fake, fake, fake, -5, 64, 0, fake, 1), 3, "-5"),
        ((fake, fake, fake, 10, 64, 3, fake, 1), 4, "out_dtype 3"),
    ]
    for args, code, text in cases:
        assert lib.pk_cpu_dequantize_4bit(*args) == code, (args, lib.pk_cpu_last_error())
        assert text in lib.pk_cpu_last_error().decode(), lib.pk_cpu_last_error()
        with pytest.raises(RuntimeError, match=f"code {code}: .*{re.escape(text)}"):
            cpu_lib._raise_for(lib, "pk_cpu_dequantize_4bit", code)
    nested = [
        ((fake, None, fake, fake, 0.0, 256, fake, 10, 64, 0, fake, 1), 1, "absmax_q"),
        ((fake, fake, fake, None, 0.0, 256, fake, 10, 64, 0, fake, 1), 1, "nested_code"),
        ((fake, fake, fake, fake, 0.0, 100, fake, 10, 64, 0, fake, 1), 2, "nested_blocksize 100"),
        ((fake, fake, fake, fake, 0.0, 256, fake, 10, 100, 0, fake, 1), 2, "blocksize 100"),
        ((fake, fake, fake, fake, 0.0, 256, fake, 0, 64, 0, fake, 1), 3, "numel"),
        ((fake, fake, fake, fake, 0.0, 256, fake, 10, 64, 7, fake, 1), 4, "out_dtype 7"),
    ]
    for args, code, text in nested:
        assert lib.pk_cpu_dequantize_4bit_nested(*args) == code, (args, lib.pk_cpu_last_error())
        assert text in lib.pk_cpu_last_error().decode(), lib.pk_cpu_last_error()
    packed, absmax = random_weight(10, 64, seed=0)
    _raw(lib, packed, absmax, code4("nf4"), 64, 10, torch.float32, threads=1)
    assert lib.pk_cpu_last_error() == b"", "success clears the message"


def _args(numel=100, blocksize=64):
    packed = torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.ones(-(-numel // blocksize))
    return packed, absmax, code4("nf4"), blocksize, numel


@pytest.mark.parametrize("which,bad,exc,msg", [
    (0, torch.zeros(50, 1, dtype=torch.int8), TypeError, "packed has dtype int8"),
    (1, torch.ones(2, dtype=torch.float16), TypeError, "absmax has dtype float16"),
    (2, torch.zeros(16, dtype=torch.float64), TypeError, "code has dtype float64"),
    (0, [1, 2, 3], TypeError, "packed must be a torch.Tensor"),
    (0, torch.zeros(49, 1, dtype=torch.uint8), ValueError, "packed has 49 bytes"),
    (1, torch.ones(1), ValueError, "absmax has 1 entries"),
    (2, torch.zeros(8), ValueError, "code must have 16"),
    (0, torch.zeros(100, 1, dtype=torch.uint8)[::2], ValueError, "packed must be contiguous"),
    (1, torch.ones(2, device="meta"), ValueError, "absmax is on meta"),
    (3, 48, ValueError, "unsupported blocksize 48"),
    (4, -1, ValueError, "numel must be a non-negative int"),
])
def test_wrapper_validates_arguments(which, bad, exc, msg):
    args = list(_args())
    args[which] = bad
    with pytest.raises(exc, match=re.escape(msg)):
        cpu_lib.dequantize_4bit_cpu(*args)


def test_wrapper_rejects_bad_dtype_and_nested_args():
    with pytest.raises(TypeError, match="dtype must be one of"):
        cpu_lib.dequantize_4bit_cpu(*_args(), dtype=torch.float64)
    packed, _, code, bs, numel = _args()
    q = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="together"):
        cpu_lib.dequantize_4bit_cpu(packed, q, code, bs, numel, nested_absmax=torch.ones(1))
    with pytest.raises(TypeError, match="absmax has dtype float32"):
        cpu_lib.dequantize_4bit_cpu(packed, torch.ones(2), code, bs, numel, nested_absmax=torch.ones(1),
                                    nested_code=dynamic_map())
    with pytest.raises(ValueError, match="nested_code must have 256"):
        cpu_lib.dequantize_4bit_cpu(packed, q, code, bs, numel, nested_absmax=torch.ones(1),
                                    nested_code=torch.ones(16))
    with pytest.raises(ValueError, match="nested_absmax has 0 entries"):
        cpu_lib.dequantize_4bit_cpu(packed, q, code, bs, numel, nested_absmax=torch.ones(0),
                                    nested_code=dynamic_map())


def test_empty_needs_no_library(fresh_loader, tmp_path):
    fresh_loader.setenv(cpu_lib.ENV_LIB, str(tmp_path / "absent.so"))
    assert cpu_lib.dequantize_4bit_cpu(*_args(numel=0)).shape == (0,)


# ------------------------------------------------------------------ loader
def test_missing_library_reports_why_and_auto_falls_back(fresh_loader, tmp_path):
    missing = tmp_path / "nope" / cpu_lib.LIB_NAME
    fresh_loader.setenv(cpu_lib.ENV_LIB, str(missing))
    fresh_loader.delenv(backend.ENV_VAR, raising=False)
    assert cpu_lib.library_path() == missing
    assert cpu_lib.load() is None and cpu_lib.isa() is None
    reason = cpu_lib.unavailable_reason()
    assert str(missing) in reason and cpu_lib.ENV_LIB in reason and "not found" in reason
    cpu = torch.device("cpu")
    assert backend.select(cpu, has_cpu_impl=True) == "reference"
    with pytest.raises(RuntimeError, match="the CPU C library is unavailable: .*not found"):
        cpu_lib.dequantize_4bit_cpu(*_args())
    fresh_loader.setenv(backend.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="PEFT_KERNELS_BACKEND=cpu but the CPU C library is unavailable"):
        backend.select(cpu, has_cpu_impl=True)
    # Through the layer: auto still works without the library.
    fresh_loader.delenv(backend.ENV_VAR)
    layer = Linear4bit(33, 5)
    x = torch.randn(2, 33)
    assert torch.isfinite(layer(x)).all()


def test_unloadable_library_reports_why(fresh_loader, tmp_path):
    bogus = tmp_path / cpu_lib.LIB_NAME
    bogus.write_bytes(b"not an ELF file")
    fresh_loader.setenv(cpu_lib.ENV_LIB, str(bogus))
    assert cpu_lib.load() is None
    assert "cannot load" in cpu_lib.unavailable_reason() and str(bogus) in cpu_lib.unavailable_reason()


STUB_ALL = """
int pk_cpu_version(void) { return 99; }
const char* pk_cpu_last_error(void) { return ""; }
int pk_cpu_isa(void) { return 0; }
int pk_cpu_set_max_isa(int m) { return 0; }
int pk_cpu_max_threads(void) { return 1; }
int pk_cpu_dequantize_4bit(void) { return 0; }
int pk_cpu_dequantize_4bit_nested(void) { return 0; }
int pk_cpu_gemv_4bit_nt(void) { return 0; }
int pk_cpu_gemv_4bit_nn(void) { return 0; }
"""


@pytest.mark.parametrize("source,reason", [
    (STUB_ALL, "has ABI version 99 but this peft_kernels expects"),
    ("int pk_cpu_version(void) { return 1; }", "lacks a C ABI symbol"),
], ids=["version", "symbol"])
def test_incompatible_library_reports_why(fresh_loader, tmp_path, source, reason):
    if CC is None:
        pytest.skip(NO_CC)
    src = tmp_path / "stub.c"
    src.write_text(source)
    out = tmp_path / cpu_lib.LIB_NAME
    subprocess.run([*CC, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    fresh_loader.setenv(cpu_lib.ENV_LIB, str(out))
    assert cpu_lib.load() is None
    assert reason in cpu_lib.unavailable_reason()


def test_default_path_is_package_folder(fresh_loader):
    fresh_loader.delenv(cpu_lib.ENV_LIB, raising=False)
    path = cpu_lib.library_path()
    assert path.name == cpu_lib.LIB_NAME and path.parent.name == "_cpu"
    assert path.parent.parent.name == "peft_kernels"


def test_installed_library_loads_and_matches(fresh_loader):
    """The library setup.py (pip install) or build_cpu() put into the package."""
    fresh_loader.delenv(cpu_lib.ENV_LIB, raising=False)
    if not cpu_lib.library_path().is_file():
        pytest.skip(f"no installed CPU library at {cpu_lib.library_path()} (run `pip install -e .` with a C compiler)")
    assert cpu_lib.load() is not None, cpu_lib.unavailable_reason()
    packed, absmax = random_weight(1001, 64, seed=3)
    want = reference.dequantize_4bit(packed, absmax, code4("nf4"), 64, 1001, torch.bfloat16)
    assert_bit_exact(cpu_lib.dequantize_4bit_cpu(packed, absmax, code4("nf4"), 64, 1001, torch.bfloat16), want)


# ------------------------------------------------------------ dispatch
def test_backend_selection(lib, monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select(cpu, has_cpu_impl=True) == "cpu"
    assert backend.select(cpu) == "reference"  # an op without a CPU C implementation
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.select(cpu, has_cpu_impl=True) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert backend.select(cpu, has_cpu_impl=True) == "cpu"
    assert backend.select(cpu) == "reference"
    with pytest.raises(ValueError, match="needs CPU tensors"):
        backend.select(meta, has_cpu_impl=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=_dt_id)
@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "dq"))
def test_linear4bit_cpu_equals_reference(lib, monkeypatch, dtype, double_quant):
    """Same dequantized bits, same torch matmul: identical outputs and gradients (more rows than the GEMV
    path takes: 15 > CPU_GEMV_MAX_M)."""
    from peft_kernels.ops.linear4bit import CPU_GEMV_MAX_M
    assert 3 * 5 > max(CPU_GEMV_MAX_M.values())
    torch.manual_seed(0)
    layer = Linear4bit(129, 67, bias=True, blocksize=64, double_quant=double_quant, dtype=dtype)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 129, dtype=dtype)
    dy = torch.randn(3, 5, 67, dtype=dtype)
    results = {}
    for name in ("reference", "cpu"):
        monkeypatch.setenv(backend.ENV_VAR, name)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        dx, db = torch.autograd.grad(y, (xi, layer.bias), dy)
        results[name] = (y, dx, db)
    for got, want in zip(results["cpu"], results["reference"]):
        assert torch.equal(got, want)


# ------------------------------------------------------------ fused GEMV
# (m, n, k): one element; odd k (rows start mid-byte, blocks span rows); k not a multiple of the 512-element
# span and larger than it; m at the path's limits.
GEMV_SHAPES = ((1, 1, 1), (1, 67, 129), (3, 33, 64), (8, 200, 1000), (2, 130, 2049), (16, 64, 1536))


def _gemv_weight(n, k, blocksize, nested, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, st = quantize_4bit(w, blocksize, "nf4", nested)
    kw = dict(nested_absmax=st.nested.absmax, nested_code=st.nested.code, nested_offset=st.nested.offset) \
        if nested else {}
    scales = reference.decode_absmax(st.absmax, st.nested.absmax if nested else None,
                                     st.nested.code if nested else None, st.nested.offset if nested else 0.0)
    w_q = reference.dequantize_4bit(packed, scales, st.code, blocksize, n * k, torch.float32).view(n, k)
    return packed, st.absmax, st.code, kw, w_q


def _raw_gemv(lib, kind, a, packed, absmax, code, blocksize, n, k, kw, bias=None, threads=1, guard=3):
    """The C function with an explicit thread count, into a NaN-poisoned buffer with a guard after it."""
    m = a.shape[0]
    rows = n if kind == "nt" else k
    buf = torch.full((m * rows + guard,), float("nan"))
    args = cpu_lib._quant_args(packed, absmax, code, blocksize, n, k, kw.get("nested_absmax"),
                               kw.get("nested_code"), kw.get("nested_offset", 0.0), 256)
    if kind == "nt":
        rc = lib.pk_cpu_gemv_4bit_nt(*args, a.data_ptr(), m, n, k, None if bias is None else bias.data_ptr(),
                                     buf.data_ptr(), threads)
    else:
        rc = lib.pk_cpu_gemv_4bit_nn(*args, a.data_ptr(), m, n, k, buf.data_ptr(), threads)
    assert rc == 0, lib.pk_cpu_last_error()
    assert torch.isnan(buf[m * rows:]).all(), "wrote past the output"
    return buf[:m * rows].view(m, rows)


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "dq"))
@pytest.mark.parametrize("blocksize", (64, 256))
def test_gemv_matches_float64_product_every_tier(lib, blocksize, nested):
    for i, (m, n, k) in enumerate(GEMV_SHAPES):
        packed, absmax, code, kw, w_q = _gemv_weight(n, k, blocksize, nested, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        x, dy, bias = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g), torch.randn(n, generator=g)
        w64 = w_q.double()
        want_y, want_dx = x.double() @ w64.t() + bias.double(), dy.double() @ w64
        for tier in _tiers(lib):
            with _isa(lib, tier):
                y = _raw_gemv(lib, "nt", x, packed, absmax, code, blocksize, n, k, kw, bias)
                dx = _raw_gemv(lib, "nn", dy, packed, absmax, code, blocksize, n, k, kw)
                assert_close_to_reference(y, want_y, torch.float32, f"nt tier {tier} {m}x{n}x{k}")
                assert_close_to_reference(dx, want_dx, torch.float32, f"nn tier {tier} {m}x{n}x{k}")
                got = cpu_lib.gemv_4bit_nt_cpu(x, packed, absmax, code, blocksize, n, bias, **kw)
                assert torch.equal(got, y)  # the wrapper is the same call


def test_gemv_decodes_the_dequantized_bits(lib):
    """x = identity rows: y = x·Wᵀ is Wᵀ exactly, and dY = identity rows gives W: the GEMV decodes the same
    float32 values as the dequantization, on every tier (odd k: row starts on the low nibble)."""
    for n, k, nested in ((67, 129, True), (40, 96, False)):
        packed, absmax, code, kw, w_q = _gemv_weight(n, k, 64, nested, seed=7)
        for tier in _tiers(lib):
            with _isa(lib, tier):
                assert_bit_exact(cpu_lib.gemv_4bit_nt_cpu(torch.eye(k), packed, absmax, code, 64, n, **kw),
                                 w_q.t().contiguous())
                assert_bit_exact(cpu_lib.gemv_4bit_nn_cpu(torch.eye(n), packed, absmax, code, 64, k, **kw), w_q)


def test_gemv_does_not_depend_on_the_thread_count(lib):
    m, n, k = 2, 300, 1000  # over the per-thread minimum when forced: 2+ threads split rows / column strips
    packed, absmax, code, kw, _ = _gemv_weight(n, k, 64, True, seed=3)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    outs = {t: (_raw_gemv(lib, "nt", x, packed, absmax, code, 64, n, k, kw, threads=t),
                _raw_gemv(lib, "nn", dy, packed, absmax, code, 64, n, k, kw, threads=t)) for t in (1, 2, 3, 7)}
    for t in (2, 3, 7):
        assert torch.equal(outs[t][0], outs[1][0]) and torch.equal(outs[t][1], outs[1][1]), t


def test_gemv_c_and_wrapper_validate_arguments(lib):
    fake = 0x1000  # never dereferenced: each call below fails validation first
    q = [fake, fake, None, None, None, 0.0, 0, fake, 64]
    assert lib.pk_cpu_gemv_4bit_nt(*q, None, 1, 4, 64, None, fake, 1) == 1
    assert "null pointer" in lib.pk_cpu_last_error().decode()
    assert lib.pk_cpu_gemv_4bit_nn(fake, None, None, None, None, 0.0, 0, fake, 64, fake, 1, 4, 64, fake, 1) == 1
    assert "double quantization" in lib.pk_cpu_last_error().decode()
    assert lib.pk_cpu_gemv_4bit_nt(*q[:-1], 48, fake, 1, 4, 64, None, fake, 1) == 2
    assert "blocksize 48" in lib.pk_cpu_last_error().decode()
    assert lib.pk_cpu_gemv_4bit_nn(*q, fake, 0, 4, 64, fake, 1) == 3
    assert "m, n, k must be > 0" in lib.pk_cpu_last_error().decode()
    assert lib.pk_cpu_gemv_4bit_nn(fake, None, fake, fake, fake, 0.0, 3, fake, 64, fake, 1, 4, 64, fake, 1) == 2
    assert "nested_blocksize 3" in lib.pk_cpu_last_error().decode()
    packed, absmax, code, _, _ = _gemv_weight(8, 64, 64, False, seed=0)
    with pytest.raises(ValueError, match=r"x must be float32 \[rows >= 1, 64\]"):
        cpu_lib.gemv_4bit_nt_cpu(torch.randn(0, 64), packed, absmax, code, 64, 8)
    with pytest.raises(TypeError, match="float32"):
        cpu_lib.gemv_4bit_nt_cpu(torch.randn(1, 64, dtype=torch.float16), packed, absmax, code, 64, 8)
    with pytest.raises(ValueError, match="packed has 256 bytes but a \\[16, 64\\] weight needs 512"):
        cpu_lib.gemv_4bit_nt_cpu(torch.randn(1, 64), packed, absmax, code, 64, 16)
    with pytest.raises(ValueError, match=r"bias must be float32 \[8\]"):
        cpu_lib.gemv_4bit_nt_cpu(torch.randn(1, 64), packed, absmax, code, 64, 8, torch.randn(9))
    with pytest.raises(ValueError, match="dy must be float32"):
        cpu_lib.gemv_4bit_nn_cpu(torch.randn(64), packed, absmax, code, 64, 64)
    with pytest.raises(ValueError, match="a \\[9, 64\\] weight needs 288"):  # dy's N larger than W's
        cpu_lib.gemv_4bit_nn_cpu(torch.randn(2, 9), packed, absmax, code, 64, 64)


@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "dq"))
def test_linear4bit_few_rows_take_the_gemv(lib, monkeypatch, double_quant):
    """At M <= CPU_GEMV_MAX_M the cpu backend runs the fused GEMV (counted), to tolerance of the float64
    product; gradients too."""
    from peft_kernels.ops import linear4bit as l4
    torch.manual_seed(0)
    layer = Linear4bit(129, 67, bias=True, blocksize=64, double_quant=double_quant, dtype=torch.float32)
    layer.bias.requires_grad_(True)
    qs = layer.quant_state
    w64 = reference.dequantize_4bit(layer.weight, qs.absmax_float(), qs.code, 64, qs.numel, torch.float64).view(67, 129)
    calls = []
    real = l4.cpu_gemv
    monkeypatch.setattr(l4, "cpu_gemv", lambda kind, *a, **k: calls.append(kind) or real(kind, *a, **k))
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    x = torch.randn(1, 2, 129, requires_grad=True)
    dy = torch.randn(1, 2, 67)
    y = layer(x)
    dx, db = torch.autograd.grad(y, (x, layer.bias), dy)
    assert calls == ["nt", "nn"]
    x64, dy64 = x.detach().double(), dy.double()
    assert_close_to_reference(y, x64 @ w64.t() + layer.bias.detach().double(), torch.float32, "y")
    assert_close_to_reference(dx, dy64 @ w64, torch.float32, "dx")
    assert_close_to_reference(db, dy64.sum((0, 1)), torch.float32, "db")

