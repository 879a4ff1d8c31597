// What the attention forward (attention.cu) and backward (attention_bwd.cu) share: the arguments, the key
// range a query block visits, and the masked, biased score of one (query, key) pair.
#pragma once

#include "mma.cuh"

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


}  // namespace attn
}  // namespace dlcv_fast
