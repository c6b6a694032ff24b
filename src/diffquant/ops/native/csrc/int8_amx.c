/* int8 dynamic quantization's product on Intel AMX (Sapphire Rapids and later), compiled on
   first use by ops/native/build.py with the other kernels.

   Why: torch._int_mm (oneDNN) took 0.6-0.8x the bf16 product on an AMX Xeon, and the oneDNN op
   that was faster (qlinear, 0.45x with its own weight layout) wants a packed copy of the weight
   or reorders its right operand on every call. Here the stored weight [N, K] (torchao's int8
   layout) is the left tile operand as it lies, 16 rows of 64 bytes at stride K, and the
   quantized tokens are the right one, written by the quantization pass straight into the layout
   the tiles read (VNNI: 4 consecutive k of a token in one 32-bit word). Nothing weight-sized is
   copied. Each thread computes C^T = W . X^T for its channels, 32 x 32 at a time in four
   accumulator tiles, and scales each finished block to bf16 right away, transposed in
   registers, with int8_dynamic.c's roundings: the same bits as formats/torchao.int8_dynamic_linear.

   Needs K % 64 == 0 and N % 16 == 0 (every Flux linear); the caller falls back otherwise. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && \
    defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux grants the tile registers per process, on request (5.16 and later). */
int dq_amx_available(void) {
    unsigned long bits = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits)) return 0;
    return (int)((bits >> XFEATURE_XTILEDATA) & 1);
}

/* 16 lanes of bf16 values (one per lane, from a column pair's 32 bits, low or high half) times
   inv -> int8 codes in int32 lanes: int8_dynamic.c's quantize_run, lane by lane */
static inline __m512i codes16(__m512 v, __m512 inv) {
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), _mm512_set1_ps(-128.0f)),
                             _mm512_set1_ps(127.0f));
    return _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_add_ps(t, magic), magic));
}

/* Tokens [r0, r1) of x bf16 [M, ldx], K columns -> scale[M] and the codes in the tile layout,
   blocked by 16 tokens: xp int8 [G][K / 4][16][4], token t = 16 g + l's codes k..k+3
   (k % 4 == 0) the 32-bit word (g, k / 4, l). A tile of 16 words-rows is then 1 KB in one
   piece (in a [K / 4][M][4] layout its rows were a token row apart, 16 pages per tile load).
   Per group of 16 tokens: two gathers read four columns of the 16 rows (lines the next 15
   reuse), one 64-byte store writes them. Returns 1 when a token holds a NaN or an infinity. */
int dq_quantize_rows_vnni_bf16(const uint16_t *x, int64_t ldx, int64_t r0, int64_t r1,
                               int64_t k, int8_t *xp, float *scale) {
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)ldx));
    const __m512i low = _mm512_set1_epi32(0xff), mask_hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t g = r0 / 16; g * 16 < r1; g++) {
        int lo = r0 > 16 * g ? (int)(r0 - 16 * g) : 0;             /* this range's lanes */
        int hi = r1 < 16 * g + 16 ? (int)(r1 - 16 * g) : 16;
        __mmask16 live = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        float inv[16] = {0};
        for (int j = lo; j < hi; j++) {
            if (dq_row_scale_bf16(x + (16 * g + j) * ldx, k, &scale[16 * g + j])) return 1;
            inv[j] = 1.0f / scale[16 * g + j];
        }
        __m512 vinv = _mm512_loadu_ps(inv);
        const uint16_t *base = x + 16 * g * ldx;
        int8_t *out = xp + g * (k / 4) * 64;
        for (int64_t kg = 0; kg < k / 4; kg++) {
            __m512i p01 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows,
                                                      base + 4 * kg, 2);
            __m512i p23 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows,
                                                      base + 4 * kg + 2, 2);
            __m512i c0 = codes16(_mm512_castsi512_ps(_mm512_slli_epi32(p01, 16)), vinv);
            __m512i c1 = codes16(_mm512_castsi512_ps(_mm512_and_si512(p01, mask_hi)), vinv);
            __m512i c2 = codes16(_mm512_castsi512_ps(_mm512_slli_epi32(p23, 16)), vinv);
            __m512i c3 = codes16(_mm512_castsi512_ps(_mm512_and_si512(p23, mask_hi)), vinv);
            __m512i word = _mm512_or_si512(
                _mm512_or_si512(_mm512_and_si512(c0, low),
                                _mm512_slli_epi32(_mm512_and_si512(c1, low), 8)),
                _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(c2, low), 16),
                                _mm512_slli_epi32(c3, 24)));
            _mm512_mask_storeu_epi32(out + kg * 64, live, word);
        }
    }
    return 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

/* tiles 0-3: int32 accumulators; 4-5: weight rows; 6-7: tokens. All 16 rows x 64 bytes. */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* r[i] (16 rows of 16 floats) -> r[j] = column j: three rounds of shuffles, 64 in all */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {  /* lane L: rows 2i, 2i+1 interleaved, columns 4L..4L+3 */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* u[4i + c], lane L: column 4L + c of rows 4i..4i+3 */
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int c = 0; c < 4; c++) {  /* column 4L + c: lane L of u[c], u[4+c], u[8+c], u[12+c] */
        __m512 lo_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
        __m512 hi_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
        __m512 lo_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        __m512 hi_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_f32x4(lo_a, lo_b, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(lo_a, lo_b, 0xdd);
        r[8 + c] = _mm512_shuffle_f32x4(hi_a, hi_b, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(hi_a, hi_b, 0xdd);
    }
}

/* dq_int8_output_bf16's ops (int8_dynamic.c) on 16 channels of one token (scale s), as bf16 bits
   in 16-bit lanes */
static inline __m256i output16(__m512 a, float s, __m512 w, const __m512 *b) {
    __m512 t = _mm512_mul_ps(a, _mm512_set1_ps(s));
    t = _mm512_mul_ps(round_bf16x16(t), w);
    if (b) t = _mm512_add_ps(t, *b);
    return _mm512_cvtepi32_epi16(bf16_bits16(t));
}

typedef struct {
    const float *sx, *sw;
    const uint16_t *bias;
    uint16_t *y;
    int64_t ldy, m;
} epilogue_args;

/* sums[32][32] int32 (channels ch.., tokens tok..; nc channels, 16 or 32) -> y rows tok.. */
static void scale_block(const int32_t sums[32][32], int64_t ch, int nc, int64_t tok,
                        const epilogue_args *e) {
    __m512 w[2], b[2];
    for (int h = 0; h < 2; h++) {
        w[h] = _mm512_loadu_ps(e->sw + ch + 16 * h);
        b[h] = e->bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                             _mm256_loadu_si256((const __m256i *)(e->bias + ch + 16 * h))), 16))
                       : _mm512_setzero_ps();
        if (nc == 16) break;
    }
    for (int g = 0; g < 2; g++) {  /* tokens tok + 16g .. */
        int64_t t0 = tok + 16 * g;
        int nr = e->m - t0 < 16 ? (int)(e->m - t0) : 16;
        if (nr <= 0) break;
        __m512 r[2][16];
        for (int h = 0; h < nc / 16; h++) {
            for (int i = 0; i < 16; i++)  /* exact: int32 -> float rounds as (float) does */
                r[h][i] = _mm512_cvtepi32_ps(_mm512_loadu_si512(&sums[16 * h + i][16 * g]));
            transpose16(r[h]);
        }
        for (int j = 0; j < nr; j++) {
            uint16_t *yr = e->y + (t0 + j) * e->ldy + ch;
            float s = e->sx[t0 + j];
            for (int h = 0; h < nc / 16; h++)
                _mm256_storeu_si256((__m256i *)(yr + 16 * h),
                                    output16(r[h][j], s, w[h], e->bias ? &b[h] : 0));
        }
    }
}

/* Blocking (bytes and counts chosen on the AMX Xeon this was measured on, 2 MB L2 per core):
   a block of NB channels x MB tokens keeps its int32 sums in `acc_buf` (NB x MB x 4 bytes)
   while K goes past in steps of KC, so the weight block (NB x KC) and the tokens (32 x KC) it meets
   stay in L2; each token is read N / NB times and each weight row M / MB times from memory.
   K up to 2 KC runs in one step (no parking of sums). Of (NB, MB, KC) = (128-512, 256-1280,
   512-2048), this was within 5% of the best on every Flux shape: 0.5-0.6x the bf16 product. */
enum { NB = 256, MB = 256, KC = 2048 };

/* Channels [32 c0, min(n, 32 c1)) of y bf16 [M, ldy] = scaled (w [N, K] . xp tokens), xp
   holding groups * 16 >= M rounded up to 32 tokens. Over 60 lines: one loop nest over the tile
   registers, which _tile_* intrinsics name by constant, so no part of it can be a function. */
int dq_amx_int8_linear(const int8_t *w, int64_t k, int64_t n, const int8_t *xp, int64_t groups,
                       int64_t c0, int64_t c1, const float *sx, const float *sw,
                       const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m) {
    int64_t mr = (m + 31) / 32 * 32;
    if (k % 64 || n % 16 || groups * 16 < mr) return -1;
    const int64_t nbs = NB, mbs = MB, kcs = k <= 2 * KC ? k : KC;
    /* a block's parked sums when K is split; per call (256 KB): threads of the POSIX build
       are new on every call, so a buffer kept per thread would leak */
    int32_t *acc_buf = 0;
    if (kcs < k && !(acc_buf = aligned_alloc(64, (size_t)(nbs * mbs * 4)))) return 1;
    epilogue_args e = {sx, sw, bias, y, ldy, m};
    int64_t first = 32 * c0, last = 32 * c1 < n ? 32 * c1 : n;
    int32_t sums[32][32] __attribute__((aligned(64)));
    configure_tiles();
    for (int64_t nb = first; nb < last; nb += nbs) {
        int64_t ne = nb + nbs < last ? nb + nbs : last;
        for (int64_t mb = 0; mb < mr; mb += mbs) {
            int64_t me = mb + mbs < mr ? mb + mbs : mr;
            for (int64_t kc = 0; kc < k; kc += kcs) {
                int64_t ke = kc + kcs < k ? kc + kcs : k;
                for (int64_t ms = mb; ms < me; ms += 32) {
                    const int8_t *b0 = xp + ms * k, *b1 = b0 + 16 * k;  /* groups ms/16, +1 */
                    for (int64_t ns = nb; ns < ne; ns += 32) {
                        int two = ns + 16 < ne;
                        const int8_t *a0 = w + ns * k, *a1 = w + (ns + 16) * k;
                        /* this block's parked sums, [32][mbs] (used only when K is split) */
                        int32_t *c = kcs < k ? acc_buf + (ns - nb) * mbs + (ms - mb) : 0;
                        if (kc == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                            _tile_zero(2);
                            _tile_zero(3);
                        } else {
                            _tile_loadd(0, c, mbs * 4);
                            _tile_loadd(1, c + 16, mbs * 4);
                            _tile_loadd(2, c + 16 * mbs, mbs * 4);
                            _tile_loadd(3, c + 16 * mbs + 16, mbs * 4);
                        }
                        for (int64_t kk = kc; kk < ke; kk += 64) {
                            _tile_loadd(4, a0 + kk, k);
                            _tile_loadd(6, b0 + kk * 16, 64);  /* word rows kk/4 .. kk/4 + 15 */
                            _tile_loadd(7, b1 + kk * 16, 64);
                            _tile_dpbssd(0, 4, 6);
                            _tile_dpbssd(1, 4, 7);
                            if (two) {
                                _tile_loadd(5, a1 + kk, k);
                                _tile_dpbssd(2, 5, 6);
                                _tile_dpbssd(3, 5, 7);
                            }
                        }
                        if (ke < k) {  /* more K to come: park the sums */
                            _tile_stored(0, c, mbs * 4);
                            _tile_stored(1, c + 16, mbs * 4);
                            _tile_stored(2, c + 16 * mbs, mbs * 4);
                            _tile_stored(3, c + 16 * mbs + 16, mbs * 4);
                            continue;
                        }
                        _tile_stored(0, &sums[0][0], 128);
                        _tile_stored(1, &sums[0][16], 128);
                        if (two) {
                            _tile_stored(2, &sums[16][0], 128);
                            _tile_stored(3, &sums[16][16], 128);
                        }
                        scale_block(sums, ns, two ? 32 : 16, ms, &e);
                    }
                }
            }
        }
    }
    _tile_release();
    free(acc_buf);
    return 0;
}
#else
int dq_amx_available(void) { return 0; }

int dq_quantize_rows_vnni_bf16(const uint16_t *x, int64_t ldx, int64_t r0, int64_t r1,
                               int64_t k, int8_t *xp, float *scale) {
    (void)x, (void)ldx, (void)r0, (void)r1, (void)k, (void)xp, (void)scale;
    return -1;
}

int dq_amx_int8_linear(const int8_t *w, int64_t k, int64_t n, const int8_t *xp, int64_t groups,
                       int64_t c0, int64_t c1, const float *sx, const float *sw,
                       const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m) {
    (void)w, (void)k, (void)n, (void)xp, (void)groups, (void)c0, (void)c1, (void)sx, (void)sw;
    (void)bias, (void)y, (void)ldy, (void)m;
    return -1;
}
#endif
