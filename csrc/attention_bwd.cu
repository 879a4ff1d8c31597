// Dense attention backward (FlashAttention-2 style), the CUDA backend of dlcv_fast::attention_bwd.
//
// Same contract as kernels/attention.py's backward: from dO, q, k, v, the forward's out and lse (natural log,
// -inf on fully masked rows), the same masks and bias; returns dq, dk, dv (each a (B, L, H, D) buffer viewed
// as (B, H, L, D), in q's dtype) and, when the bias needs a gradient, dS (B, Hq, Lq, Lk) fp32 (gradient of
// the scores, which the caller sums over the bias's broadcast dims). Deterministic: no atomics.
//
// Three kernels, scope as the forward (fp16/bf16, head dims multiples of 8 up to 128, sm_80+):
//   delta: delta = rowsum(dO * O) per query row (fp32), and the lse in log2 units (+inf on empty rows, so
//          their P is 0 everywhere);
//   dK/dV: one CTA per (64 keys, batch x kv head); each warp owns 16 keys and walks the queries that can see
//          them (all the group's q heads: GQA sums in registers), in blocks of BQ (64, 32 or 16 queries as
//          the head dim grows: bq()) double buffered by cp.async: S^T = K Q^T and dP^T = V dO^T (mma.sync),
//          P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta), dV += P^T dO and dK += dS^T Q (P and dS from the
//          score registers, Q and dO transposed by ldmatrix.trans);
//   dQ:    one CTA per (64 queries, batch x head), the forward's key range and loop: S, P, dP = dO V^T, dS,
//          dQ += dS K; it also stores dS when the bias needs a gradient (every (query, key) pair once).
#include "attention.cuh"
#include "ops.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace dlcv_fast {
namespace {

using namespace mma;
using namespace attn;

struct BwdArgs {
  AttnArgs f;
  int64_t sdb, sdh, sdm;           // dO strides
  int64_t sgqb, sgqh, sgqm;        // dq strides
  int64_t sgkb, sgkh, sgkn;        // dk strides (dv has the same)
  float sm_scale;                  // scale (natural units) for dQ and dK
  bool bias_grad;
};

// delta and lse2 for every (b, h, query): one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ lse,
                          float* __restrict__ delta, float* __restrict__ lse2, BwdArgs a, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t i = row % a.f.Lq, bh = row / a.f.Lq, b = bh / a.f.H, h = bh % a.f.H;
  const T* d = dout + b * a.sdb + h * a.sdh + i * a.sdm;
  const T* o = out + b * a.f.sob + h * a.f.soh + i * a.f.som;
  float sum = 0.f;
  for (int c = lane; c < a.f.head_dim; c += 32) sum += to_float(d[c]) * to_float(o[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    delta[row] = sum;
    const float l = lse[row];
    lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// The warp's 16 x (DP) fp32 accumulator (C fragments, 8 columns each) times mul, as T, to rows row0.. of a
// (rows, D) matrix with row stride ld, through the warp's 16 x (DP + 8) staging tile in shared memory.
template <typename T, int DP>
__device__ __forceinline__ void store_rows(const float (&acc)[DP / 8][4], float mul, T* stage, T* dst, int64_t ld,
                                           int row0, int n_rows, int D) {
  constexpr int kLd = DP + 8;
  const int lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) {
    *reinterpret_cast<uint32_t*>(stage + g * kLd + nd * 8 + 2 * tig) = pack2<T>(acc[nd][0] * mul, acc[nd][1] * mul);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kLd + nd * 8 + 2 * tig) =
        pack2<T>(acc[nd][2] * mul, acc[nd][3] * mul);
  }
  __syncwarp();
  for (int i = lane; i < 16 * (DP / 8); i += 32) {
    const int r = i / (DP / 8), c = (i - r * (DP / 8)) * 8;
    if (row0 + r < n_rows && c < D)
      *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * ld + c) =
          *reinterpret_cast<const uint4*>(stage + r * kLd + c);
  }
}

// store_rows for a gradient w.r.t. RoPE-rotated q or k: the rows go back through the inverse rotation (the
// gradient w.r.t. the unrotated input), (g_c, g_{c+R}) -> (g_c cos + g_{c+R} sin, g_{c+R} cos - g_c sin) at
// position row0 + r, in fp32 from the warp's 16 x DP fp32 staging tile `stage`.
template <typename T, int DP>
__device__ __forceinline__ void store_rows_rope(const float (&acc)[DP / 8][4], float mul, float* stage, T* dst,
                                                int64_t ld, int row0, int n_rows, int D, const float* cos,
                                                const float* sin, int R) {
  const int lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) stage[(g + 8 * (e / 2)) * DP + nd * 8 + 2 * tig + (e & 1)] = acc[nd][e] * mul;
  __syncwarp();
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = i / D, c = i - r * D;
    if (row0 + r >= n_rows) continue;
    const float* row = stage + r * DP;
    float x = row[c];
    if (c < 2 * R) {
      const int64_t t = int64_t(row0 + r) * R + (c < R ? c : c - R);
      x = c < R ? row[c] * cos[t] + row[c + R] * sin[t] : row[c] * cos[t] - row[c - R] * sin[t];
    }
    dst[int64_t(row0 + r) * ld + c] = from_float<T>(x);
  }
}

// ROPE: q and k rotated in shared memory, dK rotated back (a template flag: at head dim 64 the runtime branch
// alone pushed the plain kernel, at 255 registers, into spilling).
template <typename T, int DP, int BQ, bool ROPE>
__global__ void __launch_bounds__(kThreads, 1)  // min 1 CTA: ptxas capped head dim 64 on sm_80 at 168 registers (spilled)
    attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                         T* __restrict__ dk, T* __restrict__ dv, const float* __restrict__ bias,
                         const uint8_t* __restrict__ kpm, const float* __restrict__ rope_cos,
                         const float* __restrict__ rope_sin, BwdArgs args) {
  constexpr int kLd = DP + 8;
  const AttnArgs& a = args.f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);  // 64 keys
  T* sv = sk + kBN * kLd;                   // 64 keys
  T* sq = sv + kBN * kLd;                   // 2 stages of BQ queries
  T* sdo = sq + 2 * BQ * kLd;               // 2 stages of BQ queries
  float* s_lse2 = reinterpret_cast<float*>(sdo + 2 * BQ * kLd);  // 2 x BQ
  float* s_delta = s_lse2 + 2 * BQ;                                // 2 x BQ

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int n0 = blockIdx.x * kBN;
  const int Hkv = a.H / a.group;
  const int bhk = blockIdx.y, b = bhk / Hkv, hk = bhk - b * Hkv;
  const int D = a.head_dim;
  const uint8_t* kp = a.has_kpm ? kpm + b * a.skpb : nullptr;
  const int key_a = n0 + warp * 16 + g, key_b = key_a + 8;  // this thread's two keys

  load_kv<T, DP>(sk, sv, k + b * a.skb + hk * a.skh, v + b * a.svb + hk * a.svh, n0, a);
  cp_async_commit();

  // Queries that can see some key of this block: all, or (causal, past the prefix) those from n0 on.
  const int m_start = (a.causal && n0 >= a.prefix_len) ? (n0 / BQ) * BQ : 0;
  const int n_qblocks = a.Lq > m_start ? (a.Lq - m_start + BQ - 1) / BQ : 0;
  const int steps = a.group * n_qblocks;  // (q head, query block) pairs, walked in order

  float acc_k[DP / 8][4], acc_v[DP / 8][4];
  zero(acc_k);
  zero(acc_v);

  auto issue = [&](int step, int st) {  // loads of step `step` into stage st
    const int h = hk * a.group + step / n_qblocks, m0 = m_start + (step % n_qblocks) * BQ;
    load_tile<T, DP, BQ>(sq + st * BQ * kLd, q + b * a.sqb + h * a.sqh + int64_t(m0) * a.sqm, a.sqm, 0, a.Lq - m0,
                         D);
    load_tile<T, DP, BQ>(sdo + st * BQ * kLd, dout + b * args.sdb + h * args.sdh + int64_t(m0) * args.sdm, args.sdm,
                         0, a.Lq - m0, D);
  };
  if (steps > 0) issue(0, 0);
  cp_async_commit();
  if (ROPE && steps > 0) {  // the K tile (the first group) rotated in place, once
    cp_async_wait<1>();
    __syncthreads();
    rope_tile<T, DP>(sk, n0, a.Lk, rope_cos + b * a.srb, rope_sin + b * a.srb, a);
  }  // (published by the loop's first barrier)

  for (int step = 0; step < steps; ++step) {
    const int st = step & 1;
    const int h = hk * a.group + step / n_qblocks, m0 = m_start + (step % n_qblocks) * BQ;
    // lse2 / delta of this block's queries (plain loads; the barrier below publishes them)
    if (tid < BQ) {
      const int64_t row = (int64_t(b) * a.H + h) * a.Lq + m0 + tid;
      const bool ok = m0 + tid < a.Lq;
      s_lse2[st * BQ + tid] = ok ? lse2[row] : INFINITY;
      s_delta[st * BQ + tid] = ok ? delta[row] : 0.f;
    }
    if (step + 1 < steps) {
      issue(step + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (ROPE) {  // rotate this step's Q tile in place
      rope_tile<T, DP, BQ>(sq + st * BQ * kLd, m0, a.Lq, rope_cos + b * a.srb, rope_sin + b * a.srb, a);
      __syncthreads();
    }
    const T* qs = sq + st * BQ * kLd;
    const T* dos = sdo + st * BQ * kLd;
    const float* l2 = s_lse2 + st * BQ;
    const float* dl = s_delta + st * BQ;

    // A step with no bias, no padding mask, every key of the CTA below Lk, every query below Lq and (causal) every
    // key visible to every query takes the unmasked instance (no per-element mask, no branches around the
    // products), the rest the masked one.
    const bool masked = a.has_bias || a.has_kpm || n0 + kBN > a.Lk || m0 + BQ > a.Lq ||
                        (a.causal && n0 + kBN - 1 > m0 && n0 + kBN > a.prefix_len);
    auto block = [&](auto masked_c) {
      constexpr bool MASKED = decltype(masked_c)::value;
      // S^T = K Q^T and dP^T = V dO^T: 16 keys x BQ queries per warp (16-query groups past Lq skipped: P = 0 there).
      const int valid = MASKED ? min(BQ, a.Lq - m0) : BQ;
      float s[BQ / 8][4], dp[BQ / 8][4];
      mma_abt_pair<T, DP, BQ>(s, dp, sk, sv, qs, dos, warp * 16, valid);
      // P^T and dS^T (natural units), in place of S^T and dP^T.
#pragma unroll
      for (int nb = 0; nb < BQ / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = e < 2 ? key_a : key_b;
          const int qi = nb * 8 + 2 * tig + (e & 1);  // query within the block
          // 0 at masked keys (-inf) and empty rows (lse2 = +inf)
          const float p = MASKED ? exp2f(masked_score(s[nb][e], m0 + qi, key, b, h, bias, kp, a) - l2[qi])
                                 : exp2f(fmaf(s[nb][e], a.qk_scale, -l2[qi]));
          s[nb][e] = p;
          dp[nb][e] = p * (dp[nb][e] - dl[qi]);
        }
      }
      // dV += P^T dO, dK += dS^T Q: 16 queries a step; dO and Q transposed by ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        if (kk * 16 < valid) {  // groups past the valid rows hold zeros
          uint32_t pa[4], da[4];
          c_to_a<T>(pa, s, kk);
          c_to_a<T>(da, dp, kk);
          mma_ab<T, DP>(acc_v, pa, dos, kk);
          mma_ab<T, DP>(acc_k, da, qs, kk);
        }
      }
    };
    if (masked) block(std::true_type{});
    else block(std::false_type{});
    __syncthreads();  // this stage is read; the next step's prefetch overwrites it
  }
  cp_async_wait<0>();
  __syncthreads();  // K / V tiles free for staging (a CTA with no query step still waits for its loads)

  // Keys past Lk are not stored; rows of a key block no query sees are zeros.
  T* stage = sk + warp * 16 * kLd;
  const int row0 = n0 + warp * 16;
  if (ROPE) {  // through a fp32 staging tile over K and V (4 x 16 x DP floats fit in their 2 x 64 x (DP + 8))
    store_rows_rope<T, DP>(acc_k, args.sm_scale, reinterpret_cast<float*>(sk) + warp * 16 * DP,
                           dk + b * args.sgkb + hk * args.sgkh, args.sgkn, row0, a.Lk, D, rope_cos + b * a.srb,
                           rope_sin + b * a.srb, a.rope_R);
    __syncthreads();  // the next warp's dV staging below overlaps this warp's fp32 staging
  } else {
    store_rows<T, DP>(acc_k, args.sm_scale, stage, dk + b * args.sgkb + hk * args.sgkh, args.sgkn, row0, a.Lk, D);
  }
  __syncwarp();
  store_rows<T, DP>(acc_v, 1.f, stage, dv + b * args.sgkb + hk * args.sgkh, args.sgkn, row0, a.Lk, D);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1)  // min 1 CTA: ptxas capped head dim 32 at 128 registers (spilled)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                       T* __restrict__ dq, float* __restrict__ ds_out, const float* __restrict__ bias,
                       const uint8_t* __restrict__ kpm, const float* __restrict__ rope_cos,
                       const float* __restrict__ rope_sin, BwdArgs args) {
  constexpr int kLd = DP + 8;
  const AttnArgs& a = args.f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sdo = sq + kBM * kLd;
  T* sk = sdo + kBM * kLd;   // 2 stages
  T* sv = sk + 2 * kBN * kLd;  // 2 stages
  __shared__ int span[8];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int m0 = blockIdx.x * kBM;
  const int bh = blockIdx.y, b = bh / a.H, h = bh - b * a.H, hk = h / a.group;
  const int D = a.head_dim;
  const T* kb = k + b * a.skb + hk * a.skh;
  const T* vb = v + b * a.svb + hk * a.svh;
  const uint8_t* kp = a.has_kpm ? kpm + b * a.skpb : nullptr;
  const int row_a = m0 + warp * 16 + g, row_b = row_a + 8;
  const int64_t stat = int64_t(bh) * a.Lq;
  const float l2[2] = {row_a < a.Lq ? lse2[stat + row_a] : INFINITY, row_b < a.Lq ? lse2[stat + row_b] : INFINITY};
  const float dl[2] = {row_a < a.Lq ? delta[stat + row_a] : 0.f, row_b < a.Lq ? delta[stat + row_b] : 0.f};
  float* ds_rows = args.bias_grad ? ds_out + stat * a.Lk : nullptr;

  const int2 range = key_range(m0, kp, a, span);
  const int lo = range.x, hi = range.y;
  load_tile<T, DP>(sq, q + b * a.sqb + h * a.sqh, a.sqm, m0, a.Lq, D);
  load_tile<T, DP>(sdo, dout + b * args.sdb + h * args.sdh, args.sdm, m0, a.Lq, D);
  if (lo < hi) {
    load_kv<T, DP>(sk, sv, kb, vb, lo, a);
  }
  cp_async_commit();

  float acc[DP / 8][4];
  zero(acc);

  int stage = 0;
  for (int n0 = lo; n0 < hi; n0 += kBN, stage ^= 1) {
    if (n0 + kBN < hi) {
      load_kv<T, DP>(sk + (stage ^ 1) * kBN * kLd, sv + (stage ^ 1) * kBN * kLd, kb, vb, n0 + kBN, a);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (a.has_rope) rope_block<T, DP>(sk + stage * kBN * kLd, n0, sq, m0, n0 == lo, b, rope_cos, rope_sin, a);
    const T* ks_ = sk + stage * kBN * kLd;
    const T* vs_ = sv + stage * kBN * kLd;

    // A block with no bias, no padding mask, every key below hi and (causal) every key visible to every query of
    // the CTA takes the unmasked instance (no per-element mask, no branches around the products), the rest the
    // masked one (keys past hi are masked, P = 0: their 16-key groups are skipped).
    const bool masked = a.has_bias || a.has_kpm || n0 + kBN > hi ||
                        (a.causal && n0 + kBN - 1 > m0 && n0 + kBN > a.prefix_len);
    auto block = [&](auto masked_c) {
      constexpr bool MASKED = decltype(masked_c)::value;
      const int valid = MASKED ? min(kBN, hi - n0) : kBN;
      float s[kBN / 8][4], dp[kBN / 8][4];
      mma_abt_pair<T, DP, kBN>(s, dp, sq, sdo, ks_, vs_, warp * 16, valid);
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e < 2 ? row_a : row_b, col = n0 + nb * 8 + 2 * tig + (e & 1);
          s[nb][e] = MASKED ? exp2f(masked_score(s[nb][e], row, col, b, h, bias, kp, a) - l2[e / 2])  // P
                            : exp2f(fmaf(s[nb][e], a.qk_scale, -l2[e / 2]));
        }
      }
      // delta = rowsum(dO * O) from the delta kernel, or, when this one block holds every key the rows see,
      // rowsum(P dP) / rowsum(P) from the tile: the same quantity without the rounding of the stored output
      // (|dO| x that rounding, summed over the head dim, dominated dS for short key ranges), and exactly what
      // makes this dS sum to zero over the row, as a softmax gradient does.
      float dlt[2] = {dl[0], dl[1]};
      if (hi - lo <= kBN) {
        float pdp[2] = {0.f, 0.f}, psum[2] = {0.f, 0.f};
#pragma unroll
        for (int nb = 0; nb < kBN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            pdp[e / 2] += s[nb][e] * dp[nb][e];
            psum[e / 2] += s[nb][e];
          }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          for (int off = 1; off < 4; off <<= 1) {  // the quad holding the row
            pdp[r] += __shfl_xor_sync(0xffffffffu, pdp[r], off);
            psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], off);
          }
          dlt[r] = psum[r] > 0.f ? pdp[r] / psum[r] : 0.f;
        }
      }
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = e < 2 ? row_a : row_b, col = n0 + nb * 8 + 2 * tig + (e & 1);
          const float d = s[nb][e] * (dp[nb][e] - dlt[e / 2]);
          dp[nb][e] = d;
          if (MASKED && args.bias_grad && row < a.Lq && col < a.Lk) ds_rows[int64_t(row) * a.Lk + col] = d;  // (bias: MASKED)
        }
      }
      // dQ += dS K: K transposed by ldmatrix.trans.
      mma_cb<T, DP>(acc, dp, ks_, valid);
    };
    if (masked) block(std::true_type{});
    else block(std::false_type{});
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // Q / dO tiles free for staging
  if (a.has_rope)  // through a fp32 staging tile over Q and dO
    store_rows_rope<T, DP>(acc, args.sm_scale, reinterpret_cast<float*>(sq) + warp * 16 * DP,
                           dq + b * args.sgqb + h * args.sgqh, args.sgqm, m0 + warp * 16, a.Lq, D,
                           rope_cos + b * a.srb, rope_sin + b * a.srb, a.rope_R);
  else
    store_rows<T, DP>(acc, args.sm_scale, sq + warp * 16 * kLd, dq + b * args.sgqb + h * args.sgqh, args.sgqm,
                      m0 + warp * 16, a.Lq, D);
}

// Queries per step of the dK/dV kernel: its dK and dV accumulators take 2 * DP / 2 registers a thread, so larger
// head dims walk the queries in smaller steps (at 128, 32-query steps spilled on sm_80; with RoPE at 64, 64-query
// steps spilled on sm_90; at 64 without RoPE, 64-query steps sat at 252-255 registers, 2 CTAs per SM, and spilled
// once the unmasked step instance was added: 32-query steps take about 166 registers, 3 CTAs per SM).
template <int DP, bool ROPE>
constexpr int bq() { return DP <= 32 ? 64 : DP <= 96 ? 32 : 16; }

template <typename T, int DP>
void launch_dp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
               const at::Tensor& lse2, const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
               const at::Tensor& dv, float* ds, const float* bias, const uint8_t* kpm, const float* rcos,
               const float* rsin, const BwdArgs& args, int B) {
  const AttnArgs& a = args.f;
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kLd = DP + 8;
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  const T* dop = reinterpret_cast<const T*>(dout.data_ptr());
  auto dkdv = [&](auto rope) {
    constexpr bool ROPE = decltype(rope)::value;
    constexpr int BQ = bq<DP, ROPE>();
    auto kernel = attn_bwd_dkdv_kernel<T, DP, BQ, ROPE>;
    constexpr int bytes = (2 * kBN + 4 * BQ) * kLd * 2 + 4 * BQ * 4;
    set_smem(kernel, bytes, "dlcv_fast_cuda::attention_bwd: ");
    dim3 grid(unsigned((a.Lk + kBN - 1) / kBN), unsigned(B * (a.H / a.group)));
    kernel<<<grid, kThreads, bytes, stream>>>(qp, kp, vp, dop, lse2.data_ptr<float>(), delta.data_ptr<float>(),
                                               reinterpret_cast<T*>(dk.data_ptr()), reinterpret_cast<T*>(dv.data_ptr()),
                                               bias, kpm, rcos, rsin, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (a.has_rope) dkdv(std::true_type{});
  else dkdv(std::false_type{});
  {
    auto kernel = attn_bwd_dq_kernel<T, DP>;
    constexpr int bytes = (2 * kBM + 4 * kBN) * kLd * 2;
    set_smem(kernel, bytes, "dlcv_fast_cuda::attention_bwd: ");
    dim3 grid(unsigned((a.Lq + kBM - 1) / kBM), unsigned(B * a.H));
    kernel<<<grid, kThreads, bytes, stream>>>(qp, kp, vp, dop, lse2.data_ptr<float>(), delta.data_ptr<float>(),
                                               reinterpret_cast<T*>(dq.data_ptr()), ds, bias, kpm, rcos, rsin, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
            const at::Tensor& lse2, const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
            const at::Tensor& dv, float* ds, const float* bias, const uint8_t* kpm, const float* rcos,
            const float* rsin, const BwdArgs& args, int B) {
  with_padded_head_dim(args.f.head_dim, [&](auto dp) {
    launch_dp<T, decltype(dp)::value>(q, k, v, dout, lse2, delta, dq, dk, dv, ds, bias, kpm, rcos, rsin, args, B);
  });
}

at::Tensor like_kernel(const at::Tensor& t) {  // a (B, L, H, D) buffer viewed as (B, H, L, D)
  return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, int64_t prefix_len, double scale, bool bias_grad,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin) {
  constexpr const char* kOp = "dlcv_fast_cuda::attention_bwd: ";
  BwdArgs args;
  at::Tensor bias, kpm;
  args.f = make_args(kOp, q, k, v, out, attn_bias, key_padding_mask, causal, prefix_len, scale, bias, kpm);
  at::Tensor cos32, sin32;
  rope_args(kOp, q, k, rope_cos, rope_sin, cos32, sin32, args.f);
  const AttnArgs& a = args.f;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK(dout_in.device() == q.device() && dout_in.scalar_type() == q.scalar_type() &&
                  dout_in.sizes() == q.sizes(),
              kOp, "dout must match q's shape, dtype and device");
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq,
              kOp, "lse must be the forward's contiguous (B, Hq, Lq) float32 log-sum-exp");
  auto dq = like_kernel(q), dk = like_kernel(k), dv = like_kernel(v);
  auto f32 = q.options().dtype(at::kFloat);
  args.bias_grad = bias_grad && a.has_bias;
  at::Tensor ds = args.bias_grad ? at::zeros({B, H, Lq, Lk}, f32) : at::empty({0}, f32);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv, ds};
  }
  c10::cuda::CUDAGuard guard(q.device());
  // A fresh buffer when dO's layout does not allow 16-byte loads (e.g. the all-zero strides of out.sum()'s
  // gradient; .contiguous() would keep a misaligned start).
  const at::Tensor dout =
      dout_in.stride(3) == 1 && aligned8(dout_in) ? dout_in : dout_in.clone(at::MemoryFormat::Contiguous);
  args.sdb = dout.stride(0); args.sdh = dout.stride(1); args.sdm = dout.stride(2);
  args.sgqb = dq.stride(0); args.sgqh = dq.stride(1); args.sgqm = dq.stride(2);
  args.sgkb = dk.stride(0); args.sgkh = dk.stride(1); args.sgkn = dk.stride(2);
  args.sm_scale = float(scale);

  auto delta = at::empty({B, H, Lq}, f32), lse2 = at::empty({B, H, Lq}, f32);
  const int64_t rows = B * H * Lq;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned delta_blocks = unsigned((rows + kThreads / 32 - 1) / (kThreads / 32));
  const uint8_t* kp = a.has_kpm ? reinterpret_cast<const uint8_t*>(kpm.data_ptr()) : nullptr;
  float* dsp = args.bias_grad ? ds.data_ptr<float>() : nullptr;
  const float* bp = a.has_bias ? bias.data_ptr<float>() : nullptr;
  const float* rc = a.has_rope ? cos32.data_ptr<float>() : nullptr;
  const float* rs = a.has_rope ? sin32.data_ptr<float>() : nullptr;
#define DLCV_ATTN_BWD(T)                                                                                          \
  attn_bwd_delta_kernel<T><<<delta_blocks, kThreads, 0, stream>>>(                                               \
      reinterpret_cast<const T*>(dout.data_ptr()), reinterpret_cast<const T*>(out.data_ptr()), lse.data_ptr<float>(), \
      delta.data_ptr<float>(), lse2.data_ptr<float>(), args, rows);                                               \
  C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                                 \
  launch<T>(q, k, v, dout, lse2, delta, dq, dk, dv, dsp, bp, kp, rc, rs, args, int(B));
  if (q.scalar_type() == at::kHalf) {
    DLCV_ATTN_BWD(__half)
  } else {
    DLCV_ATTN_BWD(__nv_bfloat16)
  }
#undef DLCV_ATTN_BWD
  return {dq, dk, dv, ds};
}

}  // namespace dlcv_fast
