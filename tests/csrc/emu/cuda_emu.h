// A CPU emulation of the part of CUDA that csrc/ uses, so that the kernels' own source runs (and is tested)
// on a machine without a GPU. tests/csrc/emu/build.py rewrites each csrc/ file a little (launch syntax,
// __shared__ declarations, the CUDA-only includes), puts `#include "cuda_emu.h"` in front and compiles the
// result with the host compiler into a torch extension whose ops (torch.ops.dlcv_fast_emu.*) take CPU tensors.
//
// Model: a kernel launch runs its blocks one after another; the threads of a block are fibers (ucontext) on
// one OS thread, switched only where a thread waits at a barrier: __syncthreads, __syncwarp, and the warp-wide
// operations (shuffles, ldmatrix, mma.sync, WMMA), which exchange their operands through per-warp slots as the
// hardware's lanes do. Each block draws its schedule (seeded: DLCV_FAST_EMU_SEED): warps in lockstep, or one warp
// at a time run as far ahead as the barriers let it, in shuffled orders, so a missing barrier shows up as a
// wrong (NaN or seed-dependent) result.
//
// What is checked on top of the results (each a RuntimeError naming it):
//  - deadlock (threads waiting at a barrier that the others never reach), and threads of one warp at different
//    warp-wide operations, or at one after some of its lanes have exited;
//  - cp.async: destination in shared memory, 16-byte aligned source and destination; the copy lands only at the
//    cp.async.wait_group that covers it, and the destination holds NaN bytes until then (a read before the wait
//    gives NaN results);
//  - ldmatrix: every row address in shared memory and 16-byte aligned; WMMA: 32-byte aligned pointers and
//    leading dimensions that are multiples of 16 bytes;
//  - shared memory starts as NaN bytes each block; the dynamic allocation ends at an inaccessible page (an
//    access past the launch's byte count faults); a launch asking for more than 48 KB of dynamic shared memory
//    needs the cudaFuncSetAttribute opt-in first, and never more than the device's limit.
// Not modelled: timing, memory ordering between blocks, global-memory bounds (reads past a tensor are not
// caught), floating-point summation order inside a tensor-core instruction (fp32 here, in k order).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ declarations are rewritten by build.py; one left over does not compile:
#define __shared__ __shared_memory_declaration_not_rewritten_by_build_py__

namespace emu {

constexpr size_t kStack = 256 * 1024;
constexpr size_t kStaticSmem = 48 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  bool done = false;
  std::vector<Copy> open;                 // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited for
};

struct Barrier {
  int expected = 0, arrived = 0;
  long gen = 0;
  const char* what = "";
};

struct Warp {
  Barrier bar;
  int size = 0, live = 0;
  uint32_t u32[32][8];
  const void* ptr[32];
};

struct DeviceProp {
  int major = 9, multiProcessorCount = 132;
  size_t sharedMemPerBlockOptin = 227 * 1024;
};

struct State {
  dim3 grid, block, bid;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  std::vector<Warp> warps;
  Barrier block_bar;
  Fiber* cur = nullptr;
  ucontext_t sched;
  std::function<void()> body;
  // shared memory
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  void* dyn_map = nullptr;
  size_t dyn_map_size = 0;
  alignas(128) unsigned char arena[kStaticSmem];
  size_t arena_used = 0;
  std::unordered_map<const void*, void*> statics;
  std::unordered_map<const void*, int> optin;  // kernel -> opted-in dynamic shared memory bytes
  // bookkeeping
  std::string error;
  long events = 0;
  std::mt19937 rng;
  DeviceProp prop;
};

inline State& st() {
  static State s;
  return s;
}

inline void yield() {
  State& s = st();
  swapcontext(&s.cur->ctx, &s.sched);
}

// Report a failure from inside a thread: recorded, and the thread parks until the launch gives up.
[[noreturn]] inline void fail(const std::string& msg) {
  State& s = st();
  if (s.cur == nullptr) throw std::runtime_error("dlcv_fast emu: " + msg);
  if (s.error.empty())
    s.error = msg + " (block " + std::to_string(s.bid.x) + "," + std::to_string(s.bid.y) + "," +
              std::to_string(s.bid.z) + ", thread " + std::to_string(s.cur->linear) + ")";
  for (;;) yield();
}

inline void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.gen;
    ++st().events;
  }
}

inline void arrive_wait(Barrier& b, const char* what) {
  State& s = st();
  if (b.arrived == 0) b.what = what;
  else if (std::strcmp(b.what, what) != 0)
    fail(std::string("threads of one group wait at different barriers: ") + what + " and " + b.what);
  ++s.events;
  const long gen = b.gen;
  ++b.arrived;
  release_if_complete(b);  // the last to arrive goes on
  while (b.gen == gen) yield();
}

inline Warp& this_warp() { return st().warps[st().cur->linear / 32]; }
inline int lane_id() { return st().cur->linear % 32; }

// A warp-wide operation with every lane present: arrive, exchange, leave.
inline Warp& warp_op(const char* what) {
  Warp& w = this_warp();
  if (w.live != w.size) fail(std::string(what) + " with lanes of the warp already exited");
  return w;
}

inline bool in_smem(const void* p, size_t n) {
  const State& s = st();
  auto c = static_cast<const unsigned char*>(p);
  if (s.dyn != nullptr && c >= s.dyn && c + n <= s.dyn + s.dyn_size) return true;
  return c >= s.arena && c + n <= s.arena + s.arena_used;
}

inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

inline const uint3& thread_idx() { return st().cur->tid; }

inline unsigned char* dynamic_smem() { return st().dyn; }

// The block's instance of a static __shared__ variable of type A (key: the address of a static local unique to
// the declaration and template instance).
template <typename A>
A& shared_var(const void* key) {
  State& s = st();
  auto it = s.statics.find(key);
  if (it == s.statics.end()) {
    const size_t off = (s.arena_used + 127) / 128 * 128;
    if (off + sizeof(A) > kStaticSmem) fail("static shared memory above 48 KB");
    s.arena_used = off + sizeof(A);
    it = s.statics.emplace(key, s.arena + off).first;
  }
  return *static_cast<A*>(it->second);
}

inline void complete(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}

inline void on_exit() {
  State& s = st();
  Fiber& f = *s.cur;
  f.done = true;
  ++s.events;
  Warp& w = s.warps[f.linear / 32];
  --w.live;
  --w.bar.expected;
  release_if_complete(w.bar);
  --s.block_bar.expected;
  release_if_complete(s.block_bar);
}

inline void trampoline() {
  st().body();
  on_exit();
}  // returns to the scheduler (uc_link)

inline void map_dynamic(size_t bytes) {
  State& s = st();
  if (s.dyn_map != nullptr) munmap(s.dyn_map, s.dyn_map_size);
  s.dyn_map = nullptr;
  s.dyn = nullptr;
  s.dyn_size = bytes;
  if (bytes == 0) return;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + page - 1) / page * page;
  s.dyn_map_size = body + page;
  s.dyn_map = mmap(nullptr, s.dyn_map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s.dyn_map == MAP_FAILED) throw std::runtime_error("dlcv_fast emu: mmap failed");
  auto base = static_cast<unsigned char*>(s.dyn_map);
  mprotect(base + body, page, PROT_NONE);  // the guard page right after the (128-byte rounded) allocation
  s.dyn = base + body - (bytes + 127) / 128 * 128;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline void run_block(const dim3& bid, unsigned seed) {
  State& s = st();
  const int n = s.nthreads;
  s.bid = bid;
  // the block's schedule: a function of the seed and the block's place only
  s.rng.seed(uint32_t(splitmix64(splitmix64(seed) ^ (uint64_t(bid.z) << 42 | uint64_t(bid.y) << 21 | bid.x))));
  while (int(s.stacks.size()) < n) s.stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  s.fibers.assign(n, Fiber());
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i];
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  s.warps.assign((n + 31) / 32, Warp());
  for (int w = 0; w < int(s.warps.size()); ++w) {
    s.warps[w].size = s.warps[w].live = s.warps[w].bar.expected = std::min(32, n - 32 * w);
  }
  s.block_bar = Barrier();
  s.block_bar.expected = n;
  if (s.dyn != nullptr) std::memset(s.dyn, 0xff, s.dyn_size);
  std::memset(s.arena, 0xff, sizeof(s.arena));
  s.arena_used = 0;
  s.statics.clear();

  // Two schedules, drawn per block: lockstep (every waiting thread resumes once per pass, in a shuffled order:
  // warps advance together) and warp-greedy (warps in a shuffled order, each run until it cannot go on: a warp
  // gets as far ahead of the others as the barriers allow).
  const bool greedy = s.rng() % 2 == 1;
  std::vector<int> order(n), warp_order(s.warps.size());
  for (int i = 0; i < n; ++i) order[i] = i;
  for (int w = 0; w < int(warp_order.size()); ++w) warp_order[w] = w;
  int live = n;
  auto step = [&](int i) {  // resume thread i until it waits or exits
    Fiber& f = s.fibers[i];
    if (f.done) return;
    s.cur = &f;
    swapcontext(&s.sched, &f.ctx);
    if (f.done) --live;
  };
  while (live > 0 && s.error.empty()) {
    const long before = s.events;
    if (greedy) {
      std::shuffle(warp_order.begin(), warp_order.end(), s.rng);
      for (int w : warp_order) {
        const int lo = 32 * w, hi = std::min(n, lo + 32);
        for (long seen = -1; seen != s.events && s.error.empty();) {
          seen = s.events;
          for (int i = lo; i < hi && s.error.empty(); ++i) step(i);
        }
      }
    } else {
      std::shuffle(order.begin(), order.end(), s.rng);
      for (int i : order) {
        step(i);
        if (!s.error.empty()) break;
      }
    }
    if (s.error.empty() && live > 0 && s.events == before)
      s.error = "deadlock: " + std::to_string(live) + " threads wait at a barrier the others never reach (block " +
                std::to_string(bid.x) + "," + std::to_string(bid.y) + ")";
  }
  s.cur = nullptr;
}

inline unsigned seed_from_env() {
  const char* e = std::getenv("DLCV_FAST_EMU_SEED");
  return e != nullptr ? unsigned(std::strtoul(e, nullptr, 10)) : 0u;
}

inline const DeviceProp* device_prop() {
  State& s = st();
  if (const char* e = std::getenv("DLCV_FAST_EMU_SMS")) s.prop.multiProcessorCount = std::atoi(e);
  if (const char* e = std::getenv("DLCV_FAST_EMU_SMEM_OPTIN")) s.prop.sharedMemPerBlockOptin = std::atol(e);
  return &s.prop;
}

template <typename... P>
struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) {
    State& s = st();
    const int n = int(block.x * block.y * block.z);
    if (n < 1 || n > 1024) throw std::runtime_error("dlcv_fast emu: block of " + std::to_string(n) + " threads");
    const size_t limit = device_prop()->sharedMemPerBlockOptin;
    auto it = s.optin.find(reinterpret_cast<const void*>(fn));
    const size_t allowed = std::max<size_t>(48 * 1024, it == s.optin.end() ? 0 : size_t(it->second));
    if (smem > allowed || smem > limit)
      throw std::runtime_error("dlcv_fast emu: launch with " + std::to_string(smem) +
                               " bytes of dynamic shared memory; allowed " + std::to_string(std::min(allowed, limit)));
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto fnp = fn;
    s.body = [fnp, &params]() {
      auto copy = params;  // each thread its own copy of the parameters
      std::apply(fnp, copy);
    };
    s.grid = grid;
    s.block = block;
    s.nthreads = n;
    const unsigned seed = seed_from_env();
    s.error.clear();
    map_dynamic(smem);
    for (unsigned z = 0; z < grid.z && s.error.empty(); ++z)
      for (unsigned y = 0; y < grid.y && s.error.empty(); ++y)
        for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) run_block(dim3(x, y, z), seed);
    s.body = nullptr;
    if (!s.error.empty()) {
      std::string msg = "dlcv_fast emu: " + s.error;
      s.error.clear();
      throw std::runtime_error(msg);
    }
  }
};

template <typename... P>
Launch<P...> launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0, int /*stream*/ = 0) {
  return Launch<P...>{fn, grid, block, smem};
}

inline uint16_t half_bits(uint32_t reg, int hi) { return uint16_t(hi ? reg >> 16 : reg & 0xffffu); }

template <typename T>
float bits_to_float(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

}  // namespace emu

// ---- the CUDA names the kernels use ----

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::st().bid)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

inline void __syncthreads() { ::emu::arrive_wait(::emu::st().block_bar, "__syncthreads"); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::emu::arrive_wait(::emu::warp_op("__syncwarp").bar, "__syncwarp");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) ::emu::fail("__shfl_xor_sync with a partial mask is not modelled");
  ::emu::Warp& w = ::emu::warp_op("__shfl_xor_sync");
  const int lane = ::emu::lane_id();
  std::memcpy(w.u32[lane], &v, sizeof(T));
  ::emu::arrive_wait(w.bar, "__shfl_xor_sync");
  const int src = lane ^ lane_mask;
  T r = v;
  if (src < w.size) std::memcpy(&r, w.u32[src], sizeof(T));
  ::emu::arrive_wait(w.bar, "__shfl_xor_sync (read)");
  return r;
}

template <typename T>
T __ldg(const T* p) { return *p; }

template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }

// ---- host-side CUDA / ATen-CUDA names the launchers use ----

namespace at {
namespace cuda {
inline int getCurrentCUDAStream() { return 0; }
inline const ::emu::DeviceProp* getCurrentDeviceProperties() { return ::emu::device_prop(); }
inline const ::emu::DeviceProp* getDeviceProperties(int) { return ::emu::device_prop(); }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (size_t(value) > ::emu::device_prop()->sharedMemPerBlockOptin) return cudaErrorInvalidValue;
    ::emu::st().optin[reinterpret_cast<const void*>(fn)] = value;
  }
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int threads, size_t smem) {
  const size_t per_sm = 228 * 1024;
  *n = int(std::min<size_t>(2048 / size_t(threads), smem > 0 ? per_sm / (smem + 1024) : 32));
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t emu_err_ = (expr);                                                \
    TORCH_CHECK(emu_err_ == cudaSuccess, "dlcv_fast emu: CUDA call failed: " #expr);   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// ---- mma.cuh's primitives (mma.cuh leaves them out under DLCV_FAST_EMU) ----

namespace dlcv_fast {
namespace mma {

inline void cp_async16(void* dst, const void* src, bool valid) {
  if (!emu::in_smem(dst, 16)) emu::fail("cp.async destination outside shared memory");
  if (!emu::aligned(dst, 16) || !emu::aligned(src, 16)) emu::fail("cp.async of 16 bytes from/to a misaligned address");
  std::memset(dst, 0xff, 16);  // NaN until the wait that covers it
  emu::st().cur->open.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  emu::Fiber& f = *emu::st().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

template <int N>
void cp_async_wait() {
  emu::Fiber& f = *emu::st().cur;
  while (int(f.groups.size()) > N) {
    emu::complete(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::warp_op("ldmatrix");
  const int lane = emu::lane_id();
  if (!emu::in_smem(p, 16) || !emu::aligned(p, 16)) emu::fail("ldmatrix row address not 16-byte aligned shared memory");
  w.ptr[lane] = p;
  emu::arrive_wait(w.bar, "ldmatrix");
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {  // row g of matrix j, columns 2t, 2t + 1
      auto row = static_cast<const uint16_t*>(w.ptr[8 * j + g]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {  // (rows 2t, 2t + 1; column g) of matrix j
      lo = static_cast<const uint16_t*>(w.ptr[8 * j + 2 * t])[g];
      hi = static_cast<const uint16_t*>(w.ptr[8 * j + 2 * t + 1])[g];
    }
    r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::arrive_wait(w.bar, "ldmatrix (read)");
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix(r, p, true); }

// c += a (16x16, row) * b (16x8, col), the PTX ISA's fragment layouts (see mma.cuh).
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp_op("mma.sync");
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) w.u32[lane][i] = a[i];
  w.u32[lane][4] = b0;
  w.u32[lane][5] = b1;
  emu::arrive_wait(w.bar, "mma.sync");
  auto A = [&](int r, int k) {  // a0 (r, k), a1 (r + 8, k), a2 (r, k + 8), a3 (r + 8, k + 8)
    const uint32_t reg = w.u32[(r % 8) * 4 + (k % 8) / 2][(r / 8) + 2 * (k / 8)];
    return emu::bits_to_float<T>(emu::half_bits(reg, k % 2));
  };
  auto B = [&](int k, int n) {  // b0 (rows 2t, 2t + 1; column g), b1 (rows 2t + 8, 2t + 9)
    const uint32_t reg = w.u32[n * 4 + (k % 8) / 2][4 + k / 8];
    return emu::bits_to_float<T>(emu::half_bits(reg, k % 2));
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  emu::arrive_wait(w.bar, "mma.sync (read)");
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

}  // namespace mma
}  // namespace dlcv_fast

// ---- WMMA (nvcuda::wmma), 16x16x16 only; every lane holds the whole tile ----

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16x16x16 WMMA only");
  float v[16][16];  // logical (row, col) of the tile, fp32
};

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

inline void check_ptr(const void* p, unsigned ld, size_t elem, const char* what) {
  if (!::emu::aligned(p, 32)) ::emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((size_t(ld) * elem) % 16 != 0) ::emu::fail(std::string(what) + ": leading dimension not a multiple of 16 bytes");
}

inline float elem(float x) { return x; }
inline float elem(__half x) { return __half2float(x); }
inline float elem(__nv_bfloat16 x) { return __bfloat162float(x); }

// Operand tiles: matrix_a is (M, K), matrix_b is (K, N); row_major: element (r, c) at p[r * ld + c].
template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "operand fragment needs a layout");
  ::emu::Warp& w = ::emu::warp_op("wmma::load_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::load_matrix_sync");
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = elem(std::is_same_v<L, row_major> ? p[r * ld + c] : p[c * ld + r]);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync (read)");
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ld, layout_t layout) {
  ::emu::Warp& w = ::emu::warp_op("wmma::load_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::load_matrix_sync");
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = elem(layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync (read)");
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ld, layout_t layout) {
  ::emu::Warp& w = ::emu::warp_op("wmma::store_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::store_matrix_sync");
  ::emu::arrive_wait(w.bar, "wmma::store_matrix_sync");
  for (int i = ::emu::lane_id(); i < 256; i += 32) {  // each lane its share of the tile
    const int r = i / 16, c = i % 16;
    p[layout == mem_row_major ? r * ld + c : c * ld + r] = f.v[r][c];
  }
  ::emu::arrive_wait(w.bar, "wmma::store_matrix_sync (written)");
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, float, void>& c) {
  ::emu::Warp& w = ::emu::warp_op("wmma::mma_sync");
  ::emu::arrive_wait(w.bar, "wmma::mma_sync");
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 16; ++k) acc += a.v[m][k] * b.v[k][n];
      out[m][n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
