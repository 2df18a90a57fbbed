/*
 * peft_kernels CUDA C library: C ABI.
 *
 * Built by peft_kernels/csrc_build.py into peft_kernels/_cuda/libpeft_kernels_cuda.so
 * and loaded from Python with ctypes (peft_kernels/ops/cuda_lib.py). The library
 * links the CUDA runtime statically and exports only the pk_* symbols below, so it
 * depends on neither Python nor torch and can be carried to any machine whose
 * driver supports the CUDA version it was compiled with.
 *
 * Rules every entry point follows:
 *   - All tensor arguments are raw device pointers to caller-owned memory. The
 *     library never allocates device or host memory and never synchronizes: work
 *     is enqueued on the caller's stream and the function returns at once.
 *   - Work is launched into the CUDA context current on the calling thread
 *     (torch makes the tensors' device current inside a `torch.cuda.device`
 *     guard); all pointers must belong to that device.
 *   - The return value is 0 on success or one of the PK_ERR_* codes below;
 *     pk_last_error() then describes the failure. Sizes of the buffers cannot be
 *     checked here: the caller guarantees them (the Python wrapper does).
 *   - Thread-safe: no global mutable state besides the per-thread error text.
 */
#ifndef PEFT_KERNELS_H
#define PEFT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PK_API __declspec(dllexport)
#else
#define PK_API __attribute__((visibility("default")))
#endif

/* Bumped on every incompatible change of this header; the Python loader refuses
 * a library whose pk_version() differs from the one it was written for. */
#define PK_VERSION 2

/* Return codes. */
#define PK_OK 0
#define PK_ERR_NULL_POINTER 1   /* a required pointer argument is NULL */
#define PK_ERR_BLOCKSIZE 2      /* blocksize not a power of two in [32, 4096] */
#define PK_ERR_NUMEL 3          /* numel <= 0 */
#define PK_ERR_DTYPE 4          /* out_dtype not one of PK_DTYPE_* */
#define PK_ERR_CUDA 5           /* the CUDA runtime reported an error at launch */
#define PK_ERR_SHAPE 6          /* a size argument is out of range (M, N, K, R) */
#define PK_ERR_ALIGN 7          /* a pointer lacks the alignment the kernel's vector loads need */

/* Output dtypes. */
#define PK_DTYPE_F32 0
#define PK_DTYPE_F16 1
#define PK_DTYPE_BF16 2

/*
 * Dequantize a blockwise 4-bit tensor (NF4/FP4 bytes as bitsandbytes writes them):
 *
 *     out[i] = convert(code16[q_i] * absmax[i / blocksize]),   0 <= i < numel
 *
 * where q_i is the high nibble of packed[i / 2] for even i and the low nibble for
 * odd i. The product is formed in float32 and converted to out_dtype with
 * round-to-nearest-even, so the result is bit-identical to
 * peft_kernels.ops.reference.dequantize_4bit.
 *
 *   packed     uint8  [(numel + 1) / 2]            device
 *   absmax     float  [ceil(numel / blocksize)]    device
 *   code16     float  [16]                         device (the code book)
 *   numel      > 0; any value (odd, last block partial)
 *   blocksize  power of two in [32, 4096]
 *   out_dtype  PK_DTYPE_F32 / PK_DTYPE_F16 / PK_DTYPE_BF16
 *   out        [numel] elements of out_dtype       device; exactly numel written
 *   stream     cudaStream_t to enqueue on (NULL: the legacy default stream)
 *
 * Fast path when out is 16-byte aligned and packed is 2-byte (f32) or 4-byte
 * (f16/bf16) aligned; any other alignment takes a slower byte-wise path.
 */
PK_API int pk_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16,
                              int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                              void* stream);

/*
 * Fused 4-bit GEMV for decode (M <= 16 rows), with an optional bias and LoRA term:
 *
 *     y[m, n] = sum_k x[m, k] * W[n, k]  +  bias[n]  +  scale * sum_j xa[m, j] * lora_B[n, j]
 *
 * where W[n, k] = code16[q] * absmax_f32[(n*K + k) / blocksize] is element n*K + k of the
 * blockwise 4-bit tensor (as in pk_dequantize_4bit; NF4 or FP4: the code book is an argument),
 * formed in float32 and never rounded to x's dtype. Products and sums are float32; y is
 * rounded once to x's dtype (round-to-nearest-even).
 *
 *   x          [M, K] of x_dtype, row-major, 16-byte aligned              device
 *   x_dtype    PK_DTYPE_F32 / PK_DTYPE_F16 / PK_DTYPE_BF16 (also the dtype of y and lora_B)
 *   M          1 <= M <= 16
 *   N          >= 1 (any value)
 *   K          >= 32, a multiple of 32 (each 16-byte load is 32 weights of one row inside one
 *              quantization block); K need not be a multiple of blocksize (blocks may span rows)
 *   packed     uint8 [N*K / 2], 16-byte aligned                            device
 *   absmax     float32 [ceil(N*K / blocksize)]         when nested_absmax is NULL, else
 *              uint8 codes [ceil(N*K / blocksize)]: absmax_f32[i] = nested_code[absmax[i]] *
 *              nested_absmax[i / 256] + nested_offset (double quantization)          device
 *   nested_absmax  float32 [ceil(nblocks / 256)] or NULL;  nested_code float32 [256] or NULL
 *   code16     float32 [16]                                                device
 *   blocksize  power of two in [32, 4096]
 *   bias       float32 [N] or NULL                                         device
 *   xa         [M, R] of x_dtype, row-major, or NULL (no LoRA term)        device
 *   lora_B     [N, R] of x_dtype, row-major, or NULL (NULL exactly when xa is)       device
 *   R          >= 1 with a LoRA term, else ignored;   scale: the LoRA scale
 *   y          [M, N] of x_dtype, row-major; every element written exactly once     device
 *   stream     cudaStream_t to enqueue on (NULL: the legacy default stream)
 *
 * Launch: 128-thread blocks, one warp per 2 output rows; each lane reads 16 bytes per row
 * per step, so a warp reads 512 contiguous bytes of each of its rows per step.
 */
PK_API int pk_gemv_4bit(const void* x, int32_t x_dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                        const void* absmax, const float* nested_absmax, const float* nested_code,
                        float nested_offset, const float* code16, int32_t blocksize, const float* bias,
                        const void* xa, const void* lora_B, int64_t R, float scale, void* y, void* stream);

/* Message describing the outcome of the last pk_* call on this thread: "" after
 * success. Valid until the next pk_* call on the same thread; never NULL. */
PK_API const char* pk_last_error(void);

/* PK_VERSION of the compiled library. */
PK_API int pk_version(void);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_KERNELS_H */
