// Swin (shifted-)window attention forward, the CUDA backend of dlcv_fast::window_attention_fwd.
//
// Same contract and index arithmetic as kernels/window_attention.py (read its docstring first): qkv (B, H, W,
// 3C) channels-last, channels (3, heads, D); out (B, H, W, C) and lse (B, H, W, heads) fp32 natural log.
// Cyclic shift, padding, partition, relative position bias, the shifted-window region mask (-100), merge,
// crop and reverse shift are all address and mask arithmetic; padding tokens carry q/k/v = qkv_bias.
//
// Scope: windows of at most 64 tokens (7x7, 8x8 and any Wh*Ww <= 64), head dims up to 64, fp16 and bf16, on
// sm_80 and later (WMMA 16x16x16 with fp32 accumulation). Larger windows and fp32 run the Triton kernels.
//
// One CTA (4 warps) per (window, head); two __syncthreads in all, both before step 3:
//   1. threads 0..63 work out each window token's place (qkv offset, output pixel, bias-table coordinate,
//      region id, real/padding/past-the-window); all threads copy the head's bias-table column, times log2(e),
//      to shared memory;
//   -- __syncthreads --
//   2. q, k and v of the window (64 rows, zero past the window, qkv_bias at padding tokens) to shared memory,
//      16-byte loads when head dim, strides and pointers allow;
//   -- __syncthreads --
//   3. warp w owns query rows 16w..16w+15 from here on: S = Q K^T (WMMA) into a shared fp32 buffer; the
//      row softmax (log2 units, bias and region mask added, keys past the window at -inf) by the warp, one
//      row at a time, writing unnormalised P in the input dtype over the same bytes of S; O = P V (WMMA)
//      into the same rows; then O / l to global memory at the tokens' unshifted places, and the lse.
//   A warp whose rows all lie past the window (a 7x7 window has 49 tokens: warp 3 keeps row 48) returns
//   early; nothing after the barriers needs it.
#include "common.cuh"
#include "ops.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

namespace dlcv_fast {
namespace {

using namespace nvcuda;

constexpr int kTile = 64;       // tokens of a window, at most
constexpr int kThreads = 128;   // 4 warps x 16 query rows
constexpr int kLdS = 68;        // row stride (floats) of the S / P / O buffer: 16-row tiles start 32-byte aligned
constexpr int kMaxTable = 256;  // (2Wh-1)(2Ww-1) < 4 Wh Ww <= 256 rows of the bias table
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct WinArgs {
  int H, W, n_win, n_win_w, win_h, win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1;
  int C, heads, head_dim;
  int64_t s_b;     // qkv batch stride (elements)
  int s_h, s_w;    // qkv in-image strides: one image spans < 2^31 elements (checked on the host)
  int s_t, s_th;   // strides of the fp32 table
  float qk_scale;  // scale * log2(e)
  bool has_table, has_bias, shifted;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// T: __half or __nv_bfloat16. DP: head dim padded to 16, 32 or 64. V: elements per qkv load (8 or 1).
template <typename T, int DP, int V>
__global__ void __launch_bounds__(kThreads)
    window_attn_fwd_kernel(const T* __restrict__ qkv, const float* __restrict__ table,
                           const float* __restrict__ qkv_bias, T* __restrict__ out, float* __restrict__ lse,
                           WinArgs a) {
  constexpr int kLdQ = DP + 8;                             // row stride of q/k/v in shared memory
  constexpr int kLdP = kLdS * int(sizeof(float) / sizeof(T));  // P rows start where S rows do
  __shared__ __align__(32) T sq[kTile * kLdQ];
  __shared__ __align__(32) T sk[kTile * kLdQ];
  __shared__ __align__(32) T sv[kTile * kLdQ];
  __shared__ __align__(32) float ss[kTile * kLdS];
  __shared__ float stab[kMaxTable];
  __shared__ int t_off[kTile], t_pix[kTile], t_f[kTile], t_reg[kTile], t_in[kTile];
  __shared__ float row_m[kTile], row_l[kTile];

  const int n_tok = a.win_h * a.win_w;
  const int64_t wid = blockIdx.x;  // image-major window index
  const int h = blockIdx.y;
  const int64_t b = wid / a.n_win;
  const int win = int(wid - b * a.n_win);
  const int tid = threadIdx.x;
  const int D = a.head_dim;

  // 1. Token geometry, and the head's bias column.
  if (tid < kTile) {
    int inside = -1, off = 0, pix = 0, f = 0, reg = 0;
    if (tid < n_tok) {
      const int ty = tid / a.win_w, tx = tid - ty * a.win_w;
      const int r = (win / a.n_win_w) * a.win_h + ty;  // coordinates in the shifted, padded map
      const int c = (win % a.n_win_w) * a.win_w + tx;
      inside = (r < a.H && c < a.W) ? 1 : 0;
      const int y = (r + a.roll_h) % a.H, x = (c + a.roll_w) % a.W;
      off = y * a.s_h + x * a.s_w;
      pix = y * a.W + x;
      f = ty * (2 * a.win_w - 1) + tx;
      reg = ((r >= a.cut_h0) + (r >= a.cut_h1)) * 3 + (c >= a.cut_w0) + (c >= a.cut_w1);
    }
    t_in[tid] = inside;
    t_off[tid] = off;
    t_pix[tid] = pix;
    t_f[tid] = f;
    t_reg[tid] = reg;
  }
  if (a.has_table) {
    const int n_t = (2 * a.win_h - 1) * (2 * a.win_w - 1);
    for (int i = tid; i < n_t; i += kThreads) stab[i] = table[i * a.s_t + h * a.s_th] * kLog2e;
  }
  __syncthreads();  // the token geometry is read by every thread below

  // 2. q, k, v of the window for this head.
  const T* img = qkv + b * a.s_b + h * D;
  constexpr int kChunks = DP / V;
  for (int i = tid; i < 3 * kTile * kChunks; i += kThreads) {
    const int part = i / (kTile * kChunks);
    const int rem = i - part * (kTile * kChunks);
    const int t = rem / kChunks;
    const int d0 = (rem - t * kChunks) * V;
    const int inside = t_in[t];
    float v[V];
    if (inside == 1 && d0 < D) {
      load_floats<V>(img + t_off[t] + part * a.C + d0, v);  // V = 8 only when D % 8 == 0
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        v[j] = (inside == 0 && a.has_bias && d0 + j < D) ? qkv_bias[part * a.C + h * D + d0 + j] : 0.f;
    }
    T* dst = (part == 0 ? sq : part == 1 ? sk : sv) + t * kLdQ + d0;
    store_floats<V>(dst, v);
  }
  __syncthreads();

  // 3. Each warp: its 16 query rows.
  const int warp = tid / 32, lane = tid % 32;
  const int row0 = warp * 16;
  if (row0 >= n_tok) return;
  const int n_kt = (n_tok + 15) / 16;  // key tiles of 16

  {  // S = Q K^T
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTile / 16];
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sq + row0 * kLdQ + kk * 16, kLdQ);
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        if (j < n_kt) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // K^T: k rows as columns
          wmma::load_matrix_sync(fb, sk + j * 16 * kLdQ + kk * 16, kLdQ);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j)
      if (j < n_kt) wmma::store_matrix_sync(ss + row0 * kLdS + j * 16, acc[j], kLdS, wmma::mem_row_major);
  }
  __syncwarp();

  // Softmax, row by row; lane owns keys lane and lane + 32. P (unnormalised, input dtype) overwrites the
  // first half of the row's bytes once every lane has read the row's scores.
  T* sp = reinterpret_cast<T*>(ss);
  const int t0 = (a.win_h - 1) * (2 * a.win_w - 1) + a.win_w - 1;  // table row of the offset (0, 0)
  for (int r = 0; r < 16; ++r) {
    const int i = row0 + r;
    float s[2] = {-INFINITY, -INFINITY};
    if (i < n_tok) {
      const int fi = t_f[i] + t0, ri = t_reg[i];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int j = lane + 32 * u;
        if (j < n_tok) {
          float v = ss[i * kLdS + j] * a.qk_scale;
          if (a.has_table) v += stab[fi - t_f[j]];
          if (a.shifted && ri != t_reg[j]) v -= 100.f * kLog2e;
          s[u] = v;
        }
      }
    }
    // Token 0 is a key of every query (masked by -100 at most), so m is finite on rows of the window.
    const float m = warp_max(fmaxf(s[0], s[1]));
    const float p0 = i < n_tok ? exp2f(s[0] - m) : 0.f;
    const float p1 = i < n_tok ? exp2f(s[1] - m) : 0.f;
    const float l = warp_sum(p0 + p1);
    __syncwarp();
    sp[i * kLdP + lane] = from_float<T>(p0);
    sp[i * kLdP + lane + 32] = from_float<T>(p1);
    if (lane == 0) {
      row_m[i] = m;
      row_l[i] = l;
    }
  }
  __syncwarp();

  {  // O = P V, over the key tiles of the window (P is 0 at keys past it, V rows there are 0)
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DP / 16];
#pragma unroll
    for (int j = 0; j < DP / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      if (kk < n_kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, sp + row0 * kLdP + kk * 16, kLdP);
#pragma unroll
        for (int j = 0; j < DP / 16; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, sv + kk * 16 * kLdQ + j * 16, kLdQ);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
    __syncwarp();  // every lane's P fragments are loaded before O overwrites the rows
#pragma unroll
    for (int j = 0; j < DP / 16; ++j)
      wmma::store_matrix_sync(ss + row0 * kLdS + j * 16, acc[j], kLdS, wmma::mem_row_major);
  }
  __syncwarp();

  // O / l to the tokens' places in the unshifted map (real tokens only: padding is cropped), and the lse.
  const int64_t img_pix = b * int64_t(a.H) * a.W;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int i = row0 + idx / D, d = idx - (idx / D) * D;
    if (i < n_tok && t_in[i] == 1)
      out[(img_pix + t_pix[i]) * a.C + h * D + d] = from_float<T>(ss[i * kLdS + d] / row_l[i]);
  }
  if (lane < 16) {
    const int i = row0 + lane;
    if (i < n_tok && t_in[i] == 1)
      lse[(img_pix + t_pix[i]) * a.heads + h] = (row_m[i] + log2f(row_l[i])) * kLn2;
  }
}

template <typename T, int DP>
void launch_dp(const at::Tensor& qkv, const float* table, const float* bias, const at::Tensor& out,
               const at::Tensor& lse, const WinArgs& a, int64_t windows, bool vec) {
  dim3 grid(unsigned(windows), unsigned(a.heads));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* q = reinterpret_cast<const T*>(qkv.data_ptr());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  float* l = lse.data_ptr<float>();
  if (vec) window_attn_fwd_kernel<T, DP, 8><<<grid, kThreads, 0, stream>>>(q, table, bias, o, l, a);
  else window_attn_fwd_kernel<T, DP, 1><<<grid, kThreads, 0, stream>>>(q, table, bias, o, l, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& qkv, const float* table, const float* bias, const at::Tensor& out,
            const at::Tensor& lse, const WinArgs& a, int64_t windows, bool vec) {
  if (a.head_dim <= 16) launch_dp<T, 16>(qkv, table, bias, out, lse, a, windows, vec);
  else if (a.head_dim <= 32) launch_dp<T, 32>(qkv, table, bias, out, lse, a, windows, vec);
  else launch_dp<T, 64>(qkv, table, bias, out, lse, a, windows, vec);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(const at::Tensor& qkv,
                                                             const std::optional<at::Tensor>& table,
                                                             const std::optional<at::Tensor>& qkv_bias,
                                                             int64_t num_heads, int64_t window_h, int64_t window_w,
                                                             int64_t shift_h, int64_t shift_w, double scale) {
  constexpr const char* kOp = "dlcv_fast_cuda::window_attention_fwd: ";
  TORCH_CHECK(qkv.is_cuda(), kOp, "qkv must be a CUDA tensor, got ", qkv.device());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, kOp,
              "qkv.dtype must be float16 or bfloat16 (float32 runs the Triton kernels), got ", dt);
  TORCH_CHECK(qkv.dim() == 4, kOp, "qkv must be 4-D (B, H, W, 3*C), got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(3) == 1, kOp, "qkv must have a unit channel stride, got ", qkv.strides());
  TORCH_CHECK(num_heads >= 1 && qkv.size(3) % (3 * num_heads) == 0, kOp, "qkv's ", qkv.size(3),
              " channels must be a multiple of 3 * num_heads = ", 3 * num_heads);
  TORCH_CHECK(window_h >= 1 && window_w >= 1 && window_h * window_w <= kTile, kOp,
              "windows of at most 64 tokens, got ", window_h, "x", window_w);
  TORCH_CHECK(shift_h >= 0 && shift_w >= 0 && shift_h < window_h && shift_w < window_w, kOp,
              "shift must be in [0, window) per dim, got (", shift_h, ", ", shift_w, ")");
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = qkv.size(3) / 3, D = C / num_heads;
  TORCH_CHECK(D >= 1 && D <= 64, kOp, "head dims from 1 to 64, got ", D);
  TORCH_CHECK(num_heads <= 65535, kOp, "at most 65535 heads (the grid's y dimension), got ", num_heads);
  TORCH_CHECK(at::cuda::getDeviceProperties(qkv.get_device())->major >= 8, kOp, "needs sm_80 or later");
  const int64_t t_rows = (2 * window_h - 1) * (2 * window_w - 1);
  at::Tensor tab, bias;
  if (table.has_value()) {
    TORCH_CHECK(table->device() == qkv.device(), kOp, "rel_pos_bias_table must be on qkv's device");
    TORCH_CHECK(table->dim() == 2 && table->size(0) == t_rows && table->size(1) == num_heads, kOp,
                "rel_pos_bias_table must have shape (", t_rows, ", ", num_heads, "), got ", table->sizes());
    tab = table->to(at::kFloat).contiguous();
  }
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->device() == qkv.device(), kOp, "qkv_bias must be on qkv's device");
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * C, kOp, "qkv_bias must have shape (", 3 * C,
                ",), got ", qkv_bias->sizes());
    bias = qkv_bias->to(at::kFloat).contiguous();
  }
  auto out = at::empty({B, H, W, C}, qkv.options());
  auto lse = at::empty({B, H, W, num_heads}, qkv.options().dtype(at::kFloat));
  if (qkv.numel() == 0) return {out, lse};
  TORCH_CHECK((H - 1) * qkv.stride(1) + (W - 1) * qkv.stride(2) + 3 * C < (int64_t(1) << 31) &&
                  H * W * 3 * C < (int64_t(1) << 31),
              kOp, "one image spans 2^31 elements or more");
  TORCH_CHECK(B * ((H + window_h - 1) / window_h) * ((W + window_w - 1) / window_w) < (int64_t(1) << 31), kOp,
              "B * windows per image must be below 2^31 (the grid's x dimension)");
  c10::cuda::CUDAGuard guard(qkv.device());

  const int64_t n_h = (H + window_h - 1) / window_h, n_w = (W + window_w - 1) / window_w;
  const int64_t pad_h = n_h * window_h, pad_w = n_w * window_w;
  WinArgs a;
  a.H = int(H); a.W = int(W); a.n_win = int(n_h * n_w); a.n_win_w = int(n_w);
  a.win_h = int(window_h); a.win_w = int(window_w);
  a.roll_h = int(shift_h % H); a.roll_w = int(shift_w % W);
  a.cut_h0 = int(shift_h ? pad_h - window_h : pad_h); a.cut_h1 = int(pad_h - shift_h);
  a.cut_w0 = int(shift_w ? pad_w - window_w : pad_w); a.cut_w1 = int(pad_w - shift_w);
  a.C = int(C); a.heads = int(num_heads); a.head_dim = int(D);
  a.s_b = qkv.stride(0); a.s_h = int(qkv.stride(1)); a.s_w = int(qkv.stride(2));
  a.s_t = tab.defined() ? int(tab.stride(0)) : 0; a.s_th = tab.defined() ? int(tab.stride(1)) : 0;
  a.qk_scale = float(scale) * kLog2e;
  a.has_table = tab.defined(); a.has_bias = bias.defined(); a.shifted = shift_h || shift_w;
  const bool vec = D % 8 == 0 && aligned16(qkv.data_ptr()) && a.s_b % 8 == 0 && a.s_h % 8 == 0 && a.s_w % 8 == 0;
  const float* tp = tab.defined() ? tab.data_ptr<float>() : nullptr;
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (dt == at::kHalf) launch<__half>(qkv, tp, bp, out, lse, a, B * a.n_win, vec);
  else launch<__nv_bfloat16>(qkv, tp, bp, out, lse, a, B * a.n_win, vec);
  return {out, lse};
}

}  // namespace dlcv_fast
