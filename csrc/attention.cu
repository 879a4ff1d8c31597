// Dense attention forward (FlashAttention-2 style), the CUDA backend of dlcv_fast::attention_fwd.
//
// Same contract as the Triton forward in kernels/attention.py (read its docstrings first): q (B, Hq, Lq, D),
// k/v (B, Hkv, Lk, D) with Hq % Hkv == 0 (GQA/MQA), any strides with a unit last stride; masks from indices
// (causal top-left, prefix_len: keys < P visible to every query, key_padding_mask (B, Lk)), an additive
// bias broadcast to (B, Hq, Lq, Lk) by zero strides; out (B, Hq, Lq, D) in q's dtype (the caller's buffer,
// a (B, Lq, Hq, D) layout) and lse (B, Hq, Lq) fp32 natural log; a row with no visible key gives zeros and
// lse = -inf.
//
// Scope: fp16 and bf16, head dims that are multiples of 8 up to 128, strides that are multiples of 8
// elements and 16-byte aligned pointers (every layout the models make), sm_80 and later.
//
// One CTA (4 warps) per (64 queries, batch x head). Each warp keeps its 16 query rows' Q fragments, the
// 16 x 64 score tile and the 16 x D output accumulator in registers (mma.sync m16n8k16, fp32 accumulate;
// operands from shared memory by ldmatrix, V transposed by ldmatrix.trans). K and V blocks of 64 keys are
// double buffered with cp.async (zero fill past Lk and past the head dim), so the next block's loads overlap
// this block's maths. Online softmax in log2 units, as the Triton kernel: m and l per row, a row with nothing
// visible yet exponentiates against 0. With RoPE tables, each K block and (once) the Q tile are rotated in
// place in shared memory after they land (rope_tile). The key loop is bounded by the causal/prefix limit and
// by the span of keys the padding mask keeps (read once per CTA); keys inside it are masked per element, and
// the 16-key groups of the last block that lie wholly past the span are not computed.
#include "attention.cuh"
#include "ops.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace dlcv_fast {
namespace {

using namespace mma;
using namespace attn;

// One key block of the forward for a warp's 16 query rows: S = Q K^T, the online softmax, O += P V. MASKED: the
// general step (scale, bias and masks per element; in the last block only the 16-key groups that hold keys below hi
// are computed: past hi every key is masked, p = 0 whatever the score). !MASKED: the caller has checked that every
// key of the block is visible to every row, unbiased, and that a.qk_scale > 0: the row max is taken on the raw
// scores (x -> x * qk_scale keeps the order) and p = exp2(s * qk_scale - m) is one FFMA.
template <bool MASKED, typename T, int DP>
__device__ __forceinline__ void fwd_step(float (&acc)[DP / 8][4], float (&m_i)[2], float (&l_i)[2],
                                         const uint32_t (&qf)[DP / 16][4], const T* ks_, const T* vs_, int n0, int hi,
                                         int row_a, int row_b, int b, int h, const float* bias, const uint8_t* kp,
                                         const AttnArgs& a) {
  const int tig = threadIdx.x % 4;
  const int valid = MASKED ? min(kBN, hi - n0) : kBN;
  float s[kBN / 8][4];
  zero(s);
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) mma_abt<T, DP, kBN>(s, qf[ks], ks_, ks, valid);

  // Scale, bias, masks (MASKED); row max, in log2 units.
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (MASKED) {
        const int row = e < 2 ? row_a : row_b;
        s[nb][e] = masked_score(s[nb][e], row, n0 + nb * 8 + 2 * tig + (e & 1), b, h, bias, kp, a);
      }
      mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
    }
  }
  float alpha[2], m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    if (!MASKED) mx[r] *= a.qk_scale;
    const float m_new = fmaxf(m_i[r], mx[r]);
    m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: no inf - inf
    alpha[r] = exp2f(m_i[r] - m_use[r]);
    m_i[r] = m_new;
    l_i[r] *= alpha[r];
  }
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) {
    acc[nd][0] *= alpha[0];
    acc[nd][1] *= alpha[0];
    acc[nd][2] *= alpha[1];
    acc[nd][3] *= alpha[1];
  }
#pragma unroll
  for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = MASKED ? exp2f(s[nb][e] - m_use[e / 2]) : exp2f(fmaf(s[nb][e], a.qk_scale, -m_use[e / 2]));
      s[nb][e] = p;
      l_i[e / 2] += p;  // this thread's share of the row sum; reduced over the quad at the end
    }
  }

  // O += P V: P's accumulator layout is the A operand's (two 8-key blocks per 16-key step).
  mma_cb<T, DP>(acc, s, vs_, valid);
}

// min 1 CTA per SM in the launch bounds: without it ptxas capped head dim 64 at 128 registers (and spilled)
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    float* __restrict__ lse, const float* __restrict__ bias, const uint8_t* __restrict__ kpm,
                    const float* __restrict__ rope_cos, const float* __restrict__ rope_sin, AttnArgs a) {
  constexpr int kLd = DP + 8;  // shared row stride (elements): 16-byte aligned rows, conflict-free ldmatrix
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kBM * kLd;        // 2 stages
  T* sv = sk + 2 * kBN * kLd;    // 2 stages
  __shared__ int span[2 * 4];    // per-warp first / last kept key

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int m0 = blockIdx.x * kBM;
  const int bh = blockIdx.y, b = bh / a.H, h = bh - b * a.H, hk = h / a.group;
  const int D = a.head_dim;
  const T* qb = q + b * a.sqb + h * a.sqh;
  const T* kb = k + b * a.skb + hk * a.skh;
  const T* vb = v + b * a.svb + hk * a.svh;
  const uint8_t* kp = a.has_kpm ? kpm + b * a.skpb : nullptr;

  const int2 range = key_range(m0, kp, a, span);  // the keys to visit
  const int lo = range.x, hi = range.y;

  load_tile<T, DP>(sq, qb, a.sqm, m0, a.Lq, D);
  if (lo < hi) {
    load_kv<T, DP>(sk, sv, kb, vb, lo, a);
  }
  cp_async_commit();

  float acc[DP / 8][4];
  zero(acc);
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  uint32_t qf[DP / 16][4];
  const int row_a = m0 + warp * 16 + g, row_b = row_a + 8;  // this thread's two query rows

  int stage = 0;
  for (int n0 = lo; n0 < hi; n0 += kBN, stage ^= 1) {
    const bool more = n0 + kBN < hi;
    if (more) {  // prefetch the next block into the other stage
      load_kv<T, DP>(sk + (stage ^ 1) * kBN * kLd, sv + (stage ^ 1) * kBN * kLd, kb, vb, n0 + kBN, a);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (a.has_rope) rope_block<T, DP>(sk + stage * kBN * kLd, n0, sq, m0, n0 == lo, b, rope_cos, rope_sin, a);
    if (n0 == lo) {  // Q fragments (rows 16 warp.., all of the head dim), once
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) load_a<T, DP>(qf[ks], sq, warp * 16, ks);
    }
    const T* ks_ = sk + stage * kBN * kLd;
    const T* vs_ = sv + stage * kBN * kLd;

    // A block with no bias, no padding mask, every key below hi and (causal) every key visible to every query of
    // the CTA needs no per-element mask: it takes the unmasked instance of the step (no branches around the
    // products, one FFMA and one EX2 per score), the rest the masked one.
    const bool masked = a.has_bias || a.has_kpm || !(a.qk_scale > 0.f) || n0 + kBN > hi ||
                        (a.causal && n0 + kBN - 1 > m0 && n0 + kBN > a.prefix_len);
    if (masked) fwd_step<true, T, DP>(acc, m_i, l_i, qf, ks_, vs_, n0, hi, row_a, row_b, b, h, bias, kp, a);
    else fwd_step<false, T, DP>(acc, m_i, l_i, qf, ks_, vs_, n0, hi, row_a, row_b, b, h, bias, kp, a);
    __syncthreads();  // this stage is read; the next iteration's prefetch overwrites it
  }
  cp_async_wait<0>();  // no block at all: the Q load is still outstanding

  // Normalise; stage the 64 x D tile in shared memory (over Q) for 16-byte stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
    inv[r] = l_i[r] > 0.f ? 1.f / l_i[r] : 0.f;  // empty row: zeros
  }
  __syncthreads();  // every warp is done with sq (its Q fragments were read in the first block)
#pragma unroll
  for (int nd = 0; nd < DP / 8; ++nd) {
    const int c = nd * 8 + 2 * tig;
    *reinterpret_cast<uint32_t*>(sq + (warp * 16 + g) * kLd + c) = pack2<T>(acc[nd][0] * inv[0], acc[nd][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sq + (warp * 16 + g + 8) * kLd + c) =
        pack2<T>(acc[nd][2] * inv[1], acc[nd][3] * inv[1]);
  }
  if (tig == 0) {
    float* lrow = lse + int64_t(bh) * a.Lq;
    if (row_a < a.Lq) lrow[row_a] = l_i[0] > 0.f ? (m_i[0] + log2f(l_i[0])) * kLn2 : -INFINITY;
    if (row_b < a.Lq) lrow[row_b] = l_i[1] > 0.f ? (m_i[1] + log2f(l_i[1])) * kLn2 : -INFINITY;
  }
  __syncthreads();
  T* ob = o + b * a.sob + h * a.soh;
  for (int i = tid; i < kBM * (DP / 8); i += kThreads) {
    const int r = i / (DP / 8), c = (i - r * (DP / 8)) * 8;
    if (m0 + r < a.Lq && c < D)
      *reinterpret_cast<uint4*>(ob + int64_t(m0 + r) * a.som + c) = *reinterpret_cast<const uint4*>(sq + r * kLd + c);
  }
}

template <int DP>
constexpr int smem_bytes() {
  return (kBM + 4 * kBN) * (DP + 8) * 2;
}

template <typename T, int DP>
void launch_dp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
               const at::Tensor& lse, const float* bias, const uint8_t* kpm, const float* rope_cos,
               const float* rope_sin, const AttnArgs& a, int B) {
  auto kernel = attn_fwd_kernel<T, DP>;
  constexpr int bytes = smem_bytes<DP>();
  set_smem(kernel, bytes, "dlcv_fast_cuda::attention_fwd: ");
  dim3 grid(unsigned((a.Lq + kBM - 1) / kBM), unsigned(B * a.H));
  kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<T*>(o.data_ptr()), lse.data_ptr<float>(), bias, kpm,
      rope_cos, rope_sin, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
            const float* bias, const uint8_t* kpm, const float* rope_cos, const float* rope_sin, const AttnArgs& a,
            int B) {
  with_padded_head_dim(a.head_dim, [&](auto dp) {
    launch_dp<T, decltype(dp)::value>(q, k, v, o, lse, bias, kpm, rope_cos, rope_sin, a, B);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& attn_bias,
                                                      const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                                      int64_t prefix_len, double scale,
                                                      const std::optional<at::Tensor>& rope_cos,
                                                      const std::optional<at::Tensor>& rope_sin) {
  constexpr const char* kOp = "dlcv_fast_cuda::attention_fwd: ";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, kOp, "4-D q, k, v expected");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  auto o = at::empty({B, Lq, H, D}, q.options()).transpose(1, 2);
  auto lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  at::Tensor bias, kpm;
  AttnArgs a = make_args(kOp, q, k, v, o, attn_bias, key_padding_mask, causal, prefix_len, scale, bias, kpm);
  at::Tensor cos32, sin32;
  rope_args(kOp, q, k, rope_cos, rope_sin, cos32, sin32, a);
  if (o.numel() == 0) return {o, lse};
  if (Lk == 0) return {o.zero_(), lse.fill_(-INFINITY)};
  c10::cuda::CUDAGuard guard(q.device());
  const uint8_t* kp = a.has_kpm ? reinterpret_cast<const uint8_t*>(kpm.data_ptr()) : nullptr;
  const float* bp = a.has_bias ? bias.data_ptr<float>() : nullptr;
  const float* rc = a.has_rope ? cos32.data_ptr<float>() : nullptr;
  const float* rs = a.has_rope ? sin32.data_ptr<float>() : nullptr;
  if (q.scalar_type() == at::kHalf) launch<__half>(q, k, v, o, lse, bp, kp, rc, rs, a, int(B));
  else launch<__nv_bfloat16>(q, k, v, o, lse, bp, kp, rc, rs, a, int(B));
  return {o, lse};
}

}  // namespace dlcv_fast
