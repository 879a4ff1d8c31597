// Rotary position embedding, the CUDA backend of dlcv_fast::rope (same contract as kernels/rope.py).
//
// x (B, H, N, D), any strides with a unit last stride; cos/sin (N, R), (B|1, N, R) or (B|1, H|1, N, R) in
// fp32 or x's dtype, broadcast to (B, H, N, R) with zero strides. The first 2R channels are rotated in pairs
// (half-split: c with c + R; interleaved: 2c with 2c + 1), the rest are copied (not touched in place).
// Pair (a, b) -> (a cos - b s, b cos + a s) with s = sin_sign * sin, computed in fp32; sin_sign = -1 is the
// inverse rotation, which is also the backward. out may be x itself.
//
// Launch: a 2-D block, threadIdx.x over the row's chunks (V pairs each, V = 16 bytes of x when every
// pointer, stride and size allows it, else 1), threadIdx.y over rows (b, h, n); a grid-stride loop over row
// groups. Memory bound: one read and one write of x, the tables mostly from L2 (they are N*R, x is B*H*N*D).
#include "common.cuh"
#include "ops.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace dlcv_fast {
namespace {

struct RopeArgs {
  int64_t rows;  // B * H * N
  int H, N;
  int R;     // rotated pairs
  int rest;  // pass-through channels to copy (0 in place)
  int64_t sxb, sxh, sxn, sob, soh, son, scb, sch, scn;
  float sin_sign;
};

template <typename T, typename TT, int V, bool INTERLEAVED>
__global__ void __launch_bounds__(256) rope_kernel(const T* x, T* out, const TT* __restrict__ cos,
                                                   const TT* __restrict__ sin, RopeArgs a) {
  const int pair_chunks = a.R / V;
  const int items = pair_chunks + a.rest / V;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t n = row % a.N;
    const int64_t bh = row / a.N;
    const int64_t h = bh % a.H;
    const int64_t b = bh / a.H;
    const T* xr = x + b * a.sxb + h * a.sxh + n * a.sxn;
    T* orow = out + b * a.sob + h * a.soh + n * a.son;
    const int64_t tab = b * a.scb + h * a.sch + n * a.scn;
    for (int chunk = threadIdx.x; chunk < items; chunk += blockDim.x) {
      if (chunk >= pair_chunks) {  // pass-through channels
        const int c0 = 2 * a.R + (chunk - pair_chunks) * V;
        float v[V];
        load_floats<V>(xr + c0, v);
        store_floats<V>(orow + c0, v);
        continue;
      }
      const int p0 = chunk * V;
      float c[V], s[V];
      load_floats<V>(cos + tab + p0, c);
      load_floats<V>(sin + tab + p0, s);
      if constexpr (INTERLEAVED) {
        float e[2 * V];
        load_floats<2 * V>(xr + 2 * p0, e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float lo = e[2 * i], hi = e[2 * i + 1], si = s[i] * a.sin_sign;
          e[2 * i] = lo * c[i] - hi * si;
          e[2 * i + 1] = hi * c[i] + lo * si;
        }
        store_floats<2 * V>(orow + 2 * p0, e);
      } else {
        float lo[V], hi[V];
        load_floats<V>(xr + p0, lo);
        load_floats<V>(xr + a.R + p0, hi);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float si = s[i] * a.sin_sign, l = lo[i], u = hi[i];
          lo[i] = l * c[i] - u * si;
          hi[i] = u * c[i] + l * si;
        }
        store_floats<V>(orow + p0, lo);
        store_floats<V>(orow + a.R + p0, hi);
      }
    }
  }
}

at::Tensor table_view(const at::Tensor& t, int64_t B, int64_t H, int64_t N) {
  at::Tensor v = t.stride(-1) == 1 ? t : t.contiguous();
  if (v.dim() == 2) v = v.unsqueeze(0).unsqueeze(0);
  else if (v.dim() == 3) v = v.unsqueeze(1);
  return v.expand({B, H, N, v.size(-1)});
}

template <typename T, typename TT, int V>
void launch(const at::Tensor& x, const at::Tensor& cv, const at::Tensor& sv, const at::Tensor& out, bool interleaved,
            const RopeArgs& a) {
  const int items = a.R / V + a.rest / V;
  const int bx = items < 32 ? items : 32;
  const int by = 256 / bx;
  const int64_t blocks = std::min<int64_t>((a.rows + by - 1) / by, int64_t(1) << 20);
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const TT* cp = reinterpret_cast<const TT*>(cv.data_ptr());
  const TT* sp = reinterpret_cast<const TT*>(sv.data_ptr());
  dim3 block(bx, by);
  if (interleaved)
    rope_kernel<T, TT, V, true><<<unsigned(blocks), block, 0, stream>>>(xp, op, cp, sp, a);
  else
    rope_kernel<T, TT, V, false><<<unsigned(blocks), block, 0, stream>>>(xp, op, cp, sp, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool strides_divisible(const at::Tensor& t, int64_t v) {
  for (int i = 0; i < 3; ++i)
    if (t.stride(i) % v) return false;
  return true;
}

template <typename T, typename TT>
void dispatch_vec(const at::Tensor& x, const at::Tensor& cv, const at::Tensor& sv, const at::Tensor& out,
                  bool interleaved, const RopeArgs& a) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.R % V == 0 && a.rest % V == 0 && aligned16(x.data_ptr()) && aligned16(out.data_ptr()) &&
                   aligned16(cv.data_ptr()) && aligned16(sv.data_ptr()) && strides_divisible(x, V) &&
                   strides_divisible(out, V) && strides_divisible(cv, V);
  if (vec) launch<T, TT, V>(x, cv, sv, out, interleaved, a);
  else launch<T, TT, 1>(x, cv, sv, out, interleaved, a);
}

}  // namespace

void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
               bool interleaved, double sin_sign) {
  TORCH_CHECK(x.is_cuda(), "dlcv_fast_cuda::rope: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "dlcv_fast_cuda::rope: x must be 4-D (B, H, N, D), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "dlcv_fast_cuda::rope: x.dtype must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(x.stride(3) == 1 || x.size(3) <= 1, "dlcv_fast_cuda::rope: x must have a unit last stride, got ",
              x.strides());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == dt && out.device() == x.device(),
              "dlcv_fast_cuda::rope: out must match x's shape, dtype and device");
  TORCH_CHECK(out.stride(3) == 1 || out.size(3) <= 1, "dlcv_fast_cuda::rope: out must have a unit last stride");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(),
              "dlcv_fast_cuda::rope: cos and sin must have the same shape and dtype");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(),
              "dlcv_fast_cuda::rope: cos and sin must be on x's device");
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == dt,
              "dlcv_fast_cuda::rope: cos/sin dtype must be float32 or x's dtype, got ", cos.scalar_type());
  TORCH_CHECK(cos.dim() >= 2 && cos.dim() <= 4, "dlcv_fast_cuda::rope: cos/sin must be 2-D to 4-D, got ",
              cos.sizes());
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3), R = cos.size(-1);
  TORCH_CHECK(cos.size(-2) == N, "dlcv_fast_cuda::rope: cos/sin have ", cos.size(-2), " positions, x has N=", N);
  TORCH_CHECK(R >= 1 && 2 * R <= D, "dlcv_fast_cuda::rope: rotary dim 2R=", 2 * R, " must be in [2, D=", D, "]");
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const bool same_strides = cos.strides() == sin.strides() && cos.stride(-1) == 1;
  at::Tensor cv = table_view(same_strides ? cos : cos.contiguous(), B, H, N);
  at::Tensor sv = table_view(same_strides ? sin : sin.contiguous(), B, H, N);
  RopeArgs a;
  a.rows = B * H * N;
  a.H = int(H);
  a.N = int(N);
  a.R = int(R);
  const bool inplace = out.data_ptr() == x.data_ptr();
  TORCH_CHECK(!inplace || out.strides() == x.strides(),
              "dlcv_fast_cuda::rope: out starts where x does but has other strides; pass x itself for in place");
  a.rest = inplace ? 0 : int(D - 2 * R);
  a.sxb = x.stride(0); a.sxh = x.stride(1); a.sxn = x.stride(2);
  a.sob = out.stride(0); a.soh = out.stride(1); a.son = out.stride(2);
  a.scb = cv.stride(0); a.sch = cv.stride(1); a.scn = cv.stride(2);
  a.sin_sign = float(sin_sign);
  const bool f32_table = cos.scalar_type() == at::kFloat;
  switch (dt) {
    case at::kHalf:
      if (f32_table) dispatch_vec<__half, float>(x, cv, sv, out, interleaved, a);
      else dispatch_vec<__half, __half>(x, cv, sv, out, interleaved, a);
      break;
    case at::kBFloat16:
      if (f32_table) dispatch_vec<__nv_bfloat16, float>(x, cv, sv, out, interleaved, a);
      else dispatch_vec<__nv_bfloat16, __nv_bfloat16>(x, cv, sv, out, interleaved, a);
      break;
    default:
      dispatch_vec<float, float>(x, cv, sv, out, interleaved, a);
  }
}

}  // namespace dlcv_fast
