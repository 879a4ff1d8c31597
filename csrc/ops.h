// The host entry points of the CUDA kernels; bindings.cpp registers them as torch ops (dlcv_fast_cuda::*).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dlcv_fast {

// attention.cu: the dense attention forward (FlashAttention-2 style) for fp16/bf16, head dims that are multiples of
// 8 up to 128. Returns (out (B, Hq, Lq, D) over a (B, Lq, Hq, D) buffer, lse (B, Hq, Lq) fp32 natural log), as
// kernels/attention.py's forward. With rope_cos / rope_sin ((N, R) or (B, N, R), N = Lq = Lk), q and k are rotated
// (half-split pairs) inside the kernel as their tiles arrive in shared memory: the result of apply_rope first.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& attn_bias,
                                                      const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                                      int64_t prefix_len, double scale,
                                                      const std::optional<at::Tensor>& rope_cos,
                                                      const std::optional<at::Tensor>& rope_sin);

// attention_bwd.cu: its backward (same scope) from the forward's out and lse: (dq, dk, dv) as (B, L, H, D) buffers
// viewed as (B, H, L, D), and dS (B, Hq, Lq, Lk) fp32 when bias_grad (else an empty tensor). With the forward's
// RoPE tables, q and k are rotated inside the kernels and dq, dk are the gradients w.r.t. the unrotated q, k.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, int64_t prefix_len, double scale, bool bias_grad,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin);

// rope.cu: rotate x by (cos, sin) into out (out may be x). See kernels/rope.py for the contract.
void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
               bool interleaved, double sin_sign);

// window_attention.cu: Swin window attention forward for windows of at most 64 tokens, head dims up to 64,
// fp16/bf16. Returns (out (B, H, W, C), lse (B, H, W, heads) fp32, natural log), as kernels/window_attention.py.
std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(const at::Tensor& qkv,
                                                             const std::optional<at::Tensor>& table,
                                                             const std::optional<at::Tensor>& qkv_bias,
                                                             int64_t num_heads, int64_t window_h, int64_t window_w,
                                                             int64_t shift_h, int64_t shift_w, double scale);

// window_attention.cu: its backward (same scope) from the forward's lse. Returns (dqkv (B, H, W, 3C) in qkv's
// dtype, the table gradient's per-group partial sums (groups, heads, N, N) fp32 or an empty tensor, the padding
// keys' qkv-bias gradient per group (groups, 2, C) fp32 or an empty tensor), reduced as in
// kernels/window_attention.py's finish_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& qkv, const std::optional<at::Tensor>& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& lse, int64_t num_heads, int64_t window_h,
    int64_t window_w, int64_t shift_h, int64_t shift_w, double scale, bool table_grad, bool pad_bias_grad);

}  // namespace dlcv_fast
