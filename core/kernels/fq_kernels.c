/* FlatQuant Studio native CPU kernels, loaded through ctypes. One source for every CPU: the x86 code paths are
 * compiled with per-function target attributes (no -m flags), so one library holds them all and fq_set_isa picks
 * one at run time from the CPU's flags; the NEON dot-product path is compiled only where the compiler targets it.
 *
 *   ISA_AVX512   AVX-512 F/BW/VL/DQ + VNNI: 512-bit vpdpbusd
 *   ISA_AVXVNNI  AVX2 + AVX-VNNI: 256-bit vpdpbusd (Alder Lake and later client cores)
 *   ISA_AVX2     AVX2 + FMA: vpmaddubsw + vpmaddwd (Haswell, Zen 1-3)
 *   ISA_NEON_DOT aarch64 with the dot-product extension (sdot)
 *   ISA_PORTABLE plain C (anything else)
 *
 * Every path computes the same integers and the same float operations in the same order (the build disables
 * floating-point contraction; fused multiply-adds are explicit), so all of them are bit-identical to each other and
 * to the PyTorch reference (core.quantizer.integer_linear, core.transforms.kronecker_matmul).
 *
 * fq_quantize: per-token symmetric quantization, the fake-quant formula bit for bit:
 *     scale = max(clip * absmax / qmax, 1e-8);  q = clamp(rint(x / scale), -qmax-1, qmax)
 *   fp32 or bf16 input, codes written with a zero tail up to a multiple of 8 columns, plus the per-token sum of the
 *   codes (needed by the unsigned-weight trick below).
 *
 * fq_gemm: out[m, n] = float(sum_k q[m, k] * w[n, k]) * w_scale[n] * x_scale[m] (+ bias[n]), the PyTorch path's
 *   operation order. Weights are int4 codes stored biased (w + 8, 0..15), two per byte, repacked at load into blocks
 *   of 16 output channels x 8 inputs = 64 bytes (the kernels stream one block per step, like llama.cpp's interleaved
 *   Q4_0 rows): byte 4*lane + b holds input 8*kb + b in its low nibble and input 8*kb + 4 + b in its high nibble.
 *   A mask and a shift give two "4 inputs x lanes" operands: one zmm (16 lanes), two ymm (8 + 8) or four NEON
 *   registers (4 lanes each). The unsigned x signed byte dot product (vpdpbusd, or vpmaddubsw + vpmaddwd: |w + 8|
 *   <= 15 and |x| <= 128 cannot saturate int16) accumulates in int32. The bias of 8 is removed with the token's
 *   code sum: sum (w + 8) * x = sum w * x + 8 * sum x.
 *
 * fq_kron: y[m] = L^T * X[m] * R per token, fp32 fused multiply-adds in a fixed order on every path.
 *
 * fq_linear: transform (optional) + quantize + GEMM in one call: a decode step's linear with a single parallel
 *   region, no Python in between.
 *
 * Threads: a small pool in which the calling thread never waits for a worker that has not started. Work is cut in
 * chunks that threads claim with an atomic counter; the caller claims chunks too and at the end waits only for
 * chunks already being worked on. On a busy machine (2 vCPUs shared with other jobs) a worker that the scheduler
 * does not run simply claims nothing, instead of holding up a whole parallel region for a time slice (what an
 * OpenMP barrier does: ~8 ms per op measured here).
 */
#ifndef FQ_AVX2_TEMPLATE
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define FQ_API __attribute__((visibility("default")))
#define FQ_ABI 3

#if defined(__x86_64__) || defined(__i386__)
#define FQ_X86 1
#include <immintrin.h>
#define TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define TGT_AVX2 __attribute__((target("avx2,fma")))
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define FQ_AVXVNNI 1
#define TGT_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#endif
#endif
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define FQ_NEON_DOT 1
#include <arm_neon.h>
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512 = 3, ISA_NEON_DOT = 4 };
static int g_isa = ISA_PORTABLE;

/* ---- work-claiming pool ------------------------------------------------------------------------------------ */

typedef void (*task_fn)(void *ctx, int64_t chunk);

#define MAX_WORKERS 63
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* job publication and worker sleep */
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t caller_mu = PTHREAD_MUTEX_INITIALIZER; /* one caller uses the pool at a time */
static _Atomic uint64_t job_state;  /* generation << 32 | next chunk */
static _Atomic int64_t job_done;    /* chunks finished in the current generation */
static uint32_t job_gen;            /* guarded by pool_mu */
static task_fn job_fn;
static void *job_ctx;
static int64_t job_n;
static int n_workers;

static inline void cpu_relax(void)
{
#if defined(FQ_X86)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int claim(uint32_t gen, int64_t n, int64_t *chunk)
{
    uint64_t s = atomic_load(&job_state);
    for (;;) {
        if ((uint32_t)(s >> 32) != gen || (int64_t)(s & 0xFFFFFFFFu) >= n)
            return 0;
        if (atomic_compare_exchange_weak(&job_state, &s, s + 1)) {
            *chunk = (int64_t)(s & 0xFFFFFFFFu);
            return 1;
        }
    }
}

static void *worker_main(void *arg)
{
    (void)arg;
    uint32_t seen = 0;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (job_gen == seen)
            pthread_cond_wait(&pool_cv, &pool_mu);
        seen = job_gen;
        task_fn fn = job_fn;
        void *ctx = job_ctx;
        int64_t n = job_n, c;
        pthread_mutex_unlock(&pool_mu);
        while (claim(seen, n, &c)) {
            fn(ctx, c);
            atomic_fetch_add(&job_done, 1);
        }
        pthread_mutex_lock(&pool_mu);
    }
    return NULL;
}

static void run_chunks(int64_t n, int threads, task_fn fn, void *ctx)
{
    if (threads > MAX_WORKERS + 1)
        threads = MAX_WORKERS + 1;
    if (n <= 1 || threads <= 1 || pthread_mutex_trylock(&caller_mu) != 0) {
        for (int64_t c = 0; c < n; ++c) /* serial: small work, or another thread is using the pool */
            fn(ctx, c);
        return;
    }
    pthread_mutex_lock(&pool_mu);
    while (n_workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        n_workers++;
    }
    uint32_t gen = ++job_gen;
    job_fn = fn;
    job_ctx = ctx;
    job_n = n;
    atomic_store(&job_done, 0);
    atomic_store(&job_state, (uint64_t)gen << 32);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    int64_t c, mine = 0;
    while (claim(gen, n, &c)) {
        fn(ctx, c);
        mine++;
    }
    atomic_fetch_add(&job_done, mine);
    for (int spins = 0; atomic_load(&job_done) < n; ++spins) { /* only chunks in flight are left */
        if (spins < 2000)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&caller_mu);
}

/* ---- ISA selection ------------------------------------------------------------------------------------------- */

FQ_API int fq_isa_compiled(int isa)
{
    switch (isa) {
    case ISA_PORTABLE:
        return 1;
#if defined(FQ_X86)
    case ISA_AVX2:
    case ISA_AVX512:
        return 1;
#if defined(FQ_AVXVNNI)
    case ISA_AVXVNNI:
        return 1;
#endif
#endif
#if defined(FQ_NEON_DOT)
    case ISA_NEON_DOT:
        return 1;
#endif
    default:
        return 0;
    }
}

/* Python picks the path from /proc/cpuinfo; this double-checks what the compiler can ask the CPU, so that a wrong
 * choice is refused instead of dying on an illegal instruction. */
FQ_API int fq_set_isa(int isa)
{
    if (!fq_isa_compiled(isa))
        return -1;
#if defined(FQ_X86)
    __builtin_cpu_init();
    if ((isa == ISA_AVX2 || isa == ISA_AVXVNNI) && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return -1;
    if (isa == ISA_AVX512 && !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                               __builtin_cpu_supports("avx512vnni")))
        return -1;
#endif
    g_isa = isa;
    return isa;
}

FQ_API int fq_get_isa(void) { return g_isa; }

/* ---- shared scalar pieces (every path ends in these, or in vector code with the same operations) ------------- */

static inline float load1(const void *x, int bf16, int64_t i)
{
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)x)[i];
}

static inline uint16_t bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* round to nearest even, as torch (finite values) */
}

static inline void store1(void *out, int bf16, int64_t i, float v)
{
    if (bf16)
        ((uint16_t *)out)[i] = bf16_rne(v);
    else
        ((float *)out)[i] = v;
}

static inline float token_scale(float absmax, int qmax, int use_clip, float clip)
{
    float s = absmax;
    if (use_clip)
        s = s * clip;
    s = s / (float)qmax;
    if (!(s >= 1e-8f))
        s = 1e-8f;
    return s;
}

/* ---- quantize ------------------------------------------------------------------------------------------------ */

typedef struct {
    const void *x;
    int bf16, qmax, use_clip;
    int64_t K, ldx, ldq, rows_per_chunk, M;
    float clip;
    int8_t *q;
    float *scale;
    int32_t *rowsum;
} quant_args;

/* codes of row elements [k0, K) with scale s; returns their sum */
static int32_t quantize_tail(const void *row, int bf16, int64_t k0, int64_t K, float s, int qmax, int8_t *qrow)
{
    const float lo = (float)(-qmax - 1), hi = (float)qmax;
    int32_t sum = 0;
    for (int64_t k = k0; k < K; ++k) {
        float v = nearbyintf(load1(row, bf16, k) / s);
        v = fminf(fmaxf(v, lo), hi);
        qrow[k] = (int8_t)(int32_t)v;
        sum += (int32_t)v;
    }
    return sum;
}

static void quantize_row_portable(const quant_args *a, const void *row, int8_t *qrow, int64_t m)
{
    float mx = 0.0f;
    for (int64_t k = 0; k < a->K; ++k) {
        float v = fabsf(load1(row, a->bf16, k));
        mx = v > mx ? v : mx;
    }
    const float s = token_scale(mx, a->qmax, a->use_clip, a->clip);
    a->scale[m] = s;
    a->rowsum[m] = quantize_tail(row, a->bf16, 0, a->K, s, a->qmax, qrow);
}

#if defined(FQ_X86)
static inline __mmask16 tail_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

TGT_AVX512 static inline __m512 load16(const void *x, int bf16, int64_t off, __mmask16 m)
{
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)x + off);
}

TGT_AVX512 static void quantize_row_avx512(const quant_args *a, const void *row, int8_t *qrow, int64_t m)
{
    const int bf16 = a->bf16;
    const int64_t K = a->K;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(row, bf16, k, tail_mask(K - k))));
    const float s = token_scale(_mm512_reduce_max_ps(vmax), a->qmax, a->use_clip, a->clip);
    a->scale[m] = s;
    const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps((float)(-a->qmax - 1)), vhi = _mm512_set1_ps(a->qmax);
    __m512i vsum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 mk = tail_mask(K - k);
        __m512 v = _mm512_div_ps(load16(row, bf16, k, mk), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
        __m512i iv = _mm512_maskz_mov_epi32(mk, _mm512_cvtps_epi32(v));
        vsum = _mm512_add_epi32(vsum, iv);
        _mm_mask_storeu_epi8(qrow + k, mk, _mm512_cvtsepi32_epi8(iv));
    }
    a->rowsum[m] = _mm512_reduce_add_epi32(vsum);
}

TGT_AVX2 static inline __m256 load8(const void *x, int bf16, int64_t off)
{
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)x + off);
}

TGT_AVX2 static void quantize_row_avx2(const quant_args *a, const void *row, int8_t *qrow, int64_t m)
{
    const int bf16 = a->bf16;
    const int64_t K = a->K, K8 = K & ~(int64_t)7;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8)
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(row, bf16, k), absmask));
    float lanes[8], mx = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; ++i)
        mx = lanes[i] > mx ? lanes[i] : mx;
    for (int64_t k = K8; k < K; ++k) {
        float v = fabsf(load1(row, bf16, k));
        mx = v > mx ? v : mx;
    }
    const float s = token_scale(mx, a->qmax, a->use_clip, a->clip);
    a->scale[m] = s;
    const __m256 vs = _mm256_set1_ps(s), vlo = _mm256_set1_ps((float)(-a->qmax - 1)), vhi = _mm256_set1_ps(a->qmax);
    __m256i vsum = _mm256_setzero_si256();
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 v = _mm256_div_ps(load8(row, bf16, k), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
        __m256i iv = _mm256_cvtps_epi32(v);
        vsum = _mm256_add_epi32(vsum, iv);
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1));
        _mm_storel_epi64((__m128i *)(qrow + k), _mm_packs_epi16(p16, p16));
    }
    int32_t sums[8], total = 0;
    _mm256_storeu_si256((__m256i *)sums, vsum);
    for (int i = 0; i < 8; ++i)
        total += sums[i];
    a->rowsum[m] = total + quantize_tail(row, bf16, K8, K, s, a->qmax, qrow);
}
#endif

static void quantize_rows(void *ctx, int64_t chunk)
{
    const quant_args *a = (const quant_args *)ctx;
    const int64_t m_end = (chunk + 1) * a->rows_per_chunk < a->M ? (chunk + 1) * a->rows_per_chunk : a->M;
    for (int64_t m = chunk * a->rows_per_chunk; m < m_end; ++m) {
        const void *row = a->bf16 ? (const void *)((const uint16_t *)a->x + m * a->ldx)
                                  : (const void *)((const float *)a->x + m * a->ldx);
        int8_t *qrow = a->q + m * a->ldq;
#if defined(FQ_X86)
        if (g_isa == ISA_AVX512)
            quantize_row_avx512(a, row, qrow, m);
        else if (g_isa == ISA_AVX2 || g_isa == ISA_AVXVNNI)
            quantize_row_avx2(a, row, qrow, m);
        else
#endif
            quantize_row_portable(a, row, qrow, m);
        for (int64_t k = a->K; k < a->ldq; ++k)
            qrow[k] = 0;
    }
}

FQ_API void fq_quantize(const void *x, int bf16, int64_t M, int64_t K, int64_t ldx, int qmax, float clip,
                        int use_clip, int8_t *q, int64_t ldq, float *scale, int32_t *rowsum, int threads)
{
    quant_args a = {x, bf16, qmax, use_clip, K, ldx, ldq, 0, M, clip, q, scale, rowsum};
    a.rows_per_chunk = (1 << 16) / (K + 1) + 1; /* ~64k elements per chunk */
    const int64_t chunks = (M + a.rows_per_chunk - 1) / a.rows_per_chunk;
    run_chunks(chunks, threads, quantize_rows, &a);
}

/* ---- GEMM ---------------------------------------------------------------------------------------------------- */

typedef struct {
    const int8_t *q;
    const int32_t *rowsum;
    const float *xs, *ws, *bias;
    const uint8_t *wp;
    void *out;
    int64_t ldq, N, NB, KB, ldo, m0, m1, wstride;
    int NR, out_bf16;
} gemm_args;

#define MR_MAX 8
#define NR_MAX 4
/* int32 sums of one tile: acc[i * NR_MAX * 16 + j * 16 + lane] for token i, block j */
#define ACC_AT(i, j) ((i) * NR_MAX * 16 + (j) * 16)

/* the rescale, shared by every path: float(acc - 8 * rowsum) * w_scale * x_scale (+ bias), rounded once per op */
static void epilogue(int mr, int nr, const int32_t *acc, int64_t m, int64_t nb, const gemm_args *a)
{
    for (int i = 0; i < mr; ++i) {
        const int32_t corr = 8 * a->rowsum[m + i];
        const float sx = a->xs[m + i];
        for (int j = 0; j < nr; ++j) {
            const int64_t n0 = (nb + j) * 16;
            const int64_t n1 = n0 + 16 < a->N ? n0 + 16 : a->N;
            const int32_t *c = acc + ACC_AT(i, j);
            for (int64_t n = n0; n < n1; ++n) {
                float f = (float)(c[n - n0] - corr);
                f = f * a->ws[n];
                f = f * sx;
                if (a->bias)
                    f = f + a->bias[n];
                store1(a->out, a->out_bf16, (m + i) * a->ldo + n, f);
            }
        }
    }
}

static void tile_portable(int mr, int nr, const int8_t *q, int64_t ldq, const uint8_t *w, int64_t wstride,
                          int64_t KB, int32_t *acc)
{
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) {
            int32_t *c = acc + ACC_AT(i, j);
            const int8_t *x = q + i * ldq;
            for (int l = 0; l < 16; ++l)
                c[l] = 0;
            for (int64_t kb = 0; kb < KB; ++kb) {
                const uint8_t *blk = w + j * wstride + kb * 64;
                const int8_t *xk = x + kb * 8;
                for (int l = 0; l < 16; ++l) {
                    int32_t s = 0;
                    for (int b = 0; b < 4; ++b)
                        s += (int32_t)(blk[4 * l + b] & 15) * xk[b] + (int32_t)(blk[4 * l + b] >> 4) * xk[4 + b];
                    c[l] += s;
                }
            }
        }
}

#if defined(FQ_X86)
/* One tile: MR tokens x NR blocks of 16 channels over all KB steps, accumulating in MR * NR registers.
 * A single token (memory bound) splits low and high nibbles into two accumulators to keep more independent
 * vpdpbusd chains in flight; larger tiles have enough chains already and reuse each unpacked weight MR times. */
TGT_AVX512 static inline __attribute__((always_inline)) void tile_avx512(const int MR, const int NR, const int8_t *q,
                                                                         int64_t ldq, const uint8_t *w,
                                                                         int64_t wstride, int64_t KB, int32_t *acc)
{
    __m512i a[8][4], a2[4];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            a[i][j] = _mm512_setzero_si512();
    for (int j = 0; j < NR; ++j)
        a2[j] = _mm512_setzero_si512();
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m512i wl[4], wh[4];
        for (int j = 0; j < NR; ++j) {
            __m512i v = _mm512_loadu_si512((const void *)(w + j * wstride + kb * 64));
            wl[j] = _mm512_and_si512(v, nib);
            wh[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        for (int i = 0; i < MR; ++i) {
            int32_t x0, x1;
            memcpy(&x0, q + i * ldq + kb * 8, 4);
            memcpy(&x1, q + i * ldq + kb * 8 + 4, 4);
            const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
            for (int j = 0; j < NR; ++j) {
                a[i][j] = _mm512_dpbusd_epi32(a[i][j], wl[j], b0);
                if (MR == 1)
                    a2[j] = _mm512_dpbusd_epi32(a2[j], wh[j], b1);
                else
                    a[i][j] = _mm512_dpbusd_epi32(a[i][j], wh[j], b1);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            _mm512_storeu_si512((void *)(acc + ACC_AT(i, j)), MR == 1 ? _mm512_add_epi32(a[i][j], a2[j]) : a[i][j]);
}

#define TILE512(MR_, NR_) \
    case (MR_) * 8 + (NR_): tile_avx512(MR_, NR_, qm, ldq, wb, wstride, KB, acc); break;

TGT_AVX512 static void tiles_avx512(int mr, int nr, const int8_t *qm, int64_t ldq, const uint8_t *wb,
                                    int64_t wstride, int64_t KB, int32_t *acc)
{
    switch (mr * 8 + nr) {
        TILE512(1, 1) TILE512(1, 2) TILE512(1, 3) TILE512(1, 4)
        TILE512(2, 1) TILE512(2, 2) TILE512(3, 1) TILE512(3, 2)
        TILE512(4, 1) TILE512(4, 2) TILE512(5, 1) TILE512(5, 2)
        TILE512(6, 1) TILE512(6, 2) TILE512(7, 1) TILE512(7, 2)
        TILE512(8, 1) TILE512(8, 2)
        default: tile_portable(mr, nr, qm, ldq, wb, wstride, KB, acc); break;
    }
}

/* AVX2 dot steps: acc[lane] += sum_b wl[lane, b] * x0[b] + wh[lane, b] * x1[b] for 8 lanes */
TGT_AVX2 static inline __m256i dot_maddubs(__m256i acc, __m256i wl, __m256i wh, __m256i b0, __m256i b1)
{
    __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(wl, b0), _mm256_maddubs_epi16(wh, b1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1)));
}

#if defined(FQ_AVXVNNI)
TGT_AVXVNNI static inline __m256i dot_vnni(__m256i acc, __m256i wl, __m256i wh, __m256i b0, __m256i b1)
{
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, wl, b0), wh, b1);
}
#endif

/* the AVX2 tiles, once per dot step (this file includes itself below with FQ_AVX2_TEMPLATE set) */
#define FQ_AVX2_TEMPLATE 1
#define AVX2_TGT TGT_AVX2
#define AVX2_DOT dot_maddubs
#define AVX2_NAME(n) n##_avx2
#include __FILE__
#undef AVX2_TGT
#undef AVX2_DOT
#undef AVX2_NAME
#if defined(FQ_AVXVNNI)
#define AVX2_TGT TGT_AVXVNNI
#define AVX2_DOT dot_vnni
#define AVX2_NAME(n) n##_avxvnni
#include __FILE__
#undef AVX2_TGT
#undef AVX2_DOT
#undef AVX2_NAME
#endif
#undef FQ_AVX2_TEMPLATE
#endif /* FQ_X86 */

#if defined(FQ_NEON_DOT)
static void tile_neon(int mr, int nr, const int8_t *q, int64_t ldq, const uint8_t *w, int64_t wstride, int64_t KB,
                      int32_t *acc)
{
    const uint8x16_t nib = vdupq_n_u8(0x0F);
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) {
            int32x4_t c0 = vdupq_n_s32(0), c1 = c0, c2 = c0, c3 = c0;
            const uint8_t *blk = w + j * wstride;
            const int8_t *x = q + i * ldq;
            for (int64_t kb = 0; kb < KB; ++kb) {
                int32_t x0, x1;
                memcpy(&x0, x + kb * 8, 4);
                memcpy(&x1, x + kb * 8 + 4, 4);
                const int8x16_t b0 = vreinterpretq_s8_s32(vdupq_n_s32(x0)), b1 = vreinterpretq_s8_s32(vdupq_n_s32(x1));
                const uint8_t *p = blk + kb * 64;
                uint8x16_t v0 = vld1q_u8(p), v1 = vld1q_u8(p + 16), v2 = vld1q_u8(p + 32), v3 = vld1q_u8(p + 48);
                c0 = vdotq_s32(vdotq_s32(c0, vreinterpretq_s8_u8(vandq_u8(v0, nib)), b0),
                               vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), b1);
                c1 = vdotq_s32(vdotq_s32(c1, vreinterpretq_s8_u8(vandq_u8(v1, nib)), b0),
                               vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), b1);
                c2 = vdotq_s32(vdotq_s32(c2, vreinterpretq_s8_u8(vandq_u8(v2, nib)), b0),
                               vreinterpretq_s8_u8(vshrq_n_u8(v2, 4)), b1);
                c3 = vdotq_s32(vdotq_s32(c3, vreinterpretq_s8_u8(vandq_u8(v3, nib)), b0),
                               vreinterpretq_s8_u8(vshrq_n_u8(v3, 4)), b1);
            }
            int32_t *c = acc + ACC_AT(i, j);
            vst1q_s32(c, c0);
            vst1q_s32(c + 4, c1);
            vst1q_s32(c + 8, c2);
            vst1q_s32(c + 12, c3);
        }
}
#endif

static void gemm_group(void *ctx, int64_t g)
{
    const gemm_args *a = (const gemm_args *)ctx;
    const int NR = a->NR;
    const int64_t nb = g * NR;
    const int nr = (int)(a->NB - nb < NR ? a->NB - nb : NR);
    const uint8_t *wb = a->wp + nb * a->wstride;
    int32_t acc[MR_MAX * NR_MAX * 16];
    for (int64_t m = a->m0; m < a->m1; m += MR_MAX) {
        const int mr = (int)(a->m1 - m < MR_MAX ? a->m1 - m : MR_MAX);
        const int8_t *qm = a->q + m * a->ldq;
        switch (g_isa) {
#if defined(FQ_X86)
        case ISA_AVX512:
            tiles_avx512(mr, nr, qm, a->ldq, wb, a->wstride, a->KB, acc);
            break;
        case ISA_AVX2:
            tiles_avx2(mr, nr, qm, a->ldq, wb, a->wstride, a->KB, acc);
            break;
#if defined(FQ_AVXVNNI)
        case ISA_AVXVNNI:
            tiles_avxvnni(mr, nr, qm, a->ldq, wb, a->wstride, a->KB, acc);
            break;
#endif
#endif
#if defined(FQ_NEON_DOT)
        case ISA_NEON_DOT:
            tile_neon(mr, nr, qm, a->ldq, wb, a->wstride, a->KB, acc);
            break;
#endif
        default:
            tile_portable(mr, nr, qm, a->ldq, wb, a->wstride, a->KB, acc);
        }
        epilogue(mr, nr, acc, m, nb, a);
    }
}

FQ_API void fq_gemm(const int8_t *q, int64_t ldq, const int32_t *rowsum, const float *xs, const uint8_t *wp,
                    const float *ws, const float *bias, int64_t M, int64_t N, int64_t KB, void *out, int64_t ldo,
                    int out_bf16, int threads)
{
    gemm_args a = {q, rowsum, xs, ws, bias, wp, out, ldq, N, (N + 15) / 16, KB, ldo, 0, 0, KB * 64, 0, out_bf16};
    /* a single token is memory bound: more weight streams in flight; the AVX2 tiles hold 8 tokens x 1 block */
    a.NR = M == 1 ? 4 : ((g_isa == ISA_AVX2 || g_isa == ISA_AVXVNNI) ? 1 : 2);
    const int64_t ngroups = (a.NB + a.NR - 1) / a.NR;
    /* token blocks of about 1 MiB of codes stay in L2 while every weight block streams past them once */
    int64_t mc = (int64_t)(1 << 20) / (KB * 8);
    mc = mc < MR_MAX ? MR_MAX : (mc / MR_MAX) * MR_MAX;
    /* waking a worker costs a few us: only for real work */
    if ((M * N * KB * 8) < (1 << 21))
        threads = 1;
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
        a.m0 = m0;
        a.m1 = m0 + mc < M ? m0 + mc : M;
        run_chunks(ngroups, threads, gemm_group, &a);
    }
}

/* ---- online transform (few tokens) ------------------------------------------------------------------------- */

/* t[0..n) = fma(s, r[0..n), t[0..n)) (axpy) and its transposed use, in vector code where the CPU has it; each
 * element sees the same fused multiply-add sequence on every path. */
static inline void axpy_portable(int64_t n, float s, const float *r, float *t)
{
    for (int64_t j = 0; j < n; ++j)
        t[j] = fmaf(s, r[j], t[j]);
}

#if defined(FQ_X86)
TGT_AVX512 static inline void axpy_avx512(int64_t n, float s, const float *r, float *t)
{
    const __m512 vs = _mm512_set1_ps(s);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 mk = tail_mask(n - j);
        _mm512_mask_storeu_ps(t + j, mk, _mm512_fmadd_ps(vs, _mm512_maskz_loadu_ps(mk, r + j),
                                                         _mm512_maskz_loadu_ps(mk, t + j)));
    }
}

TGT_AVX2 static inline void axpy_avx2(int64_t n, float s, const float *r, float *t)
{
    const __m256 vs = _mm256_set1_ps(s);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(t + j, _mm256_fmadd_ps(vs, _mm256_loadu_ps(r + j), _mm256_loadu_ps(t + j)));
    for (; j < n; ++j)
        t[j] = fmaf(s, r[j], t[j]);
}
#endif

/* fq_kron: y[m] = Lᵀ · X[m] · R for each token (X[m] = row m of x viewed as a x b), fp32 accumulation, output in
 * the input's dtype. Serial on purpose: it serves few-token (decode) calls, where the two tiny matmuls of the
 * PyTorch path cost more in dispatch and thread wake-ups than in arithmetic. work: a * b + b floats. */
static inline __attribute__((always_inline)) void kron_rows(const void *x, int bf16, int64_t M, int64_t a,
                                                            int64_t b, const float *L, const float *R, void *y,
                                                            float *work,
                                                            void (*axpy)(int64_t, float, const float *, float *))
{
    float *acc = work + a * b;
    for (int64_t m = 0; m < M; ++m) {
        const int64_t base = m * a * b;
        for (int64_t i = 0; i < a; ++i) { /* T = X · R: row i = sum_k X[i, k] · R[k, :] */
            float *t = work + i * b;
            memset(t, 0, (size_t)b * sizeof(float));
            for (int64_t k = 0; k < b; ++k)
                axpy(b, load1(x, bf16, base + i * b + k), R + k * b, t);
        }
        for (int64_t i = 0; i < a; ++i) { /* Y = Lᵀ · T: row i = sum_k L[k, i] · T[k, :] */
            memset(acc, 0, (size_t)b * sizeof(float));
            for (int64_t k = 0; k < a; ++k)
                axpy(b, L[k * a + i], work + k * b, acc);
            for (int64_t j = 0; j < b; ++j)
                store1(y, bf16, base + i * b + j, acc[j]);
        }
    }
}

#if defined(FQ_X86)
TGT_AVX512 static void kron_avx512(const void *x, int bf16, int64_t M, int64_t a, int64_t b, const float *L,
                                   const float *R, void *y, float *work)
{
    kron_rows(x, bf16, M, a, b, L, R, y, work, axpy_avx512);
}

TGT_AVX2 static void kron_avx2(const void *x, int bf16, int64_t M, int64_t a, int64_t b, const float *L,
                               const float *R, void *y, float *work)
{
    kron_rows(x, bf16, M, a, b, L, R, y, work, axpy_avx2);
}
#endif

FQ_API void fq_kron(const void *x, int bf16, int64_t M, int64_t a, int64_t b, const float *L, const float *R,
                    void *y, float *work)
{
#if defined(FQ_X86)
    if (g_isa == ISA_AVX512) {
        kron_avx512(x, bf16, M, a, b, L, R, y, work);
        return;
    }
    if (g_isa == ISA_AVX2 || g_isa == ISA_AVXVNNI) {
        kron_avx2(x, bf16, M, a, b, L, R, y, work);
        return;
    }
#endif
    kron_rows(x, bf16, M, a, b, L, R, y, work, axpy_portable);
}

/* ---- fused linear ------------------------------------------------------------------------------------------ */

/* [transform ->] quantize -> GEMM: the same three steps as the separate calls (identical results), one call.
 * xt: scratch for the transformed input (M * K elements of x's dtype) when L is given; work: a * b + b floats. */
FQ_API void fq_linear(const void *x, int bf16, int64_t M, int64_t K, const float *L, const float *R, int64_t a,
                      int64_t b, void *xt, float *work, int qmax, float clip, int use_clip, int8_t *q, int64_t ldq,
                      float *scale, int32_t *rowsum, const uint8_t *wp, const float *ws, const float *bias,
                      int64_t N, int64_t KB, void *out, int out_bf16, int threads)
{
    if (L) {
        fq_kron(x, bf16, M, a, b, L, R, xt, work);
        x = xt;
    }
    fq_quantize(x, bf16, M, K, K, qmax, clip, use_clip, q, ldq, scale, rowsum, threads);
    fq_gemm(q, ldq, rowsum, scale, wp, ws, bias, M, N, KB, out, N, out_bf16, threads);
}

FQ_API int fq_abi_version(void) { return FQ_ABI; }

#else /* FQ_AVX2_TEMPLATE: AVX2 tiles for one dot step (AVX2_DOT), named AVX2_NAME(...) */

/* MR tokens x NR blocks (two 8-lane halves each): 4 x 1 for prompts (each unpacked weight reused 4 times), 1 x 4
 * for a single token (8 independent accumulator chains, 256 bytes of weights in flight). */
AVX2_TGT static inline __attribute__((always_inline)) void AVX2_NAME(tile)(const int MR, const int NR,
                                                                          const int8_t *q, int64_t ldq,
                                                                          const uint8_t *w, int64_t wstride,
                                                                          int64_t KB, int32_t *acc)
{
    __m256i c[MR_MAX][2 * NR_MAX];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 2 * NR; ++j)
            c[i][j] = _mm256_setzero_si256();
    const __m256i nib = _mm256_set1_epi8(0x0F);
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m256i wl[2 * NR_MAX], wh[2 * NR_MAX];
        for (int j = 0; j < 2 * NR; ++j) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (j >> 1) * wstride + kb * 64 + (j & 1) * 32));
            wl[j] = _mm256_and_si256(v, nib);
            wh[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        }
        for (int i = 0; i < MR; ++i) {
            int32_t x0, x1;
            memcpy(&x0, q + i * ldq + kb * 8, 4);
            memcpy(&x1, q + i * ldq + kb * 8 + 4, 4);
            const __m256i b0 = _mm256_set1_epi32(x0), b1 = _mm256_set1_epi32(x1);
            for (int j = 0; j < 2 * NR; ++j)
                c[i][j] = AVX2_DOT(c[i][j], wl[j], wh[j], b0, b1);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 2 * NR; ++j)
            _mm256_storeu_si256((__m256i *)(acc + ACC_AT(i, j >> 1) + (j & 1) * 8), c[i][j]);
}

AVX2_TGT static void AVX2_NAME(tiles)(int mr, int nr, const int8_t *qm, int64_t ldq, const uint8_t *wb,
                                      int64_t wstride, int64_t KB, int32_t *acc)
{
    if (nr == 4 && mr == 1) {
        AVX2_NAME(tile)(1, 4, qm, ldq, wb, wstride, KB, acc);
        return;
    }
    /* 16 ymm registers: at most 4 tokens x 2 halves of accumulators next to the unpacked weights */
    for (int j = 0; j < nr; ++j)
        for (int i0 = 0; i0 < mr; i0 += 4) {
            const uint8_t *wj = wb + j * wstride;
            const int8_t *qi = qm + i0 * ldq;
            int32_t *aij = acc + ACC_AT(i0, j);
            switch (mr - i0 < 4 ? mr - i0 : 4) {
            case 4: AVX2_NAME(tile)(4, 1, qi, ldq, wj, wstride, KB, aij); break;
            case 3: AVX2_NAME(tile)(3, 1, qi, ldq, wj, wstride, KB, aij); break;
            case 2: AVX2_NAME(tile)(2, 1, qi, ldq, wj, wstride, KB, aij); break;
            default: AVX2_NAME(tile)(1, 1, qi, ldq, wj, wstride, KB, aij); break;
            }
        }
}
#endif /* FQ_AVX2_TEMPLATE */
