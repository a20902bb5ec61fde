// cpmv's fused CUDA kernels: the element-wise and row-wise training ops that candle would run as
// chains of separate kernels (each one a full pass over memory), with their backward passes.
// Statistics are always accumulated in f32, whatever the storage type (f32 or bf16).
// Compiled to PTX by build.rs; launched from src/ops.rs. The CPU reference of every kernel is the
// op-by-op composition in cpmv-model's ops.rs, and crates/model/tests/gpu/ops.rs compares the two
// on a GPU.
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 fromf<bf16>(float x) { return __float2bfloat16(x); }
// Rounds through the storage type (what an op-by-op composition does between ops).
template <typename T> __device__ __forceinline__ float rnd(float x) { return tof(fromf<T>(x)); }

// Sum / max over the block (blockDim.x a multiple of 32); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float sh[32];
  __shared__ float res;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < nw ? sh[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) res = v;
  }
  __syncthreads();
  return res;
}

__device__ float block_max(float v) {
  __shared__ float sh[32];
  __shared__ float res;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < nw ? sh[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (lane == 0) res = v;
  }
  __syncthreads();
  return res;
}

// Columns one thread accumulates weight gradients for in the norm backward kernels
// (D <= MAX_COLS_PER_THREAD * blockDim.x).
#define MAX_COLS_PER_THREAD 32

// ---- RMSNorm: y = round(x / sqrt(mean(x^2) + eps)) * w ------------------------------------------
template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int d, float eps) {
  const T *xr = x + (size_t)blockIdx.x * d;
  T *yr = y + (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = tof(xr[i]);
    ss += v * v;
  }
  float den = sqrtf(block_sum(ss) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    yr[i] = fromf<T>(rnd<T>(tof(xr[i]) / den) * tof(w[i]));
}

// dx (n*d) and dw accumulated in f32 (dw32, d, zeroed by the caller); each block handles
// `rows` consecutive rows so the atomics into dw32 are `rows` times fewer.
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *w, const T *dy, T *dx, float *dw32, int n, int d,
                             float eps, int rows) {
  float acc[MAX_COLS_PER_THREAD];
  for (int c = 0; c < MAX_COLS_PER_THREAD; c++) acc[c] = 0.f;
  int r0 = blockIdx.x * rows;
  for (int r = r0; r < min(n, r0 + rows); r++) {
    const T *xr = x + (size_t)r * d;
    const T *gr = dy + (size_t)r * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float v = tof(xr[i]);
      ss += v * v;
    }
    float rs = 1.f / sqrtf(block_sum(ss) / d + eps);
    float dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float xh = tof(xr[i]) * rs;
      dot += tof(gr[i]) * tof(w[i]) * xh;
    }
    dot = block_sum(dot) / d;
    int c = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x, c++) {
      float xh = tof(xr[i]) * rs;
      float g = tof(gr[i]);
      dx[(size_t)r * d + i] = fromf<T>(rs * (g * tof(w[i]) - xh * dot));
      acc[c] += g * xh;
    }
  }
  int c = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x, c++) atomicAdd(&dw32[i], acc[c]);
}

// ---- LayerNorm: y = round(xhat * w + b), all in f32 (as torch's LayerNorm) ---------------------------------------------------
template <typename T>
__device__ void layer_norm_fwd(const T *x, const T *w, const T *b, T *y, int d, float eps) {
  const T *xr = x + (size_t)blockIdx.x * d;
  T *yr = y + (size_t)blockIdx.x * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += tof(xr[i]);
  float mean = block_sum(s) / d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float c = tof(xr[i]) - mean;
    ss += c * c;
  }
  float den = sqrtf(block_sum(ss) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    yr[i] = fromf<T>((tof(xr[i]) - mean) / den * tof(w[i]) + tof(b[i]));
  }
}

template <typename T>
__device__ void layer_norm_bwd(const T *x, const T *w, const T *dy, T *dx, float *dwb32, int n,
                               int d, float eps, int rows) {
  float aw[MAX_COLS_PER_THREAD], ab[MAX_COLS_PER_THREAD];
  for (int c = 0; c < MAX_COLS_PER_THREAD; c++) aw[c] = ab[c] = 0.f;
  int r0 = blockIdx.x * rows;
  for (int r = r0; r < min(n, r0 + rows); r++) {
    const T *xr = x + (size_t)r * d;
    const T *gr = dy + (size_t)r * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += tof(xr[i]);
    float mean = block_sum(s) / d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float c = tof(xr[i]) - mean;
      ss += c * c;
    }
    float rs = 1.f / sqrtf(block_sum(ss) / d + eps);
    float sg = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float g = tof(gr[i]) * tof(w[i]);
      sg += g;
      sgx += g * (tof(xr[i]) - mean) * rs;
    }
    sg = block_sum(sg) / d;
    sgx = block_sum(sgx) / d;
    int c = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x, c++) {
      float xh = (tof(xr[i]) - mean) * rs;
      float g = tof(gr[i]);
      dx[(size_t)r * d + i] = fromf<T>(rs * (g * tof(w[i]) - sg - xh * sgx));
      aw[c] += g * xh;
      ab[c] += g;
    }
  }
  int c = 0;
  for (int i = threadIdx.x; i < d; i += blockDim.x, c++) {
    atomicAdd(&dwb32[i], aw[c]);
    atomicAdd(&dwb32[d + i], ab[c]);
  }
}

// f32 accumulator -> storage type, written at `out`.
template <typename T> __device__ void cast_out(const float *src, T *out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = fromf<T>(src[i]);
}

// ---- SiLU(gate) * up ----------------------------------------------------------------------------
__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T> __device__ void silu_mul_fwd(const T *g, const T *u, T *y, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a = tof(g[i]);
  y[i] = fromf<T>(rnd<T>(a * sigmoidf(a)) * tof(u[i]));
}

// out = [dgate (n) | dup (n)]
template <typename T> __device__ void silu_mul_bwd(const T *g, const T *u, const T *dy, T *out, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a = tof(g[i]), s = sigmoidf(a), d = tof(dy[i]);
  out[i] = fromf<T>(d * tof(u[i]) * s * (1.f + a * (1.f - s)));
  out[n + i] = fromf<T>(d * a * s);
}

// ---- Rotary embedding on [B, T, H, Dh] with tables [B, T, Dh] (rotate-half convention) ----------
// dir = +1 forward (y = x cos + rot(x) sin), -1 backward (the transpose: dx = dy cos - rot(dy sin)).
template <typename T>
__device__ void rope(const T *x, const T *cs, const T *sn, T *y, int bt, int h, int dh, float dir) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t n = (size_t)bt * h * dh;
  if (i >= n) return;
  int k = i % dh;
  size_t row = i / dh;        // (b*T + t)*H + head
  size_t tab = (row / h) * dh; // (b*T + t)*Dh
  int half = dh / 2;
  float v = tof(x[i]);
  float out;
  if (dir > 0) {
    float c = tof(cs[tab + k]), s = tof(sn[tab + k]);
    float other = k < half ? -tof(x[i + half]) : tof(x[i - half]);
    out = rnd<T>(v * c) + rnd<T>(other * s);
  } else {
    float c = tof(cs[tab + k]);
    float other = k < half ? tof(x[i + half]) * tof(sn[tab + k + half])
                           : -tof(x[i - half]) * tof(sn[tab + k - half]);
    out = v * c + other;
  }
  y[i] = fromf<T>(out);
}

// ---- Softmax over the last axis of [rows, tk], optionally with allowed-key ranges --------------
// Row r = ((b * heads + head) * tq + q); keys j with lo <= j < hi are allowed, where (lo, hi) =
// bounds[2 * (b * tq + q) .. +2] (bounds == NULL: all keys), clamped to [0, tk] so bad bounds
// never index outside the row. Scores are multiplied by `scale` first. Blocked keys get
// probability 0 (a row always has at least one allowed key).
template <typename T>
__device__ void softmax_fwd(const T *s, T *p, const uint32_t *bounds, int heads, int tq, int tk,
                            float scale) {
  size_t r = blockIdx.x;
  const T *sr = s + r * tk;
  T *pr = p + r * tk;
  int lo = 0, hi = tk;
  if (bounds) {
    size_t b = r / ((size_t)heads * tq);
    size_t q = r % tq;
    uint32_t l = bounds[2 * (b * tq + q)], h = bounds[2 * (b * tq + q) + 1];
    lo = l < (uint32_t)tk ? (int)l : tk;
    hi = h < (uint32_t)tk ? (int)h : tk;
  }
  float m = -INFINITY;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, tof(sr[j]) * scale);
  m = block_max(m);
  float sum = 0.f;
  for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) sum += expf(tof(sr[j]) * scale - m);
  float inv = 1.f / block_sum(sum);
  for (int j = threadIdx.x; j < tk; j += blockDim.x)
    pr[j] = fromf<T>(j >= lo && j < hi ? expf(tof(sr[j]) * scale - m) * inv : 0.f);
}

// ds = scale * p * (dp - sum(p * dp)) per row.
template <typename T> __device__ void softmax_bwd(const T *p, const T *dp, T *ds, int tk, float scale) {
  size_t r = blockIdx.x;
  const T *pr = p + r * tk;
  const T *gr = dp + r * tk;
  float dot = 0.f;
  for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += tof(pr[j]) * tof(gr[j]);
  dot = block_sum(dot);
  for (int j = threadIdx.x; j < tk; j += blockDim.x)
    ds[r * tk + j] = fromf<T>(scale * tof(pr[j]) * (tof(gr[j]) - dot));
}

// ---- Cross-entropy rows: loss[r] = logsumexp(l[r]) - l[r, t[r]] in f32 --------------------------
template <typename T> __device__ void ce_fwd(const T *l, const uint32_t *t, float *loss, int v) {
  size_t r = blockIdx.x;
  const T *lr = l + r * v;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, tof(lr[j]));
  m = block_max(m);
  float s = 0.f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(tof(lr[j]) - m);
  s = block_sum(s);
  // A target outside the vocabulary gives NaN (callers validate; never read out of bounds).
  if (threadIdx.x == 0) loss[r] = t[r] < (uint32_t)v ? logf(s) + m - tof(lr[t[r]]) : NAN;
}

// dl[r, j] = g[r] * (softmax(l[r])_j - [j == t[r]]), recomputing the row statistics.
template <typename T>
__device__ void ce_bwd(const T *l, const uint32_t *t, const float *g, T *dl, int v) {
  size_t r = blockIdx.x;
  const T *lr = l + r * v;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, tof(lr[j]));
  m = block_max(m);
  float s = 0.f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(tof(lr[j]) - m);
  float inv = 1.f / block_sum(s);
  float gr = g[r];
  uint32_t tr = t[r];
  for (int j = threadIdx.x; j < v; j += blockDim.x)
    dl[r * v + j] = fromf<T>(gr * (expf(tof(lr[j]) - m) * inv - (j == (int)tr ? 1.f : 0.f)));
}

// ---- Bias + activation: y = act(round(x + b)) over [n/d, d] rows, b [d] ---------------------------
// act: 0 none, 1 GELU tanh approximation, 2 GELU erf (exact).
#define GELU_C 0.7978845608028654f   // sqrt(2/pi)
#define GELU_K 0.044715f
__device__ __forceinline__ float act_f(float z, int act) {
  if (act == 1) return 0.5f * z * (1.f + tanhf(GELU_C * (z + GELU_K * z * z * z)));
  if (act == 2) return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
  return z;
}
__device__ __forceinline__ float act_grad(float z, int act) {
  if (act == 1) {
    float t = tanhf(GELU_C * (z + GELU_K * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_K * z * z);
  }
  if (act == 2)
    return 0.5f * (1.f + erff(z * 0.7071067811865476f)) + z * expf(-0.5f * z * z) * 0.3989422804014327f;
  return 1.f;
}

template <typename T> __device__ void bias_act_fwd(const T *x, const T *b, T *y, size_t n, int d, int act) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float z = rnd<T>(tof(x[i]) + tof(b[i % d]));
  y[i] = fromf<T>(act_f(z, act));
}

// dz = dy * act'(round(x + b)): the gradient of the pre-activation (= of x; its column sums are
// the bias gradient, see col_sum).
template <typename T>
__device__ void bias_act_bwd(const T *x, const T *b, const T *dy, T *dz, size_t n, int d, int act) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float z = rnd<T>(tof(x[i]) + tof(b[i % d]));
  dz[i] = fromf<T>(tof(dy[i]) * act_grad(z, act));
}

// ---- Column sums of an [m, d] matrix into f32 out[d] (zeroed by the caller) ---------------------
// Block (32, 8): the 32 threads of a warp read 32 adjacent columns of one row (coalesced); the 8
// warps take every 8th row of the block's `rows` rows; one atomic per column and block.
template <typename T> __device__ void col_sum(const T *x, float *out, int m, int d, int rows) {
  __shared__ float sh[8][33];
  int col = blockIdx.x * 32 + threadIdx.x;
  long long r0 = (long long)blockIdx.y * rows, r1 = min((long long)m, r0 + rows);
  float acc = 0.f;
  if (col < d)
    for (long long r = r0 + threadIdx.y; r < r1; r += 8) acc += tof(x[(size_t)r * d + col]);
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    float s = 0.f;
    for (int k = 0; k < 8; k++) s += sh[k][threadIdx.x];
    atomicAdd(out + col, s);
  }
}

// ---- AdamW, torch's formula, one pass: moments and master in f32 --------------------------------
// master == NULL: the parameter itself is f32 and is the master.
// The scalars come from the host: 1 - beta1 and 1 - beta2 rounded from f64 to f32, as torch
// passes them (computing 1 - beta2 in f32 here would be off by 1e-5 relative for beta2 = 0.999).
template <typename T>
__device__ __forceinline__ void adamw_elem(T *p, float *master, float *m, float *v, const T *g, size_t i,
                                           float lr_wd, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float eps, float step_size,
                                           float bc2_sqrt, float grad_scale) {
  float gi = tof(g[i]) * grad_scale;
  float pv = master ? master[i] : tof(p[i]);
  pv = pv * lr_wd;
  float mi = m[i], w = one_minus_beta1;
  float mn = w < 0.5f ? mi + w * (gi - mi) : gi - (gi - mi) * (1.f - w);
  float vn = beta2 * v[i] + one_minus_beta2 * gi * gi;
  float den = sqrtf(vn) / bc2_sqrt + eps;
  pv = pv + (-step_size) * (mn / den);
  m[i] = mn;
  v[i] = vn;
  if (master) master[i] = pv;
  p[i] = fromf<T>(pv);
}

// All parameters of one dtype in one launch. `desc` holds ADAMW_DESC words per parameter:
// addresses of param, master (0 = none), m, v, grad; element count; index of its first chunk
// (ascending); decay factor | step size << 32 (f32 bits); sqrt(1 - beta2^t) (f32 bits). Block k
// updates chunk k (ADAMW_CHUNK elements) of the parameter whose chunks contain k.
#define ADAMW_DESC 10
#define ADAMW_CHUNK 65536
template <typename T>
__device__ void adamw_multi(const unsigned long long *desc, int count, float one_minus_beta1,
                            float beta2, float one_minus_beta2, float eps, float grad_scale) {
  unsigned long long k = blockIdx.x;
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (desc[(size_t)mid * ADAMW_DESC + 6] <= k) lo = mid; else hi = mid - 1;
  }
  const unsigned long long *d = desc + (size_t)lo * ADAMW_DESC;
  T *p = (T *)d[0];
  float *master = (float *)d[1];
  float *m = (float *)d[2], *v = (float *)d[3];
  const T *g = (const T *)d[4];
  size_t n = d[5];
  size_t start = (size_t)(k - d[6]) * ADAMW_CHUNK;
  size_t end = min(n, start + ADAMW_CHUNK);
  float lr_wd = __uint_as_float((unsigned)(d[7] & 0xffffffffull));
  float step_size = __uint_as_float((unsigned)(d[7] >> 32));
  float bc2_sqrt = __uint_as_float((unsigned)d[8]);
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x)
    adamw_elem<T>(p, master, m, v, g, i, lr_wd, one_minus_beta1, beta2, one_minus_beta2, eps,
                  step_size, bc2_sqrt, grad_scale);
}

// ---- Dropout mask from a counter-based generator: out[i] = 1/keep with probability keep, else 0.
// The mask is a pure function of (seed, i), so a recomputation (gradient checkpointing) replays it
// from the seed alone.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T> __device__ void dropout_mask(T *out, size_t n, uint64_t seed, float keep) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double u = (double)(splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull)) >> 11) * (1.0 / 9007199254740992.0);
  out[i] = fromf<T>(u < keep ? 1.f / keep : 0.f);
}

// ---- Sum of squares, one f64 partial per block (grid-stride), for global gradient norms.
template <typename T> __device__ void sum_squares(const T *x, size_t n, double *partial) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    double v = (double)tof(x[i]);
    acc += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) sh[w] = acc;
  __syncthreads();
  if (w == 0) {
    acc = lane < nw ? sh[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) partial[blockIdx.x] = acc;
  }
}

#define INSTANTIATE(T, S)                                                                           \
  extern "C" __global__ void rms_norm_fwd_##S(const T *x, const T *w, T *y, int d, float eps) {     \
    rms_norm_fwd<T>(x, w, y, d, eps);                                                               \
  }                                                                                                 \
  extern "C" __global__ void rms_norm_bwd_##S(const T *x, const T *w, const T *dy, T *dx,           \
                                              float *dw32, int n, int d, float eps, int rows) {     \
    rms_norm_bwd<T>(x, w, dy, dx, dw32, n, d, eps, rows);                                           \
  }                                                                                                 \
  extern "C" __global__ void layer_norm_fwd_##S(const T *x, const T *w, const T *b, T *y, int d,    \
                                                float eps) {                                        \
    layer_norm_fwd<T>(x, w, b, y, d, eps);                                                          \
  }                                                                                                 \
  extern "C" __global__ void layer_norm_bwd_##S(const T *x, const T *w, const T *dy, T *dx,         \
                                                float *dwb32, int n, int d, float eps, int rows) {  \
    layer_norm_bwd<T>(x, w, dy, dx, dwb32, n, d, eps, rows);                                        \
  }                                                                                                 \
  extern "C" __global__ void cast_out_##S(const float *src, T *out, int n) {                        \
    cast_out<T>(src, out, n);                                                                       \
  }                                                                                                 \
  extern "C" __global__ void silu_mul_fwd_##S(const T *g, const T *u, T *y, size_t n) {             \
    silu_mul_fwd<T>(g, u, y, n);                                                                    \
  }                                                                                                 \
  extern "C" __global__ void silu_mul_bwd_##S(const T *g, const T *u, const T *dy, T *out,          \
                                              size_t n) {                                           \
    silu_mul_bwd<T>(g, u, dy, out, n);                                                              \
  }                                                                                                 \
  extern "C" __global__ void rope_##S(const T *x, const T *c, const T *s, T *y, int bt, int h,     \
                                      int dh, float dir) {                                          \
    rope<T>(x, c, s, y, bt, h, dh, dir);                                                            \
  }                                                                                                 \
  extern "C" __global__ void softmax_fwd_##S(const T *s, T *p, const uint32_t *bounds, int heads,   \
                                             int tq, int tk, float scale) {                         \
    softmax_fwd<T>(s, p, bounds, heads, tq, tk, scale);                                             \
  }                                                                                                 \
  extern "C" __global__ void softmax_bwd_##S(const T *p, const T *dp, T *ds, int tk, float scale) { \
    softmax_bwd<T>(p, dp, ds, tk, scale);                                                           \
  }                                                                                                 \
  extern "C" __global__ void ce_fwd_##S(const T *l, const uint32_t *t, float *loss, int v) {        \
    ce_fwd<T>(l, t, loss, v);                                                                       \
  }                                                                                                 \
  extern "C" __global__ void ce_bwd_##S(const T *l, const uint32_t *t, const float *g, T *dl,       \
                                        int v) {                                                    \
    ce_bwd<T>(l, t, g, dl, v);                                                                      \
  }                                                                                                 \
  extern "C" __global__ void bias_act_fwd_##S(const T *x, const T *b, T *y, size_t n, int d,       \
                                              int act) {                                           \
    bias_act_fwd<T>(x, b, y, n, d, act);                                                            \
  }                                                                                                 \
  extern "C" __global__ void bias_act_bwd_##S(const T *x, const T *b, const T *dy, T *dz, size_t n, \
                                              int d, int act) {                                     \
    bias_act_bwd<T>(x, b, dy, dz, n, d, act);                                                       \
  }                                                                                                 \
  extern "C" __global__ void col_sum_##S(const T *x, float *out, int m, int d, int rows) {          \
    col_sum<T>(x, out, m, d, rows);                                                                 \
  }                                                                                                 \
  extern "C" __global__ void adamw_multi_##S(const unsigned long long *desc, int count, float omb1, \
                                             float beta2, float omb2, float eps, float grad_scale) { \
    adamw_multi<T>(desc, count, omb1, beta2, omb2, eps, grad_scale);                                \
  }                                                                                                 \
  extern "C" __global__ void dropout_mask_##S(T *out, size_t n, uint64_t seed, float keep) {      \
    dropout_mask<T>(out, n, seed, keep);                                                            \
  }                                                                                                 \
  extern "C" __global__ void sum_squares_##S(const T *x, size_t n, double *partial) {               \
    sum_squares<T>(x, n, partial);                                                                  \
  }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
