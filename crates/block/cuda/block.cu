// The CUDA backend's kernels. Each one is the device version of a `Cpu` method in src/cpu.rs
// and is held to it by tests/cuda.rs; the matrix products go to cuBLAS. Every kernel is a
// template over the element type T of activations, weights and gradients (float or bf16),
// instantiated as `<name>_f32` and `<name>_bf16`; arithmetic is in f32 (f64 for sums), and
// per-row statistics (norm statistics, softmax log-sum-exp) are float whatever T is.
// Views: a row-major matrix at element `off`, `rows` × `cols`, rows `ld` apart.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 fromf<bf16>(float x) { return __float2bfloat16(x); }

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
template <typename T>
__device__ void bias_act(T* y, size_t off, size_t rows, size_t cols, size_t ld, const T* bias,
                         int act, T* pre) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    T* p = y + off + r * ld + c;
    float v = tof(*p) + (bias ? tof(bias[c]) : 0.0f);
    if (pre) pre[i] = fromf<T>(v);
    *p = fromf<T>(act == GELU_NONE ? v : gelu_f(v, act));
}

template <typename T> __device__ void act_backward(T* d, const T* pre, size_t n, int act) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = fromf<T>(tof(d[i]) * gelu_grad_f(tof(pre[i]), act));
}

// Column sums (bias gradients, norm weight gradients) in two passes, so that a few thousand
// columns over ten thousand rows still fill the GPU: the *_part kernels sum CHUNK rows of each
// column (grid: column blocks × row chunks) into f32 partials [chunk][cols]; col_sum_add adds the
// partials of each column, in chunk order (deterministic), to the gradient.
#define CHUNK 64

template <typename T>
__device__ void bias_grad_part(float* part, const T* dy, size_t off, size_t rows, size_t cols,
                               size_t ld) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    size_t r0 = (size_t)blockIdx.y * CHUNK, r1 = min(rows, r0 + CHUNK);
    double acc = 0.0;
    for (size_t r = r0; r < r1; r++) acc += (double)tof(dy[off + r * ld + c]);
    part[(size_t)blockIdx.y * cols + c] = (float)acc;
}

template <typename T>
__device__ void col_sum_add(T* out, const float* part, size_t chunks, size_t cols) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double acc = (double)tof(out[c]);
    for (size_t k = 0; k < chunks; k++) acc += (double)part[k * cols + c];
    out[c] = fromf<T>((float)acc);
}

// One block per row: y = (x − mean)·rstd·w + b; stats = (mean, rstd).
template <typename T>
__device__ void layer_norm(T* y, float* stats, const T* x, const T* w, const T* b, size_t cols,
                           float eps) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    const T* xr = x + r * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) s += (double)tof(xr[c]);
    double mean = block_sum(s, sh) / (double)cols;
    double q = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = (double)tof(xr[c]) - mean;
        q += d * d;
    }
    double var = block_sum(q, sh) / (double)cols;
    double rstd = 1.0 / sqrt(var + (double)eps);
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[r * cols + c] = fromf<T>(
            (float)(((double)tof(xr[c]) - mean) * rstd * (double)tof(w[c]) + (double)tof(b[c])));
    if (threadIdx.x == 0) {
        stats[2 * r] = (float)mean;
        stats[2 * r + 1] = (float)rstd;
    }
}

// One block per row: dx += rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·w.
template <typename T>
__device__ void layer_norm_backward_dx(T* dx, const T* dy, const T* x, const T* w,
                                       const float* stats, size_t cols) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    double mean = stats[2 * r], rstd = stats[2 * r + 1];
    const T *xr = x + r * cols, *dyr = dy + r * cols;
    double s1 = 0.0, s2 = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double xh = ((double)tof(xr[c]) - mean) * rstd;
        double g = (double)tof(dyr[c]) * (double)tof(w[c]);
        s1 += g;
        s2 += g * xh;
    }
    double m1 = block_sum(s1, sh) / (double)cols;
    double m2 = block_sum(s2, sh) / (double)cols;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double xh = ((double)tof(xr[c]) - mean) * rstd;
        double g = (double)tof(dyr[c]) * (double)tof(w[c]);
        T* o = dx + r * cols + c;
        *o = fromf<T>((float)((double)tof(*o) + rstd * (g - m1 - xh * m2)));
    }
}

// Partials of dw = Σ dy·x̂ (part[0 .. chunks·cols]) and db = Σ dy (the next chunks·cols).
template <typename T>
__device__ void layer_norm_backward_dwb_part(float* part, const T* dy, const T* x,
                                             const float* stats, size_t rows, size_t cols) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    size_t r0 = (size_t)blockIdx.y * CHUNK, r1 = min(rows, r0 + CHUNK);
    double gw = 0.0, gb = 0.0;
    for (size_t r = r0; r < r1; r++) {
        double d = (double)tof(dy[r * cols + c]);
        gw += d * ((double)tof(x[r * cols + c]) - (double)stats[2 * r]) * (double)stats[2 * r + 1];
        gb += d;
    }
    size_t chunks = gridDim.y;
    part[(size_t)blockIdx.y * cols + c] = (float)gw;
    part[(chunks + blockIdx.y) * cols + c] = (float)gb;
}

// One block per row: y = x·rstd·w, rstd = 1/√(mean(x²) + eps).
template <typename T>
__device__ void rms_norm(T* y, float* rstd, const T* x, const T* w, size_t cols, float eps) {
    __shared__ double sh[32];
    size_t r = blockIdx.x;
    const T* xr = x + r * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double v = (double)tof(xr[c]);
        s += v * v;
    }
    double inv = 1.0 / sqrt(block_sum(s, sh) / (double)cols + (double)eps);
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[r * cols + c] = fromf<T>((float)((double)tof(xr[c]) * inv * (double)tof(w[c])));
    if (threadIdx.x == 0) rstd[r] = (float)inv;
}

// One block per row: dx += r·(g − x·r²·mean(g·x)), g = dy·w.
template <typename T>
__device__ void rms_norm_backward_dx(T* dx, const T* dy, const T* x, const T* w,
                                     const float* rstd, size_t cols) {
    __shared__ double sh[32];
    size_t row = blockIdx.x;
    double r = rstd[row];
    const T *xr = x + row * cols, *dyr = dy + row * cols;
    double s = 0.0;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x)
        s += (double)tof(dyr[c]) * (double)tof(w[c]) * (double)tof(xr[c]);
    double gx = block_sum(s, sh) / (double)cols;
    for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
        double g = (double)tof(dyr[c]) * (double)tof(w[c]);
        T* o = dx + row * cols + c;
        *o = fromf<T>((float)((double)tof(*o) + r * (g - (double)tof(xr[c]) * r * r * gx)));
    }
}

// Partials of dw = Σ dy·x·rstd.
template <typename T>
__device__ void rms_norm_backward_dw_part(float* part, const T* dy, const T* x, const float* rstd,
                                          size_t rows, size_t cols) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    size_t r0 = (size_t)blockIdx.y * CHUNK, r1 = min(rows, r0 + CHUNK);
    double acc = 0.0;
    for (size_t r = r0; r < r1; r++)
        acc += (double)tof(dy[r * cols + c]) * (double)tof(x[r * cols + c]) * (double)rstd[r];
    part[(size_t)blockIdx.y * cols + c] = (float)acc;
}

template <typename T> __device__ void add(T* y, const T* x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fromf<T>(tof(y[i]) + tof(x[i]));
}

template <typename T> __device__ void mul(T* y, const T* x, const T* m, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fromf<T>(tof(x[i]) * tof(m[i]));
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

template <typename T> __device__ void dropout_mask(T* m, size_t n, uint64_t seed, float keep) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double u = (double)(splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull)) >> 11) * (1.0 / 9007199254740992.0);
    m[i] = fromf<T>(u < keep ? 1.f / keep : 0.f);
}

// Rotary embedding in place over the heads of a view; one thread per (row, head, i < half).
template <typename T>
__device__ void rope(T* x, size_t off, size_t rows, size_t cols, size_t ld, size_t head_dim,
                     const T* cos_t, const T* sin_t, int transpose) {
    size_t half = head_dim / 2, heads = cols / head_dim;
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * heads * half) return;
    size_t i = t % half, h = (t / half) % heads, r = t / (half * heads);
    size_t j = i + half;
    T* p = x + off + r * ld + h * head_dim;
    const T *c = cos_t + r * head_dim, *s = sin_t + r * head_dim;
    float x1 = tof(p[i]), x2 = tof(p[j]);
    if (transpose) {
        p[i] = fromf<T>(x1 * tof(c[i]) + x2 * tof(s[j]));
        p[j] = fromf<T>(x2 * tof(c[j]) - x1 * tof(s[i]));
    } else {
        p[i] = fromf<T>(x1 * tof(c[i]) - x2 * tof(s[i]));
        p[j] = fromf<T>(x2 * tof(c[j]) + x1 * tof(s[j]));
    }
}

// y (dense rows×cols) = silu(g)·u, g and u views of one buffer with the same ld.
template <typename T>
__device__ void swiglu(T* y, const T* gu, size_t goff, size_t uoff, size_t ld, size_t rows,
                       size_t cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    double g = tof(gu[goff + r * ld + c]);
    y[i] = fromf<T>((float)(g / (1.0 + exp(-g))) * tof(gu[uoff + r * ld + c]));
}

template <typename T>
__device__ void swiglu_backward(T* dgu, const T* dy, const T* gu, size_t goff, size_t uoff,
                                size_t ld, size_t rows, size_t cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    size_t r = i / cols, c = i % cols;
    size_t gi = goff + r * ld + c, ui = uoff + r * ld + c;
    double g = tof(gu[gi]), u = tof(gu[ui]), d = tof(dy[i]);
    double sig = 1.0 / (1.0 + exp(-g));
    dgu[gi] = fromf<T>((float)(d * u * sig * (1.0 + g * (1.0 - sig))));
    dgu[ui] = fromf<T>((float)(d * g * sig));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Attention's row kernels over one sequence's scores s = [heads][len][len] (src/attention.rs
// runs the matrix products): one warp per (head, query) row, the query's keys
// [bounds[2r], bounds[2r+1]) of its sequence, lse at [h · rows + r].

// s := softmax over the key range (0 elsewhere); lse := its log-sum-exp (−∞ if empty).
template <typename T>
__device__ void attn_softmax(T* s, float* lse, const uint32_t* bounds, size_t seq, size_t len,
                             size_t heads, size_t rows) {
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= heads * len) return;
    size_t h = warp / len, row = seq * len + warp % len;
    uint32_t lo = bounds[2 * row], hi = bounds[2 * row + 1];
    T* x = s + warp * len;
    float m = -INFINITY;
    for (size_t t = lo + lane; t < hi; t += 32) m = fmaxf(m, tof(x[t]));
    m = warp_max(m);
    float sum = 0.0f;
    for (size_t t = lo + lane; t < hi; t += 32) sum += expf(tof(x[t]) - m);
    sum = warp_sum(sum);
    for (size_t t = lane; t < len; t += 32)
        x[t] = fromf<T>(t >= lo && t < hi ? expf(tof(x[t]) - m) / sum : 0.0f);
    if (lane == 0) lse[h * rows + row] = hi > lo ? m + logf(sum) : -INFINITY;
}

// s := exp(s − lse) over the key range (0 elsewhere): the forward pass's probabilities again.
template <typename T>
__device__ void attn_probs(T* s, const float* lse, const uint32_t* bounds, size_t seq, size_t len,
                           size_t heads, size_t rows) {
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= heads * len) return;
    size_t h = warp / len, row = seq * len + warp % len;
    uint32_t lo = bounds[2 * row], hi = bounds[2 * row + 1];
    float l = lse[h * rows + row];
    T* x = s + warp * len;
    for (size_t t = lane; t < len; t += 32)
        x[t] = fromf<T>(t >= lo && t < hi ? expf(tof(x[t]) - l) : 0.0f);
}

// d := p · (d − δ) · scale, δ = Σ dout·out over the head's columns of the query's row.
template <typename T>
__device__ void attn_softmax_backward(T* d, const T* p, const T* dout, const T* out, size_t seq,
                                      size_t len, size_t heads, size_t hd, float scale) {
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= heads * len) return;
    size_t h = warp / len, row = seq * len + warp % len;
    size_t at = row * heads * hd + h * hd;
    float part = 0.0f;
    for (size_t e = lane; e < hd; e += 32) part += tof(dout[at + e]) * tof(out[at + e]);
    float delta = warp_sum(part);
    T* x = d + warp * len;
    const T* pr = p + warp * len;
    for (size_t t = lane; t < len; t += 32)
        x[t] = fromf<T>(tof(pr[t]) * (tof(x[t]) - delta) * scale);
}

#define INSTANTIATE(T, S)                                                                          \
    extern "C" __global__ void bias_act_##S(T* y, size_t off, size_t rows, size_t cols, size_t ld, \
                                            const T* bias, int act, T* pre) {                     \
        bias_act<T>(y, off, rows, cols, ld, bias, act, pre);                                       \
    }                                                                                              \
    extern "C" __global__ void act_backward_##S(T* d, const T* pre, size_t n, int act) {           \
        act_backward<T>(d, pre, n, act);                                                           \
    }                                                                                              \
    extern "C" __global__ void bias_grad_part_##S(float* part, const T* dy, size_t off, size_t rows, \
                                                  size_t cols, size_t ld) {                        \
        bias_grad_part<T>(part, dy, off, rows, cols, ld);                                          \
    }                                                                                              \
    extern "C" __global__ void col_sum_add_##S(T* out, const float* part, size_t chunks,           \
                                               size_t cols) {                                      \
        col_sum_add<T>(out, part, chunks, cols);                                                   \
    }                                                                                              \
    extern "C" __global__ void layer_norm_##S(T* y, float* stats, const T* x, const T* w,          \
                                              const T* b, size_t cols, float eps) {                \
        layer_norm<T>(y, stats, x, w, b, cols, eps);                                               \
    }                                                                                              \
    extern "C" __global__ void layer_norm_backward_dx_##S(T* dx, const T* dy, const T* x,          \
                                                          const T* w, const float* stats,          \
                                                          size_t cols) {                           \
        layer_norm_backward_dx<T>(dx, dy, x, w, stats, cols);                                      \
    }                                                                                              \
    extern "C" __global__ void layer_norm_backward_dwb_part_##S(float* part, const T* dy,          \
                                                                const T* x, const float* stats,    \
                                                                size_t rows, size_t cols) {        \
        layer_norm_backward_dwb_part<T>(part, dy, x, stats, rows, cols);                           \
    }                                                                                              \
    extern "C" __global__ void rms_norm_##S(T* y, float* rstd, const T* x, const T* w, size_t cols, \
                                            float eps) {                                           \
        rms_norm<T>(y, rstd, x, w, cols, eps);                                                     \
    }                                                                                              \
    extern "C" __global__ void rms_norm_backward_dx_##S(T* dx, const T* dy, const T* x, const T* w, \
                                                        const float* rstd, size_t cols) {          \
        rms_norm_backward_dx<T>(dx, dy, x, w, rstd, cols);                                         \
    }                                                                                              \
    extern "C" __global__ void rms_norm_backward_dw_part_##S(float* part, const T* dy, const T* x,  \
                                                             const float* rstd, size_t rows,       \
                                                             size_t cols) {                        \
        rms_norm_backward_dw_part<T>(part, dy, x, rstd, rows, cols);                               \
    }                                                                                              \
    extern "C" __global__ void add_##S(T* y, const T* x, size_t n) { add<T>(y, x, n); }            \
    extern "C" __global__ void mul_##S(T* y, const T* x, const T* m, size_t n) {                   \
        mul<T>(y, x, m, n);                                                                        \
    }                                                                                              \
    extern "C" __global__ void dropout_mask_##S(T* m, size_t n, uint64_t seed, float keep) {       \
        dropout_mask<T>(m, n, seed, keep);                                                         \
    }                                                                                              \
    extern "C" __global__ void rope_##S(T* x, size_t off, size_t rows, size_t cols, size_t ld,     \
                                        size_t head_dim, const T* cos_t, const T* sin_t,           \
                                        int transpose) {                                           \
        rope<T>(x, off, rows, cols, ld, head_dim, cos_t, sin_t, transpose);                        \
    }                                                                                              \
    extern "C" __global__ void swiglu_##S(T* y, const T* gu, size_t goff, size_t uoff, size_t ld,  \
                                          size_t rows, size_t cols) {                              \
        swiglu<T>(y, gu, goff, uoff, ld, rows, cols);                                              \
    }                                                                                              \
    extern "C" __global__ void swiglu_backward_##S(T* dgu, const T* dy, const T* gu, size_t goff,  \
                                                   size_t uoff, size_t ld, size_t rows,            \
                                                   size_t cols) {                                  \
        swiglu_backward<T>(dgu, dy, gu, goff, uoff, ld, rows, cols);                               \
    }                                                                                              \
    extern "C" __global__ void attn_softmax_##S(T* s, float* lse, const uint32_t* bounds,         \
                                                size_t seq, size_t len, size_t heads, size_t rows) { \
        attn_softmax<T>(s, lse, bounds, seq, len, heads, rows);                                    \
    }                                                                                              \
    extern "C" __global__ void attn_probs_##S(T* s, const float* lse, const uint32_t* bounds,      \
                                              size_t seq, size_t len, size_t heads, size_t rows) {   \
        attn_probs<T>(s, lse, bounds, seq, len, heads, rows);                                      \
    }                                                                                              \
    extern "C" __global__ void attn_softmax_backward_##S(T* d, const T* p, const T* dout,          \
                                                         const T* out, size_t seq, size_t len,     \
                                                         size_t heads, size_t hd, float scale) {   \
        attn_softmax_backward<T>(d, p, dout, out, seq, len, heads, hd, scale);                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
