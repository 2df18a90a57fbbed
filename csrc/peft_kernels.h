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
#define PK_VERSION 1

/* Return codes. */
#define PK_OK 0
#define PK_ERR_NULL_POINTER 1   /* a required pointer argument is NULL */
#define PK_ERR_BLOCKSIZE 2      /* blocksize not a power of two in [32, 4096] */
#define PK_ERR_NUMEL 3          /* numel <= 0 */
#define PK_ERR_DTYPE 4          /* out_dtype not one of PK_DTYPE_* */
#define PK_ERR_CUDA 5           /* the CUDA runtime reported an error at launch */

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

/* Message describing the outcome of the last pk_* call on this thread: "" after
 * success. Valid until the next pk_* call on the same thread; never NULL. */
PK_API const char* pk_last_error(void);

/* PK_VERSION of the compiled library. */
PK_API int pk_version(void);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_KERNELS_H */
