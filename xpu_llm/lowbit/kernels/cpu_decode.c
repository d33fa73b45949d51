// Fused float32 CPU ops for one decode step of a decoder block (one new token per row), built into the same
// library as cpu_native.c. Each replaces several small PyTorch ops whose dispatch cost dominates at decode
// sizes on the CPU; numerics follow the reference (float32, same formulas; only summation order differs).
#include <math.h>
#include <stdint.h>
#include <string.h>

// out = rmsnorm(x) * w per row, with x <- x + residual first when residual is given (the block's skip
// connection fused in). rows x dim, all contiguous float32.
void xl_rmsnorm(float *x, const float *residual, const float *w, float *out, int64_t rows, int64_t dim,
                float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * dim;
        if (residual)
            for (int64_t i = 0; i < dim; i++) xr[i] += residual[r * dim + i];
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[r * dim + i] = w[i] * (xr[i] * inv);
    }
}

// out[r, i] = silu(gu[r, i]) * gu[r, hidden + i]: the SwiGLU product from the fused gate/up matmul.
void xl_silu_mul(const float *gu, float *out, int64_t rows, int64_t hidden) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * hidden, *u = g + hidden;
        float *o = out + r * hidden;
        for (int64_t i = 0; i < hidden; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

// Rotate-half RoPE of one head vector (the Hugging Face layout): x * cos + rotate_half(x) * sin.
static void rope(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        out[i] = a * cos[i] + (-b) * sin[i];
        out[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// fp8 byte of x (M mantissa bits, exponent bias BIAS) saturated to +-fmax and rounded to nearest even: the byte
// of torch's clamp then cast to float8_e4m3fn / float8_e5m2 (the integer steps of attention_kernels._fp8_bytes).
static uint8_t fp8_byte(float x, int M, int BIAS, float fmax) {
    const float a = fminf(fabsf(x), fmax);
    uint32_t byte;
    if (a < ldexpf(1.f, 1 - BIAS)) {  // subnormal: a multiple of 2**(1 - BIAS - M)
        byte = (uint32_t)nearbyintf(a * ldexpf(1.f, BIAS - 1 + M));
    } else {
        uint32_t bits;
        memcpy(&bits, &a, 4);
        const uint32_t r = bits + ((1u << (22 - M)) - 1) + ((bits >> (23 - M)) & 1);
        byte = ((((r >> 23) - 127 + BIAS) << M) | ((r >> (23 - M)) & ((1u << M) - 1)));
    }
    return (uint8_t)(byte | (signbit(x) ? 0x80 : 0));
}

// Write one head row x (D floats) at `slot` of a cache of `kind`: 0 float32 as is; 1 int8 codes with the scale
// absmax * float32(1/127) and IEEE divisions rounded half to even; 2 / 3 fp8 e4m3 / e5m2 bytes. The bytes of
// kv_cache.QuantizedKVCache's PyTorch quantize of the same float32 row.
static void store_row(const float *x, int64_t D, int kind, void *cache, float *scales, int64_t slot) {
    if (kind == 0) {
        memcpy((float *)cache + slot * D, x, D * sizeof(float));
    } else if (kind == 1) {
        float amax = 0.f;
        for (int64_t i = 0; i < D; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float scale = fmaxf(amax, 1e-12f) * (float)(1.0 / 127.0);
        int8_t *q = (int8_t *)cache + slot * D;
        for (int64_t i = 0; i < D; i++) q[i] = (int8_t)fminf(fmaxf(nearbyintf(x[i] / scale), -127.f), 127.f);
        scales[slot] = scale;
    } else {
        uint8_t *q = (uint8_t *)cache + slot * D;
        for (int64_t i = 0; i < D; i++) q[i] = kind == 2 ? fp8_byte(x[i], 3, 7, 448.f) : fp8_byte(x[i], 2, 15, 57344.f);
    }
}

// Row j of a cache as float32: the row itself (kind 0) or decoded into buf (int8 code * its slot's scale; fp8
// through `lut`, the 256 values of the bytes), the values the PyTorch path's dequantize gives.
static inline const float *cache_row(int kind, const void *cache, const float *scales, const float *lut,
                                     int64_t j, int64_t D, float *buf) {
    if (kind == 0) return (const float *)cache + j * D;
    if (kind == 1) {
        const int8_t *c = (const int8_t *)cache + j * D;
        for (int64_t i = 0; i < D; i++) buf[i] = (float)c[i] * scales[j];
    } else {
        const uint8_t *c = (const uint8_t *)cache + j * D;
        for (int64_t i = 0; i < D; i++) buf[i] = lut[c[i]];
    }
    return buf;
}

// One decode step of GQA attention for B rows at cache slot `pos`:
//   qkv [B, (H + 2 Hkv) D] (the fused projection's output), cos/sin [B or 1, D] (cs_rows), caches
//   [Bcache, Hkv, S, D] of `kind` (0 float32; 1 int8 with scales ks / vs [Bcache, Hkv, S]; 2 / 3 fp8 e4m3 / e5m2
//   bytes decoded through `lut`); the new k (RoPE applied) and v are written at slot pos, then each query head
//   attends to the slots j < kv_len where mask[b or 0, j] is set (mask [B or 1, kv_len], mask_rows).
//   out [B, H D]; work: at least B * H * kv_len floats for the scores.
void xl_attn_decode(const float *qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D, const float *cos,
                    const float *sin, int64_t cs_rows, void *kc, void *vc, float *ks, float *vs, const float *lut,
                    int kind, int64_t S, int64_t pos, int64_t kv_len, const uint8_t *mask, int64_t mask_rows,
                    float *out, float *work) {
    const int64_t width = (H + 2 * Hkv) * D, rep = H / Hkv;
    const size_t esize = kind == 0 ? sizeof(float) : 1;
    const float scale = 1.f / sqrtf((float)D);
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * width;
        const float *c = cos + (cs_rows > 1 ? b : 0) * D, *s = sin + (cs_rows > 1 ? b : 0) * D;
        for (int64_t g = 0; g < Hkv; g++) {
            const int64_t head = (b * Hkv + g) * S;
            float k[512];
            rope(row + (H + g) * D, c, s, k, D);
            store_row(k, D, kind, (char *)kc + head * D * esize, ks ? ks + head : NULL, pos);
            store_row(row + (H + Hkv + g) * D, D, kind, (char *)vc + head * D * esize, vs ? vs + head : NULL, pos);
        }
    }
#pragma omp parallel for schedule(static) if (B * H * kv_len * D > (1 << 16))
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = h / rep, head = (b * Hkv + g) * S;
        const float *c = cos + (cs_rows > 1 ? b : 0) * D, *s = sin + (cs_rows > 1 ? b : 0) * D;
        const uint8_t *m = mask + (mask_rows > 1 ? b : 0) * kv_len;
        float q[512], buf[512];  // head_dim <= 512 (checked by the caller)
        rope(qkv + b * width + h * D, c, s, q, D);
        const void *K = (const char *)kc + head * D * esize, *V = (const char *)vc + head * D * esize;
        const float *Ks = ks ? ks + head : NULL, *Vs = vs ? vs + head : NULL;
        float *sc = work + bh * kv_len, mx = -INFINITY;
        for (int64_t j = 0; j < kv_len; j++) {
            if (!m[j]) continue;
            const float *kr = cache_row(kind, K, Ks, lut, j, D, buf);
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; i++) dot += q[i] * kr[i];
            sc[j] = dot * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        float sum = 0.f;
        for (int64_t j = 0; j < kv_len; j++) {
            sc[j] = m[j] ? expf(sc[j] - mx) : 0.f;
            sum += sc[j];
        }
        float *o = out + b * H * D + h * D;
        for (int64_t i = 0; i < D; i++) o[i] = 0.f;
        for (int64_t j = 0; j < kv_len; j++) {
            if (sc[j] == 0.f) continue;
            const float p = sc[j] / sum, *vr = cache_row(kind, V, Vs, lut, j, D, buf);
            for (int64_t i = 0; i < D; i++) o[i] += p * vr[i];
        }
    }
}
