// Tensor-core building blocks of the sm_80+ kernels (attention.cu, attention_bwd.cu): cp.async tile loads,
// ldmatrix, mma.sync m16n8k16 (fp32 accumulate) and the fragment packing they need. Fragment layouts are the
// PTX ISA's: for lane l, g = l / 4 and t = l % 4; C/D of a 16x8 tile: c0, c1 at (row g, cols 2t, 2t + 1),
// c2, c3 at (row g + 8, same cols); A of a 16x16 tile: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..),
// a3 (g + 8, 2t + 8..); B of a 16x8 tile: b0 (rows 2t.., col g), b1 (rows 2t + 8.., col g). So a C tile's
// registers for two adjacent 8-column blocks are the A fragment of the next product (P in P V).
#pragma once

#include "common.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace dlcv_fast {
namespace mma {

constexpr int kThreads = 128;  // 4 warps, 16 rows each

// The inline-PTX primitives. Under DLCV_FAST_EMU (tests/csrc/emu: the kernels compiled for the CPU) the
// emulation header defines them instead.
#ifndef DLCV_FAST_EMU
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero fill when !valid (src points at valid memory regardless).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// c += a (16x16, row) * b (16x8, col); fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // DLCV_FAST_EMU

// Two floats as a packed pair of T (lo in the low 16 bits: the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- warp-level products on (rows, DP + 8) shared tiles (the kernels' layout: row stride DP + 8 elements) ----

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// The A fragment of rows [row0, row0 + 16) x channels [16 ks, 16 ks + 16) of a shared tile.
template <typename T, int DP>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int ks) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (row0 + lane % 16) * (DP + 8) + ks * 16 + (lane / 16) * 8);
}

// c (16 x N) += a (16 x 16: channels [16 ks, 16 ks + 16) of 16 rows) x (rows [0, N) of the tile, same channels)^T:
// one k-step of a score-like product A B^T, both operands row-major in shared memory. Only the 16-row groups
// that start below n_valid are computed (the others keep c; n_valid is the same across the warp).
template <typename T, int DP, int N>
__device__ __forceinline__ void mma_abt(float (&c)[N / 8][4], const uint32_t (&a)[4], const T* tile, int ks,
                                        int n_valid = N) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nb = 0; nb < N / 8; nb += 2) {
    if (nb * 8 < n_valid) {
      uint32_t b[4];  // rows nb*8.. and (nb+1)*8.., channels ks*16.. (+8)
      ldmatrix_x4(b, tile + (nb * 8 + (lane / 16) * 8 + lane % 8) * (DP + 8) + ks * 16 + ((lane / 8) % 2) * 8);
      mma_16816<T>(c[nb], a, b[0], b[1]);
      mma_16816<T>(c[nb + 1], a, b[2], b[3]);
    }
  }
}

// The two score-like products of a backward step over the whole head dim, from zero: s = A1 B1^T and
// dp = A2 B2^T for this warp's 16 rows [row0, row0 + 16) of A1, A2 against the first `valid` rows (16-row groups)
// of B1, B2, all four shared tiles (S and dP in the dQ kernel; S^T and dP^T in the dK/dV kernel).
template <typename T, int DP, int N>
__device__ __forceinline__ void mma_abt_pair(float (&s)[N / 8][4], float (&dp)[N / 8][4], const T* a1, const T* a2,
                                             const T* b1, const T* b2, int row0, int valid) {
  zero(s);
  zero(dp);
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) {
    uint32_t f1[4], f2[4];
    load_a<T, DP>(f1, a1, row0, ks);
    load_a<T, DP>(f2, a2, row0, ks);
    mma_abt<T, DP, N>(s, f1, b1, ks, valid);
    mma_abt<T, DP, N>(dp, f2, b2, ks, valid);
  }
}

// C fragments (16 x 8 NB, fp32) as the A operand of k-step kk (their columns [16 kk, 16 kk + 16), as T): the
// score tile of one product is the left operand of the next (P in P V, dS in dS K).
template <typename T, int NB>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[NB][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc (16 x DP) += a (16 x 16) x rows [16 kk, 16 kk + 16) of the tile (16 x DP): A B with B row-major in shared
// memory, read transposed by ldmatrix.trans.
template <typename T, int DP>
__device__ __forceinline__ void mma_ab(float (&acc)[DP / 8][4], const uint32_t (&a)[4], const T* tile, int kk) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nd = 0; nd < DP / 8; nd += 2) {
    uint32_t b[4];  // rows kk*16.. (+8), channels nd*8.. and (nd+1)*8..
    ldmatrix_x4_trans(b, tile + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * (DP + 8) + nd * 8 + (lane / 16) * 8);
    mma_16816<T>(acc[nd], a, b[0], b[1]);
    mma_16816<T>(acc[nd + 1], a, b[2], b[3]);
  }
}

// acc (16 x DP) += c (16 x 8 NB fp32 fragments of the previous product, as T) x the tile's rows [0, 8 NB)
// (row-major in shared memory): P V in the forward, dS K in the dQ kernel. 16-row groups at or past `valid`
// hold zeros and are skipped (with a compile-time `valid` the test folds away).
template <typename T, int DP, int NB>
__device__ __forceinline__ void mma_cb(float (&acc)[DP / 8][4], const float (&c)[NB][4], const T* tile, int valid) {
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    if (kk * 16 < valid) {
      uint32_t a[4];
      c_to_a<T>(a, c, kk);
      mma_ab<T, DP>(acc, a, tile, kk);
    }
  }
}

// Rows [row0, row0 + ROWS) x the head dim of a (rows, D) matrix with row stride ld, into a (ROWS, DP + 8)
// shared tile; rows at or past n_rows and channels at or past D are zero. The trip count is a constant and, where
// kThreads is a multiple of the 16-byte chunks per row (DP 32, 64, 128), each thread keeps one column: the
// addressing is a few integer ops per chunk (a runtime-bound loop cost about 25 per chunk, more than the maths of
// a key block in the forward).
template <typename T, int DP, int ROWS = 64>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int row0, int n_rows, int D) {
  constexpr int kLd = DP + 8, kChunks = DP / 8, kTotal = ROWS * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    int r, c;
    if constexpr (kThreads % kChunks == 0) {
      r = int(threadIdx.x) / kChunks + it * (kThreads / kChunks);
      c = (int(threadIdx.x) % kChunks) * 8;
    } else {
      const int i = int(threadIdx.x) + it * kThreads;
      r = i / kChunks;
      c = (i - r * kChunks) * 8;
    }
    if (kTotal % kThreads != 0 && r >= ROWS) break;
    const int row = row0 + r;
    const bool valid = row < n_rows && c < D;
    const T* s = src + (valid ? int64_t(row) * ld + c : int64_t(0));
    cp_async16(dst + r * kLd + c, s, valid);
  }
}

// Opt a kernel into `bytes` of dynamic shared memory, with a clear error where the GPU has less per block.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, const char* op) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(size_t(bytes) <= limit, op, "this head dim needs ", bytes, " bytes of shared memory per block; the GPU "
              "has ", limit, " (use backend 'triton')");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace mma
}  // namespace dlcv_fast
