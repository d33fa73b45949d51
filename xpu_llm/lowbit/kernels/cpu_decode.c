// Fused float32 CPU ops for one decode step of a decoder block (one new token per row), built into the same
// library as cpu_native.c. Each replaces several small PyTorch ops whose dispatch cost dominates at decode
// sizes on the CPU; numerics follow the reference (float32, same formulas; only summation order differs).
#include <math.h>
#include <stdint.h>

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

// One decode step of GQA attention for B rows at cache slot `pos`:
//   qkv [B, (H + 2 Hkv) D] (the fused projection's output), cos/sin [B or 1, D] (cs_rows), caches
//   [Bcache, Hkv, S, D]; the new k (RoPE applied) and v are written at slot pos, then each query head attends
//   to the slots j < kv_len where mask[b or 0, j] is set (mask [B or 1, kv_len], mask_rows).
//   out [B, H D]; work: at least B * H * kv_len floats for the scores.
void xl_attn_decode(const float *qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D, const float *cos,
                    const float *sin, int64_t cs_rows, float *kc, float *vc, int64_t S, int64_t pos,
                    int64_t kv_len, const uint8_t *mask, int64_t mask_rows, float *out, float *work) {
    const int64_t width = (H + 2 * Hkv) * D, rep = H / Hkv;
    const float scale = 1.f / sqrtf((float)D);
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * width;
        const float *c = cos + (cs_rows > 1 ? b : 0) * D, *s = sin + (cs_rows > 1 ? b : 0) * D;
        for (int64_t g = 0; g < Hkv; g++) {
            float *kslot = kc + ((b * Hkv + g) * S + pos) * D, *vslot = vc + ((b * Hkv + g) * S + pos) * D;
            rope(row + (H + g) * D, c, s, kslot, D);
            for (int64_t i = 0; i < D; i++) vslot[i] = row[(H + Hkv + g) * D + i];
        }
    }
#pragma omp parallel for schedule(static) if (B * H * kv_len * D > (1 << 16))
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = h / rep;
        const float *c = cos + (cs_rows > 1 ? b : 0) * D, *s = sin + (cs_rows > 1 ? b : 0) * D;
        const uint8_t *m = mask + (mask_rows > 1 ? b : 0) * kv_len;
        float q[512];  // head_dim <= 512 (checked by the caller)
        rope(qkv + b * width + h * D, c, s, q, D);
        const float *K = kc + (b * Hkv + g) * S * D, *V = vc + (b * Hkv + g) * S * D;
        float *sc = work + bh * kv_len, mx = -INFINITY;
        for (int64_t j = 0; j < kv_len; j++) {
            if (!m[j]) continue;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; i++) dot += q[i] * K[j * D + i];
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
            const float p = sc[j] / sum;
            for (int64_t i = 0; i < D; i++) o[i] += p * V[j * D + i];
        }
    }
}
