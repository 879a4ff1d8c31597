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

// Where window token t (window-local index) of window `win` lives: inside = 1 for a real token, 0 for padding,
// -1 past the window (t >= Wh * Ww); y, x its place in the unshifted map; f its folded window coordinates for
// the bias table; reg its shifted-window region id (as _tokens in kernels/window_attention.py).
struct Token {
  int inside, y, x, f, reg;
};

__device__ __forceinline__ Token window_token(int t, int win, const WinArgs& a) {
  Token k{-1, 0, 0, 0, 0};
  if (t < a.win_h * a.win_w) {
    const int ty = t / a.win_w, tx = t - ty * a.win_w;
    const int r = (win / a.n_win_w) * a.win_h + ty;  // coordinates in the shifted, padded map
    const int c = (win % a.n_win_w) * a.win_w + tx;
    k.inside = (r < a.H && c < a.W) ? 1 : 0;
    k.y = (r + a.roll_h) % a.H;
    k.x = (c + a.roll_w) % a.W;
    k.f = ty * (2 * a.win_w - 1) + tx;
    k.reg = ((r >= a.cut_h0) + (r >= a.cut_h1)) * 3 + (c >= a.cut_w0) + (c >= a.cut_w1);
  }
  return k;
}

// The score of query (fi: its folded coordinates plus the table row of offset (0, 0); ri: its region) and key
// (fj, rj) in log2 units from the raw q.k: scaled, the head's relative position bias (stab, already times
// log2(e)) added, and the -100 shifted-window mask where the regions differ.
__device__ __forceinline__ float window_score(float raw, int fi, int ri, int fj, int rj, const float* stab,
                                              const WinArgs& a) {
  float v = raw * a.qk_scale;
  if (a.has_table) v += stab[fi - fj];
  if (a.shifted && ri != rj) v -= 100.f * kLog2e;
  return v;
}

// One window's q, k, v (parts 0-2, from the image's qkv) and, with PARTS = 4, dO (part 3, from the image's
// dout) for head h, into (64, DP + 8) shared tiles: padding tokens get q/k/v = qkv_bias and dO = 0, tokens past
// the window and channels past the head dim 0. t_off / t_doff: the tokens' in-image offsets in qkv / dout.
template <typename T, int DP, int V, int PARTS>
__device__ __forceinline__ void load_window(const T* qkv_img, const T* dout_img, const float* qkv_bias,
                                            const int* t_in, const int* t_off, const int* t_doff, T* sq, T* sk,
                                            T* sv, T* sdo, int h, const WinArgs& a) {
  constexpr int kLdQ = DP + 8, kChunks = DP / V;
  const int D = a.head_dim;
  for (int i = threadIdx.x; i < PARTS * kTile * kChunks; i += kThreads) {
    const int part = i / (kTile * kChunks);
    const int rem = i - part * (kTile * kChunks);
    const int t = rem / kChunks;
    const int d0 = (rem - t * kChunks) * V;  // V = 8 only when D % 8 == 0: a chunk is all in or all out
    const int inside = t_in[t];
    float v[V];
    if (inside == 1 && d0 < D) {
      load_floats<V>(part < 3 ? qkv_img + t_off[t] + part * a.C + h * D + d0 : dout_img + t_doff[t] + h * D + d0, v);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        v[j] = (part < 3 && inside == 0 && a.has_bias && d0 + j < D) ? qkv_bias[part * a.C + h * D + d0 + j] : 0.f;
    }
    store_floats<V>((part == 0 ? sq : part == 1 ? sk : part == 2 ? sv : sdo) + t * kLdQ + d0, v);
  }
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
    const Token k = window_token(tid, win, a);
    t_in[tid] = k.inside;
    t_off[tid] = k.y * a.s_h + k.x * a.s_w;
    t_pix[tid] = k.y * a.W + k.x;
    t_f[tid] = k.f;
    t_reg[tid] = k.reg;
  }
  if (a.has_table) {
    const int n_t = (2 * a.win_h - 1) * (2 * a.win_w - 1);
    for (int i = tid; i < n_t; i += kThreads) stab[i] = table[i * a.s_t + h * a.s_th] * kLog2e;
  }
  __syncthreads();  // the token geometry is read by every thread below

  // 2. q, k, v of the window for this head.
  load_window<T, DP, V, 3>(qkv + b * a.s_b, nullptr, qkv_bias, t_in, t_off, nullptr, sq, sk, sv, nullptr, h, a);
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
          s[u] = window_score(ss[i * kLdS + j], fi, ri, t_f[j], t_reg[j], stab, a);
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

// ------------------------------------------------------------------------------------------------
// Backward: one CTA (4 warps) per (group of windows, head), looping over windows g, g + groups, ... so that the
// table gradient (dS summed over windows) and the padding tokens' share of the qkv bias gradient add up in
// shared memory, in a fixed order (deterministic, no atomics). Per window:
//   A. (warp w: query rows 16w..) S = Q K^T and dP = dO V^T (WMMA); P = exp2(S*scale*log2e + bias + mask -
//      lse*log2e) with the forward's lse (+inf at padding queries, so their P is 0), delta = rowsum(P*dP) /
//      rowsum(P) (as the Triton kernels: free of the output's rounding), dS = P (dP - delta); P and dS are
//      written in the input dtype over the bytes of S and dP; dS (fp32) is added to the table gradient tile.
//   B. (warp w: key rows 16w..) dV = P^T dO, dK = scale * dS^T Q; (query rows) dQ = scale * dS K (WMMA),
//      staged per warp through shared memory to dqkv at the real tokens; padding keys' dK/dV add to the bias
//      gradient.
// Barriers per window: token geometry, loads, A -> B, B -> next window's loads.
// ------------------------------------------------------------------------------------------------

struct WinBwdArgs {
  WinArgs f;          // the forward's geometry and flags
  int64_t d_b;        // dout strides (elements)
  int d_h, d_w;
  int total_windows, groups;
  float sm_scale;     // scale (natural units), for dQ and dK
  bool table_grad, pad_bias_grad;
};

template <int DP>
struct BwdSmem {  // byte offsets into the dynamic shared memory
  static constexpr int kLdQ = DP + 8;
  static constexpr int kLdG = DP + 4;  // per-warp fp32 staging rows
  static constexpr int kTileBytes = kTile * kLdQ * 2;  // one of q, k, v, dO (16-bit types)
  static constexpr int q = 0, k = kTileBytes, v = 2 * kTileBytes, dout = 3 * kTileBytes;
  static constexpr int s = 4 * kTileBytes;                    // S -> P
  static constexpr int dp = s + kTile * kLdS * 4;            // dP -> dS
  static constexpr int stage = dp + kTile * kLdS * 4;        // 4 warps x 16 x kLdG fp32
  static constexpr int tab = stage + 4 * 16 * kLdG * 4;      // bias-table column (fp32, log2 units)
  static constexpr int tokens = tab + kMaxTable * 4;         // 7 int arrays of kTile
  static constexpr int bias = tokens + 7 * kTile * 4;        // 4 warps x 2 x DP fp32: padding keys' dK, dV sums
  static constexpr int bytes = bias + 4 * 2 * DP * 4;        // 54-92 KB: within the 99 KB of sm_86/89/120
};

// acc (16 x 16j) fragments -> the warp's staging rows -> fn(row r, channel d, value) for each row and channel.
template <int DP, typename Frag, typename Fn>
__device__ __forceinline__ void stage_rows(Frag (&acc)[DP / 16], float* stg, int D, Fn fn) {
  constexpr int kLdG = DP + 4;
#pragma unroll
  for (int j = 0; j < DP / 16; ++j) wmma::store_matrix_sync(stg + j * 16, acc[j], kLdG, wmma::mem_row_major);
  __syncwarp();
  for (int idx = threadIdx.x % 32; idx < 16 * D; idx += 32) {
    const int r = idx / D, d = idx - r * D;
    fn(r, d, stg[r * kLdG + d]);
  }
  __syncwarp();
}

template <typename T, int DP, int V>
__global__ void __launch_bounds__(kThreads, 1)
    window_attn_bwd_kernel(const T* __restrict__ qkv, const float* __restrict__ table,
                           const float* __restrict__ qkv_bias, const T* __restrict__ dout,
                           const float* __restrict__ lse, T* __restrict__ dqkv, float* __restrict__ dtab,
                           float* __restrict__ dbias, WinBwdArgs args) {
  using L = BwdSmem<DP>;
  constexpr int kLdQ = L::kLdQ, kLdG = L::kLdG;
  constexpr int kLdP = kLdS * int(sizeof(float) / sizeof(T));
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem + L::q);
  T* sk = reinterpret_cast<T*>(smem + L::k);
  T* sv = reinterpret_cast<T*>(smem + L::v);
  T* sdo = reinterpret_cast<T*>(smem + L::dout);
  float* ss = reinterpret_cast<float*>(smem + L::s);
  float* sdp = reinterpret_cast<float*>(smem + L::dp);
  float* stab = reinterpret_cast<float*>(smem + L::tab);
  int* t_in = reinterpret_cast<int*>(smem + L::tokens);
  int* t_off = t_in + kTile;
  int* t_doff = t_off + kTile;
  int* t_pix = t_doff + kTile;
  int* t_f = t_pix + kTile;
  int* t_reg = t_f + kTile;
  float* t_lse2 = reinterpret_cast<float*>(t_reg + kTile);
  float* sbias = reinterpret_cast<float*>(smem + L::bias);
  // The table gradient (dS summed over the CTA's windows): each thread always owns the same 32 entries, rows
  // 16 * warp + r and keys lane, lane + 32, so it stays in registers.
  float tacc[16][2] = {};

  const WinArgs& a = args.f;
  const int h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int D = a.head_dim, n_tok = a.win_h * a.win_w, n_kt = (n_tok + 15) / 16;
  const int t0 = (a.win_h - 1) * (2 * a.win_w - 1) + a.win_w - 1;
  float* stg = reinterpret_cast<float*>(smem + L::stage) + warp * 16 * kLdG;

  if (a.has_table) {
    const int n_t = (2 * a.win_h - 1) * (2 * a.win_w - 1);
    for (int i = tid; i < n_t; i += kThreads) stab[i] = table[i * a.s_t + h * a.s_th] * kLog2e;
  }
  for (int i = tid; i < 4 * 2 * DP; i += kThreads) sbias[i] = 0.f;

  for (int wid = blockIdx.x; wid < args.total_windows; wid += args.groups) {
    const int64_t b = wid / a.n_win;
    const int win = wid - int(b) * a.n_win;
    const int64_t img_pix = b * int64_t(a.H) * a.W;
    __syncthreads();  // the previous window's last reads of the shared tiles and token arrays are done
    if (tid < kTile) {
      const Token k = window_token(tid, win, a);
      t_in[tid] = k.inside;
      t_off[tid] = k.y * a.s_h + k.x * a.s_w;
      t_doff[tid] = k.y * args.d_h + k.x * args.d_w;
      t_pix[tid] = k.y * a.W + k.x;
      t_f[tid] = k.f;
      t_reg[tid] = k.reg;
      // lse in log2 units; +inf (P = 0) at padding queries and past the window
      t_lse2[tid] = k.inside == 1 ? lse[(img_pix + t_pix[tid]) * a.heads + h] * kLog2e : INFINITY;
    }
    __syncthreads();
    load_window<T, DP, V, 4>(qkv + b * a.s_b, dout + b * args.d_b, qkv_bias, t_in, t_off, t_doff, sq, sk, sv, sdo, h,
                             a);
    __syncthreads();

    const int row0 = warp * 16;
    if (row0 < n_tok) {  // A: scores, P, dP, dS for the warp's query rows
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s[kTile / 16], acc_dp[kTile / 16];
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        wmma::fill_fragment(acc_s[j], 0.f);
        wmma::fill_fragment(acc_dp[j], 0.f);
      }
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fq, fdo;
        wmma::load_matrix_sync(fq, sq + row0 * kLdQ + kk * 16, kLdQ);
        wmma::load_matrix_sync(fdo, sdo + row0 * kLdQ + kk * 16, kLdQ);
#pragma unroll
        for (int j = 0; j < kTile / 16; ++j) {
          if (j < n_kt) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fk, fv;  // K^T, V^T
            wmma::load_matrix_sync(fk, sk + j * 16 * kLdQ + kk * 16, kLdQ);
            wmma::load_matrix_sync(fv, sv + j * 16 * kLdQ + kk * 16, kLdQ);
            wmma::mma_sync(acc_s[j], fq, fk, acc_s[j]);
            wmma::mma_sync(acc_dp[j], fdo, fv, acc_dp[j]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kTile / 16; ++j) {
        if (j < n_kt) {
          wmma::store_matrix_sync(ss + row0 * kLdS + j * 16, acc_s[j], kLdS, wmma::mem_row_major);
          wmma::store_matrix_sync(sdp + row0 * kLdS + j * 16, acc_dp[j], kLdS, wmma::mem_row_major);
        }
      }
      __syncwarp();
      T* sp = reinterpret_cast<T*>(ss);
      T* sds = reinterpret_cast<T*>(sdp);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int i = row0 + r;
        float p[2] = {0.f, 0.f}, dp[2] = {0.f, 0.f};
        if (i < n_tok) {
          const int fi = t_f[i] + t0, ri = t_reg[i];
          const float lse2 = t_lse2[i];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int j = lane + 32 * u;
            if (j < n_tok) {
              const float v = window_score(ss[i * kLdS + j], fi, ri, t_f[j], t_reg[j], stab, a);
              p[u] = exp2f(v - lse2);  // 0 where lse2 = +inf
              dp[u] = sdp[i * kLdS + j];
            }
          }
        }
        const float l = warp_sum(p[0] + p[1]);
        const float pdp = warp_sum(p[0] * dp[0] + p[1] * dp[1]);
        const float delta = l > 0.f ? pdp / l : 0.f;
        const float ds0 = p[0] * (dp[0] - delta), ds1 = p[1] * (dp[1] - delta);
        __syncwarp();
        sp[i * kLdP + lane] = from_float<T>(p[0]);
        sp[i * kLdP + lane + 32] = from_float<T>(p[1]);
        sds[i * kLdP + lane] = from_float<T>(ds0);
        sds[i * kLdP + lane + 32] = from_float<T>(ds1);
        tacc[r][0] += ds0;  // 0 past the window
        tacc[r][1] += ds1;
      }
    }
    __syncthreads();  // P and dS of every query row are in place

    if (row0 < n_tok) {  // B: dV and dK for the warp's key rows, dQ for its query rows
      const T* sp = reinterpret_cast<const T*>(ss);
      const T* sds = reinterpret_cast<const T*>(sdp);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_v[DP / 16], acc_k[DP / 16], acc_q[DP / 16];
#pragma unroll
      for (int j = 0; j < DP / 16; ++j) {
        wmma::fill_fragment(acc_v[j], 0.f);
        wmma::fill_fragment(acc_k[j], 0.f);
        wmma::fill_fragment(acc_q[j], 0.f);
      }
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        if (kk < n_kt) {
          // P^T and dS^T rows 16w.. (keys) x columns 16kk.. (queries): column-major views of P and dS.
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fpt, fdst;
          wmma::load_matrix_sync(fpt, sp + kk * 16 * kLdP + row0, kLdP);
          wmma::load_matrix_sync(fdst, sds + kk * 16 * kLdP + row0, kLdP);
          // dS rows 16w.. (queries) x columns 16kk.. (keys)
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fds;
          wmma::load_matrix_sync(fds, sds + row0 * kLdP + kk * 16, kLdP);
#pragma unroll
          for (int j = 0; j < DP / 16; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fdo, fq, fk;
            wmma::load_matrix_sync(fdo, sdo + kk * 16 * kLdQ + j * 16, kLdQ);
            wmma::load_matrix_sync(fq, sq + kk * 16 * kLdQ + j * 16, kLdQ);
            wmma::load_matrix_sync(fk, sk + kk * 16 * kLdQ + j * 16, kLdQ);
            wmma::mma_sync(acc_v[j], fpt, fdo, acc_v[j]);
            wmma::mma_sync(acc_k[j], fdst, fq, acc_k[j]);
            wmma::mma_sync(acc_q[j], fds, fk, acc_q[j]);
          }
        }
      }
      T* grad_img = dqkv + img_pix * (3 * int64_t(a.C)) + h * D;
      const float scale = args.sm_scale;
      float* bias_w = sbias + warp * 2 * DP;
      // part 0: dQ (rows = queries), 1: dK, 2: dV (rows = keys: the same tokens). Real tokens go to dqkv;
      // padding keys' dK / dV add to the qkv bias gradient (summed over the warp's rows in a fixed order).
      auto emit = [&](auto& acc, int part) {
        const float mul = part == 2 ? 1.f : scale;
        stage_rows<DP>(acc, stg, D, [&](int r, int d, float v) {
          const int t = row0 + r;
          if (t < n_tok && t_in[t] == 1)
            grad_img[int64_t(t_pix[t]) * (3 * a.C) + part * a.C + d] = from_float<T>(v * mul);
          if (part > 0 && args.pad_bias_grad && r == 0) {  // once per channel d
            float sum = 0.f;
            for (int rr = 0; rr < 16; ++rr) {
              const int tt = row0 + rr;
              if (tt < n_tok && t_in[tt] == 0) sum += stg[rr * kLdG + d];
            }
            bias_w[(part - 1) * DP + d] += sum * mul;
          }
        });
      };
      emit(acc_q, 0);
      emit(acc_k, 1);
      emit(acc_v, 2);
    }
  }

  const int64_t g = blockIdx.x;
  if (args.table_grad) {
    float* out = dtab + (g * a.heads + h) * int64_t(n_tok) * n_tok;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = warp * 16 + r;
#pragma unroll
      for (int u = 0; u < 2; ++u)
        if (i < n_tok && lane + 32 * u < n_tok) out[i * n_tok + lane + 32 * u] = tacc[r][u];
    }
  }
  __syncthreads();  // every warp's share of the bias gradient is in shared memory
  if (args.pad_bias_grad) {
    for (int i = tid; i < 2 * D; i += kThreads) {
      const int part = i / D, d = i - part * D;
      float sum = 0.f;
      for (int w = 0; w < 4; ++w) sum += sbias[w * 2 * DP + part * DP + d];
      dbias[(g * 2 + part) * a.C + h * D + d] = sum;
    }
  }
}

// Calls fn(kernel, layout) with the backward kernel instance for head dim D (padded to 16, 32 or 64) and the
// load width, and an object of its shared-memory layout type.
template <typename T, typename Fn>
void with_bwd_kernel(int D, bool vec, Fn&& fn) {
  if (D <= 16) {
    if (vec) fn(window_attn_bwd_kernel<T, 16, 8>, BwdSmem<16>{});
    else fn(window_attn_bwd_kernel<T, 16, 1>, BwdSmem<16>{});
  } else if (D <= 32) {
    if (vec) fn(window_attn_bwd_kernel<T, 32, 8>, BwdSmem<32>{});
    else fn(window_attn_bwd_kernel<T, 32, 1>, BwdSmem<32>{});
  } else {
    if (vec) fn(window_attn_bwd_kernel<T, 64, 8>, BwdSmem<64>{});
    else fn(window_attn_bwd_kernel<T, 64, 1>, BwdSmem<64>{});
  }
}

// Launches the backward; returns (dtab, dbias): the per-group partial sums, (groups, heads, N, N) and
// (groups, 2, C) fp32, or empty tensors when not asked for.
template <typename T>
std::tuple<at::Tensor, at::Tensor> launch_bwd(const at::Tensor& qkv, const float* table, const float* bias,
                                              const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& dqkv,
                                              WinBwdArgs& args, int64_t windows, bool vec) {
  at::Tensor dtab, dbias;
  with_bwd_kernel<T>(args.f.head_dim, vec, [&](auto kernel, auto layout) {
    const int bytes = decltype(layout)::bytes;
    TORCH_CHECK(size_t(bytes) <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
                "dlcv_fast_cuda::window_attention_bwd: needs ", bytes, " bytes of shared memory per block, the GPU "
                "has ", at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes));
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // One wave of resident CTAs, each looping over its windows; never more groups than windows.
    const int64_t want = (int64_t(std::max(per_sm, 1)) * sms + args.f.heads - 1) / args.f.heads;
    args.groups = int(std::min<int64_t>(windows, std::max<int64_t>(want, 1)));
    args.total_windows = int(windows);
    const int64_t N = int64_t(args.f.win_h) * args.f.win_w;
    auto f32 = qkv.options().dtype(at::kFloat);
    dtab = at::empty(args.table_grad ? at::IntArrayRef({args.groups, args.f.heads, N, N}) : at::IntArrayRef({0}),
                     f32);
    dbias = at::empty(args.pad_bias_grad ? at::IntArrayRef({args.groups, 2, args.f.C}) : at::IntArrayRef({0}),
                      f32);
    dim3 grid(unsigned(args.groups), unsigned(args.f.heads));
    kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(qkv.data_ptr()), table, bias, reinterpret_cast<const T*>(dout.data_ptr()),
        lse.data_ptr<float>(), reinterpret_cast<T*>(dqkv.data_ptr()),
        args.table_grad ? dtab.data_ptr<float>() : nullptr, args.pad_bias_grad ? dbias.data_ptr<float>() : nullptr,
        args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dtab, dbias};
}

}  // namespace

namespace {

// Checks shared by the forward and the backward, and the kernels' geometry (as _geometry in
// kernels/window_attention.py). Fills tab / bias with fp32 contiguous copies of the table and qkv bias.
WinArgs window_args(const char* op, const at::Tensor& qkv, const std::optional<at::Tensor>& table,
                    const std::optional<at::Tensor>& qkv_bias, int64_t num_heads, int64_t window_h,
                    int64_t window_w, int64_t shift_h, int64_t shift_w, double scale, at::Tensor& tab,
                    at::Tensor& bias) {
  TORCH_CHECK(qkv.is_cuda(), op, "qkv must be a CUDA tensor, got ", qkv.device());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, op,
              "qkv.dtype must be float16 or bfloat16 (float32 runs the Triton kernels), got ", dt);
  TORCH_CHECK(qkv.dim() == 4, op, "qkv must be 4-D (B, H, W, 3*C), got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(3) == 1, op, "qkv must have a unit channel stride, got ", qkv.strides());
  TORCH_CHECK(num_heads >= 1 && qkv.size(3) % (3 * num_heads) == 0, op, "qkv's ", qkv.size(3),
              " channels must be a multiple of 3 * num_heads = ", 3 * num_heads);
  TORCH_CHECK(window_h >= 1 && window_w >= 1 && window_h * window_w <= kTile, op,
              "windows of at most 64 tokens, got ", window_h, "x", window_w);
  TORCH_CHECK(shift_h >= 0 && shift_w >= 0 && shift_h < window_h && shift_w < window_w, op,
              "shift must be in [0, window) per dim, got (", shift_h, ", ", shift_w, ")");
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = qkv.size(3) / 3, D = C / num_heads;
  TORCH_CHECK(D >= 1 && D <= 64, op, "head dims from 1 to 64, got ", D);
  TORCH_CHECK(num_heads <= 65535, op, "at most 65535 heads (the grid's y dimension), got ", num_heads);
  TORCH_CHECK(at::cuda::getDeviceProperties(qkv.get_device())->major >= 8, op, "needs sm_80 or later");
  const int64_t t_rows = (2 * window_h - 1) * (2 * window_w - 1);
  if (table.has_value()) {
    TORCH_CHECK(table->device() == qkv.device(), op, "rel_pos_bias_table must be on qkv's device");
    TORCH_CHECK(table->dim() == 2 && table->size(0) == t_rows && table->size(1) == num_heads, op,
                "rel_pos_bias_table must have shape (", t_rows, ", ", num_heads, "), got ", table->sizes());
    tab = table->to(at::kFloat).contiguous();
  }
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->device() == qkv.device(), op, "qkv_bias must be on qkv's device");
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * C, op, "qkv_bias must have shape (", 3 * C,
                ",), got ", qkv_bias->sizes());
    bias = qkv_bias->to(at::kFloat).contiguous();
  }
  TORCH_CHECK((H - 1) * qkv.stride(1) + (W - 1) * qkv.stride(2) + 3 * C < (int64_t(1) << 31), op,
              "one image spans 2^31 elements or more");
  const int64_t n_h = (H + window_h - 1) / window_h, n_w = (W + window_w - 1) / window_w;
  TORCH_CHECK(B * n_h * n_w < (int64_t(1) << 31) && H * W < (int64_t(1) << 31), op,
              "B * windows per image and H * W must be below 2^31");
  const int64_t pad_h = n_h * window_h, pad_w = n_w * window_w;
  WinArgs a;
  a.H = int(H); a.W = int(W); a.n_win = int(n_h * n_w); a.n_win_w = int(n_w);
  a.win_h = int(window_h); a.win_w = int(window_w);
  a.roll_h = H ? int(shift_h % H) : 0; a.roll_w = W ? int(shift_w % W) : 0;
  a.cut_h0 = int(shift_h ? pad_h - window_h : pad_h); a.cut_h1 = int(pad_h - shift_h);
  a.cut_w0 = int(shift_w ? pad_w - window_w : pad_w); a.cut_w1 = int(pad_w - shift_w);
  a.C = int(C); a.heads = int(num_heads); a.head_dim = int(D);
  a.s_b = qkv.stride(0); a.s_h = int(qkv.stride(1)); a.s_w = int(qkv.stride(2));
  a.s_t = tab.defined() ? int(tab.stride(0)) : 0; a.s_th = tab.defined() ? int(tab.stride(1)) : 0;
  a.qk_scale = float(scale) * kLog2e;
  a.has_table = tab.defined(); a.has_bias = bias.defined(); a.shifted = shift_h || shift_w;
  return a;
}

// 16-byte loads: head dim a multiple of 8, pointer and strides of every tensor read that way aligned.
bool vec_ok(const WinArgs& a, const at::Tensor& t) {
  return a.head_dim % 8 == 0 && aligned16(t.data_ptr()) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(const at::Tensor& qkv,
                                                             const std::optional<at::Tensor>& table,
                                                             const std::optional<at::Tensor>& qkv_bias,
                                                             int64_t num_heads, int64_t window_h, int64_t window_w,
                                                             int64_t shift_h, int64_t shift_w, double scale) {
  at::Tensor tab, bias;
  const WinArgs a = window_args("dlcv_fast_cuda::window_attention_fwd: ", qkv, table, qkv_bias, num_heads,
                                window_h, window_w, shift_h, shift_w, scale, tab, bias);
  const int64_t B = qkv.size(0), C = a.C;
  auto out = at::empty({B, a.H, a.W, C}, qkv.options());
  auto lse = at::empty({B, a.H, a.W, num_heads}, qkv.options().dtype(at::kFloat));
  if (qkv.numel() == 0) return {out, lse};
  c10::cuda::CUDAGuard guard(qkv.device());
  const bool vec = vec_ok(a, qkv);
  if (qkv.scalar_type() == at::kHalf)
    launch<__half>(qkv, ptr_or_null(tab), ptr_or_null(bias), out, lse, a, B * a.n_win, vec);
  else
    launch<__nv_bfloat16>(qkv, ptr_or_null(tab), ptr_or_null(bias), out, lse, a, B * a.n_win, vec);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& qkv, const std::optional<at::Tensor>& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& lse, int64_t num_heads, int64_t window_h,
    int64_t window_w, int64_t shift_h, int64_t shift_w, double scale, bool table_grad, bool pad_bias_grad) {
  constexpr const char* kOp = "dlcv_fast_cuda::window_attention_bwd: ";
  at::Tensor tab, bias;
  WinBwdArgs args;
  args.f = window_args(kOp, qkv, table, qkv_bias, num_heads, window_h, window_w, shift_h, shift_w, scale, tab,
                       bias);
  const WinArgs& a = args.f;
  const int64_t B = qkv.size(0), N = window_h * window_w;
  TORCH_CHECK(dout.device() == qkv.device() && dout.scalar_type() == qkv.scalar_type(), kOp,
              "dout must have qkv's device and dtype");
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == B && dout.size(1) == a.H && dout.size(2) == a.W &&
                  dout.size(3) == a.C && dout.stride(3) == 1,
              kOp, "dout must be (B, H, W, C) with a unit channel stride, got ", dout.sizes(), " ", dout.strides());
  TORCH_CHECK((a.H - 1) * dout.stride(1) + (a.W - 1) * dout.stride(2) + a.C < (int64_t(1) << 31), kOp,
              "one image of dout spans 2^31 elements or more");
  TORCH_CHECK(lse.device() == qkv.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 4 && lse.size(0) == B && lse.size(1) == a.H && lse.size(2) == a.W &&
                  lse.size(3) == num_heads,
              kOp, "lse must be the forward's contiguous (B, H, W, heads) float32 log-sum-exp");
  table_grad = table_grad && tab.defined();
  pad_bias_grad = pad_bias_grad && bias.defined();
  auto dqkv = at::empty({B, a.H, a.W, 3 * a.C}, qkv.options());
  const int64_t windows = B * a.n_win;
  auto f32 = qkv.options().dtype(at::kFloat);
  if (qkv.numel() == 0 || windows == 0)
    return {dqkv, table_grad ? at::zeros({1, num_heads, N, N}, f32) : at::empty({0}, f32),
            pad_bias_grad ? at::zeros({1, 2, a.C}, f32) : at::empty({0}, f32)};
  c10::cuda::CUDAGuard guard(qkv.device());
  args.d_b = dout.stride(0); args.d_h = int(dout.stride(1)); args.d_w = int(dout.stride(2));
  args.sm_scale = float(scale);
  args.table_grad = table_grad;
  args.pad_bias_grad = pad_bias_grad;
  const bool vec = vec_ok(a, qkv) && vec_ok(a, dout);
  auto parts = qkv.scalar_type() == at::kHalf
                   ? launch_bwd<__half>(qkv, ptr_or_null(tab), ptr_or_null(bias), dout, lse, dqkv, args, windows, vec)
                   : launch_bwd<__nv_bfloat16>(qkv, ptr_or_null(tab), ptr_or_null(bias), dout, lse, dqkv, args,
                                               windows, vec);
  return {dqkv, std::get<0>(parts), std::get<1>(parts)};
}

}  // namespace dlcv_fast
