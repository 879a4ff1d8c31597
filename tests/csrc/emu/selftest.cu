// Deliberately broken kernels, one per check of cuda_emu.h, so the tests show that each check fires (a check
// that cannot fail proves nothing). Built by build.load_selftest() through the same rewrite as csrc/; ops
// torch.ops.dlcv_fast_emu_selftest.run(case) -> a float tensor (the kernel's output) or a RuntimeError.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

using namespace dlcv_fast::mma;

// 128 threads copy 128 x 16 bytes (4 floats each) into shared memory by cp.async, then read their neighbour's
// chunk. `wait`: whether the wait_group comes before the barrier (the correct kernel) or not at all.
__global__ void cp_async_kernel(const float* src, float* out, bool wait) {
  __shared__ __align__(16) float tile[128 * 4];
  const int t = threadIdx.x;
  cp_async16(tile + 4 * t, src + 4 * t, true);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  __syncthreads();
  const int n = (t + 1) % 128;
  for (int i = 0; i < 4; ++i) out[4 * t + i] = tile[4 * n + i];
}

// Warp 1 writes a shared array that warp 0 reads; `barrier`: whether a __syncthreads separates them.
__global__ void handoff_kernel(float* out, bool barrier) {
  __shared__ float x[32];
  const int t = threadIdx.x;
  if (t >= 32 && t < 64) x[t - 32] = float(t);
  if (barrier) __syncthreads();
  // every warp does some warp-wide work first, so that the schedules interleave the warps
  float v = __shfl_xor_sync(0xffffffffu, float(t), 1);
  if (t < 32) out[t] = x[t] + 0.f * v;
}

// Lanes 0-15 of warp 1 wait at __syncwarp, every other thread at __syncthreads: nothing can go on.
__global__ void deadlock_kernel(float* out) {
  const int t = threadIdx.x;
  if (t >= 32 && t < 48) __syncwarp();
  else __syncthreads();
  out[t] = 1.f;
}

// Half of warp 0 shuffles while the other half waits at __syncwarp.
__global__ void divergent_kernel(float* out) {
  const int t = threadIdx.x;
  float v = 1.f;
  if (t < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncwarp();
  out[t] = v;
}

// ldmatrix over the rows tile + offset + stride * lane of a (32, 72) fp16 tile holding i % 1024 at element i; out:
// each lane's first element. offset 1: row addresses 2 bytes off the 16-byte alignment ldmatrix needs; stride 64:
// every row in the same bank group (128 bytes apart); 72 (padded by 16 bytes, as the kernels do) or 8: eight
// different ones.
__global__ void ldmatrix_kernel(float* out, int offset, int stride) {
  __shared__ __align__(16) __half tile[32 * 72];
  const int t = threadIdx.x;
  for (int i = t; i < 32 * 72; i += blockDim.x) tile[i] = __float2half_rn(float(i % 1024));
  __syncwarp();
  uint32_t r[4];
  ldmatrix_x4(r, tile + offset + stride * t);
  const uint16_t lo = uint16_t(r[0] & 0xffffu);
  out[t] = __half2float(*reinterpret_cast<const __half*>(&lo));
}

// Writes one float past the dynamic shared memory it was launched with.
__global__ void smem_overflow_kernel(float* out, int n) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) {
    s[n] = 1.f;
    out[0] = s[n];
  }
}

// The race check (cuda_emu.h), each with a correct twin:
// Lanes of one warp exchange values through shared memory; `sync`: a __syncwarp between the store and the load.
__global__ void lane_exchange_kernel(float* out, bool sync) {
  __shared__ float x[32];
  const int t = threadIdx.x;
  x[t] = float(t);
  if (sync) __syncwarp();
  out[t] = x[(t + 1) % 32];
}

// Every block writes out[0, 32) (`overlap`) or its own 32 floats.
__global__ void block_overlap_kernel(float* out, bool overlap) {
  const int t = threadIdx.x;
  out[(overlap ? 0 : 32 * blockIdx.x) + t] = float(t);
}

// Warp 0 reads a staged tile while warp 1 starts the next stage's cp.async into the same buffer; `barrier`: a
// __syncthreads between the reads and the copy (as a double-buffered loop needs before it refills a stage).
__global__ void stage_reuse_kernel(const float* src, float* out, bool barrier) {
  __shared__ __align__(16) float tile[32 * 4];
  const int t = threadIdx.x;
  if (t < 32) {
    for (int i = 0; i < 4; ++i) tile[4 * t + i] = 0.f;
  }
  __syncthreads();
  if (t < 32) out[t] = tile[4 * t];
  if (barrier) __syncthreads();
  if (t >= 32) {
    cp_async16(tile + 4 * (t - 32), src + 4 * (t - 32), true);
    cp_async_commit();
    cp_async_wait<0>();
  }
}

at::Tensor run(int64_t which) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::zeros({512}, f32);
  float* o = out.data_ptr<float>();
  at::Tensor src = at::arange(512, f32);  // the cp.async cases' source
  switch (which) {
    case 0:
    case 1:
      cp_async_kernel<<<1, 128>>>(src.data_ptr<float>(), o, which == 0);
      break;
    case 2:
    case 3:
      handoff_kernel<<<1, 128>>>(o, which == 2);
      break;
    case 4:
      deadlock_kernel<<<1, 128>>>(o);
      break;
    case 5:
      divergent_kernel<<<1, 64>>>(o);
      break;
    case 6:
    case 7:
      ldmatrix_kernel<<<1, 32>>>(o, which == 6 ? 0 : 1, 8);
      break;
    case 8:  // 64 KB without the opt-in
      smem_overflow_kernel<<<1, 32, 64 * 1024>>>(o, 0);
      break;
    case 9:  // 1 KB, written at float 256 + 32: past the allocation (rounded to 128 bytes), into the guard page
      smem_overflow_kernel<<<1, 32, 1024>>>(o, 256 + 32);
      break;
    case 10:
    case 11:
      lane_exchange_kernel<<<1, 32>>>(o, which == 11);
      break;
    case 12:
    case 13:
      block_overlap_kernel<<<4, 32>>>(o, which == 12);
      break;
    case 14:
    case 15:
      stage_reuse_kernel<<<1, 64>>>(src.data_ptr<float>(), o, which == 15);
      break;
    case 16:
    case 17:
      ldmatrix_kernel<<<1, 32>>>(o, 0, which == 16 ? 64 : 72);
      break;
    default:
      TORCH_CHECK(false, "no self-test case ", which);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(dlcv_fast_emu_selftest, m) { m.def("run(int which) -> Tensor"); }
TORCH_LIBRARY_IMPL(dlcv_fast_emu_selftest, CompositeExplicitAutograd, m) { m.impl("run", &run); }
