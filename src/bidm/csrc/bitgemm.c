/* Binary (1-bit) conv2d / linear by XOR-popcount and AND-popcount on bit-packed operands.
 *
 * Built at first use by bidm/export/kernels.py (plain C11, `cc -O3 -shared -fPIC [-fopenmp] [-mavx2 -mpopcnt]
 * [-mavx512f -mavx512vpopcntdq]`)
 * and called through ctypes on contiguous torch buffers. The layout is the one of bidm/export/pack.py
 * (LAYOUT_VERSION 1):
 *
 *   word  = uint64, little-endian bit order: channel c of a pixel lives in word c / 64, bit c % 64.
 *   bit   = 1 <=> code is -1 ("pm1" codes), or 1 <=> code is 1 ("01" codes, DoReFa activations).
 *   pad   = channels Cin..64*Wc-1 hold bit 0 in activations and weights.
 *   acts  = [B, H, W, Wc] words (channels packed per pixel, NHWC order).
 *   wts   = [Cout, kh, kw, Wc] words (reduction order: tap row dy, tap column dx, channel).
 *
 * Dot products (K = kh*kw*Cin real bits, A = activations, W = weights, both with bit 1 = -1):
 *   pm1 x pm1:  dot = K - 2 popc(A ^ W)
 *   01  x pm1:  dot = popc(A) - 2 popc(A & W)       (a in {0,1}, w = 1 - 2*bit)
 * Zero padding of the binarized input (padded taps contribute 0) is reproduced exactly: the im2col tile writes
 * padded taps as all-zero words (= +1 codes for pm1, = 0 codes for 01) and records them in a per-pixel tap mask;
 * for pm1 the epilogue subtracts what the +1 taps added, tapsum_t[t][o] = Cin - 2 popc(W[o, t]). For 01 a zero word
 * already contributes 0.
 *
 * Epilogue: the real-valued factors of XNOR/BiDM-style layers (alpha, K map, bias, scaled shortcut) are applied
 * while each micro-tile is written (see bidm_epilogue), and the output may be written channels last.
 *
 * Blocking: the output pixels (b, oh, ow) are cut into tiles of MC pixels, one tile per OpenMP task. Each task
 * gathers its tile's im2col rows (KW = kh*kw*Wc words each) once, then sweeps the weight panel (NR = 8 output
 * channels interleaved per word, see bidm_make_panel) with an MR x NR micro-kernel, the fastest one compiled in:
 * AVX-512 VPOPCNTDQ (one vpopcntq per 8 words), else the AVX2 nibble-LUT popcount (vpshufb) on 4x64-bit lanes,
 * else scalar 64-bit popcount.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BIDM_AVX512 1 /* the micro-kernel counts with vpopcntq on 8 x 64-bit lanes */
#else
#define BIDM_AVX512 0
#endif

#define BIDM_ABI_VERSION 6
#define NR 8  /* output channels per panel (two 4x64-bit AVX2 lanes, one 8x64-bit AVX-512 lane) */
/* AVX2 without AVX-512 VPOPCNTDQ: the popcount is the nibble-LUT method (vpshufb on pre-split nibble words, the
 * default) or, with -DBIDM_HARLEY_SEAL=1, Harley-Seal carry-save accumulation on whole words (one pixel per call:
 * its 10 accumulator registers per pixel leave no room for two). bench/gemm_micro.py compares them. */
#ifndef BIDM_HARLEY_SEAL
#define BIDM_HARLEY_SEAL 0
#endif
#if BIDM_HARLEY_SEAL && !(defined(__AVX2__) && !BIDM_AVX512)
#error "BIDM_HARLEY_SEAL is the AVX2 micro-kernel: build with -mavx2 and without AVX-512 VPOPCNTDQ"
#endif
#ifndef BIDM_MR
#define BIDM_MR (BIDM_HARLEY_SEAL ? 1 : 2)
#endif
/* pixels per micro-kernel call. AVX2: 2 beat 3 and 4 (4 spills accumulators). AVX-512: 2, 4 and 8 are within
 * run-to-run noise of each other (bench/gemm_micro.py). -DBIDM_MR=N (BIDM_CFLAGS) to try others. */
#define MR BIDM_MR
#define MC 64 /* pixels per task (im2col tile) */
/* Weight panels of at most this many bytes are swept pixel-major (bidm_conv2d); 0 = always panel-major. A tuning
 * knob (bidm_set_pixel_major_bytes; bench/gemm_micro.py --pixel-major A/Bs it in one process). */
static int64_t pixel_major_bytes = 32768;
int64_t bidm_set_pixel_major_bytes(int64_t n) { /* returns the previous value */
    const int64_t old = pixel_major_bytes;
    pixel_major_bytes = n;
    return old;
}

int bidm_abi_version(void) { return BIDM_ABI_VERSION; }

int bidm_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int bidm_has_avx2(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

int bidm_has_avx512(void) { return BIDM_AVX512; }

/* 0 scalar, 1 AVX2 nibble LUT, 2 AVX2 Harley-Seal, 3 AVX-512 vpopcntq */
int bidm_popcount_method(void) {
#if BIDM_AVX512
    return 3;
#elif BIDM_HARLEY_SEAL
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

int bidm_mr(void) { return MR; }

static inline int popc64(uint64_t x) { return __builtin_popcountll(x); }

/* ---------------------------------------------------------------------------------------------------------------
 * Packing float codes into words. mode 0: bit = (x < 0), mode 1: bit = (x > 0.5). */

static inline uint64_t code_bit(float v, int mode) { return mode ? (uint64_t)(v > 0.5f) : (uint64_t)(v < 0.0f); }

/* The fused input pass of a binary layer, in one read of x:
 *   words[b, p]  = bits of code(x[b, :, p] + shift), mode 0: bit = (x + shift < 0), mode 1: bit = (x + shift > 0.5);
 *   absmean[b, p] = mean_c |x[b, c, p]| (the input of XNOR's / BiDM's K map; skipped when absmean is NULL).
 * x is [B, C, HW] (nhwc = 0, NCHW) or [B, HW, C] (nhwc = 1, channels last); shift [C] or NULL (= 0).
 * out: [B, HW, Wc] (channels packed per pixel). */

/* One pixel's row of C floats -> its Wc words (and mean_c |x| when absmean). */
static inline void pack_row(const float *row, int64_t C, const float *shift, int mode, uint64_t *dst,
                            float *absmean) {
    const int64_t Wc = (C + 63) / 64;
    float abs_sum = 0.0f;
    for (int64_t k = 0; k < Wc; k++) {
        const int64_t c0 = k * 64, n = (C - c0 < 64) ? C - c0 : 64;
        uint64_t word = 0;
        int64_t b = 0;
#if defined(__AVX2__)
        const __m256 zero = _mm256_setzero_ps(), half = _mm256_set1_ps(0.5f);
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 acc = zero;
        for (; b + 8 <= n; b += 8) {
            const __m256 v = _mm256_loadu_ps(row + c0 + b);
            const __m256 u = shift ? _mm256_add_ps(v, _mm256_loadu_ps(shift + c0 + b)) : v;
            const __m256 bit = mode ? _mm256_cmp_ps(u, half, _CMP_GT_OQ) : _mm256_cmp_ps(u, zero, _CMP_LT_OQ);
            word |= (uint64_t)(unsigned)_mm256_movemask_ps(bit) << b;
            acc = _mm256_add_ps(acc, _mm256_and_ps(v, nosign));
        }
        if (absmean) {
            float lanes[8];
            _mm256_storeu_ps(lanes, acc);
            for (int l = 0; l < 8; l++) abs_sum += lanes[l];
        }
#endif
        for (; b < n; b++) {
            const float v = row[c0 + b], u = shift ? v + shift[c0 + b] : v;
            word |= code_bit(u, mode) << b;
            abs_sum += v < 0 ? -v : v;
        }
        dst[k] = word;
    }
    if (absmean) *absmean = abs_sum * (1.0f / (float)C);
}

/* Rows p = 0..P-1 of x [P, C] packed serially (the fused GroupNorm's third pass, groupnorm.c). */
void bidm_pack_rows(const float *x, int64_t P, int64_t C, const float *shift, int mode, uint64_t *out,
                    float *absmean) {
    const int64_t Wc = (C + 63) / 64;
    for (int64_t m = 0; m < P; m++) pack_row(x + m * C, C, shift, mode, out + m * Wc, absmean ? absmean + m : NULL);
}

static void pack_pixels_nhwc(const float *x, int64_t P, int64_t C, const float *shift, int mode, uint64_t *out,
                             float *absmean, int nthreads) {
    const int64_t Wc = (C + 63) / 64;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P * C > 65536)
    for (int64_t m = 0; m < P; m++) pack_row(x + m * C, C, shift, mode, out + m * Wc, absmean ? absmean + m : NULL);
}

static void pack_pixels_nchw(const float *x, int64_t B, int64_t C, int64_t HW, const float *shift, int mode,
                             uint64_t *out, float *absmean, int nthreads) {
    const int64_t Wc = (C + 63) / 64, CH = 256; /* pixels per chunk */
    const int64_t nchunk = (HW + CH - 1) / CH;
    const float inv_c = 1.0f / (float)C;
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B * C * HW > 65536)
    for (int64_t task = 0; task < B * nchunk; task++) {
        const int64_t b = task / nchunk, p0 = (task % nchunk) * CH;
        const int64_t np = (HW - p0 < CH) ? HW - p0 : CH;
        uint64_t acc[256];
        float abs_sum[256];
        for (int64_t p = 0; p < np; p++) abs_sum[p] = 0.0f;
        for (int64_t k = 0; k < Wc; k++) {
            const int64_t c0 = k * 64, nc = (C - c0 < 64) ? C - c0 : 64;
            for (int64_t p = 0; p < np; p++) acc[p] = 0;
            for (int64_t cb = 0; cb < nc; cb++) {
                const float *src = x + (b * C + c0 + cb) * HW + p0;
                const float s = shift ? shift[c0 + cb] : 0.0f;
                if (mode) {
                    for (int64_t p = 0; p < np; p++) acc[p] |= (uint64_t)(src[p] + s > 0.5f) << cb;
                } else if (shift) {
                    for (int64_t p = 0; p < np; p++) acc[p] |= (uint64_t)(src[p] + s < 0.0f) << cb;
                } else {
                    for (int64_t p = 0; p < np; p++) acc[p] |= (uint64_t)(src[p] < 0.0f) << cb;
                }
                if (absmean)
                    for (int64_t p = 0; p < np; p++) abs_sum[p] += src[p] < 0 ? -src[p] : src[p];
            }
            uint64_t *dst = out + (b * HW + p0) * Wc + k;
            for (int64_t p = 0; p < np; p++) dst[p * Wc] = acc[p];
        }
        if (absmean)
            for (int64_t p = 0; p < np; p++) absmean[b * HW + p0 + p] = abs_sum[p] * inv_c;
    }
}

void bidm_pack_input(const float *x, int64_t B, int64_t C, int64_t HW, int nhwc, const float *shift, int mode,
                     uint64_t *out, float *absmean, int nthreads) {
    if (nhwc || HW == 1)
        pack_pixels_nhwc(x, B * HW, C, shift, mode, out, absmean, nthreads);
    else
        pack_pixels_nchw(x, B, C, HW, shift, mode, out, absmean, nthreads);
}

/* x: [B, C, HW] (NCHW) -> out: [B, HW, Wc] (channels packed per pixel). */
void bidm_pack_nchw(const float *x, int64_t B, int64_t C, int64_t HW, int mode, uint64_t *out, int nthreads) {
    bidm_pack_input(x, B, C, HW, 0, NULL, mode, out, NULL, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Weight panel and tile formats.
 *
 * With AVX2 (SPLIT = 2) every word w is stored as two "nibble words", lo = w & 0x0f..0f and hi = (w >> 4) & 0x0f..0f,
 * because OP(a, w) commutes with the split for OP in {XOR, AND}: the micro-kernel then needs no shift or mask
 * before its vpshufb lookups. Panel: [ceil(Cout/NR), KW, SPLIT, NR] (NR output channels interleaved per word,
 * channels past Cout zero). Tile rows: [MR-padded pixels, KW, SPLIT]. With AVX-512 VPOPCNTDQ or without AVX2
 * (SPLIT = 1) words stay whole. */

#if defined(__AVX2__) && !BIDM_AVX512 && !BIDM_HARLEY_SEAL
#define SPLIT 2
#else
#define SPLIT 1
#endif
#define NIB 0x0f0f0f0f0f0f0f0fULL

int bidm_panel_width(void) { return NR; }

int64_t bidm_panel_words(int64_t Cout, int64_t KW) { return (Cout + NR - 1) / NR * KW * NR * SPLIT; }

void bidm_make_panel(const uint64_t *w, int64_t Cout, int64_t KW, uint64_t *panel) {
    const int64_t npan = (Cout + NR - 1) / NR;
    for (int64_t pb = 0; pb < npan; pb++)
        for (int64_t k = 0; k < KW; k++)
            for (int64_t j = 0; j < NR; j++) {
                const int64_t o = pb * NR + j;
                const uint64_t v = o < Cout ? w[o * KW + k] : 0;
                uint64_t *dst = panel + (pb * KW + k) * SPLIT * NR + j;
#if SPLIT == 2
                dst[0] = v & NIB;
                dst[NR] = (v >> 4) & NIB;
#else
                dst[0] = v;
#endif
            }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Micro-kernels: cnt[i][j] = sum_k popc(OP(A[i][k], P[k][j])), i < MR pixels, j < NR channels. */

#if BIDM_AVX512
/* one zmm holds the NR = 8 channels' words of tap-word k; the pixel's word is broadcast (folded into the xor). The
 * k loop is unrolled 4x: its counter and compare otherwise take vector ports' slots (128->128 3x3, 32x32, batch 64:
 * 7.95 -> 6.84 ms; 8x gives the same) */
#define DEFINE_MICRO_AVX512(NAME, OP)                                                                            \
    static void NAME(const uint64_t *A, int64_t KW, const uint64_t *P, int32_t cnt[MR][NR]) {                   \
        __m512i acc[MR];                                                                                         \
        for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_si512();                                            \
        _Pragma("GCC unroll 4") for (int64_t k = 0; k < KW; k++) {                                               \
            const __m512i w = _mm512_loadu_si512((const void *)(P + k * NR));                                    \
            for (int i = 0; i < MR; i++) {                                                                       \
                const __m512i a = _mm512_set1_epi64((long long)A[i * KW + k]);                                   \
                acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(OP(a, w)));                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < MR; i++) _mm256_storeu_si256((__m256i *)cnt[i], _mm512_cvtepi64_epi32(acc[i]));     \
    }

DEFINE_MICRO_AVX512(micro_xor, _mm512_xor_si512)
DEFINE_MICRO_AVX512(micro_and, _mm512_and_si512)

#elif BIDM_HARLEY_SEAL
/* Harley-Seal: per 64-bit lane (one output channel), x_k = OP(a_k, w_k) are summed bitwise by carry-save adders
 * into ones / twos / fours; every 8 inputs the carry-out (eights) is popcounted (nibble LUT + vpsadbw) and added
 * with weight 8. Inputs past the last full block of 8 go through the adders too; the end adds
 * 4 popc(fours) + 2 popc(twos) + popc(ones). Channels 0-3 and 4-7 are two independent ymm chains. */
#define CSA(carry, sum, a, b, c) /* carry:sum = a + b + c, bitwise */                                         \
    do {                                                                                                         \
        const __m256i u_ = _mm256_xor_si256(a, b);                                                               \
        carry = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u_, c));                                \
        sum = _mm256_xor_si256(u_, c);                                                                           \
    } while (0)
static inline __m256i popc_lanes(__m256i v) { /* per 64-bit lane */
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                         2, 2, 3, 2, 3, 3, 4);
    const __m256i nib = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib));
    const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi64(v, 4), nib));
    return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}
#define DEFINE_MICRO_HS(NAME, OP)                                                                                \
    static void NAME(const uint64_t *A, int64_t KW, const uint64_t *P, int32_t cnt[MR][NR]) {                   \
        for (int i = 0; i < MR; i++) {                                                                           \
            __m256i tot[2], ones[2], twos[2], fours[2];                                                          \
            for (int h = 0; h < 2; h++) tot[h] = ones[h] = twos[h] = fours[h] = _mm256_setzero_si256();          \
            const uint64_t *a = A + i * KW;                                                                      \
            int64_t k = 0;                                                                                       \
            for (; k + 8 <= KW; k += 8)                                                                          \
                for (int h = 0; h < 2; h++) {                                                                    \
                    __m256i x[8], twosA, twosB, foursA, foursB, eights;                                          \
                    for (int q = 0; q < 8; q++)                                                                  \
                        x[q] = OP(_mm256_set1_epi64x((long long)a[k + q]),                                       \
                                  _mm256_loadu_si256((const __m256i *)(P + (k + q) * NR + 4 * h)));              \
                    CSA(twosA, ones[h], ones[h], x[0], x[1]);                                                    \
                    CSA(twosB, ones[h], ones[h], x[2], x[3]);                                                    \
                    CSA(foursA, twos[h], twos[h], twosA, twosB);                                                 \
                    CSA(twosA, ones[h], ones[h], x[4], x[5]);                                                    \
                    CSA(twosB, ones[h], ones[h], x[6], x[7]);                                                    \
                    CSA(foursB, twos[h], twos[h], twosA, twosB);                                                 \
                    CSA(eights, fours[h], fours[h], foursA, foursB);                                             \
                    tot[h] = _mm256_add_epi64(tot[h], _mm256_slli_epi64(popc_lanes(eights), 3));                 \
                }                                                                                                \
            for (; k < KW; k++) /* the tail: straight popcounts */                                               \
                for (int h = 0; h < 2; h++)                                                                      \
                    tot[h] = _mm256_add_epi64(                                                                   \
                        tot[h], popc_lanes(OP(_mm256_set1_epi64x((long long)a[k]),                               \
                                              _mm256_loadu_si256((const __m256i *)(P + k * NR + 4 * h)))));      \
            for (int h = 0; h < 2; h++) {                                                                        \
                tot[h] = _mm256_add_epi64(tot[h], _mm256_slli_epi64(popc_lanes(fours[h]), 2));                   \
                tot[h] = _mm256_add_epi64(tot[h], _mm256_slli_epi64(popc_lanes(twos[h]), 1));                    \
                tot[h] = _mm256_add_epi64(tot[h], popc_lanes(ones[h]));                                          \
            }                                                                                                    \
            const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);                                      \
            const __m256i lo = _mm256_permutevar8x32_epi32(tot[0], even);                                        \
            const __m256i hi = _mm256_permutevar8x32_epi32(tot[1], even);                                        \
            _mm256_storeu_si256((__m256i *)cnt[i], _mm256_permute2x128_si256(lo, hi, 0x20));                     \
        }                                                                                                        \
    }

DEFINE_MICRO_HS(micro_xor, _mm256_xor_si256)
DEFINE_MICRO_HS(micro_and, _mm256_and_si256)

#elif defined(__AVX2__)
#define DEFINE_MICRO_AVX2(NAME, OP)                                                                              \
    static void NAME(const uint64_t *A, int64_t KW, const uint64_t *P, int32_t cnt[MR][NR]) {                   \
        const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, \
                                             3, 1, 2, 2, 3, 2, 3, 3, 4);                                         \
        const __m256i zero = _mm256_setzero_si256();                                                             \
        __m256i tot[MR][2];                                                                                      \
        for (int i = 0; i < MR; i++) tot[i][0] = tot[i][1] = zero;                                               \
        for (int64_t k0 = 0; k0 < KW; k0 += 31) { /* byte counters hold at most 31 * 8 */                       \
            const int64_t k1 = (k0 + 31 < KW) ? k0 + 31 : KW;                                                    \
            __m256i c[MR][2];                                                                                    \
            for (int i = 0; i < MR; i++) c[i][0] = c[i][1] = zero;                                               \
            for (int64_t k = k0; k < k1; k++) {                                                                  \
                const uint64_t *p = P + k * 2 * NR;                                                              \
                const __m256i w0l = _mm256_loadu_si256((const __m256i *)p);                                      \
                const __m256i w1l = _mm256_loadu_si256((const __m256i *)(p + 4));                                \
                const __m256i w0h = _mm256_loadu_si256((const __m256i *)(p + 8));                                \
                const __m256i w1h = _mm256_loadu_si256((const __m256i *)(p + 12));                               \
                for (int i = 0; i < MR; i++) {                                                                   \
                    const __m256i al = _mm256_set1_epi64x((long long)A[(i * KW + k) * 2]);                       \
                    const __m256i ah = _mm256_set1_epi64x((long long)A[(i * KW + k) * 2 + 1]);                   \
                    c[i][0] = _mm256_add_epi8(c[i][0], _mm256_shuffle_epi8(lut, OP(al, w0l)));                   \
                    c[i][0] = _mm256_add_epi8(c[i][0], _mm256_shuffle_epi8(lut, OP(ah, w0h)));                   \
                    c[i][1] = _mm256_add_epi8(c[i][1], _mm256_shuffle_epi8(lut, OP(al, w1l)));                   \
                    c[i][1] = _mm256_add_epi8(c[i][1], _mm256_shuffle_epi8(lut, OP(ah, w1h)));                   \
                }                                                                                                \
            }                                                                                                    \
            for (int i = 0; i < MR; i++) {                                                                       \
                tot[i][0] = _mm256_add_epi64(tot[i][0], _mm256_sad_epu8(c[i][0], zero));                         \
                tot[i][1] = _mm256_add_epi64(tot[i][1], _mm256_sad_epu8(c[i][1], zero));                         \
            }                                                                                                    \
        }                                                                                                        \
        const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6); /* low halves of the 64-bit counts */    \
        for (int i = 0; i < MR; i++) {                                                                           \
            const __m256i lo = _mm256_permutevar8x32_epi32(tot[i][0], even);                                     \
            const __m256i hi = _mm256_permutevar8x32_epi32(tot[i][1], even);                                     \
            _mm256_storeu_si256((__m256i *)cnt[i], _mm256_permute2x128_si256(lo, hi, 0x20));                     \
        }                                                                                                        \
    }

DEFINE_MICRO_AVX2(micro_xor, _mm256_xor_si256)
DEFINE_MICRO_AVX2(micro_and, _mm256_and_si256)

#else /* portable scalar micro-kernels */

#define DEFINE_MICRO_SCALAR(NAME, OP)                                                                            \
    static void NAME(const uint64_t *A, int64_t KW, const uint64_t *P, int32_t cnt[MR][NR]) {                   \
        for (int i = 0; i < MR; i++) {                                                                           \
            const uint64_t *a = A + i * KW;                                                                      \
            int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;                              \
            for (int64_t k = 0; k < KW; k++) {                                                                   \
                const uint64_t x = a[k], *p = P + k * NR;                                                        \
                s0 += popc64(x OP p[0]);                                                                         \
                s1 += popc64(x OP p[1]);                                                                         \
                s2 += popc64(x OP p[2]);                                                                         \
                s3 += popc64(x OP p[3]);                                                                         \
                s4 += popc64(x OP p[4]);                                                                         \
                s5 += popc64(x OP p[5]);                                                                         \
                s6 += popc64(x OP p[6]);                                                                         \
                s7 += popc64(x OP p[7]);                                                                         \
            }                                                                                                    \
            cnt[i][0] = s0, cnt[i][1] = s1, cnt[i][2] = s2, cnt[i][3] = s3;                                      \
            cnt[i][4] = s4, cnt[i][5] = s5, cnt[i][6] = s6, cnt[i][7] = s7;                                      \
        }                                                                                                        \
    }

DEFINE_MICRO_SCALAR(micro_xor, ^)
DEFINE_MICRO_SCALAR(micro_and, &)

#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Binary conv2d (and linear, as a 1x1 conv on a 1x1 image).
 *
 * a      [B, H, W, Wc] packed activations          panel  from bidm_make_panel(w [Cout, kh*kw*Wc])
 * tapsum_t [kh*kw, NR*ceil(Cout/NR)] int32, Cin - 2 popc(w[o,t]), zero past Cout (read for mode 0 only)
 * y      [B, Cout, Ho, Wo] float32 (out_nhwc = 0) or [B, Ho, Wo, Cout] (out_nhwc = 1, channels last).
 * Padding is (top, left) = (ph, pw); bottom/right padding is whatever Ho, Wo imply.
 *
 * Epilogue (epi NULL: y = the exact integer dots d, NCHW), applied while the tile is written, in this float order:
 *   y[b, o, p] = (((d * alpha[o]) * K[b, p] + bias[o]) + res_scale * res[b, o, p]) + row_bias[b, o]
 * alpha [Cout], bias [Cout], res [B, Cout, Ho, Wo] (res_nhwc 0) or [B, Ho, Wo, Cout] (res_nhwc 1), row_bias
 * [B, Cout]; each may be NULL (factor 1, term 0). row_bias is the time-embedding add that follows conv1 in a UNet
 * ResBlock, in the order the block does it, so fusing it changes no float. res_up = u > 1 (res channels last only):
 * res is [B, Ho/u, Wo/u, Cout] and res[b, o, p] reads its pixel (oh/u, ow/u), the nearest-upsampled residual of a
 * UNet Upsample conv, which is then never made. K is kmap [B, Ho*Wo] when given, else, when kmean is given, the K
 * map computed in the tile:
 *   K[b, p] = sum over in-bounds taps t of kweight[t] * kmean[b, ih(p, t), iw(p, t)] + kbias
 * (XNOR/BiDM's 1-channel conv of mean_c|x| [B, H, W], same kernel, stride and zero padding as the binary conv);
 * else 1.
 */
typedef struct {
    const float *alpha, *kmap, *bias, *res, *kmean, *kweight;
    float res_scale, kbias;
    int32_t res_nhwc, out_nhwc;
    const float *row_bias;
    int32_t res_up, pad_;
} bidm_epilogue;

/* One output pixel m (NCHW offset of its channel 0: nchw0) of a micro-tile: the dots v[0 .. nj-1] of channels
 * o0 .. o0+nj-1, through the epilogue (row_bias: e->row_bias + b * Cout for the pixel's sample b, or NULL; res_px:
 * the offset of the pixel's channel 0 in e->res) (AVX2: one 8-float vector per pixel; the same float operations). */
static inline void write_pixel(const bidm_epilogue *e, int64_t m, int64_t nchw0, int64_t HWo, int64_t Cout,
                               int64_t o0, int64_t nj, const int32_t *v, float km, const float *row_bias,
                               int64_t res_px, float *y) {
    const int64_t nchw = nchw0 + o0 * HWo, nhwc = m * Cout + o0;
    const int64_t ostride = e->out_nhwc ? 1 : HWo, rstride = e->res_nhwc ? 1 : HWo;
    float *yo = y + (e->out_nhwc ? nhwc : nchw);
    const float *ro = e->res ? e->res + res_px + o0 * rstride : NULL;
    const float *rb = row_bias ? row_bias + o0 : NULL; /* this pixel's sample's row of e->row_bias */
#if defined(__AVX2__)
    if (nj == 8 && NR == 8) {
        float tmp[8];
        __m256 f = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)v));
        if (e->alpha) f = _mm256_mul_ps(f, _mm256_loadu_ps(e->alpha + o0));
        if (e->kmap || e->kmean) f = _mm256_mul_ps(f, _mm256_set1_ps(km));
        if (e->bias) f = _mm256_add_ps(f, _mm256_loadu_ps(e->bias + o0));
        if (ro) {
            if (!e->res_nhwc)
                for (int j = 0; j < 8; j++) tmp[j] = ro[j * rstride];
            const __m256 r = _mm256_loadu_ps(e->res_nhwc ? ro : tmp);
            f = _mm256_add_ps(f, _mm256_mul_ps(_mm256_set1_ps(e->res_scale), r));
        }
        if (rb) f = _mm256_add_ps(f, _mm256_loadu_ps(rb));
        if (e->out_nhwc) {
            _mm256_storeu_ps(yo, f);
        } else {
            _mm256_storeu_ps(tmp, f);
            for (int j = 0; j < 8; j++) yo[j * ostride] = tmp[j];
        }
        return;
    }
#endif
    for (int64_t j = 0; j < nj; j++) {
        float f = (float)v[j];
        if (e->alpha) f *= e->alpha[o0 + j];
        if (e->kmap || e->kmean) f *= km;
        if (e->bias) f += e->bias[o0 + j];
        if (ro) f += e->res_scale * ro[j * rstride];
        if (rb) f += rb[j];
        yo[j * ostride] = f;
    }
}

int bidm_conv2d(const uint64_t *a, int64_t B, int64_t H, int64_t W, int64_t Cin, const uint64_t *panel,
                const int32_t *tapsum_t, int64_t Cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, int64_t Ho, int64_t Wo, int mode, float *y, int nthreads, const bidm_epilogue *epi) {
    const int64_t Wc = (Cin + 63) / 64, T = kh * kw, KW = T * Wc, HWo = Ho * Wo, M = B * HWo;
    const int64_t npan = (Cout + NR - 1) / NR;
    if (T > 64) return -1; /* the per-pixel padded-tap mask is one uint64 */
    /* A 1x1, stride-1, unpadded conv (and a linear layer) reads its im2col rows in place. */
    const int direct = (T == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && Ho == H && Wo == W);
    int64_t mc = MC;
    if (nthreads > 1 && M < (int64_t)nthreads * MC) { /* small layers: keep every thread busy */
        mc = (M + nthreads - 1) / nthreads;
        mc = (mc + MR - 1) / MR * MR;
    }
    const int64_t ntile = (M + mc - 1) / mc;
    int status = 0;
    const bidm_epilogue plain = {NULL, NULL, NULL, NULL, NULL, NULL, 0.0f, 0.0f, 0, 0, NULL, 1, 0};
    const bidm_epilogue e = epi ? *epi : plain;
    const int64_t up = e.res_up > 1 ? e.res_up : 1;
    if (up > 1 && (!e.res || !e.res_nhwc || Ho % up || Wo % up)) return -3;
    (void)nthreads;

#pragma omp parallel num_threads(nthreads) if (ntile > 1)
    {
        const size_t rows_cap = (size_t)(mc + MR) * (size_t)KW;
        uint64_t *raw = (uint64_t *)malloc(rows_cap * sizeof(uint64_t));
        uint64_t *split = SPLIT == 2 ? (uint64_t *)malloc(rows_cap * 2 * sizeof(uint64_t)) : raw;
        uint64_t *padmask = (uint64_t *)malloc((size_t)(mc + MR) * sizeof(uint64_t));
        int32_t *popa = (int32_t *)malloc((size_t)(mc + MR) * sizeof(int32_t));
        int64_t *pix = (int64_t *)malloc((size_t)(mc + MR) * sizeof(int64_t)); /* NCHW offset of (b, 0, oh, ow) */
        int64_t *bix = (int64_t *)malloc((size_t)(mc + MR) * sizeof(int64_t)); /* sample b of the pixel */
        int64_t *rof = (int64_t *)malloc((size_t)(mc + MR) * sizeof(int64_t)); /* its channel 0 in e.res */
        float *kv = (float *)malloc((size_t)(mc + MR) * sizeof(float));          /* K map value per pixel */
        const int ok = raw && split && padmask && popa && pix && bix && rof && kv;
        if (!ok) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < ntile; tile++) {
            if (!ok) continue;
            const int64_t m0 = tile * mc, nm = (M - m0 < mc) ? M - m0 : mc;
            const int64_t nm_pad = (nm + MR - 1) / MR * MR;
            /* 1. the tile's im2col rows (raw words), padded-tap masks, output addresses */
            const uint64_t *rows = raw;
            /* pixel m0 + i = (b, oh, ow): one division per tile, then stepped; interior pixels (every tap in
             * bounds) copy each kernel row's kw * Wc words in one run and sum the K map without bounds checks, in
             * the same tap order as the border path (same floats) */
            int64_t b = m0 / HWo, r = m0 % HWo, oh = r / Wo, ow = r % Wo;
            for (int64_t i = 0; i < nm_pad; i++) {
                uint64_t *dst = raw + i * KW;
                padmask[i] = 0;
                if (i >= nm) { /* rows past the end of the batch: computed, never written */
                    memset(dst, 0, (size_t)KW * sizeof(uint64_t));
                    continue;
                }
                if (i > 0 && ++ow == Wo) {
                    ow = 0;
                    if (++oh == Ho) {
                        oh = 0;
                        ++b;
                    }
                }
                r = oh * Wo + ow;
                const int64_t m = m0 + i, ih0 = oh * sh - ph, iw0 = ow * sw - pw;
                const int interior = ih0 >= 0 && ih0 + kh <= H && iw0 >= 0 && iw0 + kw <= W;
                pix[i] = b * Cout * HWo + r;
                bix[i] = b;
                rof[i] = !e.res_nhwc ? pix[i]
                         : up > 1    ? ((b * (Ho / up) + oh / up) * (Wo / up) + ow / up) * Cout
                                     : m * Cout;
                if (e.kmean) {
                    float k = 0.0f;
                    if (interior) {
                        for (int64_t dy = 0; dy < kh; dy++) {
                            const float *km = e.kmean + (b * H + ih0 + dy) * W + iw0;
                            for (int64_t dx = 0; dx < kw; dx++) k += e.kweight[dy * kw + dx] * km[dx];
                        }
                    } else {
                        for (int64_t dy = 0; dy < kh; dy++) {
                            const int64_t ih = ih0 + dy;
                            if (ih < 0 || ih >= H) continue;
                            for (int64_t dx = 0; dx < kw; dx++) {
                                const int64_t iw = iw0 + dx;
                                if (iw >= 0 && iw < W) k += e.kweight[dy * kw + dx] * e.kmean[(b * H + ih) * W + iw];
                            }
                        }
                    }
                    kv[i] = k + e.kbias;
                } else {
                    kv[i] = e.kmap ? e.kmap[m] : 1.0f;
                }
                if (direct) continue;
                if (interior) {
                    const int64_t run = kw * Wc;
                    for (int64_t dy = 0; dy < kh; dy++) {
                        const uint64_t *src = a + ((b * H + ih0 + dy) * W + iw0) * Wc;
                        for (int64_t q = 0; q < run; q++) dst[dy * run + q] = src[q];
                    }
                    continue;
                }
                for (int64_t dy = 0; dy < kh; dy++) {
                    const int64_t ih = ih0 + dy;
                    for (int64_t dx = 0; dx < kw; dx++) {
                        const int64_t iw = iw0 + dx, t = dy * kw + dx;
                        if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                            memset(dst + t * Wc, 0, (size_t)Wc * sizeof(uint64_t));
                            padmask[i] |= (uint64_t)1 << t;
                        } else {
                            const uint64_t *src = a + ((b * H + ih) * W + iw) * Wc;
                            for (int64_t q = 0; q < Wc; q++) dst[t * Wc + q] = src[q]; /* Wc is small: no memcpy call */
                        }
                    }
                }
            }
            if (direct) {
                if (SPLIT == 1 && nm_pad == nm)
                    rows = a + m0 * KW;
                else
                    memcpy(raw, a + m0 * KW, (size_t)(nm * KW) * sizeof(uint64_t));
            }
            if (mode)
                for (int64_t i = 0; i < nm; i++) {
                    int32_t s = 0;
                    for (int64_t k = 0; k < KW; k++) s += popc64(rows[i * KW + k]);
                    popa[i] = s;
                }
#if SPLIT == 2
            for (int64_t q = 0; q < nm_pad * KW; q++) {
                split[2 * q] = rows[q] & NIB;
                split[2 * q + 1] = (rows[q] >> 4) & NIB;
            }
            rows = split;
#endif
            /* 2. sweep the weight panels with the micro-kernel, 3. write the exact integer dots */
            int32_t base[MC + MR]; /* dot = base - 2 cnt (before padded-tap corrections) */
            for (int64_t i = 0; i < nm_pad; i++) base[i] = mode ? popa[i] : (int32_t)(T * Cin);
            /* Loop order: panel-major (each panel's words stay in registers / L1 while the tile's pixels sweep it),
             * or, when all panels fit in L1, pixel-major, so each output row (and residual row) is written (read)
             * in one sequential run instead of NR floats per panel at a stride of Cout. */
            const int pixel_major = npan * KW * SPLIT * NR * (int64_t)sizeof(uint64_t) <= pixel_major_bytes;
            const int64_t n_outer = pixel_major ? nm_pad / MR : npan, n_inner = pixel_major ? npan : nm_pad / MR;
            for (int64_t outer = 0; outer < n_outer; outer++)
                for (int64_t inner = 0; inner < n_inner; inner++) {
                    const int64_t pb = pixel_major ? inner : outer, i0 = (pixel_major ? outer : inner) * MR;
                    const uint64_t *P = panel + pb * KW * SPLIT * NR;
                    const int64_t nj = (Cout - pb * NR < NR) ? Cout - pb * NR : NR;
                    int32_t cnt[MR][NR];
                    if (mode)
                        micro_and(rows + i0 * KW * SPLIT, KW, P, cnt);
                    else
                        micro_xor(rows + i0 * KW * SPLIT, KW, P, cnt);
                    const int32_t *bs = base + i0;
                    int32_t v[MR][NR];
                    for (int i = 0; i < MR; i++) {
#if defined(__AVX2__)
                        /* row by row in 8-lane vectors: each load matches the micro-kernel's 32-byte store of that
                         * row, so it is store-forwarded (a 64-byte load across two rows stalls ~20 cycles) */
                        if (NR == 8) {
                            const __m256i c = _mm256_loadu_si256((const __m256i *)cnt[i]);
                            _mm256_storeu_si256((__m256i *)v[i],
                                                _mm256_sub_epi32(_mm256_set1_epi32(bs[i]), _mm256_slli_epi32(c, 1)));
                            continue;
                        }
#endif
                        for (int j = 0; j < NR; j++) v[i][j] = bs[i] - 2 * cnt[i][j];
                    }
                    uint64_t anypad = 0;
                    for (int i = 0; i < MR; i++) anypad |= padmask[i0 + i];
                    if (!mode && anypad) {
                        /* padded taps of pm1 inputs were packed as +1: take back what they added */
                        for (int i = 0; i < MR; i++)
                            for (uint64_t pm = padmask[i0 + i]; pm; pm &= pm - 1) {
                                const int32_t *ts = tapsum_t + __builtin_ctzll(pm) * npan * NR + pb * NR;
                                for (int j = 0; j < NR; j++) v[i][j] -= ts[j];
                            }
                    }
                    for (int64_t i = 0; i < MR && i0 + i < nm; i++)
                        write_pixel(&e, m0 + i0 + i, pix[i0 + i], HWo, Cout, pb * NR, nj, v[i], kv[i0 + i],
                                    e.row_bias ? e.row_bias + bix[i0 + i] * Cout : NULL, rof[i0 + i], y);
                }
        }
        free(raw);
        if (SPLIT == 2) free(split);
        free(padmask);
        free(popa);
        free(pix);
        free(bix);
        free(rof);
        free(kv);
    }
    return status;
}
