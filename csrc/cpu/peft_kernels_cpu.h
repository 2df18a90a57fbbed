/*
 * peft_kernels CPU C library (libpeft_kernels_cpu.so): the C ABI.
 *
 * Rules (the same as the CUDA library's, csrc/peft_kernels.h):
 *   - Plain C, no torch headers; loaded with ctypes by peft_kernels/ops/cpu_lib.py.
 *   - No allocation: the caller passes every buffer (host memory).
 *   - The return value is 0 on success or one of the PK_CPU_ERR_* codes;
 *     pk_cpu_last_error() then describes the failure. Buffer sizes cannot be
 *     checked here: the caller guarantees them (the Python wrapper does).
 *   - Thread-safe; the only global state is the ISA cap of pk_cpu_set_max_isa
 *     (a test hook) and the per-thread error text.
 */
#ifndef PEFT_KERNELS_CPU_H
#define PEFT_KERNELS_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PK_CPU_API __declspec(dllexport)
#else
#define PK_CPU_API __attribute__((visibility("default")))
#endif

/* Bumped on every incompatible change; the Python loader refuses another value. */
#define PK_CPU_VERSION 2

/* Return codes: numerically equal to the CUDA library's PK_ERR_* for the same failures. */
#define PK_CPU_OK 0
#define PK_CPU_ERR_NULL_POINTER 1   /* a required pointer argument is NULL */
#define PK_CPU_ERR_BLOCKSIZE 2      /* blocksize not a power of two in [32, 4096] (or a bad nested_blocksize) */
#define PK_CPU_ERR_NUMEL 3          /* numel <= 0 (GEMV: m, n or k <= 0) */
#define PK_CPU_ERR_DTYPE 4          /* out_dtype not one of PK_CPU_DTYPE_* */

/* Output dtypes (same codes as the CUDA library). */
#define PK_CPU_DTYPE_F32 0
#define PK_CPU_DTYPE_F16 1
#define PK_CPU_DTYPE_BF16 2

/* Instruction-set tiers of the kernels (chosen at run time from the CPU). */
#define PK_CPU_ISA_BASELINE 0  /* portable C (any CPU) */
#define PK_CPU_ISA_AVX2 1      /* x86-64 AVX2 + F16C */
#define PK_CPU_ISA_AVX512 2    /* x86-64 AVX-512F + AVX-512BW */

/*
 * Dequantize a blockwise 4-bit tensor (NF4/FP4 bytes as bitsandbytes writes them):
 *
 *     out[i] = convert(code16[q_i] * absmax[i / blocksize]),   0 <= i < numel
 *
 * q_i is the high nibble of packed[i / 2] for even i, the low nibble for odd i.
 * The product is formed in float32 and converted to out_dtype with
 * round-to-nearest-even (torch's casts), so the result is bit-identical to
 * peft_kernels.ops.reference.dequantize_4bit (and to pk_dequantize_4bit).
 *
 *   packed       uint8 [(numel + 1) / 2]
 *   absmax       float [ceil(numel / blocksize)]
 *   code16       float [16] (the code book)
 *   numel        > 0; any value (odd, last block partial)
 *   blocksize    power of two in [32, 4096]
 *   out_dtype    PK_CPU_DTYPE_F32 / _F16 / _BF16
 *   out          [numel] elements of out_dtype; exactly numel written; no alignment needed
 *   num_threads  upper bound on threads (<= 0: the OpenMP default); small tensors use fewer
 */
PK_CPU_API int pk_cpu_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16,
                                      int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                                      int32_t num_threads);

/*
 * The same with double-quantized block scales, decoded per block as
 * peft_kernels.ops.reference.decode_absmax does (float32, product then sum):
 *
 *     absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + nested_offset
 *
 *   absmax_q          uint8 [ceil(numel / blocksize)]
 *   nested_absmax     float [ceil(nblocks / nested_blocksize)]
 *   nested_code       float [256]
 *   nested_offset     the mean absmax subtracted before nesting (already rounded to float)
 *   nested_blocksize  a power of two (bitsandbytes and peft_kernels use 256)
 */
PK_CPU_API int pk_cpu_dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q,
                                             const float* nested_absmax, const float* nested_code,
                                             float nested_offset, int32_t nested_blocksize, const float* code16,
                                             int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                                             int32_t num_threads);

/*
 * Fused products with a 4-bit weight W [n, k] (row-major, the layout above:
 * element r * k + c of the flat tensor is W[r, c]) for few rows, W never
 * materialised (see gemv_4bit_cpu.c). float32 in and out, all row-major and
 * contiguous; the decoded weights are bit-identical to pk_cpu_dequantize_4bit's
 * float32 output, the sums are float32 in a fixed order (independent of threads).
 *
 *     pk_cpu_gemv_4bit_nt:  y[m, n]  = x[m, k] · Wᵀ + bias[n]   (bias may be NULL)
 *     pk_cpu_gemv_4bit_nn:  dx[m, k] = dy[m, n] · W
 *
 * Block scales: absmax (float [ceil(n*k / blocksize)]), or absmax = NULL and the
 * double-quantized absmax_q / nested_absmax / nested_code / nested_offset /
 * nested_blocksize of pk_cpu_dequantize_4bit_nested. m, n, k > 0 (any values: k
 * odd, blocks spanning rows). Every output element is written.
 */
PK_CPU_API int pk_cpu_gemv_4bit_nt(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                   const float* nested_absmax, const float* nested_code, float nested_offset,
                                   int32_t nested_blocksize, const float* code16, int32_t blocksize, const float* x,
                                   int64_t m, int64_t n, int64_t k, const float* bias, float* y, int32_t num_threads);

PK_CPU_API int pk_cpu_gemv_4bit_nn(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                   const float* nested_absmax, const float* nested_code, float nested_offset,
                                   int32_t nested_blocksize, const float* code16, int32_t blocksize, const float* dy,
                                   int64_t m, int64_t n, int64_t k, float* dx, int32_t num_threads);

/* Message describing the last pk_cpu_* call's failure on this thread ("" after
 * success). Valid until the next pk_cpu_* call on the same thread; never NULL. */
PK_CPU_API const char* pk_cpu_last_error(void);

/* PK_CPU_VERSION of the compiled library. */
PK_CPU_API int pk_cpu_version(void);

/* The tier the kernels run with now: the best this CPU and build support, capped by pk_cpu_set_max_isa. */
PK_CPU_API int pk_cpu_isa(void);

/* Test hook: cap the tier (e.g. PK_CPU_ISA_BASELINE to test the portable code on
 * an AVX-512 machine); a negative value removes the cap. Returns pk_cpu_isa(). */
PK_CPU_API int pk_cpu_set_max_isa(int32_t max_isa);

/* Most threads a call may use: omp_get_max_threads(), or 1 in a build without OpenMP. */
PK_CPU_API int pk_cpu_max_threads(void);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_KERNELS_CPU_H */
