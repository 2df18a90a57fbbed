// Blockwise 4-bit (NF4/FP4) dequantization: the C ABI of peft_kernels.h.
//
// Memory-bound: each packed byte (0.5 B per element) becomes two outputs of 4 or
// 2 bytes, so the writes are 80-90% of the traffic and decide the speed. The
// layout is chosen so that every warp-wide store is one contiguous 512-byte run:
// a thread handles "units" of 16 output bytes (4 f32 or 8 f16/bf16 elements,
// from 2 or 4 packed bytes), unit u of a tile going to thread u % 256, and issues
// its loads for kUnroll units before its stores to keep several in flight.
// blocksize >= 32 and the unit start being a multiple of 4 or 8 elements mean a
// unit never straddles two quantization blocks: one absmax per unit.
//
// The per-thread bodies are __host__ __device__ and take (block, grid, thread)
// explicitly so that the same code also runs on the CPU in the emulation build
// (-DPK_HOST_EMULATION), which is how the indexing, the tails and the alignment
// fallback are tested on machines without a GPU.
#include "peft_kernels.h"
#include "pk_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

namespace {

using pk_detail::ok;
using pk_detail::set_error;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kTileUnits = int64_t(kThreads) * kUnroll;
// Only guards gridDim.x; real grids are far smaller (a tile is 4096 or 8192 elements).
constexpr int64_t kMaxGrid = int64_t(1) << 20;

struct Params {
  const uint8_t* packed;
  const float* absmax;
  void* out;
  int64_t numel;
  int64_t nunits;           // whole 16-byte output units handled by the vector path
  int64_t tail_byte_begin;  // first packed byte left to the byte-wise path
  int shift;                // log2(blocksize)
};

// ----------------------------------------------------------------- dtypes
template <int DT> struct OutT;

template <> struct OutT<PK_DTYPE_F32> {
  using Scalar = float;
  using Load = uint16_t;                 // 2 packed bytes -> 4 floats = 16 bytes
  static constexpr int kElems = 4;
  static PK_HD Scalar cvt(float v) { return v; }
  static PK_HD void store_unit(void* out, int64_t u, Load raw, float s, const float* code) {
    const unsigned b0 = raw & 0xFFu, b1 = raw >> 8;  // little-endian: lower address first
    float4 v;
    v.x = code[b0 >> 4] * s;
    v.y = code[b0 & 15u] * s;
    v.z = code[b1 >> 4] * s;
    v.w = code[b1 & 15u] * s;
    reinterpret_cast<float4*>(out)[u] = v;
  }
};

template <typename H2>
PK_HD uint32_t bits2(H2 h) {
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

PK_HD uint32_t pack2(float lo, float hi, __half) { return bits2(__floats2half2_rn(lo, hi)); }
PK_HD uint32_t pack2(float lo, float hi, __nv_bfloat16) { return bits2(__floats2bfloat162_rn(lo, hi)); }

template <typename H> struct HalfOut {
  using Scalar = H;
  using Load = uint32_t;                 // 4 packed bytes -> 8 halves = 16 bytes
  static constexpr int kElems = 8;
  static PK_HD void store_unit(void* out, int64_t u, Load raw, float s, const float* code) {
    uint32_t w[4];
    PK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const unsigned b = (raw >> (8 * j)) & 0xFFu;
      w[j] = pack2(code[b >> 4] * s, code[b & 15u] * s, H());
    }
    reinterpret_cast<uint4*>(out)[u] = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <> struct OutT<PK_DTYPE_F16> : HalfOut<__half> {
  static PK_HD __half cvt(float v) { return __float2half_rn(v); }
};
template <> struct OutT<PK_DTYPE_BF16> : HalfOut<__nv_bfloat16> {
  static PK_HD __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// ------------------------------------------------------- per-thread bodies
// Byte-wise path: packed bytes byte_begin + idx, + stride, ... (two outputs each,
// the second only if it exists). Used for the < 16-byte tail of the vector path
// and for buffers whose alignment rules the vector path out.
template <int DT>
PK_HD void bytes_range(const Params& p, const float* code, int64_t byte_begin, int64_t idx, int64_t stride) {
  using O = OutT<DT>;
  auto* out = static_cast<typename O::Scalar*>(p.out);
  for (int64_t j = byte_begin + idx; 2 * j < p.numel; j += stride) {
    const unsigned b = PK_LDG(p.packed + j);
    const float s = PK_LDG(p.absmax + ((2 * j) >> p.shift));  // 2j and 2j+1 share a block
    out[2 * j] = O::cvt(code[b >> 4] * s);
    if (2 * j + 1 < p.numel) out[2 * j + 1] = O::cvt(code[b & 15u] * s);
  }
}

template <int DT>
PK_HD void vec_block(const Params& p, const float* code, int64_t block, int64_t grid, int tid) {
  using O = OutT<DT>;
  const auto* src = reinterpret_cast<const typename O::Load*>(p.packed);
  const int64_t ntiles = (p.nunits + kTileUnits - 1) / kTileUnits;
  for (int64_t tile = block; tile < ntiles; tile += grid) {
    const int64_t first = tile * kTileUnits + tid;
    typename O::Load raw[kUnroll];
    float scale[kUnroll];
    PK_UNROLL
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t u = first + int64_t(k) * kThreads;
      if (u < p.nunits) {
        raw[k] = PK_LDG(src + u);
        scale[k] = PK_LDG(p.absmax + ((u * O::kElems) >> p.shift));
      }
    }
    PK_UNROLL
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t u = first + int64_t(k) * kThreads;
      if (u < p.nunits) O::store_unit(p.out, u, raw[k], scale[k], code);
    }
  }
  if (block == 0) bytes_range<DT>(p, code, p.tail_byte_begin, tid, kThreads);
}

template <int DT>
PK_HD void bytes_block(const Params& p, const float* code, int64_t block, int64_t grid, int tid) {
  bytes_range<DT>(p, code, 0, block * kThreads + tid, grid * kThreads);
}

// ----------------------------------------------------------------- kernels
// The 16-entry code book lives in shared memory: a lookup by nibble hits bank
// q, so a warp never has a bank conflict (equal nibbles broadcast).
template <int DT>
__global__ void __launch_bounds__(kThreads) dequant_vec_kernel(Params p, const float* __restrict__ code16) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  vec_block<DT>(p, code, blockIdx.x, gridDim.x, threadIdx.x);
}

template <int DT>
__global__ void __launch_bounds__(kThreads) dequant_bytes_kernel(Params p, const float* __restrict__ code16) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  bytes_block<DT>(p, code, blockIdx.x, gridDim.x, threadIdx.x);
}

// ------------------------------------------------------------- host side
struct Plan {
  Params p;
  bool vec;
  int64_t grid;
};

int elems_per_unit(int32_t dt) { return dt == PK_DTYPE_F32 ? 4 : 8; }

int validate(const uint8_t* packed, const float* absmax, const float* code16, int64_t numel,
             int32_t blocksize, int32_t out_dtype, const void* out) {
  if (!packed || !absmax || !code16 || !out)
    return set_error(PK_ERR_NULL_POINTER, "pk_dequantize_4bit: null pointer (packed=%p absmax=%p code16=%p out=%p)",
                     (const void*)packed, (const void*)absmax, (const void*)code16, out);
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    return set_error(PK_ERR_BLOCKSIZE, "pk_dequantize_4bit: blocksize %d is not a power of two in [32, 4096]",
                     (int)blocksize);
  if (numel <= 0)
    return set_error(PK_ERR_NUMEL, "pk_dequantize_4bit: numel must be > 0, got %lld", (long long)numel);
  if (out_dtype != PK_DTYPE_F32 && out_dtype != PK_DTYPE_F16 && out_dtype != PK_DTYPE_BF16)
    return set_error(PK_ERR_DTYPE, "pk_dequantize_4bit: out_dtype %d is not 0 (f32), 1 (f16) or 2 (bf16)",
                     (int)out_dtype);
  return PK_OK;
}

Plan make_plan(const uint8_t* packed, const float* absmax, int64_t numel, int32_t blocksize, int32_t dt,
               void* out, int64_t max_grid) {
  Plan pl;
  pl.p.packed = packed;
  pl.p.absmax = absmax;
  pl.p.out = out;
  pl.p.numel = numel;
  pl.p.shift = 0;
  while ((int32_t(1) << pl.p.shift) < blocksize) ++pl.p.shift;
  const int epu = elems_per_unit(dt);
  pl.vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % (epu / 2) == 0;
  if (pl.vec) {
    pl.p.nunits = numel / epu;
    pl.p.tail_byte_begin = pl.p.nunits * epu / 2;
    const int64_t ntiles = (pl.p.nunits + kTileUnits - 1) / kTileUnits;
    pl.grid = ntiles < 1 ? 1 : ntiles;  // block 0 also writes the tail
  } else {
    pl.p.nunits = 0;
    pl.p.tail_byte_begin = 0;
    const int64_t nbytes = (numel + 1) / 2;
    pl.grid = (nbytes + kThreads - 1) / kThreads;
  }
  if (pl.grid > max_grid) pl.grid = max_grid;
  return pl;
}

template <int DT>
cudaError_t launch(const Plan& pl, const float* code16, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(pl.grid)), block(kThreads);
  if (pl.vec)
    dequant_vec_kernel<DT><<<grid, block, 0, stream>>>(pl.p, code16);
  else
    dequant_bytes_kernel<DT><<<grid, block, 0, stream>>>(pl.p, code16);
  return cudaGetLastError();
}

#ifdef PK_HOST_EMULATION
template <int DT>
void emulate(const Plan& pl, const float* code16) {
  float code[16];
  memcpy(code, code16, sizeof(code));
  for (int64_t b = 0; b < pl.grid; ++b)
    for (int t = 0; t < kThreads; ++t) {
      if (pl.vec)
        vec_block<DT>(pl.p, code, b, pl.grid, t);
      else
        bytes_block<DT>(pl.p, code, b, pl.grid, t);
    }
}
#endif

}  // namespace

// The one per-thread error text of the library (pk_last_error), shared by every .cu file.
namespace pk_detail {

thread_local char g_error[512];

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

int ok() {
  g_error[0] = '\0';
  return PK_OK;
}

}  // namespace pk_detail

extern "C" {

PK_API int pk_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t numel,
                              int32_t blocksize, int32_t out_dtype, void* out, void* stream) {
  const int rc = validate(packed, absmax, code16, numel, blocksize, out_dtype, out);
  if (rc != PK_OK) return rc;
  const Plan pl = make_plan(packed, absmax, numel, blocksize, out_dtype, out, kMaxGrid);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (out_dtype) {
    case PK_DTYPE_F32: err = launch<PK_DTYPE_F32>(pl, code16, s); break;
    case PK_DTYPE_F16: err = launch<PK_DTYPE_F16>(pl, code16, s); break;
    default: err = launch<PK_DTYPE_BF16>(pl, code16, s); break;
  }
  if (err != cudaSuccess)
    return set_error(PK_ERR_CUDA, "pk_dequantize_4bit: kernel launch failed: %s (%s)", cudaGetErrorName(err),
                     cudaGetErrorString(err));
  return ok();
}

PK_API const char* pk_last_error(void) { return pk_detail::g_error; }

PK_API int pk_version(void) { return PK_VERSION; }

#ifdef PK_HOST_EMULATION
// Test-only entry point (not part of the ABI; built only with -DPK_HOST_EMULATION):
// runs the kernels' per-thread code on the CPU over host pointers, block by block
// and thread by thread, with the grid capped at max_grid to exercise the
// grid-stride loops. *vector_path (if not NULL) is set to 1 when the vector path
// ran and 0 for the byte-wise one, so tests can check they cover both.
PK_API int pk_emulate_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16,
                                      int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                                      int64_t max_grid, int32_t* vector_path) {
  const int rc = validate(packed, absmax, code16, numel, blocksize, out_dtype, out);
  if (rc != PK_OK) return rc;
  const Plan pl = make_plan(packed, absmax, numel, blocksize, out_dtype, out, max_grid < 1 ? 1 : max_grid);
  switch (out_dtype) {
    case PK_DTYPE_F32: emulate<PK_DTYPE_F32>(pl, code16); break;
    case PK_DTYPE_F16: emulate<PK_DTYPE_F16>(pl, code16); break;
    default: emulate<PK_DTYPE_BF16>(pl, code16); break;
  }
  if (vector_path) *vector_path = pl.vec ? 1 : 0;
  return ok();
}
#endif

}  // extern "C"
