/*
 * Internal to libpeft_kernels_cpu.so (not the C ABI; hidden symbols): what the
 * dequantization (dequant_4bit_cpu.c) shares with the fused GEMV (gemv_4bit_cpu.c).
 */
#ifndef PK_CPU_INTERNAL_H
#define PK_CPU_INTERNAL_H

#include <stdint.h>

/* -DPK_CPU_PORTABLE_ONLY builds only the portable tier: how a non-x86 build is checked on x86. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(PK_CPU_PORTABLE_ONLY)
#define PK_X86 1
#include <immintrin.h>
#else
#define PK_X86 0
#endif

#define PK_INLINE static inline __attribute__((always_inline))

typedef struct {
  const uint8_t* packed;
  const float* absmax; /* float scales, or NULL with double quantization: */
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float nested_offset;
  int nested_shift; /* log2(nested_blocksize) */
  const float* code;
  void* out;
  int64_t base; /* the element index out[0] holds: 0 for a whole tensor, a span's start in the GEMV */
  int shift; /* log2(blocksize) */
} Job;

/* Dequantize elements [begin, end) into out[begin - base ...]: begin is even (a byte
 * holds two elements); the SIMD groups of 32 never cross a block (blocksize >= 32). */
typedef void (*RangeFn)(const Job*, int64_t begin, int64_t end);

/* The float32 scale of quantization block ``blk``. */
PK_INLINE float block_scale(const Job* j, int64_t blk) {
  if (j->absmax) return j->absmax[blk];
  /* Double quantization, decoded as reference.decode_absmax does: two float32
   * roundings, product then sum (the build passes -ffp-contract=off so that the
   * compiler does not fuse them into one FMA rounding). */
  const float t = j->nested_code[j->absmax_q[blk]] * j->nested_absmax[blk >> j->nested_shift];
  return t + j->nested_offset;
}

/* The dequantizer of the active tier (best ISA, capped by pk_cpu_set_max_isa) for an output dtype. */
RangeFn pk_cpu_range_fn(int32_t out_dtype);
/* PK_CPU_ISA_* the kernels run with now. */
int pk_cpu_active_isa(void);
/* Record the thread's error text; returns ``code``. */
int pk_cpu_set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
/* Clear the error text; returns PK_CPU_OK. */
int pk_cpu_ok(void);
/* omp_get_max_threads(), 1 without OpenMP. */
int pk_cpu_omp_threads(void);
int pk_cpu_is_pow2_in(int32_t v, int32_t lo, int32_t hi);
/* log2 of a power of two. */
int pk_cpu_log2i(int32_t v);

#endif /* PK_CPU_INTERNAL_H */
