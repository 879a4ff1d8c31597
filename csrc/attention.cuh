// What the attention forward (attention.cu) and backward (attention_bwd.cu) share: the arguments, the key
// range a query block visits, and the masked, biased score of one (query, key) pair.
#pragma once

#include "mma.cuh"

#include <type_traits>

namespace dlcv_fast {
namespace attn {

constexpr int kBM = 64;  // queries per CTA (4 warps x 16)
constexpr int kBN = 64;  // keys per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct AttnArgs {
  int64_t sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som;
  int64_t sbb, sbh, sbm, sbn;  // bias strides (elements; 0 on broadcast dims)
  int64_t skpb;                // key padding mask batch stride
  int H, group, Lq, Lk, prefix_len, head_dim;
  float qk_scale;  // scale * log2(e)
  bool causal, has_bias, has_kpm;
  // RoPE inside the kernels (half-split pairs c, c + rope_R of the first 2 rope_R channels), fp32 tables
  // (B or 1, N, rope_R) with batch stride srb (0: shared) and row stride rope_R
  bool has_rope;
  int rope_R;
  int64_t srb;
};

// The score of (row, col) in log2 units, the bias added; -inf where the key is out of range or masked
// (causal / prefix by index, key padding mask), as _scores / _visible in kernels/attention.py.
__device__ __forceinline__ float masked_score(float raw, int row, int col, int b, int h, const float* bias,
                                              const uint8_t* kp, const AttnArgs& a) {
  float x = raw * a.qk_scale;
  if (a.has_bias) {
    const int rr = min(row, a.Lq - 1), cc = min(col, a.Lk - 1);
    x += __ldg(bias + b * a.sbb + h * a.sbh + rr * a.sbm + cc * a.sbn) * kLog2e;
  }
  bool keep = col < a.Lk;
  if (a.causal) keep = keep && (col <= row || col < a.prefix_len);
  if (a.has_kpm) keep = keep && kp[min(col, a.Lk - 1)];
  return keep ? x : -INFINITY;
}

// [lo, hi): the keys the query block [m0, m0 + kBM) visits, lo a multiple of kBN (kp: the batch's padding mask
// row or null). Causal/prefix limits bound hi; a padding mask bounds both ends to the span of kept keys (read
// by the whole CTA; span: 8 ints of shared memory). Contains a __syncthreads when a.has_kpm.
__device__ __forceinline__ int2 key_range(int m0, const uint8_t* kp, const AttnArgs& a, int* span) {
  int lo = 0, hi = a.Lk;
  if (a.causal) hi = min(a.Lk, max(m0 + kBM, a.prefix_len));
  if (a.has_kpm) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int first = a.Lk, last = 0;
    for (int j = tid; j < a.Lk; j += mma::kThreads)
      if (kp[j]) {
        first = min(first, j);
        last = max(last, j + 1);
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      first = min(first, __shfl_xor_sync(0xffffffffu, first, off));
      last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
    }
    if (lane == 0) {
      span[warp] = first;
      span[4 + warp] = last;
    }
    __syncthreads();
    first = min(min(span[0], span[1]), min(span[2], span[3]));
    last = max(max(span[4], span[5]), max(span[6], span[7]));
    lo = (first / kBN) * kBN;
    hi = min(hi, last);
  }
  return make_int2(lo, hi);
}


// Rotate rows [0, ROWS) of a (ROWS, DP + 8) shared tile in place by RoPE, row r at sequence position pos0 + r (rows
// at or past n_pos are left alone): pair (x_c, x_{c+R}) -> (x_c cos - x_{c+R} sin, x_{c+R} cos + x_c sin) in fp32,
// rounded to T, as the standalone kernel (rope.cu) computes it. cos / sin: the batch's (N, R) tables.
template <typename T, int DP, int ROWS = kBN>
__device__ __forceinline__ void rope_tile(T* tile, int pos0, int n_pos, const float* cos, const float* sin,
                                          const AttnArgs& a) {
  const int R = a.rope_R;
  for (int i = threadIdx.x; i < ROWS * R; i += mma::kThreads) {
    const int r = i / R, c = i - r * R;
    if (pos0 + r >= n_pos) continue;
    const int64_t t = int64_t(pos0 + r) * R + c;
    const float co = cos[t], si = sin[t];
    T* row = tile + r * (DP + 8);
    const float x0 = to_float(row[c]), x1 = to_float(row[c + R]);
    row[c] = from_float<T>(x0 * co - x1 * si);
    row[c + R] = from_float<T>(x1 * co + x0 * si);
  }
}

// The forward's and the dQ kernel's RoPE step once key block n0 has landed in sk_block: that block rotated and, on
// the first block, the Q tile (queries from m0) too, then a barrier. cos / sin: all batches' tables (batch b's at
// b * a.srb).
template <typename T, int DP>
__device__ __forceinline__ void rope_block(T* sk_block, int n0, T* sq, int m0, bool first, int b, const float* cos,
                                           const float* sin, const AttnArgs& a) {
  const float* cb = cos + b * a.srb;
  const float* sb = sin + b * a.srb;
  rope_tile<T, DP>(sk_block, n0, a.Lk, cb, sb, a);
  if (first) rope_tile<T, DP>(sq, m0, a.Lq, cb, sb, a);
  __syncthreads();
}

// K and V rows [n0, n0 + kBN) of one (batch, kv head) (kb, vb: its first key) into shared tiles sk, sv by cp.async
// (zero fill past Lk and past the head dim); the caller commits the group.
template <typename T, int DP>
__device__ __forceinline__ void load_kv(T* sk, T* sv, const T* kb, const T* vb, int n0, const AttnArgs& a) {
  mma::load_tile<T, DP>(sk, kb + int64_t(n0) * a.skn, a.skn, 0, a.Lk - n0, a.head_dim);
  mma::load_tile<T, DP>(sv, vb + int64_t(n0) * a.svn, a.svn, 0, a.Lk - n0, a.head_dim);
}

// ---- host side ----

// fn(std::integral_constant<int, DP>{}) for the head dim padded to the kernels' instances: 32, 64, 96 or 128.
template <typename Fn>
void with_padded_head_dim(int D, Fn&& fn) {
  if (D <= 32) fn(std::integral_constant<int, 32>{});
  else if (D <= 64) fn(std::integral_constant<int, 64>{});
  else if (D <= 96) fn(std::integral_constant<int, 96>{});
  else fn(std::integral_constant<int, 128>{});
}

inline bool aligned8(const at::Tensor& t) {
  return aligned16(t.data_ptr()) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

// The checks of q, k, v (and out, for the backward) the kernels rely on, and their arguments: strides, sizes,
// the mask flags; `bias` becomes the bias as fp32 broadcast to (B, Hq, Lq, Lk) by zero strides (converted
// once, before broadcasting: nothing expanded), `kpm` the padding mask with a unit last stride.
inline AttnArgs make_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const std::optional<at::Tensor>& attn_bias,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, int64_t prefix_len,
                          double scale, at::Tensor& bias, at::Tensor& kpm) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device() && out.device() == q.device(), op,
              "q, k, v (and out) must be CUDA tensors on one device");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kHalf || dt == at::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt &&
                  out.scalar_type() == dt,
              op, "q, k and v must all be float16 or all bfloat16 (float32 runs the Triton kernels), got ", dt);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && out.sizes() == q.sizes(), op,
              "q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) expected");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv >= 1 && H % Hkv == 0, op, "shapes do not match: q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 128, op, "head dims that are multiples of 8 up to 128, got ", D);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1, op,
              "unit last strides expected");
  TORCH_CHECK(aligned8(q) && aligned8(k) && aligned8(v) && aligned8(out), op,
              "q, k, v (and out) need 16-byte aligned data and strides that are multiples of 8 elements");
  TORCH_CHECK(at::cuda::getDeviceProperties(q.get_device())->major >= 8, op, "needs sm_80 or later");
  TORCH_CHECK(B * H <= 65535 && Lq <= INT32_MAX - 2 * kBM && Lk <= INT32_MAX - 2 * kBN, op,
              "B * Hq must be at most 65535 (the grid's y dimension), Lq and Lk below 2^31 - 128");
  AttnArgs a;
  a.sqb = q.stride(0); a.sqh = q.stride(1); a.sqm = q.stride(2);
  a.skb = k.stride(0); a.skh = k.stride(1); a.skn = k.stride(2);
  a.svb = v.stride(0); a.svh = v.stride(1); a.svn = v.stride(2);
  a.sob = out.stride(0); a.soh = out.stride(1); a.som = out.stride(2);
  a.H = int(H); a.group = int(H / Hkv); a.Lq = int(Lq); a.Lk = int(Lk);
  a.prefix_len = int(std::min<int64_t>(std::max<int64_t>(prefix_len, 0), Lk));
  a.head_dim = int(D);
  a.qk_scale = float(scale) * kLog2e;
  a.causal = causal;
  a.has_rope = false;
  a.rope_R = 0;
  a.srb = 0;
  a.sbb = a.sbh = a.sbm = a.sbn = 0;
  a.skpb = 0;
  if (attn_bias.has_value()) {
    TORCH_CHECK(attn_bias->device() == q.device(), op, "attn_bias must be on q's device");
    // expand() checks the shape; then an already expanded bias goes back to one element on its broadcast dims
    at::Tensor compact = attn_bias->expand({B, H, Lq, Lk});
    for (int64_t d = 0; d < compact.dim(); ++d)
      if (compact.stride(d) == 0 && compact.size(d) > 1) compact = compact.narrow(d, 0, 1);
    bias = compact.to(at::kFloat).expand({B, H, Lq, Lk});
    a.sbb = bias.stride(0); a.sbh = bias.stride(1); a.sbm = bias.stride(2); a.sbn = bias.stride(3);
  }
  a.has_bias = bias.defined();
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B &&
                    m.size(1) == Lk,
                op, "key_padding_mask must be a (B, Lk) bool tensor on q's device");
    kpm = m.stride(1) == 1 ? m : m.contiguous();
    a.skpb = kpm.stride(0);
  }
  a.has_kpm = kpm.defined();
  return a;
}

// The optional RoPE tables as fp32 (B or 1, N, R) with a unit last stride (cos32 / sin32 stay undefined without
// them), checked against q (half-split pairs; Lq = Lk = N), into a's rope fields.
inline void rope_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
                      at::Tensor& cos32, at::Tensor& sin32, AttnArgs& a) {
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), op, "rope_cos and rope_sin go together");
  if (!rope_cos.has_value()) return;
  const at::Tensor& cos = *rope_cos;
  const at::Tensor& sin = *rope_sin;
  const int64_t B = q.size(0), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(cos.sizes() == sin.sizes() &&
                  (cos.dim() == 2 || (cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1))),
              op, "rope_cos / rope_sin must both be (N, R) or (B, N, R), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(), op, "rope tables must be on q's device");
  const int64_t N = cos.size(-2), R = cos.size(-1);
  TORCH_CHECK(N == Lq && N == k.size(2), op, "rope tables have ", N, " positions; q and k have ", Lq, " and ",
              k.size(2));
  TORCH_CHECK(R >= 1 && 2 * R <= D, op, "rotary dim 2R=", 2 * R, " must be in [2, D=", D, "]");
  cos32 = cos.to(at::kFloat).contiguous();
  sin32 = sin.to(at::kFloat).contiguous();
  a.has_rope = true;
  a.rope_R = int(R);
  a.srb = (cos.dim() == 3 && cos.size(0) == B && B > 1) ? N * R : 0;
}

}  // namespace attn
}  // namespace dlcv_fast
