/*
 * Blockwise 4-bit (NF4/FP4) dequantization on the CPU: the C ABI of peft_kernels_cpu.h.
 *
 * Memory-bound like the GPU kernel: each packed byte becomes two outputs of 4 or
 * 2 bytes. A quantization block has one absmax, so only 16 distinct outputs: per
 * block the kernel forms the 16 products code[q] * absmax in float32, rounds them
 * once to the output dtype, and then every element is a table lookup by nibble.
 * That is bit-identical to converting element by element, and it keeps the
 * rounding (branchy in scalar code, several instructions for bf16) out of the
 * per-element loop. The SIMD loops take 16 packed bytes = 32 elements at a time;
 * blocksize >= 32 (a power of two) keeps such a group inside one block.
 *
 * Three tiers, picked at run time: portable C (baseline ISA, any CPU), AVX2+F16C
 * and AVX-512F+BW (compiled with target attributes, so the library itself needs
 * no -march flag). Lookups: AVX-512 vpermps (f32, the 16-float table is one
 * register) and vpermw (16-bit outputs); AVX2 two vpermps and a blend (f32) or
 * vpshufb on tables of low and high bytes (16-bit outputs). Rounding: hardware
 * conversion for f16 (exact for subnormals too), integer arithmetic for bf16
 * (VCVTNEPS2BF16 flushes subnormals; torch's cast does not).
 *
 * Threads: OpenMP, which on Linux resolves to the libgomp torch has already
 * loaded (same soname), so our threads are torch's pool, not a second one.
 */
#include "peft_kernels_cpu.h"
#include "pk_cpu_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif


/* Fewer elements than this per thread and the fork/join costs more than it saves
 * (~64 KiB of packed input, 256 KiB of f32 output per thread). */
#define PK_MIN_ELEMS_PER_THREAD (INT64_C(1) << 17)
/* Thread chunks start at multiples of this. Correctness needs only an even start
 * (a byte holds two elements); 64 also keeps whole 32-element groups in one
 * thread and cache lines apart between threads. */
#define PK_CHUNK_ALIGN 64

/* ------------------------------------------------------------ scalar code */
/* float -> IEEE half, round to nearest even, subnormals and overflow exact. */
PK_INLINE uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((ax >> 13) & 0x3FFu)); /* NaN stays quiet NaN */
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 (and inf) round to inf */
  if (ax >= 0x38800000u) {                                   /* normal half: >= 2^-14 */
    /* Rebias the exponent (127 -> 15) and round the 13 dropped bits; a carry
     * into the exponent is the correct result. */
    const uint32_t r = ax - (112u << 23) + 0xFFFu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
  }
  if (ax <= 0x33000000u) return (uint16_t)sign; /* <= 2^-25: half of the least subnormal, ties to 0 */
  /* Subnormal half: value = m * 2^(e - 150), unit 2^-24, so q = m >> (126 - e). */
  const uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e; /* 14..24 */
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q; /* may carry into the least normal: correct */
  return (uint16_t)(sign | q);
}

/* float -> bfloat16, round to nearest even (c10's round_to_nearest_even). */
PK_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof(x));
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* Every tier walks [i, end) one quantization block at a time: a block has one
 * absmax, so only 16 distinct outputs. The tier first builds that block's table
 * of 16 converted values (product in float32, then the rounding), then each
 * element is one table lookup. The table holds exactly the values the
 * element-wise formula gives, so this is bit-identical to it, and it rounds 16
 * values per block instead of one per element. */

PK_INLINE int64_t block_end(const Job* j, int64_t i, int64_t end) {
  const int64_t e = ((i >> j->shift) + 1) << j->shift;
  return e < end ? e : end;
}

/* Elements [i, seg_end) of one block from its 16-entry table of outputs: the
 * whole range in the baseline tier, the < 32-element tail in the others. */
PK_INLINE void tail_f32(const Job* j, int64_t i, int64_t seg_end, const float* lut) {
  for (; i < seg_end; i += 2) { /* i is even: i and i + 1 share a byte */
    const unsigned b = j->packed[i >> 1];
    ((float*)j->out)[i - j->base] = lut[b >> 4];
    if (i + 1 < seg_end) ((float*)j->out)[i + 1 - j->base] = lut[b & 15u];
  }
}

PK_INLINE void tail_u16(const Job* j, int64_t i, int64_t seg_end, const uint16_t* lut) {
  for (; i < seg_end; i += 2) {
    const unsigned b = j->packed[i >> 1];
    ((uint16_t*)j->out)[i - j->base] = lut[b >> 4];
    if (i + 1 < seg_end) ((uint16_t*)j->out)[i + 1 - j->base] = lut[b & 15u];
  }
}

static void base_f32(const Job* j, int64_t i, int64_t end) {
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    float lut[16];
    for (int q = 0; q < 16; ++q) lut[q] = j->code[q] * s;
    tail_f32(j, i, seg_end, lut);
  }
}

static void base_f16(const Job* j, int64_t i, int64_t end) {
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    uint16_t lut[16];
    for (int q = 0; q < 16; ++q) lut[q] = f32_to_f16(j->code[q] * s);
    tail_u16(j, i, seg_end, lut);
  }
}

static void base_bf16(const Job* j, int64_t i, int64_t end) {
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    uint16_t lut[16];
    for (int q = 0; q < 16; ++q) lut[q] = f32_to_bf16(j->code[q] * s);
    tail_u16(j, i, seg_end, lut);
  }
}

#if PK_X86
/* Shared by the SIMD tiers: 16 packed bytes at element i (even) -> the 32 nibbles
 * in element order (q0: elements 0..15, q1: 16..31), one per byte, in its low 4
 * bits; the high 4 bits are garbage unless mask is set. */
#define PK_NIBBLES(j, i, q0, q1, mask)                                                \
  const __m128i b_ = _mm_loadu_si128((const __m128i*)((j)->packed + ((i) >> 1)));     \
  __m128i hi_ = _mm_srli_epi16(b_, 4), lo_ = b_;                                      \
  if (mask) {                                                                         \
    hi_ = _mm_and_si128(hi_, _mm_set1_epi8(0x0F));                                    \
    lo_ = _mm_and_si128(lo_, _mm_set1_epi8(0x0F));                                    \
  }                                                                                   \
  const __m128i q0 = _mm_unpacklo_epi8(hi_, lo_), q1 = _mm_unpackhi_epi8(hi_, lo_);

/* -------------------------------------------------------- AVX-512F + BW */
#define PK_AVX512 __attribute__((target("avx512f,avx512bw")))

/* 16 floats -> 16 bf16 bit patterns, round to nearest even, NaN -> 0x7FC0. */
PK_INLINE PK_AVX512 __m256i avx512_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

static PK_AVX512 void avx512_f32(const Job* j, int64_t i, int64_t end) {
  const __m512 code = _mm512_loadu_ps(j->code);
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    const __m512 lut = _mm512_mul_ps(code, _mm512_set1_ps(s));
    for (; i + 32 <= seg_end; i += 32) {
      /* vpermps reads only the low 4 bits of each index: no masking needed. */
      PK_NIBBLES(j, i, q0, q1, 0)
      _mm512_storeu_ps((float*)j->out + (i - j->base), _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q0), lut));
      _mm512_storeu_ps((float*)j->out + (i - j->base) + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q1), lut));
    }
    float tail[16];
    _mm512_storeu_ps(tail, lut);
    tail_f32(j, i, seg_end, tail);
  }
}

/* f16 / bf16: the 16 converted values, twice, form a 32-entry word table for
 * vpermw, which reads the low 5 bits of each index: with the table repeated,
 * bit 4 does not matter, so again no masking. */
PK_INLINE PK_AVX512 void avx512_half(const Job* j, int64_t i, int64_t end, const int dt) {
  const __m512 code = _mm512_loadu_ps(j->code);
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(s));
    const __m256i h = dt == PK_CPU_DTYPE_F16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                             : avx512_bf16(v);
    const __m512i lut = _mm512_broadcast_i64x4(h);
    for (; i + 32 <= seg_end; i += 32) {
      PK_NIBBLES(j, i, q0, q1, 0)
      const __m512i idx = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1));
      _mm512_storeu_si512((uint16_t*)j->out + (i - j->base), _mm512_permutexvar_epi16(idx, lut));
    }
    uint16_t tail[16];
    _mm256_storeu_si256((__m256i*)tail, h);
    tail_u16(j, i, seg_end, tail);
  }
}

static PK_AVX512 void avx512_f16(const Job* j, int64_t b, int64_t e) { avx512_half(j, b, e, PK_CPU_DTYPE_F16); }
static PK_AVX512 void avx512_bf16f(const Job* j, int64_t b, int64_t e) { avx512_half(j, b, e, PK_CPU_DTYPE_BF16); }

/* ------------------------------------------------------------ AVX2 + F16C */
#define PK_AVX2 __attribute__((target("avx2,f16c")))

/* code[idx & 15] for 8 indices: vpermps on each half of the table (it reads idx & 7),
 * then bit 3 — moved to the sign bit — picks the half. */
PK_INLINE PK_AVX2 __m256 avx2_lookup(__m256 lut_lo, __m256 lut_hi, __m128i q8) {
  const __m256i idx = _mm256_cvtepu8_epi32(q8);
  const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx), hi = _mm256_permutevar8x32_ps(lut_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static PK_AVX2 void avx2_f32(const Job* j, int64_t i, int64_t end) {
  const __m256 code_lo = _mm256_loadu_ps(j->code), code_hi = _mm256_loadu_ps(j->code + 8);
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    const __m256 sv = _mm256_set1_ps(s);
    const __m256 lo = _mm256_mul_ps(code_lo, sv), hi = _mm256_mul_ps(code_hi, sv);
    for (; i + 32 <= seg_end; i += 32) {
      PK_NIBBLES(j, i, q0, q1, 0) /* bits 4-7 are shifted out or ignored in avx2_lookup */
      float* o = (float*)j->out + (i - j->base);
      _mm256_storeu_ps(o, avx2_lookup(lo, hi, q0));
      _mm256_storeu_ps(o + 8, avx2_lookup(lo, hi, _mm_srli_si128(q0, 8)));
      _mm256_storeu_ps(o + 16, avx2_lookup(lo, hi, q1));
      _mm256_storeu_ps(o + 24, avx2_lookup(lo, hi, _mm_srli_si128(q1, 8)));
    }
    float tail[16];
    _mm256_storeu_ps(tail, lo);
    _mm256_storeu_ps(tail + 8, hi);
    tail_f32(j, i, seg_end, tail);
  }
}

PK_INLINE PK_AVX2 __m128i avx2_bf16(__m256 v) { /* 8 floats -> 8 bf16, as avx512_bf16 */
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  /* packus works per 128-bit lane; values fit (<= 0xFFFF). */
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* f16 / bf16: the 16 converted values split into a table of low bytes and one of
 * high bytes; vpshufb looks 32 nibbles up in each (it zeroes a byte whose index
 * has bit 7 set, hence the masking), and interleaving the two gives the words. */
PK_INLINE PK_AVX2 void avx2_half(const Job* j, int64_t i, int64_t end, const int dt) {
  const __m256 code_lo = _mm256_loadu_ps(j->code), code_hi = _mm256_loadu_ps(j->code + 8);
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t seg_end; i < end; i = seg_end) {
    seg_end = block_end(j, i, end);
    const float s = block_scale(j, i >> j->shift);
    const __m256 sv = _mm256_set1_ps(s);
    const __m256 vlo = _mm256_mul_ps(code_lo, sv), vhi = _mm256_mul_ps(code_hi, sv);
    const __m128i h0 = dt == PK_CPU_DTYPE_F16 ? _mm256_cvtps_ph(vlo, rne) : avx2_bf16(vlo); /* entries 0-7 */
    const __m128i h1 = dt == PK_CPU_DTYPE_F16 ? _mm256_cvtps_ph(vhi, rne) : avx2_bf16(vhi); /* 8-15 */
    const __m128i s0 = _mm_shuffle_epi8(h0, split), s1 = _mm_shuffle_epi8(h1, split);
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1));
    for (; i + 32 <= seg_end; i += 32) {
      PK_NIBBLES(j, i, q0, q1, 1)
      const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
      const __m256i lb = _mm256_shuffle_epi8(tlo, q), hb = _mm256_shuffle_epi8(thi, q);
      const __m256i w0 = _mm256_unpacklo_epi8(lb, hb), w1 = _mm256_unpackhi_epi8(lb, hb); /* per lane */
      uint16_t* o = (uint16_t*)j->out + (i - j->base);
      _mm256_storeu_si256((__m256i*)o, _mm256_permute2x128_si256(w0, w1, 0x20));
      _mm256_storeu_si256((__m256i*)(o + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
    }
    uint16_t tail[16];
    _mm_storeu_si128((__m128i*)tail, h0);
    _mm_storeu_si128((__m128i*)(tail + 8), h1);
    tail_u16(j, i, seg_end, tail);
  }
}

static PK_AVX2 void avx2_f16(const Job* j, int64_t b, int64_t e) { avx2_half(j, b, e, PK_CPU_DTYPE_F16); }
static PK_AVX2 void avx2_bf16f(const Job* j, int64_t b, int64_t e) { avx2_half(j, b, e, PK_CPU_DTYPE_BF16); }
#endif /* PK_X86 */

/* ------------------------------------------------------------- dispatch */
static int detect_isa(void) {
#if PK_X86
  __builtin_cpu_init();
  /* libgcc's checks include the OS's XSAVE support for the wider registers. */
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return PK_CPU_ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return PK_CPU_ISA_AVX2;
#endif
  return PK_CPU_ISA_BASELINE;
}

static int g_detected = -1; /* cached detect_isa(); racing first calls store the same value */
static int g_max_isa = -1;  /* cap from pk_cpu_set_max_isa; -1: none */

static int active_isa(void) {
  int d = __atomic_load_n(&g_detected, __ATOMIC_RELAXED);
  if (d < 0) {
    d = detect_isa();
    __atomic_store_n(&g_detected, d, __ATOMIC_RELAXED);
  }
  const int cap = __atomic_load_n(&g_max_isa, __ATOMIC_RELAXED);
  return (cap >= 0 && cap < d) ? cap : d;
}

static RangeFn pick(int isa, int dt) {
  static const RangeFn table[3][3] = {
      {base_f32, base_f16, base_bf16},
#if PK_X86
      {avx2_f32, avx2_f16, avx2_bf16f},
      {avx512_f32, avx512_f16, avx512_bf16f},
#else
      {base_f32, base_f16, base_bf16},
      {base_f32, base_f16, base_bf16},
#endif
  };
  return table[isa][dt];
}

/* ---------------------------------------------------------------- errors */
static _Thread_local char g_error[512];


static int ok(void) {
  g_error[0] = '\0';
  return PK_CPU_OK;
}

static int max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

static int is_pow2_in(int32_t v, int32_t lo, int32_t hi) { return v >= lo && v <= hi && (v & (v - 1)) == 0; }

static int log2i(int32_t v) {
  int k = 0;
  while ((INT32_C(1) << k) < v) ++k;
  return k;
}

static int check_common(const char* fn, const uint8_t* packed, const float* code16, int64_t numel, int32_t blocksize,
                        int32_t out_dtype, const void* out) {
  if (!packed || !code16 || !out)
    return pk_cpu_set_error(PK_CPU_ERR_NULL_POINTER, "%s: null pointer (packed=%p code16=%p out=%p)", fn,
                     (const void*)packed, (const void*)code16, out);
  if (!is_pow2_in(blocksize, 32, 4096))
    return pk_cpu_set_error(PK_CPU_ERR_BLOCKSIZE, "%s: blocksize %d is not a power of two in [32, 4096]", fn, (int)blocksize);
  if (numel <= 0) return pk_cpu_set_error(PK_CPU_ERR_NUMEL, "%s: numel must be > 0, got %lld", fn, (long long)numel);
  if (out_dtype != PK_CPU_DTYPE_F32 && out_dtype != PK_CPU_DTYPE_F16 && out_dtype != PK_CPU_DTYPE_BF16)
    return pk_cpu_set_error(PK_CPU_ERR_DTYPE, "%s: out_dtype %d is not 0 (f32), 1 (f16) or 2 (bf16)", fn, (int)out_dtype);
  return PK_CPU_OK;
}

static int run(const Job* job, int64_t numel, int32_t out_dtype, int32_t num_threads) {
  const RangeFn fn = pick(active_isa(), out_dtype);
  int64_t nt = num_threads > 0 ? num_threads : max_threads();
  const int64_t by_size = (numel + PK_MIN_ELEMS_PER_THREAD - 1) / PK_MIN_ELEMS_PER_THREAD;
  if (nt > by_size) nt = by_size;
  if (nt <= 1) {
    fn(job, 0, numel);
    return ok();
  }
  /* One contiguous chunk per thread: the work is uniform, and each thread streams
   * its own part of the input and output. */
  const int64_t chunk = ((numel + nt - 1) / nt + PK_CHUNK_ALIGN - 1) / PK_CHUNK_ALIGN * PK_CHUNK_ALIGN;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)nt) schedule(static, 1)
#endif
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t b = t * chunk;
    const int64_t e = b + chunk < numel ? b + chunk : numel;
    if (b < e) fn(job, b, e);
  }
  return ok();
}

PK_CPU_API int pk_cpu_dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16,
                                      int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                                      int32_t num_threads) {
  static const char fn[] = "pk_cpu_dequantize_4bit";
  if (!absmax) return pk_cpu_set_error(PK_CPU_ERR_NULL_POINTER, "%s: null pointer (absmax)", fn);
  const int rc = check_common(fn, packed, code16, numel, blocksize, out_dtype, out);
  if (rc != PK_CPU_OK) return rc;
  Job job = {0};
  job.packed = packed;
  job.absmax = absmax;
  job.code = code16;
  job.out = out;
  job.shift = log2i(blocksize);
  return run(&job, numel, out_dtype, num_threads);
}

PK_CPU_API int pk_cpu_dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_q,
                                             const float* nested_absmax, const float* nested_code,
                                             float nested_offset, int32_t nested_blocksize, const float* code16,
                                             int64_t numel, int32_t blocksize, int32_t out_dtype, void* out,
                                             int32_t num_threads) {
  static const char fn[] = "pk_cpu_dequantize_4bit_nested";
  if (!absmax_q || !nested_absmax || !nested_code)
    return pk_cpu_set_error(PK_CPU_ERR_NULL_POINTER, "%s: null pointer (absmax_q=%p nested_absmax=%p nested_code=%p)", fn,
                     (const void*)absmax_q, (const void*)nested_absmax, (const void*)nested_code);
  const int rc = check_common(fn, packed, code16, numel, blocksize, out_dtype, out);
  if (rc != PK_CPU_OK) return rc;
  if (!is_pow2_in(nested_blocksize, 1, INT32_C(1) << 30))
    return pk_cpu_set_error(PK_CPU_ERR_BLOCKSIZE, "%s: nested_blocksize %d is not a power of two", fn, (int)nested_blocksize);
  Job job = {0};
  job.packed = packed;
  job.absmax_q = absmax_q;
  job.nested_absmax = nested_absmax;
  job.nested_code = nested_code;
  job.nested_offset = nested_offset;
  job.nested_shift = log2i(nested_blocksize);
  job.code = code16;
  job.out = out;
  job.shift = log2i(blocksize);
  return run(&job, numel, out_dtype, num_threads);
}

PK_CPU_API const char* pk_cpu_last_error(void) { return g_error; }

PK_CPU_API int pk_cpu_version(void) { return PK_CPU_VERSION; }

PK_CPU_API int pk_cpu_isa(void) { return active_isa(); }

PK_CPU_API int pk_cpu_set_max_isa(int32_t max_isa) {
  __atomic_store_n(&g_max_isa, max_isa < 0 ? -1 : (int)max_isa, __ATOMIC_RELAXED);
  return active_isa();
}

PK_CPU_API int pk_cpu_max_threads(void) { return max_threads(); }

/* ------------------------------------------- internal: shared with gemv_4bit_cpu.c */
RangeFn pk_cpu_range_fn(int32_t out_dtype) { return pick(active_isa(), out_dtype); }

int pk_cpu_active_isa(void) { return active_isa(); }

int pk_cpu_set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

int pk_cpu_ok(void) { return ok(); }

int pk_cpu_omp_threads(void) { return max_threads(); }

int pk_cpu_is_pow2_in(int32_t v, int32_t lo, int32_t hi) { return is_pow2_in(v, lo, hi); }

int pk_cpu_log2i(int32_t v) { return log2i(v); }
