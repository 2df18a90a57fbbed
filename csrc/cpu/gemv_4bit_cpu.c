/*
 * Fused 4-bit GEMV-like products on the CPU for few rows (decode, small batches):
 *
 *     pk_cpu_gemv_4bit_nt:  y[M, N]  = x[M, K] · W[N, K]ᵀ (+ bias[N])
 *     pk_cpu_gemv_4bit_nn:  dx[M, K] = dy[M, N] · W[N, K]
 *
 * W is never materialised: each thread decodes W a span of at most PK_SPAN
 * elements at a time into a float32 buffer on its stack (L1-resident) with the
 * dequantization tier in use (dequant_4bit_cpu.c, so the decoded values are
 * bit-identical to pk_cpu_dequantize_4bit's), then runs the M dot products (nt)
 * or M axpys (nn) over that buffer. Per call the 4-bit bytes are read once,
 * where dequantize-then-matmul writes and re-reads a float32 copy of W (8x the
 * bytes): for few rows the product is bound by that traffic.
 *
 * Threads: nt splits the output features N (each thread owns whole rows of W and
 * columns of y); nn splits K (each thread owns a column strip of dx and walks
 * every row of W inside it), so no two threads write the same output and no
 * reduction is needed. Sums run in float32 in a fixed order (per span, 8 or 16
 * lanes, then across spans), so results do not depend on the thread count.
 */
#include "peft_kernels_cpu.h"
#include "pk_cpu_internal.h"

#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements of W decoded per step: 2 KiB of float32, which stays in L1 with the x rows it meets. */
#define PK_SPAN 512
/* Below this many weights per thread the fork/join costs more than the work. */
#define PK_MIN_WEIGHTS_PER_THREAD (INT64_C(1) << 16)

/* Decode W's elements [e0, e1) into buf[0 .. e1 - e0) as float32. An odd e0 (a row
 * start when K is odd) is the low nibble of its byte: done here, the tier then
 * starts on the next (even) element. */
static void decode_span(const Job* w, RangeFn fn, int64_t e0, int64_t e1, float* buf) {
  if (e0 & 1) {
    buf[0] = w->code[w->packed[e0 >> 1] & 15u] * block_scale(w, e0 >> w->shift);
    ++buf;
    if (++e0 >= e1) return;
  }
  Job j = *w;
  j.out = buf;
  j.base = e0;
  fn(&j, e0, e1);
}

/* ---------------------------------------------------- dot and axpy, per tier */
typedef float (*DotFn)(const float* a, const float* b, int64_t n);
typedef void (*AxpyFn)(float* y, float s, const float* x, int64_t n);

static float dot_base(const float* a, const float* b, int64_t n) {
  float lane[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += a[i + l] * b[i + l];
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static void axpy_base(float* y, float s, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

#if PK_X86
#define PK_AVX2 __attribute__((target("avx2")))
#define PK_AVX512 __attribute__((target("avx512f")))

static PK_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8)));
  }
  float lane[8];
  _mm256_storeu_ps(lane, _mm256_add_ps(acc0, acc1));
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static PK_AVX2 void axpy_avx2(float* y, float s, const float* x, int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(sv, _mm256_loadu_ps(x + i))));
  for (; i < n; ++i) y[i] += s * x[i];
}

static PK_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static PK_AVX512 void axpy_avx512(float* y, float s, const float* x, int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(sv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += s * x[i];
}
#endif

static DotFn pick_dot(void) {
#if PK_X86
  const int isa = pk_cpu_active_isa();
  if (isa >= PK_CPU_ISA_AVX512) return dot_avx512;
  if (isa >= PK_CPU_ISA_AVX2) return dot_avx2;
#endif
  return dot_base;
}

static AxpyFn pick_axpy(void) {
#if PK_X86
  const int isa = pk_cpu_active_isa();
  if (isa >= PK_CPU_ISA_AVX512) return axpy_avx512;
  if (isa >= PK_CPU_ISA_AVX2) return axpy_avx2;
#endif
  return axpy_base;
}

/* ------------------------------------------------------------- arguments */
typedef struct {
  Job w;      /* the 4-bit weight (out/base unused) */
  int64_t m, n, k;
} Gemv;

static int check_args(const char* fn, Gemv* g, const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                      const float* nested_absmax, const float* nested_code, float nested_offset,
                      int32_t nested_blocksize, const float* code16, int32_t blocksize, const float* in, int64_t m,
                      int64_t n, int64_t k, const void* out) {
  if (!packed || !code16 || !in || !out)
    return pk_cpu_set_error(PK_CPU_ERR_NULL_POINTER, "%s: null pointer (packed=%p code16=%p input=%p out=%p)", fn,
                            (const void*)packed, (const void*)code16, (const void*)in, out);
  if (!absmax && (!absmax_q || !nested_absmax || !nested_code))
    return pk_cpu_set_error(PK_CPU_ERR_NULL_POINTER,
                            "%s: give absmax, or absmax_q + nested_absmax + nested_code (double quantization)", fn);
  if (!pk_cpu_is_pow2_in(blocksize, 32, 4096))
    return pk_cpu_set_error(PK_CPU_ERR_BLOCKSIZE, "%s: blocksize %d is not a power of two in [32, 4096]", fn,
                            (int)blocksize);
  if (!absmax && !pk_cpu_is_pow2_in(nested_blocksize, 1, INT32_C(1) << 30))
    return pk_cpu_set_error(PK_CPU_ERR_BLOCKSIZE, "%s: nested_blocksize %d is not a power of two", fn,
                            (int)nested_blocksize);
  if (m <= 0 || n <= 0 || k <= 0)
    return pk_cpu_set_error(PK_CPU_ERR_NUMEL, "%s: m, n, k must be > 0, got %lld, %lld, %lld", fn, (long long)m,
                            (long long)n, (long long)k);
  memset(g, 0, sizeof(*g));
  g->w.packed = packed;
  g->w.absmax = absmax;
  g->w.absmax_q = absmax_q;
  g->w.nested_absmax = nested_absmax;
  g->w.nested_code = nested_code;
  g->w.nested_offset = nested_offset;
  g->w.nested_shift = absmax ? 0 : pk_cpu_log2i(nested_blocksize);
  g->w.code = code16;
  g->w.shift = pk_cpu_log2i(blocksize);
  g->m = m;
  g->n = n;
  g->k = k;
  return PK_CPU_OK;
}

static int64_t thread_count(int32_t num_threads, int64_t weights, int64_t units) {
  int64_t nt = num_threads > 0 ? num_threads : pk_cpu_omp_threads();
  const int64_t by_size = (weights + PK_MIN_WEIGHTS_PER_THREAD - 1) / PK_MIN_WEIGHTS_PER_THREAD;
  if (nt > by_size) nt = by_size;
  if (nt > units) nt = units;
  return nt < 1 ? 1 : nt;
}

/* ---------------------------------------------------------------- x · Wᵀ */
/* Output features [r0, r1): y[:, r] = x · W[r, :] + bias[r]. */
static void nt_rows(const Gemv* g, const float* x, const float* bias, float* y, int64_t r0, int64_t r1) {
  const RangeFn fn = pk_cpu_range_fn(PK_CPU_DTYPE_F32);
  const DotFn dot = pick_dot();
  float buf[PK_SPAN];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = 0; i < g->m; ++i) y[i * g->n + r] = 0.0f;
    for (int64_t k0 = 0; k0 < g->k; k0 += PK_SPAN) {
      const int64_t len = g->k - k0 < PK_SPAN ? g->k - k0 : PK_SPAN;
      decode_span(&g->w, fn, r * g->k + k0, r * g->k + k0 + len, buf);
      for (int64_t i = 0; i < g->m; ++i) y[i * g->n + r] += dot(x + i * g->k + k0, buf, len);
    }
    if (bias)
      for (int64_t i = 0; i < g->m; ++i) y[i * g->n + r] += bias[r];
  }
}

PK_CPU_API int pk_cpu_gemv_4bit_nt(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                   const float* nested_absmax, const float* nested_code, float nested_offset,
                                   int32_t nested_blocksize, const float* code16, int32_t blocksize, const float* x,
                                   int64_t m, int64_t n, int64_t k, const float* bias, float* y,
                                   int32_t num_threads) {
  Gemv g;
  const int rc = check_args("pk_cpu_gemv_4bit_nt", &g, packed, absmax, absmax_q, nested_absmax, nested_code,
                            nested_offset, nested_blocksize, code16, blocksize, x, m, n, k, y);
  if (rc != PK_CPU_OK) return rc;
  const int64_t nt = thread_count(num_threads, n * k, n);
  if (nt <= 1) {
    nt_rows(&g, x, bias, y, 0, n);
    return pk_cpu_ok();
  }
  const int64_t chunk = (n + nt - 1) / nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)nt) schedule(static, 1)
#endif
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t r0 = t * chunk, r1 = r0 + chunk < n ? r0 + chunk : n;
    if (r0 < r1) nt_rows(&g, x, bias, y, r0, r1);
  }
  return pk_cpu_ok();
}

/* ----------------------------------------------------------------- dY · W */
/* Columns [c0, c1) of dx: dx[:, c] = Σ_r dy[:, r] · W[r, c], rows of W in order. */
static void nn_cols(const Gemv* g, const float* dy, float* dx, int64_t c0, int64_t c1) {
  const RangeFn fn = pk_cpu_range_fn(PK_CPU_DTYPE_F32);
  const AxpyFn axpy = pick_axpy();
  float buf[PK_SPAN];
  for (int64_t i = 0; i < g->m; ++i) memset(dx + i * g->k + c0, 0, (size_t)(c1 - c0) * sizeof(float));
  for (int64_t s0 = c0; s0 < c1; s0 += PK_SPAN) {  /* strip by strip: the dx strip stays in cache over all rows */
    const int64_t len = c1 - s0 < PK_SPAN ? c1 - s0 : PK_SPAN;
    for (int64_t r = 0; r < g->n; ++r) {
      decode_span(&g->w, fn, r * g->k + s0, r * g->k + s0 + len, buf);
      for (int64_t i = 0; i < g->m; ++i) axpy(dx + i * g->k + s0, dy[i * g->n + r], buf, len);
    }
  }
}

PK_CPU_API int pk_cpu_gemv_4bit_nn(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                                   const float* nested_absmax, const float* nested_code, float nested_offset,
                                   int32_t nested_blocksize, const float* code16, int32_t blocksize, const float* dy,
                                   int64_t m, int64_t n, int64_t k, float* dx, int32_t num_threads) {
  Gemv g;
  const int rc = check_args("pk_cpu_gemv_4bit_nn", &g, packed, absmax, absmax_q, nested_absmax, nested_code,
                            nested_offset, nested_blocksize, code16, blocksize, dy, m, n, k, dx);
  if (rc != PK_CPU_OK) return rc;
  /* Column strips are whole 64-element units (even starts within a row; cache lines apart). */
  const int64_t units = (k + 63) / 64;
  const int64_t nt = thread_count(num_threads, n * k, units);
  if (nt <= 1) {
    nn_cols(&g, dy, dx, 0, k);
    return pk_cpu_ok();
  }
  const int64_t chunk = (units + nt - 1) / nt * 64;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)nt) schedule(static, 1)
#endif
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t c0 = t * chunk, c1 = c0 + chunk < k ? c0 + chunk : k;
    if (c0 < c1) nn_cols(&g, dy, dx, c0, c1);
  }
  return pk_cpu_ok();
}
