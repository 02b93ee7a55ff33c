/* FlatQuant Studio native CPU kernels (x86-64, AVX-512 F/BW + VNNI), loaded through ctypes.
 *
 * fq_quantize: per-token symmetric quantization, the fake-quant formula bit for bit:
 *     scale = max(clip * absmax / qmax, 1e-8);  q = clamp(rint(x / scale), -qmax-1, qmax)
 *   one pass for the absmax and one for the codes, fp32 or bf16 input, codes written with a zero tail up to a
 *   multiple of 8 columns, plus the per-token sum of the codes (needed by the unsigned-weight trick below).
 *
 * fq_gemm: out[m, n] = float(sum_k q[m, k] * w[n, k]) * w_scale[n] * x_scale[m] (+ bias[n]), the same operation
 *   order as the PyTorch path, so both give identical results.
 *   Weights are int4 codes stored biased (w + 8, 0..15), two per byte, in blocks of 16 output channels x 8 inputs =
 *   64 bytes: byte 4*lane + b holds input 8*kb + b in its low nibble and input 8*kb + 4 + b in its high nibble.
 *   One 64-byte load gives, after a mask and a shift, two VNNI operands (16 channels x 4 inputs each);
 *   vpdpbusd multiplies them (unsigned) with 4 broadcast activation codes (signed) and accumulates in int32.
 *   The bias of 8 is removed with the token's code sum: sum (w + 8) * x = sum w * x + 8 * sum x.
 *
 * Threads: a small pool in which the calling thread never waits for a worker that has not started. Work is cut in
 * chunks that threads claim with an atomic counter; the caller claims chunks too and at the end waits only for
 * chunks already being worked on. On a busy machine (2 vCPUs shared with other jobs) a worker that the scheduler
 * does not run simply claims nothing, instead of holding up a whole parallel region for a time slice (what an
 * OpenMP barrier does: ~8 ms per op measured here).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define FQ_API __attribute__((visibility("default")))

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
            _mm_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&caller_mu);
}

static inline __m512 load_ps(const void *x, int bf16, int64_t off, __mmask16 m)
{
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)x + off);
}

static inline __mmask16 tail_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

typedef struct {
    const void *x;
    int bf16, qmax, use_clip;
    int64_t K, ldx, ldq, rows_per_chunk, M;
    float clip;
    int8_t *q;
    float *scale;
    int32_t *rowsum;
} quant_args;

static void quantize_rows(void *ctx, int64_t chunk)
{
    const quant_args *a = (const quant_args *)ctx;
    const int bf16 = a->bf16, qmax = a->qmax;
    const int64_t K = a->K;
    const float lo = (float)(-qmax - 1), hi = (float)qmax;
    const int64_t m_end = (chunk + 1) * a->rows_per_chunk < a->M ? (chunk + 1) * a->rows_per_chunk : a->M;
    for (int64_t m = chunk * a->rows_per_chunk; m < m_end; ++m) {
        const void *row = bf16 ? (const void *)((const uint16_t *)a->x + m * a->ldx)
                               : (const void *)((const float *)a->x + m * a->ldx);
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = load_ps(row, bf16, k, tail_mask(K - k));
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
        float s = _mm512_reduce_max_ps(vmax);
        if (a->use_clip)
            s = s * a->clip;
        s = s / (float)qmax;
        if (!(s >= 1e-8f))
            s = 1e-8f;
        a->scale[m] = s;
        const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
        __m512i vsum = _mm512_setzero_si512();
        int8_t *qrow = a->q + m * a->ldq;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mk = tail_mask(K - k);
            __m512 v = _mm512_div_ps(load_ps(row, bf16, k, mk), vs);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
            __m512i iv = _mm512_maskz_mov_epi32(mk, _mm512_cvtps_epi32(v));
            vsum = _mm512_add_epi32(vsum, iv);
            _mm_mask_storeu_epi8(qrow + k, mk, _mm512_cvtsepi32_epi8(iv));
        }
        for (int64_t k = K; k < a->ldq; ++k)
            qrow[k] = 0;
        a->rowsum[m] = _mm512_reduce_add_epi32(vsum);
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

static inline uint16_t bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void store_out(void *out, int bf16, int64_t off, __m512 v, __mmask16 mk)
{
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)out + off, mk, v);
        return;
    }
    /* round to nearest even, as torch's float -> bfloat16 conversion (finite values) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
    _mm256_mask_storeu_epi16((uint16_t *)out + off, mk, h);
}

/* One tile: MR tokens x NR blocks of 16 channels over all KB steps, accumulating in MR * NR registers.
 * A single token (memory bound) splits low and high nibbles into two accumulators to keep more independent
 * vpdpbusd chains in flight; larger tiles have enough chains already and reuse each unpacked weight MR times. */
static inline __attribute__((always_inline)) void tile(const int MR, const int NR, const int8_t *q, int64_t ldq,
                                                       const uint8_t *w, int64_t wstride, int64_t KB,
                                                       __m512i *acc)
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
            acc[i * 4 + j] = MR == 1 ? _mm512_add_epi32(a[i][j], a2[j]) : a[i][j];
}

static inline void epilogue(int mr, int nr, const __m512i *acc, int64_t m, int64_t nb, int64_t N,
                            const int32_t *rowsum, const float *xs, const float *ws, const float *bias, void *out,
                            int64_t ldo, int bf16)
{
    for (int i = 0; i < mr; ++i) {
        const __m512i corr = _mm512_set1_epi32(8 * rowsum[m + i]);
        const __m512 sx = _mm512_set1_ps(xs[m + i]);
        for (int j = 0; j < nr; ++j) {
            int64_t n0 = (nb + j) * 16;
            if (n0 >= N)
                break;
            __mmask16 mk = tail_mask(N - n0);
            __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i * 4 + j], corr));
            f = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(mk, ws + n0));
            f = _mm512_mul_ps(f, sx);
            if (bias)
                f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mk, bias + n0));
            store_out(out, bf16, (m + i) * ldo + n0, f, mk);
        }
    }
}

#define TILE_CASE(MR_, NR_) \
    case (MR_) * 8 + (NR_): tile(MR_, NR_, qm, ldq, wb, wstride, KB, acc); break;

typedef struct {
    const int8_t *q;
    const int32_t *rowsum;
    const float *xs, *ws, *bias;
    const uint8_t *wp;
    void *out;
    int64_t ldq, N, NB, KB, ldo, m0, m1, wstride;
    int NR, out_bf16;
} gemm_args;

static void gemm_group(void *ctx, int64_t g)
{
    const gemm_args *a = (const gemm_args *)ctx;
    const int MR = 8, NR = a->NR;
    const int64_t nb = g * NR;
    const int nr = (int)(a->NB - nb < NR ? a->NB - nb : NR);
    const uint8_t *wb = a->wp + nb * a->wstride;
    const int64_t ldq = a->ldq, wstride = a->wstride, KB = a->KB;
    __m512i acc[32];
    for (int64_t m = a->m0; m < a->m1; m += MR) {
        const int mr = (int)(a->m1 - m < MR ? a->m1 - m : MR);
        const int8_t *qm = a->q + m * ldq;
        switch (mr * 8 + nr) {
            TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4)
            TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(3, 1) TILE_CASE(3, 2)
            TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(5, 1) TILE_CASE(5, 2)
            TILE_CASE(6, 1) TILE_CASE(6, 2) TILE_CASE(7, 1) TILE_CASE(7, 2)
            TILE_CASE(8, 1) TILE_CASE(8, 2)
            default: break;
        }
        epilogue(mr, nr, acc, m, nb, a->N, a->rowsum, a->xs, a->ws, a->bias, a->out, a->ldo, a->out_bf16);
    }
}

FQ_API void fq_gemm(const int8_t *q, int64_t ldq, const int32_t *rowsum, const float *xs, const uint8_t *wp,
                    const float *ws, const float *bias, int64_t M, int64_t N, int64_t KB, void *out, int64_t ldo,
                    int out_bf16, int threads)
{
    gemm_args a = {q, rowsum, xs, ws, bias, wp, out, ldq, N, (N + 15) / 16, KB, ldo, 0, 0, KB * 64, 0, out_bf16};
    a.NR = M == 1 ? 4 : 2; /* a single token is memory bound: more weight streams in flight */
    const int64_t ngroups = (a.NB + a.NR - 1) / a.NR;
    /* token blocks of about 1 MiB of codes stay in L2 while every weight block streams past them once */
    int64_t mc = (int64_t)(1 << 20) / (KB * 8);
    mc = mc < 8 ? 8 : (mc / 8) * 8;
    /* waking a worker costs a few us: only for real work */
    if ((M * N * KB * 8) < (1 << 21))
        threads = 1;
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
        a.m0 = m0;
        a.m1 = m0 + mc < M ? m0 + mc : M;
        run_chunks(ngroups, threads, gemm_group, &a);
    }
}

/* fq_kron: y[m] = Lᵀ · X[m] · R for each token (X[m] = row m of x viewed as a x b), fp32 accumulation, output in
 * the input's dtype. Serial on purpose: it serves few-token (decode) calls, where the two tiny matmuls of the
 * PyTorch path cost more in dispatch and thread wake-ups than in arithmetic. work: a * b floats. */
FQ_API void fq_kron(const void *x, int bf16, int64_t M, int64_t a, int64_t b, const float *L, const float *R,
                    void *y, float *work)
{
    for (int64_t m = 0; m < M; ++m) {
        const int64_t base = m * a * b;
        for (int64_t i = 0; i < a; ++i) { /* T = X · R, row by row */
            float *t = work + i * b;
            for (int64_t j = 0; j < b; j += 16)
                _mm512_mask_storeu_ps(t + j, tail_mask(b - j), _mm512_setzero_ps());
            for (int64_t k = 0; k < b; ++k) {
                float xv;
                if (bf16) {
                    uint32_t u = (uint32_t)((const uint16_t *)x)[base + i * b + k] << 16;
                    memcpy(&xv, &u, 4);
                } else {
                    xv = ((const float *)x)[base + i * b + k];
                }
                const __m512 vx = _mm512_set1_ps(xv);
                for (int64_t j = 0; j < b; j += 16) {
                    __mmask16 mk = tail_mask(b - j);
                    __m512 acc = _mm512_maskz_loadu_ps(mk, t + j);
                    acc = _mm512_fmadd_ps(vx, _mm512_maskz_loadu_ps(mk, R + k * b + j), acc);
                    _mm512_mask_storeu_ps(t + j, mk, acc);
                }
            }
        }
        for (int64_t i = 0; i < a; ++i) { /* Y = Lᵀ · T: row i = sum_k L[k, i] · T[k, :] */
            for (int64_t j = 0; j < b; j += 16) {
                __mmask16 mk = tail_mask(b - j);
                __m512 acc = _mm512_setzero_ps();
                for (int64_t k = 0; k < a; ++k)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(L[k * a + i]), _mm512_maskz_loadu_ps(mk, work + k * b + j), acc);
                store_out(y, bf16, base + i * b + j, acc, mk);
            }
        }
    }
}

FQ_API int fq_abi_version(void) { return 2; }
