/* GroupNorm (optionally followed by SiLU) on channels-last float32 activations, for the packed runtime.
 *
 * Built into the same library as bitgemm.c (bidm/export/kernels.py). The packed model runs channels last
 * ([B, H, W, C] memory) so that its binary layers pack their input without a transpose; torch's channels-last
 * GroupNorm is slower than its NCHW one on several UNet shapes, and SiLU is one more pass over the tensor
 * (`bench/norm_speed.py` times all three). Here one sample costs two reads and one write:
 *
 *   pass 1: sum_c = sum_p x[p, c], sq_c = sum_p x[p, c]^2       (per channel; float within 32-pixel blocks, double
 *                                                                 across them)
 *           mean_g = sum_{c in g} sum_c / (D * HW), var_g = sum_{c in g} sq_c / (D * HW) - mean_g^2   (D = C / G)
 *           scale_c = gamma_c / sqrt(var_g + eps), shift_c = beta_c - mean_g * scale_c
 *   pass 2: y = x * scale_c + shift_c, then y = y / (1 + exp(-y)) when silu != 0.
 *
 * exp is a Cephes-style single-precision polynomial (range reduction by ln 2, degree-6 polynomial, 2^n built from
 * the exponent bits) in AVX-512 / AVX2 intrinsics where compiled in (scalar otherwise); its error is a few ulp, so y
 * differs from torch's GroupNorm + SiLU by float rounding only. Samples are split across threads; with fewer samples
 * than threads each sample's pixels are cut into chunks whose partial sums are reduced before pass 2.
 *
 * `bidm_group_norm_cat_nhwc` takes one tensor (C2 = 0) or the two halves of a channel concatenation, which it never
 * makes: pass 1 sums each part into its channels' slots, pass 2 writes each part's rows into its half of every
 * output row (the UNet's skip concatenation, `bidm/export/skip_concat.py`).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define GN_MAX_SPLIT 64

/* Per-channel sum and sum of squares over P pixels: float partial sums over blocks of SUM_BLOCK pixels (vector
 * width, cheap), accumulated in double across blocks (no drift over large images). */
#define SUM_BLOCK 32
#define SUM_MAX_C 4096
static void channel_sums(const float *x, int64_t P, int64_t C, double *sum, double *sq) {
    for (int64_t c = 0; c < C; c++) sum[c] = sq[c] = 0.0;
    float fs[SUM_MAX_C], fq[SUM_MAX_C];
    const int blocked = C <= SUM_MAX_C;
    for (int64_t p0 = 0; p0 < P; p0 += SUM_BLOCK) {
        const int64_t p1 = p0 + SUM_BLOCK < P ? p0 + SUM_BLOCK : P;
        if (blocked) {
            for (int64_t c = 0; c < C; c++) fs[c] = fq[c] = 0.0f;
            for (int64_t p = p0; p < p1; p++) {
                const float *row = x + p * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    fs[c] += row[c];
                    fq[c] += row[c] * row[c];
                }
            }
            for (int64_t c = 0; c < C; c++) {
                sum[c] += (double)fs[c];
                sq[c] += (double)fq[c];
            }
        } else {
            for (int64_t p = p0; p < p1; p++)
                for (int64_t c = 0; c < C; c++) {
                    sum[c] += (double)x[p * C + c];
                    sq[c] += (double)x[p * C + c] * (double)x[p * C + c];
                }
        }
    }
}

static void affine_from_sums(const double *sum, const double *sq, int64_t C, int64_t G, int64_t HW,
                             const float *gamma, const float *beta, float eps, float *scale, float *shift) {
    const int64_t D = C / G;
    const double n = (double)(D * HW);
    for (int64_t g = 0; g < G; g++) {
        double s = 0.0, q = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; c++) {
            s += sum[c];
            q += sq[c];
        }
        const double mean = s / n;
        double var = q / n - mean * mean;
        if (var < 0.0) var = 0.0;
        const double rstd = 1.0 / sqrt(var + (double)eps);
        for (int64_t c = g * D; c < (g + 1) * D; c++) {
            const double a = (gamma ? (double)gamma[c] : 1.0) * rstd;
            scale[c] = (float)a;
            shift[c] = (float)((beta ? (double)beta[c] : 0.0) - mean * a);
        }
    }
}

/* silu(u) = u / (1 + exp(-u)). exp(v): v clamped to [-87, 88.8], v = n ln2 + r, exp(r) by a degree-6
 * polynomial, 2^n applied as 2^(n-1) (from the exponent bits) times 2, so that exp overflows to inf where float's
 * does (v > ln FLT_MAX ~ 88.72) and silu gives -0 there, as torch's does; below -87, 1 + exp(v) rounds to 1 anyway.
 * The scalar and the SIMD versions do the same float operations in the same order (no FMA contraction), so a
 * row's tail gives what its vector body would. */
#define EXP_C(name, value) static const float name = value
EXP_C(EXP_LO, -87.0f);
EXP_C(EXP_HI, 88.8f);
EXP_C(LOG2E, 1.44269504088896341f);
EXP_C(LN2_HI, 0.693359375f);
EXP_C(LN2_LO, -2.12194440e-4f);
EXP_C(P0, 1.9875691500e-4f);
EXP_C(P1, 1.3981999507e-3f);
EXP_C(P2, 8.3334519073e-3f);
EXP_C(P3, 4.1665795894e-2f);
EXP_C(P4, 1.6666665459e-1f);
EXP_C(P5, 5.0000001201e-1f);

static inline float silu_scalar(float u) {
    float v = -u;
    v = v < EXP_LO ? EXP_LO : (v > EXP_HI ? EXP_HI : v);
    const float n = floorf(v * LOG2E + 0.5f);
    float r = v - n * LN2_HI;
    r = r - n * LN2_LO;
    const float r2 = r * r;
    float p = P0 * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    p = p * r2 + r + 1.0f;
    union {
        int32_t i;
        float f;
    } half_two_n = {.i = ((int32_t)n + 126) << 23};
    return u / (1.0f + p * half_two_n.f * 2.0f);
}

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define V_SET1 _mm512_set1_ps
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_FLOOR(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define V_HALF_POW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(126)), 23))
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vf;
#define V_SET1 _mm256_set1_ps
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_FLOOR _mm256_floor_ps
#define V_HALF_POW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23))
#else
#define VW 0
#endif

#if VW
static inline vf silu_vec(vf u) {
    vf v = V_SUB(V_SET1(0.0f), u);
    v = V_MIN(V_MAX(v, V_SET1(EXP_LO)), V_SET1(EXP_HI));
    const vf n = V_FLOOR(V_ADD(V_MUL(v, V_SET1(LOG2E)), V_SET1(0.5f)));
    vf r = V_SUB(v, V_MUL(n, V_SET1(LN2_HI)));
    r = V_SUB(r, V_MUL(n, V_SET1(LN2_LO)));
    const vf r2 = V_MUL(r, r);
    vf p = V_ADD(V_MUL(V_SET1(P0), r), V_SET1(P1));
    p = V_ADD(V_MUL(p, r), V_SET1(P2));
    p = V_ADD(V_MUL(p, r), V_SET1(P3));
    p = V_ADD(V_MUL(p, r), V_SET1(P4));
    p = V_ADD(V_MUL(p, r), V_SET1(P5));
    p = V_ADD(V_ADD(V_MUL(p, r2), r), V_SET1(1.0f));
    return V_DIV(u, V_ADD(V_SET1(1.0f), V_MUL(V_MUL(p, V_HALF_POW2(n)), V_SET1(2.0f))));
}
#endif

/* Rows p = 0..P-1 of x (row stride C) normalised into y (row stride ystride): y may hold more channels than x
 * (the two halves of a concatenation are written into one output, each from its own tensor). */
static void normalize_rows(const float *x, int64_t P, int64_t C, const float *scale, const float *shift, int silu,
                           float *y, int64_t ystride) {
    for (int64_t p = 0; p < P; p++) {
        const float *src = x + p * C;
        float *dst = y + p * ystride;
        int64_t c = 0;
        if (silu) {
#if VW
            for (; c + VW <= C; c += VW)
                V_STORE(dst + c, silu_vec(V_ADD(V_MUL(V_LOAD(src + c), V_LOAD(scale + c)), V_LOAD(shift + c))));
#endif
            for (; c < C; c++) dst[c] = silu_scalar(src[c] * scale[c] + shift[c]);
        } else {
#pragma omp simd
            for (c = 0; c < C; c++) dst[c] = src[c] * scale[c] + shift[c];
        }
    }
}

/* The sums of pixels [p0, p0 + np) of sample b over both parts (s: sum[C], then sq[C]), and their normalised rows. */
typedef struct {
    const float *x1, *x2;
    int64_t C1, C2, HW;
    const float *pshift; /* the fused input pass of the binary conv that reads y (words != NULL), bitgemm.c */
    int pmode;
    uint64_t *words;
    float *absmean;
} gn_parts;

void bidm_pack_rows(const float *x, int64_t P, int64_t C, const float *shift, int mode, uint64_t *out,
                    float *absmean);

#define PACK_BLOCK 32 /* pixels normalised, then packed while they are in L1 */

static void parts_sums(const gn_parts *in, int64_t b, int64_t p0, int64_t np, double *s) {
    const int64_t C = in->C1 + in->C2;
    channel_sums(in->x1 + (b * in->HW + p0) * in->C1, np, in->C1, s, s + C);
    if (in->C2) channel_sums(in->x2 + (b * in->HW + p0) * in->C2, np, in->C2, s + in->C1, s + C + in->C1);
}

static void parts_normalize(const gn_parts *in, int64_t b, int64_t p0, int64_t np, const float *a, int silu,
                            float *y) {
    const int64_t C = in->C1 + in->C2, Wc = (C + 63) / 64;
    for (int64_t q0 = p0; q0 < p0 + np; q0 += PACK_BLOCK) {
        const int64_t nq = p0 + np - q0 < PACK_BLOCK ? p0 + np - q0 : PACK_BLOCK, m = b * in->HW + q0;
        float *dst = y + m * C;
        normalize_rows(in->x1 + m * in->C1, nq, in->C1, a, a + C, silu, dst, C);
        if (in->C2)
            normalize_rows(in->x2 + m * in->C2, nq, in->C2, a + in->C1, a + C + in->C1, silu, dst + in->C1, C);
        if (in->words)
            bidm_pack_rows(dst, nq, C, in->pshift, in->pmode, in->words + m * Wc,
                           in->absmean ? in->absmean + m : NULL);
    }
}

/* Task ``task`` of the split path: sample b, pixels [p0, p0 + np). */
static inline void chunk_of(int64_t task, int64_t split, int64_t chunk, int64_t HW, int64_t *b, int64_t *p0,
                            int64_t *np) {
    *b = task / split;
    *p0 = (task % split) * chunk;
    *np = *p0 >= HW ? 0 : (HW - *p0 < chunk ? HW - *p0 : chunk);
}

/* GroupNorm (+ SiLU) of the channel concatenation [x1, x2]: x1 [B, HW, C1], x2 [B, HW, C2] (C2 = 0: x2 unused),
 * y [B, HW, C1 + C2], all float32 channels last; gamma, beta: [C1 + C2] or NULL. Groups may straddle the two parts
 * (the statistics are per-channel sums first). With words != NULL, y is also packed as the binary conv that reads it
 * would pack it (bidm_pack_input of bitgemm.c: bits of y + pshift, mode pmode, into words [B, HW, Wc]; mean_c |y|
 * into absmean [B, HW] when not NULL), each block of pixels right after it is written: the same words, one read of
 * y less. Returns 0, or -1 when (C1 + C2) % G != 0 or an allocation fails (y untouched). */
int bidm_group_norm_cat_nhwc(const float *x1, int64_t C1, const float *x2, int64_t C2, int64_t B, int64_t HW,
                             int64_t G, const float *gamma, const float *beta, float eps, int silu, float *y,
                             int nthreads, const float *pshift, int pmode, uint64_t *words, float *absmean) {
    const int64_t C = C1 + C2;
    if (G <= 0 || C % G != 0) return -1;
    if (nthreads < 1) nthreads = 1;
    const gn_parts in = {x1, x2, C1, C2, HW, pshift, pmode, words, absmean};
    int64_t split = B >= nthreads || HW * C < 65536 ? 1 : (nthreads + B - 1) / B; /* small images: no split */
    if (split > HW) split = HW;
    if (split > GN_MAX_SPLIT) split = GN_MAX_SPLIT;
    const int64_t chunk = (HW + split - 1) / split;
    double *sums = malloc(sizeof(double) * (size_t)(B * split * 2 * C));
    float *affine = malloc(sizeof(float) * (size_t)(B * 2 * C));
    if (!sums || !affine) {
        free(sums);
        free(affine);
        return -1;
    }
    if (split == 1) { /* one task per sample: pass 2 finds the sample in cache */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B * HW * C > 65536)
        for (int64_t b = 0; b < B; b++) {
            double *s = sums + b * 2 * C;
            float *a = affine + b * 2 * C;
            parts_sums(&in, b, 0, HW, s);
            affine_from_sums(s, s + C, C, G, HW, gamma, beta, eps, a, a + C);
            parts_normalize(&in, b, 0, HW, a, silu, y);
        }
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t task = 0; task < B * split; task++) {
            int64_t b, p0, np;
            chunk_of(task, split, chunk, HW, &b, &p0, &np);
            parts_sums(&in, b, p0, np, sums + task * 2 * C);
        }
        for (int64_t b = 0; b < B; b++) {
            double *total = sums + b * split * 2 * C;
            for (int64_t k = 1; k < split; k++)
                for (int64_t c = 0; c < 2 * C; c++) total[c] += total[k * 2 * C + c];
            float *a = affine + b * 2 * C;
            affine_from_sums(total, total + C, C, G, HW, gamma, beta, eps, a, a + C);
        }
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t task = 0; task < B * split; task++) {
            int64_t b, p0, np;
            chunk_of(task, split, chunk, HW, &b, &p0, &np);
            parts_normalize(&in, b, p0, np, affine + b * 2 * C, silu, y);
        }
    }
    free(sums);
    free(affine);
    return 0;
}
