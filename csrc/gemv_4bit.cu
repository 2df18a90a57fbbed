// Fused blockwise 4-bit GEMV for decode (M <= 16): the C ABI pk_gemv_4bit of peft_kernels.h.
//
// Decode is memory-bound on W: N*K/2 bytes read once, against M*K + M*N elements of x and y.
// Layout: a warp owns kRows consecutive output rows and walks K in "chunks" of 32 weights =
// 16 packed bytes (one 128-bit load per row); chunk c of a row goes to lane c % 32, so one step
// of a warp reads 512 contiguous bytes of each of its rows. K % 32 == 0 puts every chunk inside
// one quantization block (blocksize >= 32, power of two): one absmax per chunk and row, loaded
// (and decoded, for double quantization) once. Each lane decodes 8 weights per 32-bit word into
// float32 registers (the 16-entry code book in shared memory: a nibble lookup never conflicts),
// then multiplies them by the M rows of x (8 elements per load, from L1/L2: x is small and reused
// by every warp). Each lane also accumulates its share (j = lane, lane + 32, ...) of the LoRA
// product scale * xa[m, :] . B[n, :], so one butterfly reduction (5 shuffles per value) finishes
// both terms; lane 0 adds the bias and stores y.
//
// As in dequant_4bit.cu, the per-lane bodies are __host__ __device__ and take their indices
// explicitly, and -DPK_HOST_EMULATION exports pk_emulate_gemv_4bit, which runs them on the CPU
// lane by lane, with the same butterfly reduction order, so the indexing, tails, the nested
// absmax and the LoRA term are checked against a float64 reference without a GPU.
#include "peft_kernels.h"
#include "pk_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string.h>

namespace {

using pk_detail::ok;
using pk_detail::set_error;

constexpr int kWarp = 32;
constexpr int kWarps = 4;                // warps per block (128 threads)
constexpr int kRows = 2;                 // output rows per warp: x is loaded once for both
constexpr int kChunk = 32;               // weights per 16-byte load
constexpr int kMaxM = 16;
constexpr int kRowsPerBlock = kWarps * kRows;

struct GemvParams {
  const void* x;
  const uint8_t* packed;
  const float* absmax;          // decoded scales (nested == false)
  const uint8_t* absmax_q;      // double-quantized codes (nested == true)
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  const float* bias;            // nullable
  const void* xa;               // [M, R] of T; nullable: no LoRA term
  const void* lora_b;
  float scale;
  void* y;
  int64_t M, N, K, R;
  int shift;                    // log2(blocksize)
  bool nested;
};

// ----------------------------------------------------------------- dtypes
template <typename T> struct XT;

template <> struct XT<float> {
  // 8 consecutive elements starting at a multiple of 8 (32-byte aligned in x).
  static PK_HD void load8(const float* p, float v[8]) {
    const float4 a = PK_LDG(reinterpret_cast<const float4*>(p));
    const float4 b = PK_LDG(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static PK_HD float to_f(float v) { return v; }
  static PK_HD float from_f(float v) { return v; }
};

template <typename H> struct HalfX {
  static PK_HD void load8(const H* p, float v[8]) {
    const uint4 raw = PK_LDG(reinterpret_cast<const uint4*>(p));
    H h[8];
    memcpy(h, &raw, sizeof(h));
    PK_UNROLL
    for (int i = 0; i < 8; ++i) v[i] = XT<H>::to_f(h[i]);
  }
};

template <> struct XT<__half> : HalfX<__half> {
  static PK_HD float to_f(__half v) { return __half2float(v); }
  static PK_HD __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct XT<__nv_bfloat16> : HalfX<__nv_bfloat16> {
  static PK_HD float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static PK_HD __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
PK_HD float load1(const T* p) {
#ifdef __CUDA_ARCH__
  return XT<T>::to_f(__ldg(p));
#else
  return XT<T>::to_f(*p);
#endif
}

// The float32 scale of quantization block `blk`: stored, or decoded from double quantization.
PK_HD float block_scale(const GemvParams& p, int64_t blk) {
  if (!p.nested) return PK_LDG(p.absmax + blk);
  const unsigned q = PK_LDG(p.absmax_q + blk);
  return PK_LDG(p.nested_code + q) * PK_LDG(p.nested_absmax + (blk >> 8)) + p.nested_offset;
}

// ------------------------------------------------------- per-lane body
// acc[r][m]: this lane's partial of y[m, row0 + r] (W term and, with LoRA, the scaled LoRA term).
// MT >= M is the compile-time row capacity; rows m >= M and n >= N are never read nor written.
template <typename T, int MT>
PK_HD void lane_partial(const GemvParams& p, const float* code, int64_t row0, int lane, float acc[kRows][MT]) {
  PK_UNROLL
  for (int r = 0; r < kRows; ++r)
    PK_UNROLL
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
  const T* x = static_cast<const T*>(p.x);
  const int64_t nchunk = p.K / kChunk;
  const uint4* w4 = reinterpret_cast<const uint4*>(p.packed);
  for (int64_t c = lane; c < nchunk; c += kWarp) {
    // Issue every row's load (and scale) before decoding: kRows 16-byte loads in flight per lane.
    uint4 raw[kRows];
    float s[kRows];
    PK_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = row0 + r;
      if (n < p.N) {
        const int64_t first = n * p.K + c * kChunk;  // flat index of the chunk's first weight
        raw[r] = PK_LDG(w4 + (first >> 5));          // 32 weights = 16 bytes
        s[r] = block_scale(p, first >> p.shift);
      } else {
        raw[r] = make_uint4(0u, 0u, 0u, 0u);
        s[r] = 0.0f;
      }
    }
    PK_UNROLL
    for (int j = 0; j < 4; ++j) {  // the 4 words: weights 8j .. 8j+7 of the chunk
      float w[kRows][8];
      PK_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const uint32_t word = j == 0 ? raw[r].x : j == 1 ? raw[r].y : j == 2 ? raw[r].z : raw[r].w;
        PK_UNROLL
        for (int b = 0; b < 4; ++b) {  // little-endian: byte b holds weights 2b (high) and 2b+1 (low)
          const unsigned byte = (word >> (8 * b)) & 0xFFu;
          w[r][2 * b] = code[byte >> 4] * s[r];
          w[r][2 * b + 1] = code[byte & 15u] * s[r];
        }
      }
      const int64_t k = c * kChunk + 8 * j;
      PK_UNROLL
      for (int m = 0; m < MT; ++m) {
        if (m < p.M) {
          float xv[8];
          XT<T>::load8(x + m * p.K + k, xv);
          PK_UNROLL
          for (int r = 0; r < kRows; ++r)
            PK_UNROLL
            for (int e = 0; e < 8; ++e) acc[r][m] += w[r][e] * xv[e];
        }
      }
    }
  }
  if (p.xa != nullptr) {
    const T* b = static_cast<const T*>(p.lora_b);
    const T* xa = static_cast<const T*>(p.xa);
    for (int64_t jr = lane; jr < p.R; jr += kWarp) {
      PK_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int64_t n = row0 + r;
        if (n >= p.N) continue;
        const float bs = load1(b + n * p.R + jr) * p.scale;
        PK_UNROLL
        for (int m = 0; m < MT; ++m)
          if (m < p.M) acc[r][m] += load1(xa + m * p.R + jr) * bs;
      }
    }
  }
}

// Lane 0 after the reduction: y[m, row0 + r] = acc + bias, rounded once to T.
template <typename T, int MT>
PK_HD void store_rows(const GemvParams& p, int64_t row0, const float acc[kRows][MT]) {
  T* y = static_cast<T*>(p.y);
  PK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = row0 + r;
    if (n >= p.N) continue;
    const float b = p.bias != nullptr ? PK_LDG(p.bias + n) : 0.0f;
    PK_UNROLL
    for (int m = 0; m < MT; ++m)
      if (m < p.M) y[m * p.N + n] = XT<T>::from_f(acc[r][m] + b);
  }
}

// ----------------------------------------------------------------- kernel
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * kWarp) gemv4bit_kernel(GemvParams p, const float* __restrict__ code16) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp) * kRows;
  if (row0 >= p.N) return;  // whole warp: the shuffles below see full warps only
  float acc[kRows][MT];
  lane_partial<T, MT>(p, code, row0, lane, acc);
#ifdef __CUDA_ARCH__
  PK_UNROLL
  for (int off = kWarp / 2; off > 0; off /= 2)
    PK_UNROLL
    for (int r = 0; r < kRows; ++r)
      PK_UNROLL
      for (int m = 0; m < MT; ++m) acc[r][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][m], off);
#endif
  if (lane == 0) store_rows<T, MT>(p, row0, acc);
}

// ------------------------------------------------------------- host side
int dtype_ok(int32_t dt) { return dt == PK_DTYPE_F32 || dt == PK_DTYPE_F16 || dt == PK_DTYPE_BF16; }

int validate(const void* x, int32_t x_dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
             const void* absmax, const float* nested_absmax, const float* nested_code, const float* code16,
             int32_t blocksize, const void* xa, const void* lora_b, int64_t R, const void* y) {
  const char* fn = "pk_gemv_4bit";
  if (!x || !packed || !absmax || !code16 || !y)
    return set_error(PK_ERR_NULL_POINTER, "%s: null pointer (x=%p packed=%p absmax=%p code16=%p y=%p)", fn, x,
                     (const void*)packed, absmax, (const void*)code16, y);
  if ((nested_absmax == nullptr) != (nested_code == nullptr))
    return set_error(PK_ERR_NULL_POINTER, "%s: nested_absmax=%p and nested_code=%p must be both set or both NULL",
                     fn, (const void*)nested_absmax, (const void*)nested_code);
  if ((xa == nullptr) != (lora_b == nullptr))
    return set_error(PK_ERR_NULL_POINTER, "%s: xa=%p and lora_B=%p must be both set or both NULL", fn, xa,
                     lora_b);
  if (!dtype_ok(x_dtype))
    return set_error(PK_ERR_DTYPE, "%s: x_dtype %d is not 0 (f32), 1 (f16) or 2 (bf16)", fn, (int)x_dtype);
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    return set_error(PK_ERR_BLOCKSIZE, "%s: blocksize %d is not a power of two in [32, 4096]", fn, (int)blocksize);
  if (M < 1 || M > kMaxM)
    return set_error(PK_ERR_SHAPE, "%s: M=%lld rows, the GEMV takes 1 <= M <= %d", fn, (long long)M, kMaxM);
  if (N < 1)
    return set_error(PK_ERR_SHAPE, "%s: N=%lld, must be >= 1", fn, (long long)N);
  if (K < kChunk || K % kChunk != 0)
    return set_error(PK_ERR_SHAPE, "%s: K=%lld is not a positive multiple of %d (W [N=%lld, K=%lld])", fn,
                     (long long)K, kChunk, (long long)N, (long long)K);
  if (xa != nullptr && R < 1)
    return set_error(PK_ERR_SHAPE, "%s: LoRA rank R=%lld, must be >= 1", fn, (long long)R);
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(packed) % 16 != 0)
    return set_error(PK_ERR_ALIGN, "%s: x=%p and packed=%p must be 16-byte aligned", fn, x, (const void*)packed);
  return PK_OK;
}

GemvParams make_params(const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed, const void* absmax,
                       const float* nested_absmax, const float* nested_code, float nested_offset,
                       int32_t blocksize, const float* bias, const void* xa, const void* lora_b, int64_t R,
                       float scale, void* y) {
  GemvParams p;
  p.x = x;
  p.packed = packed;
  p.nested = nested_absmax != nullptr;
  p.absmax = p.nested ? nullptr : static_cast<const float*>(absmax);
  p.absmax_q = p.nested ? static_cast<const uint8_t*>(absmax) : nullptr;
  p.nested_absmax = nested_absmax;
  p.nested_code = nested_code;
  p.nested_offset = nested_offset;
  p.bias = bias;
  p.xa = xa;
  p.lora_b = lora_b;
  p.scale = scale;
  p.y = y;
  p.M = M;
  p.N = N;
  p.K = K;
  p.R = xa != nullptr ? R : 0;
  p.shift = 0;
  while ((int32_t(1) << p.shift) < blocksize) ++p.shift;
  return p;
}

int64_t grid_of(int64_t N) { return (N + kRowsPerBlock - 1) / kRowsPerBlock; }

template <typename T, int MT>
cudaError_t launch_mt(const GemvParams& p, const float* code16, cudaStream_t s) {
  gemv4bit_kernel<T, MT><<<dim3(static_cast<unsigned>(grid_of(p.N))), dim3(kWarps * kWarp), 0, s>>>(p, code16);
  return cudaGetLastError();
}

// The row capacity MT (registers: kRows * MT accumulators) is the smallest of 1, 4, 8, 16 >= M.
template <typename T>
cudaError_t launch(const GemvParams& p, const float* code16, cudaStream_t s) {
  if (p.M == 1) return launch_mt<T, 1>(p, code16, s);
  if (p.M <= 4) return launch_mt<T, 4>(p, code16, s);
  if (p.M <= 8) return launch_mt<T, 8>(p, code16, s);
  return launch_mt<T, 16>(p, code16, s);
}

#ifdef PK_HOST_EMULATION
// One warp on the CPU: the 32 lanes' bodies, then the device's butterfly (lane l adds lane
// l ^ off's value, off = 16, 8, 4, 2, 1) so lane 0 sums in the GPU's order.
template <typename T, int MT>
void emulate_mt(const GemvParams& p, const float* code16) {
  float code[16];
  memcpy(code, code16, sizeof(code));
  float acc[kWarp][kRows][MT];
  float tmp[kWarp][kRows][MT];
  const int64_t nwarps = grid_of(p.N) * kWarps;
  for (int64_t wi = 0; wi < nwarps; ++wi) {
    const int64_t row0 = wi * kRows;
    if (row0 >= p.N) break;
    for (int l = 0; l < kWarp; ++l) lane_partial<T, MT>(p, code, row0, l, acc[l]);
    for (int off = kWarp / 2; off > 0; off /= 2) {
      for (int l = 0; l < kWarp; ++l)
        for (int r = 0; r < kRows; ++r)
          for (int m = 0; m < MT; ++m) tmp[l][r][m] = acc[l][r][m] + acc[l ^ off][r][m];
      memcpy(acc, tmp, sizeof(tmp));
    }
    store_rows<T, MT>(p, row0, acc[0]);
  }
}

template <typename T>
void emulate(const GemvParams& p, const float* code16) {
  if (p.M == 1) return emulate_mt<T, 1>(p, code16);
  if (p.M <= 4) return emulate_mt<T, 4>(p, code16);
  if (p.M <= 8) return emulate_mt<T, 8>(p, code16);
  return emulate_mt<T, 16>(p, code16);
}
#endif

}  // namespace

extern "C" {

PK_API int pk_gemv_4bit(const void* x, int32_t x_dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                        const void* absmax, const float* nested_absmax, const float* nested_code,
                        float nested_offset, const float* code16, int32_t blocksize, const float* bias,
                        const void* xa, const void* lora_B, int64_t R, float scale, void* y, void* stream) {
  const int rc = validate(x, x_dtype, M, N, K, packed, absmax, nested_absmax, nested_code, code16, blocksize, xa,
                          lora_B, R, y);
  if (rc != PK_OK) return rc;
  const GemvParams p = make_params(x, M, N, K, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                   bias, xa, lora_B, R, scale, y);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (x_dtype) {
    case PK_DTYPE_F32: err = launch<float>(p, code16, s); break;
    case PK_DTYPE_F16: err = launch<__half>(p, code16, s); break;
    default: err = launch<__nv_bfloat16>(p, code16, s); break;
  }
  if (err != cudaSuccess)
    return set_error(PK_ERR_CUDA, "pk_gemv_4bit: kernel launch failed: %s (%s)", cudaGetErrorName(err),
                     cudaGetErrorString(err));
  return ok();
}

#ifdef PK_HOST_EMULATION
// Test-only (built only with -DPK_HOST_EMULATION): pk_gemv_4bit's validation and per-lane code
// run on the CPU over host pointers, warp by warp.
PK_API int pk_emulate_gemv_4bit(const void* x, int32_t x_dtype, int64_t M, int64_t N, int64_t K,
                                const uint8_t* packed, const void* absmax, const float* nested_absmax,
                                const float* nested_code, float nested_offset, const float* code16,
                                int32_t blocksize, const float* bias, const void* xa, const void* lora_B, int64_t R,
                                float scale, void* y) {
  const int rc = validate(x, x_dtype, M, N, K, packed, absmax, nested_absmax, nested_code, code16, blocksize, xa,
                          lora_B, R, y);
  if (rc != PK_OK) return rc;
  const GemvParams p = make_params(x, M, N, K, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                   bias, xa, lora_B, R, scale, y);
  switch (x_dtype) {
    case PK_DTYPE_F32: emulate<float>(p, code16); break;
    case PK_DTYPE_F16: emulate<__half>(p, code16); break;
    default: emulate<__nv_bfloat16>(p, code16); break;
  }
  return ok();
}
#endif

}  // extern "C"
