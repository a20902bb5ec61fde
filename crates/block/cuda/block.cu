// The CUDA backend's kernels (f32). Each one is the device version of a `Cpu` method in
// src/cpu.rs and is held to it by tests/cuda.rs; the matrix products go to cuBLAS.
// Views: a row-major matrix at element `off`, `rows` × `cols`, rows `ld` apart.

#include <stdint.h>

#define GELU_NONE 0
#define GELU_ERF 1
#define GELU_TANH 2

__device__ __forceinline__ float gelu_f(float x, int act) {
    double v = (double)x;
    if (act == GELU_ERF) return (float)(0.5 * v * (1.0 + erf(v / 1.4142135623730951)));
    double u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    return (float)(0.5 * v * (1.0 + tanh(u)));
}

__device__ __forceinline__ float gelu_grad_f(float x, int act) {
    double v = (double)x;
    if (act == GELU_ERF) {
        double cdf = 0.5 * (1.0 + erf(v / 1.4142135623730951));
        double pdf = exp(-0.5 * v * v) / 2.5066282746310002;
        return (float)(cdf + v * pdf);
    }
    double u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    double t = tanh(u);
    return (float)(0.5 * (1.0 + t) +
                   0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v));
}

// Sum over a block of 256 threads (every thread gets the result).
__device__ double block_sum(double v, double* shared) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x / 32); w++) total += shared[w];
    return total;
}

// y(view) = act(y + bias); pre (dense rows×cols) receives y + bias when given.
extern "C" __global__ void bias_act(float* y, size_t off, size_t rows, size_t cols, size_t ld,
                                    const float* bias, int act, float* pre) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    float* p = y + off + r * ld + c;
    float v = *p + (bias ? bias[c] : 0.0f);
    if (pre) pre[i] = v;
    *p = act == GELU_NONE ? v : gelu_f(v, act);
}

extern "C" __global__ void act_backward(float* d, const float* pre, size_t n, int act) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] *= gelu_grad_f(pre[i], act);
}

// db[c] += Σ_r dy(view)[r, c]: one thread per column, rows in order (deterministic).
extern "C" __global__ void bias_grad(float* db, const float* dy, size_t off, size_t rows,
                                     size_t cols, size_t ld) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double acc = 0.0;
    for (size_t r = 0; r < rows; r++) acc += (double)dy[off + r * ld + c];
    db[c] += (float)acc;
}

// One block per row: y = (x − mean)·rstd·w + b; stats = (mean, rstd).
extern "C" __global__ void layer_norm(float* y, float* stats, const float* x, const float* w,
                                      const float* b, size_t cols, float eps) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    const float* xr = x + r * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) s += (double)xr[c];
    double mean = block_sum(s, sh) / (double)cols;
    double q = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = (double)xr[c] - mean;
        q += d * d;
    }
    double var = block_sum(q, sh) / (double)cols;
    double rstd = 1.0 / sqrt(var + (double)eps);
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[r * cols + c] = (float)(((double)xr[c] - mean) * rstd * (double)w[c] + (double)b[c]);
    if (threadIdx.x == 0) {
        stats[2 * r] = (float)mean;
        stats[2 * r + 1] = (float)rstd;
    }
}

// One block per row: dx += rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·w.
extern "C" __global__ void layer_norm_backward_dx(float* dx, const float* dy, const float* x,
                                                  const float* w, const float* stats,
                                                  size_t cols) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    double mean = stats[2 * r], rstd = stats[2 * r + 1];
    const float *xr = x + r * cols, *dyr = dy + r * cols;
    double s1 = 0.0, s2 = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double xh = ((double)xr[c] - mean) * rstd;
        double g = (double)dyr[c] * (double)w[c];
        s1 += g;
        s2 += g * xh;
    }
    double m1 = block_sum(s1, sh) / (double)cols;
    double m2 = block_sum(s2, sh) / (double)cols;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double xh = ((double)xr[c] - mean) * rstd;
        double g = (double)dyr[c] * (double)w[c];
        dx[r * cols + c] += (float)(rstd * (g - m1 - xh * m2));
    }
}

// One thread per column: dw += Σ dy·x̂, db += Σ dy (either may be null).
extern "C" __global__ void layer_norm_backward_dwb(float* dw, float* db, const float* dy,
                                                   const float* x, const float* stats, size_t rows,
                                                   size_t cols) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double gw = 0.0, gb = 0.0;
    for (size_t r = 0; r < rows; r++) {
        double d = (double)dy[r * cols + c];
        gw += d * ((double)x[r * cols + c] - (double)stats[2 * r]) * (double)stats[2 * r + 1];
        gb += d;
    }
    if (dw) dw[c] += (float)gw;
    if (db) db[c] += (float)gb;
}

// One block per row: y = x·rstd·w, rstd = 1/√(mean(x²) + eps).
extern "C" __global__ void rms_norm(float* y, float* rstd, const float* x, const float* w,
                                    size_t cols, float eps) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    const float* xr = x + r * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) s += (double)xr[c] * (double)xr[c];
    double inv = 1.0 / sqrt(block_sum(s, sh) / (double)cols + (double)eps);
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[r * cols + c] = (float)((double)xr[c] * inv * (double)w[c]);
    if (threadIdx.x == 0) rstd[r] = (float)inv;
}

// One block per row: dx += r·(g − x·r²·mean(g·x)), g = dy·w.
extern "C" __global__ void rms_norm_backward_dx(float* dx, const float* dy, const float* x,
                                                const float* w, const float* rstd, size_t cols) {
    __shared__ double sh[32];
    size_t row = blockIdx.x;
    double r = rstd[row];
    const float *xr = x + row * cols, *dyr = dy + row * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        s += (double)dyr[c] * (double)w[c] * (double)xr[c];
    double gx = block_sum(s, sh) / (double)cols;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double g = (double)dyr[c] * (double)w[c];
        dx[row * cols + c] += (float)(r * (g - (double)xr[c] * r * r * gx));
    }
}

// One thread per column: dw += Σ dy·x·rstd.
extern "C" __global__ void rms_norm_backward_dw(float* dw, const float* dy, const float* x,
                                                const float* rstd, size_t rows, size_t cols) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double acc = 0.0;
    for (size_t r = 0; r < rows; r++)
        acc += (double)dy[r * cols + c] * (double)x[r * cols + c] * (double)rstd[r];
    dw[c] += (float)acc;
}

extern "C" __global__ void add(float* y, const float* x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

extern "C" __global__ void mul(float* y, const float* x, const float* m, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * m[i];
}

// Dropout mask from one seed: m[i] = 1/keep when a hash of (seed, i) falls below keep, else 0.
// The arithmetic of cpmv-kernels' dropout_mask (candle's GPU path), so the block path replays its
// masks; cpmv_block::host_mask(.., PerMask, ..) is the host reference.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void dropout_mask(float* m, size_t n, uint64_t seed, float keep) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double u = (double)(splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull)) >> 11) * (1.0 / 9007199254740992.0);
    m[i] = u < keep ? 1.f / keep : 0.f;
}

// Rotary embedding in place over the heads of a view; one thread per (row, head, i < half).
extern "C" __global__ void rope(float* x, size_t off, size_t rows, size_t cols, size_t ld,
                                size_t head_dim, const float* cos_t, const float* sin_t,
                                int transpose) {
    size_t half = head_dim / 2, heads = cols / head_dim;
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * heads * half) return;
    size_t i = t % half, h = (t / half) % heads, r = t / (half * heads);
    size_t j = i + half;
    float* p = x + off + r * ld + h * head_dim;
    const float *c = cos_t + r * head_dim, *s = sin_t + r * head_dim;
    float x1 = p[i], x2 = p[j];
    if (transpose) {
        p[i] = x1 * c[i] + x2 * s[j];
        p[j] = x2 * c[j] - x1 * s[i];
    } else {
        p[i] = x1 * c[i] - x2 * s[i];
        p[j] = x2 * c[j] + x1 * s[j];
    }
}

// y (dense rows×cols) = silu(g)·u, g and u views of one buffer with the same ld.
extern "C" __global__ void swiglu(float* y, const float* gu, size_t goff, size_t uoff, size_t ld,
                                  size_t rows, size_t cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    double g = gu[goff + r * ld + c];
    y[i] = (float)(g / (1.0 + exp(-g))) * gu[uoff + r * ld + c];
}

extern "C" __global__ void swiglu_backward(float* dgu, const float* dy, const float* gu,
                                           size_t goff, size_t uoff, size_t ld, size_t rows,
                                           size_t cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    size_t gi = goff + r * ld + c, ui = uoff + r * ld + c;
    double g = gu[gi], u = gu[ui], d = dy[i];
    double sig = 1.0 / (1.0 + exp(-g));
    dgu[gi] = (float)(d * u * sig * (1.0 + g * (1.0 - sig)));
    dgu[ui] = (float)(d * g * sig);
}

// Zeroes columns [col, col + n) of every row (the k/v gradient columns before accumulation).
extern "C" __global__ void zero_cols(float* x, size_t rows, size_t ld, size_t col, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    x[(i / n) * ld + col + i % n] = 0.0f;
}

#define MAX_D 256
#define PER_LANE (MAX_D / 32)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Attention forward, one warp per (query row, head): online softmax over the row's key range
// [bounds[2r], bounds[2r+1]) of its sequence; lane l holds dims l, l + 32, ...
extern "C" __global__ void attention(float* out, float* lse, const float* qkv,
                                     const uint32_t* bounds, size_t seqs, size_t len,
                                     size_t heads, size_t kv_heads, size_t d, size_t ld,
                                     size_t q_col, size_t k_col, size_t v_col, float scale) {
    size_t rows = seqs * len;
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= rows * heads) return;
    size_t row = warp / heads, h = warp % heads;
    size_t g = h / (heads / kv_heads);
    size_t base = (row / len) * len;
    uint32_t lo = bounds[2 * row], hi = bounds[2 * row + 1];
    const float* q = qkv + row * ld + q_col + h * d;
    float qv[PER_LANE], acc[PER_LANE];
    for (int j = 0; j < PER_LANE; j++) {
        size_t e = lane + 32 * j;
        qv[j] = e < d ? q[e] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, sum = 0.0f;
    for (uint32_t t = lo; t < hi; t++) {
        const float* k = qkv + (base + t) * ld + k_col + g * d;
        const float* v = qkv + (base + t) * ld + v_col + g * d;
        float part = 0.0f;
        for (int j = 0; j < PER_LANE; j++) {
            size_t e = lane + 32 * j;
            if (e < d) part += qv[j] * k[e];
        }
        float s = warp_sum(part) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        sum = sum * corr + p;
        for (int j = 0; j < PER_LANE; j++) {
            size_t e = lane + 32 * j;
            acc[j] = acc[j] * corr + (e < d ? p * v[e] : 0.0f);
        }
        m = m_new;
    }
    float* o = out + row * heads * d + h * d;
    for (int j = 0; j < PER_LANE; j++) {
        size_t e = lane + 32 * j;
        if (e < d) o[e] = hi > lo ? acc[j] / sum : 0.0f;
    }
    if (lane == 0) lse[h * rows + row] = hi > lo ? m + logf(sum) : -INFINITY;
}

// Attention backward, one warp per (query row, head): dq written, dk and dv accumulated with
// atomics into columns zeroed beforehand.
extern "C" __global__ void attention_backward(float* dqkv, const float* dout, const float* out,
                                              const float* lse, const float* qkv,
                                              const uint32_t* bounds, size_t seqs, size_t len,
                                              size_t heads, size_t kv_heads, size_t d, size_t ld,
                                              size_t q_col, size_t k_col, size_t v_col,
                                              float scale) {
    size_t rows = seqs * len;
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= rows * heads) return;
    size_t row = warp / heads, h = warp % heads;
    size_t g = h / (heads / kv_heads);
    size_t base = (row / len) * len;
    uint32_t lo = bounds[2 * row], hi = bounds[2 * row + 1];
    size_t width = heads * d;
    const float* q = qkv + row * ld + q_col + h * d;
    const float* go = dout + row * width + h * d;
    const float* o = out + row * width + h * d;
    float qv[PER_LANE], gv[PER_LANE], dq[PER_LANE];
    float part = 0.0f;
    for (int j = 0; j < PER_LANE; j++) {
        size_t e = lane + 32 * j;
        qv[j] = e < d ? q[e] : 0.0f;
        gv[j] = e < d ? go[e] : 0.0f;
        dq[j] = 0.0f;
        if (e < d) part += gv[j] * o[e];
    }
    float delta = warp_sum(part);
    float l = lse[h * rows + row];
    for (uint32_t t = lo; t < hi; t++) {
        size_t kr = (base + t) * ld;
        const float* k = qkv + kr + k_col + g * d;
        const float* v = qkv + kr + v_col + g * d;
        float qk = 0.0f, gvv = 0.0f;
        for (int j = 0; j < PER_LANE; j++) {
            size_t e = lane + 32 * j;
            if (e < d) {
                qk += qv[j] * k[e];
                gvv += gv[j] * v[e];
            }
        }
        qk = warp_sum(qk);
        gvv = warp_sum(gvv);
        float p = expf(qk * scale - l);
        float ds = p * (gvv - delta) * scale;
        for (int j = 0; j < PER_LANE; j++) {
            size_t e = lane + 32 * j;
            if (e < d) {
                atomicAdd(dqkv + kr + v_col + g * d + e, p * gv[j]);
                atomicAdd(dqkv + kr + k_col + g * d + e, ds * qv[j]);
                dq[j] += ds * k[e];
            }
        }
    }
    float* dqo = dqkv + row * ld + q_col + h * d;
    for (int j = 0; j < PER_LANE; j++) {
        size_t e = lane + 32 * j;
        if (e < d) dqo[e] = dq[j];
    }
}
