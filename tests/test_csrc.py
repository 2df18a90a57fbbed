"""The CUDA C library (csrc/): build, exported ABI, loader, and dequantization results.

Without a GPU this still checks a lot:
* nvcc compiles the library for sm_80/86/89/90 (+ PTX), and the file exports
  exactly the C ABI, links neither Python nor torch nor a shared cudart, and
  loads with ctypes on a machine without a CUDA driver;
* argument validation and the error text of the C side;
* the kernels' own per-thread code, compiled for the host (-DPK_HOST_EMULATION)
  and run block by block on the CPU, against ``reference.dequantize_4bit`` bit
  for bit: every blocksize, odd and ragged sizes, both dtypes paths
  (vectorized and byte-wise), grid-stride loops;
* the ctypes loader's behaviour when the library is missing or broken.
The ``gpu``-marked tests run the real kernels on a CUDA device.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from _dequant_checks import assert_bit_exact, random_weight
from peft_kernels import csrc_build
from peft_kernels.ops import cuda_lib, reference
from peft_kernels.quant import VALID_BLOCKSIZES, code4, quantize_4bit

NVCC = csrc_build.nvcc_path()
NO_NVCC = "nvcc not found: the CUDA C library cannot be compiled on this machine"
ARCHS = ("80", "86", "89", "90")
ABI_SYMBOLS = {"pk_dequantize_4bit", "pk_gemv_4bit", "pk_last_error", "pk_version"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built_lib(tmp_path_factory) -> Path:
    """The release library, built once per session for all target archs in one nvcc call."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    return csrc_build.build(tmp_path_factory.mktemp("csrc"), archs=ARCHS)


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    """The emulation build: exports pk_emulate_dequantize_4bit (kernels' code on the CPU)."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    lib = ctypes.CDLL(str(csrc_build.build_emulator(tmp_path_factory.mktemp("csrc_emu"))))
    c = ctypes
    lib.pk_emulate_dequantize_4bit.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_int32,
                                               c.c_int32, c.c_void_p, c.c_int64, c.POINTER(c.c_int32)]
    lib.pk_emulate_dequantize_4bit.restype = c.c_int
    lib.pk_last_error.restype = c.c_char_p
    return lib


@pytest.fixture
def fresh_loader(monkeypatch):
    """cuda_lib with an empty load cache, restored afterwards."""
    cuda_lib.clear_cache()
    yield monkeypatch
    monkeypatch.undo()
    cuda_lib.clear_cache()


def _raw_lib(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    cuda_lib._declare(lib)
    return lib


# ------------------------------------------------------- (a) build and ABI
def _fatbin_entries(path: Path) -> set[tuple[str, int]]:
    """{('elf'|'ptx', sm)} from the .nv_fatbin section, read from the fat binary headers.

    Used when cuobjdump is not installed. Container header: magic 0xBA55ED50,
    u16 version, u16 header size, u64 payload size; each entry: u16 kind
    (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size, ..., u32 sm at +28.
    """
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]

    def name(sec):
        start = strtab_off + sec[0]
        return data[start:data.index(b"\0", start)].decode()

    fatbin = next(s for s in sections if name(s) == ".nv_fatbin")
    blob = data[fatbin[4]:fatbin[4] + fatbin[5]]
    entries, pos = set(), 0
    while pos + 16 <= len(blob):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos = (pos + 8) & ~7  # containers are 8-byte aligned; skip padding
            continue
        p, end = pos + hsize, pos + hsize + fsize
        while p < end:
            kind, _ever, ehsize, payload = struct.unpack_from("<HHIQ", blob, p)
            sm, = struct.unpack_from("<I", blob, p + 28)
            entries.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
            p += ehsize + payload
        pos = end
    return entries


def test_nvcc_builds_all_archs(built_lib):
    assert built_lib.is_file() and built_lib.name == csrc_build.LIB_NAME
    cuobjdump = shutil.which("cuobjdump") or (Path(NVCC).parent / "cuobjdump").as_posix()
    if Path(cuobjdump).is_file():
        elfs = subprocess.run([cuobjdump, "--list-elf", str(built_lib)], capture_output=True, text=True,
                              check=True).stdout
        ptxs = subprocess.run([cuobjdump, "--list-ptx", str(built_lib)], capture_output=True, text=True,
                              check=True).stdout
        entries = {("elf", int(m)) for m in re.findall(r"sm_(\d+)", elfs)}
        entries |= {("ptx", int(m)) for m in re.findall(r"sm_(\d+)", ptxs)}
    else:
        entries = _fatbin_entries(built_lib)
    for arch in ARCHS:
        assert ("elf", int(arch)) in entries, f"no SASS for sm_{arch} in {sorted(entries)}"
    assert ("ptx", max(map(int, ARCHS))) in entries, f"no PTX for the highest arch in {sorted(entries)}"


def test_exports_exactly_the_c_abi(built_lib):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(built_lib)], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if re.search(r" [TDBRVW] ", line)}
    assert exported == ABI_SYMBOLS, "the static cudart or C++ internals leak out of the library"


def test_links_no_python_torch_or_shared_cudart(built_lib):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run([readelf, "-d", str(built_lib)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", out)
    assert needed, out
    for lib in needed:
        assert not re.match(r"lib(python|torch|c10|cudart|cuda\.)", lib), f"links {lib}: {needed}"


def test_loads_without_gpu_and_validates_arguments(built_lib):
    lib = _raw_lib(built_lib)  # dlopen needs no CUDA driver: cudart finds it at the first launch
    assert lib.pk_version() == cuda_lib.ABI_VERSION
    assert lib.pk_last_error() == b""
    fake = 0x1000  # never dereferenced: each call below fails validation before any CUDA call
    cases = [
        ((None, fake, fake, 10, 64, 0, fake, None), 1, "null pointer"),
        ((fake, fake, fake, 10, 64, 0, None, None), 1, "null pointer"),
        ((fake, fake, fake, 10, 48, 0, fake, None), 2, "blocksize 48"),
        ((fake, fake, fake, 10, 16, 0, fake, None), 2, "blocksize 16"),
        ((fake, fake, fake, 10, 8192, 0, fake, None), 2, "blocksize 8192"),
        ((fake, fake, fake, 0, 64, 0, fake, None), 3, "numel"),
        ((fake, fake, fake, -5, 64, 0, fake, None), 3, "-5"),
        ((fake, fake, fake, 10, 64, 3, fake, None), 4, "out_dtype 3"),
    ]
    for args, code, text in cases:
        assert lib.pk_dequantize_4bit(*args) == code, (args, lib.pk_last_error())
        assert text in lib.pk_last_error().decode(), lib.pk_last_error()
        with pytest.raises(RuntimeError, match=f"code {code}: .*{re.escape(text)}"):
            cuda_lib._raise_for(lib, "pk_dequantize_4bit", code)


def test_release_gemv_validates_arguments(built_lib):
    """pk_gemv_4bit of the sm_80/86/89/90 build rejects bad sizes before any CUDA call (tests/test_cuda_gemv.py
    checks its arithmetic)."""
    lib = _raw_lib(built_lib)
    fake = 0x1000
    args = [fake, 1, 1, 8, 64, fake, fake, None, None, 0.0, fake, 64, None, None, None, 0, 1.0, fake, None]
    for i, bad, code, text in ((2, 17, 6, "M=17"), (4, 40, 6, "K=40"), (1, 5, 4, "x_dtype 5"),
                               (5, fake + 1, 7, "16-byte aligned")):
        call = list(args)
        call[i] = bad
        assert lib.pk_gemv_4bit(*call) == code, lib.pk_last_error()
        assert text in lib.pk_last_error().decode()


# ------------------------------------------------ (b) loader and wrappers on CPU
def test_missing_library_reports_why(fresh_loader, tmp_path):
    missing = tmp_path / "nope" / "libpeft_kernels_cuda.so"
    fresh_loader.setenv(cuda_lib.ENV_LIB, str(missing))
    assert cuda_lib.library_path() == missing
    assert cuda_lib.load() is None
    reason = cuda_lib.unavailable_reason()
    assert str(missing) in reason and cuda_lib.ENV_LIB in reason and "not found" in reason
    assert cuda_lib.load() is None  # cached, still None


def test_unloadable_library_reports_why(fresh_loader, tmp_path):
    bogus = tmp_path / "libpeft_kernels_cuda.so"
    bogus.write_bytes(b"not an ELF file")
    fresh_loader.setenv(cuda_lib.ENV_LIB, str(bogus))
    assert cuda_lib.load() is None
    assert "cannot load" in cuda_lib.unavailable_reason() and str(bogus) in cuda_lib.unavailable_reason()


def test_env_override_loads_built_library(fresh_loader, built_lib):
    fresh_loader.setenv(cuda_lib.ENV_LIB, str(built_lib))
    lib = cuda_lib.load()
    assert lib is not None, cuda_lib.unavailable_reason()
    assert cuda_lib.unavailable_reason() is None
    assert lib.pk_version() == cuda_lib.ABI_VERSION


def test_default_path_is_package_folder(fresh_loader):
    fresh_loader.delenv(cuda_lib.ENV_LIB, raising=False)
    path = cuda_lib.library_path()
    assert path.name == "libpeft_kernels_cuda.so" and path.parent.name == "_cuda"
    assert path.parent.parent.name == "peft_kernels"


def _cpu_args(numel=100, blocksize=64):
    packed = torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.ones(-(-numel // blocksize))
    return packed, absmax, code4("nf4"), blocksize, numel


def test_wrapper_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="packed is on cpu.*CUDA"):
        cuda_lib.dequantize_4bit_cuda(*_cpu_args())


@pytest.mark.parametrize("which,bad,exc,msg", [
    (0, torch.zeros(50, 1, dtype=torch.int8), TypeError, "packed has dtype int8"),
    (1, torch.ones(2, dtype=torch.float16), TypeError, "absmax has dtype float16"),
    (2, torch.zeros(16, dtype=torch.float64), TypeError, "code has dtype float64"),
    (0, [1, 2, 3], TypeError, "packed must be a torch.Tensor"),
])
def test_wrapper_rejects_wrong_dtypes(which, bad, exc, msg):
    args = list(_cpu_args())
    args[which] = bad
    with pytest.raises(exc, match=msg):
        cuda_lib.dequantize_4bit_cuda(*args)


def test_wrapper_rejects_unsupported_output_dtype():
    with pytest.raises(TypeError, match="dtype must be one of"):
        cuda_lib.dequantize_4bit_cuda(*_cpu_args(), dtype=torch.float64)


# ------------------------------------- (c) kernels' code, emulated on the CPU
def _emulate(emu, packed, absmax, code, blocksize, numel, dtype, *, out_offset=0, max_grid=1 << 20):
    """Run the kernels' per-thread code; returns (out [numel], vector_path, guard elements)."""
    guard = 5
    buf = torch.full((out_offset + numel + guard,), float("nan"), dtype=dtype)  # poison: unwritten -> NaN
    out = buf[out_offset:out_offset + numel]
    flag = ctypes.c_int32(-1)
    rc = emu.pk_emulate_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), numel, blocksize,
                                        cuda_lib.DTYPE_CODES[dtype], out.data_ptr(), max_grid, ctypes.byref(flag))
    assert rc == 0, emu.pk_last_error()
    return out, flag.value == 1, buf[out_offset + numel:]


# Sizes: 1-3 elements (tail only), odd, just below/above a vector unit, a partial
# last quantization block, and several 256-thread tiles with a ragged end.
SIZES = (1, 2, 3, 7, 8, 9, 33, 1001, 4096 * 3 + 65, 70001)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_emulated_kernel_matches_reference(emu, blocksize, dtype):
    for i, numel in enumerate(SIZES):
        packed, absmax = random_weight(numel, blocksize, seed=blocksize + i)
        for qt in ("nf4", "fp4"):
            code = code4(qt)
            want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
            got, vec, guard = _emulate(emu, packed, absmax, code, blocksize, numel, dtype)
            assert vec, "aligned buffers must take the vector path"
            assert_bit_exact(got, want)
            assert torch.isnan(guard).all(), "wrote past numel"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("numel", (1, 6, 4097, 20011))
def test_emulated_misaligned_buffers_take_bytewise_path(emu, dtype, numel):
    blocksize = 64
    packed_big, absmax = random_weight(numel + 2, blocksize, seed=numel)
    code = code4("nf4")
    for packed_offset, out_offset in ((0, 1), (1, 0), (1, 3)):
        packed = packed_big.reshape(-1)[packed_offset:packed_offset + (numel + 1) // 2]
        want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
        got, vec, guard = _emulate(emu, packed, absmax, code, blocksize, numel, dtype, out_offset=out_offset)
        # f32 needs a 2-byte aligned packed pointer, f16/bf16 4 bytes; out always 16 bytes.
        assert not vec
        assert_bit_exact(got, want)
        assert torch.isnan(guard).all()


@pytest.mark.parametrize("max_grid", (1, 2, 3))
@pytest.mark.parametrize("out_offset", (0, 1), ids=("vector", "bytewise"))
def test_emulated_grid_stride_loops(emu, max_grid, out_offset):
    numel, blocksize, dtype = 8192 * 5 + 77, 128, torch.float16  # 6 tiles of the vector path
    packed, absmax = random_weight(numel, blocksize, seed=max_grid)
    code = code4("nf4")
    want = reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype)
    got, _, guard = _emulate(emu, packed, absmax, code, blocksize, numel, dtype, out_offset=out_offset,
                             max_grid=max_grid)
    assert_bit_exact(got, want)
    assert torch.isnan(guard).all()


def test_emulated_kernel_on_quantized_weights(emu):
    w = torch.randn(67, 129)  # odd numel, rows not a multiple of the block
    for qt in ("nf4", "fp4"):
        packed, st = quantize_4bit(w, blocksize=64, quant_type=qt, double_quant=False)
        for dtype in DTYPES:
            want = reference.dequantize_4bit(packed, st.absmax, st.code, 64, w.numel(), dtype)
            got, _, _ = _emulate(emu, packed, st.absmax, st.code, 64, w.numel(), dtype)
            assert_bit_exact(got, want)


# ------------------------------------------------------------- GPU tests
def _cuda_ref(packed, absmax, code, blocksize, numel, dtype):
    """The reference, on the tensors' own device (torch's casts round to nearest-even there too)."""
    return reference.dequantize_4bit(packed, absmax, code, blocksize, numel, dtype).cpu()


@pytest.fixture(scope="module")
def gpu_lib(request):
    """The library the GPU tests run: freshly built when nvcc exists, else the installed/carried one."""
    mp = pytest.MonkeyPatch()
    if NVCC is not None:
        mp.setenv(cuda_lib.ENV_LIB, str(request.getfixturevalue("built_lib")))
    cuda_lib.clear_cache()
    lib = cuda_lib.load()
    if lib is None:
        mp.undo()
        pytest.skip(f"no CUDA C library: {cuda_lib.unavailable_reason()}")
    yield lib
    mp.undo()
    cuda_lib.clear_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_gpu_dequant_matches_reference(gpu_lib, quant_type, blocksize, dtype):
    # fp16/bf16 are also bit-exact: both sides form the float32 product and round it to nearest-even.
    for shape in ((1,), (3,), (7, 9), (33, 65), (257, 1023), (4096, 3 * 1024 + 7)):
        w = torch.randn(shape, device="cuda")
        packed, st = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
        got = cuda_lib.dequantize_4bit_cuda(packed, st.absmax, st.code, blocksize, w.numel(), dtype)
        want = _cuda_ref(packed, st.absmax, st.code, blocksize, w.numel(), dtype)
        assert got.device == w.device and got.shape == (w.numel(),)
        assert_bit_exact(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_bytewise_path_and_no_overwrite(gpu_lib, dtype):
    numel, blocksize = 100_003, 256
    packed_big, absmax = (t.cuda() for t in random_weight(numel + 2, blocksize, seed=7))
    code = code4("nf4", "cuda")
    packed = packed_big.reshape(-1)[1:1 + (numel + 1) // 2]  # misaligned by one byte
    buf = torch.full((numel + 9,), float("nan"), dtype=dtype, device="cuda")
    out = buf[1:1 + numel]  # misaligned output
    rc = gpu_lib.pk_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), numel, blocksize,
                                    cuda_lib.DTYPE_CODES[dtype], out.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
    assert rc == 0, gpu_lib.pk_last_error()
    torch.cuda.synchronize()
    assert_bit_exact(out.cpu(), _cuda_ref(packed, absmax, code, blocksize, numel, dtype))
    assert torch.isnan(buf[0]) and torch.isnan(buf[1 + numel:]).all()
    # the wrapper takes the byte-wise path too for a misaligned packed tensor
    got = cuda_lib.dequantize_4bit_cuda(packed, absmax, code, blocksize, numel, dtype)
    assert_bit_exact(got.cpu(), _cuda_ref(packed, absmax, code, blocksize, numel, dtype))


@pytest.mark.gpu
def test_gpu_side_stream_and_errors(gpu_lib):
    numel, blocksize = 12345, 64
    packed, absmax = (t.cuda() for t in random_weight(numel, blocksize, seed=3))
    code = code4("fp4", "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_lib.dequantize_4bit_cuda(packed, absmax, code, blocksize, numel, torch.bfloat16)
    side.synchronize()
    assert_bit_exact(got.cpu(), _cuda_ref(packed, absmax, code, blocksize, numel, torch.bfloat16))
    assert cuda_lib.dequantize_4bit_cuda(packed, absmax, code, blocksize, 0).numel() == 0
    with pytest.raises(ValueError, match="contiguous"):
        cuda_lib.dequantize_4bit_cuda(packed, absmax.repeat_interleave(2)[::2], code, blocksize, numel)
    with pytest.raises(ValueError, match="need [0-9]+"):
        cuda_lib.dequantize_4bit_cuda(packed, absmax[:-1], code, blocksize, numel)
    with pytest.raises(ValueError, match="blocksize"):
        cuda_lib.dequantize_4bit_cuda(packed, absmax, code, 48, numel)
    with pytest.raises(ValueError, match="absmax is on cpu"):
        cuda_lib.dequantize_4bit_cuda(packed, absmax.cpu(), code, blocksize, numel)


@pytest.mark.gpu
def test_gpu_int64_indexing(gpu_lib):
    # > 2^31 elements: the tail must land at the right 64-bit offsets.
    numel, blocksize = (1 << 31) + 4097, 4096
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs about 6 GiB of GPU memory")
    nblocks = -(-numel // blocksize)
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(nblocks, device="cuda", generator=g) + 0.5
    code = code4("nf4", "cuda")
    got = cuda_lib.dequantize_4bit_cuda(packed, absmax, code, blocksize, numel, torch.float16)
    start = (numel // blocksize - 1) * blocksize  # last two blocks, the final one partial
    want = reference.dequantize_4bit(packed[start // 2:].cpu(), absmax[start // blocksize:].cpu(), code.cpu(),
                                     blocksize, numel - start, torch.float16)
    assert_bit_exact(got[start:].cpu(), want)
    head = reference.dequantize_4bit(packed[:4096].cpu(), absmax[:2].cpu(), code.cpu(), blocksize, 8192,
                                     torch.float16)
    assert_bit_exact(got[:8192].cpu(), head)
