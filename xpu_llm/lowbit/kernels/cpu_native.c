// Native CPU kernel for low-bit weights: y[M, N] = x[M, K] @ W.T, W dequantized in registers (AVX2 + FMA + F16C).
//
// Built once at first use by cpu_native.py (gcc -O3 -mavx2 -mfma -mf16c -fopenmp) and called through ctypes.
// It reads the canonical layouts of formats.py directly (rows = output features, groups of `group` inputs):
//   4-bit: uint8 [N, K/2], element 2j in the low nibble of byte j, 2j+1 in the high nibble;
//   8-bit: one byte per element (int8 codes or fp8 bit patterns).
// Each weight is rebuilt exactly as the reference dequantize does (same single rounding), so the result differs
// from dequantize + matmul in float32 only by the order of the sums. Rows of W are split across OpenMP threads
// (the libgomp that PyTorch already loaded, so no second thread pool); activations are float32.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

enum { SYM_INT4 = 0, ASYM_INT4 = 1, LUT4 = 2, SYM_INT8 = 3, FP8_E4M3 = 4, FP8_E5M2 = 5 };
#define MB 4  // activation rows per pass over a weight row (accumulators kept in registers)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 nibble codes (int32 lanes, 0..15) -> 8 floats of the format's 4-bit value (before the group scale).
static inline __m256 nibble_values(__m256i c, int fmt, __m256 lut_lo, __m256 lut_hi) {
    if (fmt == SYM_INT4) return _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(8)));
    if (fmt == ASYM_INT4) return _mm256_cvtepi32_ps(c);
    __m256 lo = _mm256_permutevar8x32_ps(lut_lo, c), hi = _mm256_permutevar8x32_ps(lut_hi, c);
    __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(lo, hi, upper);
}

// 8 one-byte codes -> 8 floats of the code's value (e4m3: value * 2^-8, see below; exact either way).
static inline __m256 byte_values(const uint8_t *p, int fmt) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    if (fmt == SYM_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    __m128i h = _mm_cvtepu8_epi16(b);
    if (fmt == FP8_E5M2) return _mm256_cvtph_ps(_mm_slli_epi16(h, 8));  // e5m2 is the top byte of an fp16
    // e4m3fn -> fp16 with the exponent field kept: the fp16 reads as value * 2^-8 (subnormals included);
    // the caller's scale carries the 2^8 back (scale * 2^8). No NaN codes: quantize clamps to +-448.
    __m128i sign = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x80)), 8);
    __m128i mag = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7F)), 7);
    return _mm256_cvtph_ps(_mm_or_si128(sign, mag));
}

// One weight row against up to MB activation rows. xs: 4-bit formats pass x split into even and odd columns
// (xs[m*K .. +K/2) even, then odd) so nibbles never need interleaving; 8-bit formats pass x itself.
static inline __attribute__((always_inline)) void row_dot(int fmt, const uint8_t *w, const float *scale, const float *mins, int64_t K,
                           int64_t group, const float *xs, int64_t mb, __m256 lut_lo, __m256 lut_hi, float *dst,
                           int64_t ldd) {
    __m256 acc[MB];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    const int64_t G = K / group;
    if (fmt <= LUT4) {
        const int64_t half = K / 2, gb = group / 2;
        for (int64_t g = 0; g < G; g++) {
            const __m256 s = _mm256_set1_ps(scale[g]);
            const __m256 mn = _mm256_set1_ps(fmt == ASYM_INT4 ? mins[g] : 0.f);
            for (int64_t j = g * gb; j < (g + 1) * gb; j += 8) {
                __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
                __m256 v_even = nibble_values(_mm256_and_si256(c, _mm256_set1_epi32(15)), fmt, lut_lo, lut_hi);
                __m256 v_odd = nibble_values(_mm256_srli_epi32(c, 4), fmt, lut_lo, lut_hi);
                __m256 w_even, w_odd;
                if (fmt == ASYM_INT4) {  // q * s + min: q * s is exact, so the fused form rounds as the reference
                    w_even = _mm256_fmadd_ps(v_even, s, mn);
                    w_odd = _mm256_fmadd_ps(v_odd, s, mn);
                } else {
                    w_even = _mm256_mul_ps(v_even, s);
                    w_odd = _mm256_mul_ps(v_odd, s);
                }
                for (int64_t m = 0; m < mb; m++) {
                    const float *xe = xs + m * K + j;
                    acc[m] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xe), acc[m]);
                    acc[m] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xe + half), acc[m]);
                }
            }
        }
    } else {
        for (int64_t g = 0; g < G; g++) {
            const __m256 s = _mm256_set1_ps(scale[g]);
            for (int64_t j = g * group; j < (g + 1) * group; j += 8) {
                __m256 wv = _mm256_mul_ps(byte_values(w + j, fmt), s);
                for (int64_t m = 0; m < mb; m++)
                    acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + m * K + j), acc[m]);
            }
        }
    }
    for (int64_t m = 0; m < mb; m++) dst[m * ldd] = hsum(acc[m]);
}

// row_dot with the format and the row count as constants (24 specialisations, chosen once per weight row).
#define ROW(F, R) row_dot(F, w, s, mn, K, group, xm, R, lut_lo, lut_hi, dst, ldd)
#define ROWS(F) \
    switch (mb) { case 1: ROW(F, 1); break; case 2: ROW(F, 2); break; case 3: ROW(F, 3); break; default: ROW(F, 4); }
static void row_any(int fmt, int64_t mb, const uint8_t *w, const float *s, const float *mn, int64_t K, int64_t group,
                    const float *xm, __m256 lut_lo, __m256 lut_hi, float *dst, int64_t ldd) {
    switch (fmt) {
    case SYM_INT4: ROWS(SYM_INT4); break;
    case ASYM_INT4: ROWS(ASYM_INT4); break;
    case LUT4: ROWS(LUT4); break;
    case SYM_INT8: ROWS(SYM_INT8); break;
    case FP8_E4M3: ROWS(FP8_E4M3); break;
    default: ROWS(FP8_E5M2); break;
    }
}

// y[M, N] (row stride N) = x[M, K] @ W.T. scale/mins: float32 [N, K/group] (e4m3: scale * 2^8). lut: 16 floats
// for codebook formats. work: M*K floats, used by the 4-bit formats for the even/odd split of x.
// Returns 0, or -1 when a shape is not supported (caller checks first; this is a guard, not an API).
int xl_lowbit_mm(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *qw, const float *scale,
                 const float *mins, const float *lut, int64_t N, int64_t group, float *y, float *work) {
    if (K % group || group % 16 || M <= 0) return -1;
    const int four = fmt <= LUT4;
    const float *xs = x;
    if (four) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < K / 2; j++) {
                work[m * K + j] = x[m * K + 2 * j];
                work[m * K + K / 2 + j] = x[m * K + 2 * j + 1];
            }
        xs = work;
    }
    const __m256 lut_lo = lut ? _mm256_loadu_ps(lut) : _mm256_setzero_ps();
    const __m256 lut_hi = lut ? _mm256_loadu_ps(lut + 8) : _mm256_setzero_ps();
    const int64_t row_bytes = four ? K / 2 : K, G = K / group;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            const uint8_t *w = qw + n * row_bytes;
            const float *s = scale + n * G, *mn = mins ? mins + n * G : 0, *xm = xs + m0 * K;
            float *dst = y + m0 * N + n;
            row_any(fmt, mb, w, s, mn, K, group, xm, lut_lo, lut_hi, dst, N);
        }
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------------------
// Integer path (llama.cpp's approach): activations quantized to int8 per block of 32 (scale absmax / 127), then
// integer dot products with _mm256_maddubs_epi16, 32 weights per instruction. Weights stay exact; activations
// carry the int8 rounding (about the error of bfloat16 activations). Formats: sym_int4, asym_int4, fp4 (whose
// values times 2 are the integers 0..12) and sym_int8.
enum { Q8_SYM_INT4 = 0, Q8_ASYM_INT4 = 1, Q8_FP4 = 2, Q8_INT8 = 3 };

// Quantize x [M, K] into xq (int8 [M, K]; 4-bit formats store each block of 32 as its 16 even then 16 odd
// elements, the order of the low and high nibbles of 16 weight bytes), dx [M, K/32] block scales and
// gsum [M, K/group] = sum over the group's blocks of dx * sum(xq) (for the offsets of sym and asym int4).
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t group, int split, int8_t *xq, float *dx,
                          float *gsum) {
    const int64_t C = K / 32, per = group / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < C; c++) {
            const float *src = x + m * K + c * 32;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fabsf(src[i]) > amax ? fabsf(src[i]) : amax;
            const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int8_t *dst = xq + m * K + c * 32;
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                const int at = split ? (i % 2) * 16 + i / 2 : i;
                const int v = (int)nearbyintf(src[i] * inv);
                dst[at] = (int8_t)v;
                sum += v;
            }
            dx[m * C + c] = d;
            if (c % per == 0) gsum[m * (K / group) + c / per] = 0.f;
            gsum[m * (K / group) + c / per] += d * (float)sum;
        }
    }
}

static inline __attribute__((always_inline)) void row_dot_q8(int fmt, const uint8_t *w, const float *scale,
                                                             const float *mins, int64_t K, int64_t group,
                                                             const int8_t *xq, const float *dx,
                                                             const float *gsum, int64_t mb, float *dst,
                                                             int64_t ldd) {
    __m256 acc[MB];
    float off[MB];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps(), off[m] = 0.f;
    const int64_t G = K / group, C = K / 32, per = group / 32;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
    // fp4 values times 2 by nibble (bit 3 = sign), in both 128-bit lanes for the byte shuffle
    const __m256i fp4 = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6,
                                         8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    for (int64_t g = 0; g < G; g++) {
        const float s = fmt == Q8_FP4 ? scale[g] * 0.5f : scale[g];
        if (fmt == Q8_SYM_INT4 || fmt == Q8_ASYM_INT4) {  // sum(q * x) carries an offset: -8 s or min per x
            const float coef = fmt == Q8_SYM_INT4 ? -8.f * s : mins[g];
            for (int64_t m = 0; m < mb; m++) off[m] += coef * gsum[m * G + g];
        }
        for (int64_t c = g * per; c < (g + 1) * per; c++) {
            __m256i wv;
            if (fmt == Q8_INT8) {
                wv = _mm256_loadu_si256((const __m256i *)(w + c * 32));
            } else {
                const __m128i b = _mm_loadu_si128((const __m128i *)(w + c * 16));
                wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low4);  // even | odd elements
                if (fmt == Q8_FP4) wv = _mm256_shuffle_epi8(fp4, wv);
            }
            const int is_signed = fmt == Q8_INT8 || fmt == Q8_FP4;
            const __m256i wa = is_signed ? _mm256_sign_epi8(wv, wv) : wv;  // maddubs wants unsigned weights
            for (int64_t m = 0; m < mb; m++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + c * 32));
                if (is_signed) xv = _mm256_sign_epi8(xv, wv);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * dx[m * C + c]), acc[m]);
            }
        }
    }
    for (int64_t m = 0; m < mb; m++) dst[m * ldd] = hsum(acc[m]) + off[m];
}

#define ROWQ(F, R) row_dot_q8(F, w, s, mn, K, group, xq, dx, gs, R, dst, ldd)
#define ROWSQ(F) \
    switch (mb) { case 1: ROWQ(F, 1); break; case 2: ROWQ(F, 2); break; case 3: ROWQ(F, 3); break; default: ROWQ(F, 4); }
static void row_any_q8(int fmt, int64_t mb, const uint8_t *w, const float *s, const float *mn, int64_t K,
                       int64_t group, const int8_t *xq, const float *dx, const float *gs, float *dst, int64_t ldd) {
    switch (fmt) {
    case Q8_SYM_INT4: ROWSQ(Q8_SYM_INT4); break;
    case Q8_ASYM_INT4: ROWSQ(Q8_ASYM_INT4); break;
    case Q8_FP4: ROWSQ(Q8_FP4); break;
    default: ROWSQ(Q8_INT8); break;
    }
}

// y[M, N] = x[M, K] @ W.T through int8 activations. work: at least M * (K + 4 * K / 32 + 4 * K / group) bytes.
int xl_lowbit_mm_q8(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *qw, const float *scale,
                    const float *mins, int64_t N, int64_t group, float *y, uint8_t *work) {
    if (K % group || group % 32 || M <= 0) return -1;
    int8_t *xq = (int8_t *)work;
    float *dx = (float *)(work + M * K), *gsum = dx + M * (K / 32);
    quantize_rows(x, M, K, group, fmt != Q8_INT8, xq, dx, gsum);
    const int64_t row_bytes = fmt == Q8_INT8 ? K : K / 2, G = K / group, C = K / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            row_any_q8(fmt, mb, qw + n * row_bytes, scale + n * G, mins ? mins + n * G : 0, K, group,
                       xq + m0 * K, dx + m0 * C, gsum + m0 * G, y + m0 * N + n, N);
        }
    }
    return 0;
}
