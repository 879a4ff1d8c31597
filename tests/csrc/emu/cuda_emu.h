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
//  - ldmatrix: every row address in shared memory and 16-byte aligned, and no bank conflict (the 8 rows of each
//    8x8 matrix in 8 different 16-byte bank groups; DLCV_FAST_EMU_BANKCHECK=0 turns this one off); WMMA: 32-byte
//    aligned pointers and leading dimensions that are multiples of 16 bytes;
//  - shared memory starts as NaN bytes each block; the dynamic allocation ends at an inaccessible page (an
//    access past the launch's byte count faults); a launch asking for more than 48 KB of dynamic shared memory
//    needs the cudaFuncSetAttribute opt-in first, and never more than the device's limit;
//  - races (see "Race check"): two accesses to a byte of shared or global memory, one a write, that no barrier
//    orders (threads of a block, lanes of a warp, or two blocks of a launch), whatever order the schedule ran
//    them in; a cp.async destination touched while the copy is in flight.
// Not modelled: timing, global-memory bounds (reads past a tensor are not caught; build.py's AddressSanitizer
// build does that), floating-point summation order inside a tensor-core instruction (fp32 here, in k order).
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
#include <cstdio>
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

// The emulation's own code is left out of the race check's instrumentation (see "Race check" below): its
// bookkeeping is not the kernel's memory traffic. Lambdas inside such functions need the attribute too.
#define EMU_NOSAN __attribute__((no_sanitize_thread))

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
  int quiet = 0;  // > 0 while the emulation's own code runs for this thread: the race check's hooks ignore it
  std::vector<Copy> open;                 // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited for
};

struct Barrier {
  int expected = 0, arrived = 0;
  long gen = 0;
  long syncs = 0;  // releases of __syncwarp: the only warp-wide operation that orders memory (the race check)
  const char* what = "";
};

struct Warp {
  Barrier bar;
  int size = 0, live = 0;
  uint32_t u32[32][8];
  const void* ptr[32];
};

// The race check's record of one byte (see "Race check" below): the last write and the reads since, each as
// (block, thread, __syncthreads generation, __syncwarp generation of the thread's warp).
struct Cell {
  uint32_t stamp = 0;  // shared memory: the block the record belongs to (a stale stamp reads as no record)
  int32_t wblock = -1, rblock = -1;
  int16_t wthr = -1, rthr = -1;  // -1: none
  int16_t rwarp = -1;            // the warp of every read since the last block barrier, or -1: several warps
  int16_t pending = -1;          // the thread whose cp.async to this byte has not been waited for
  bool rmulti = false;           // reads by more than one thread of rblock since its last block barrier
  bool rblocks = false;          // reads by more than one block in this launch
  uint32_t wbgen = 0, wwgen = 0, rbgen = 0, rwgen = 0;
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
  bool bank_check = true;  // DLCV_FAST_EMU_BANKCHECK, read at each launch
  // race check
  uint32_t block_serial = 0;  // blocks run so far (all launches): a block's identity in the records
  std::vector<Cell> race_dyn, race_arena;
  std::unordered_map<uintptr_t, Cell> race_global;  // this launch's global-memory bytes touched by the kernel
};

EMU_NOSAN inline State& st() {
  static State s;
  return s;
}

EMU_NOSAN inline void yield() {
  State& s = st();
  swapcontext(&s.cur->ctx, &s.sched);
}

// For the scope of the emulation's own work inside a thread: EMU_NOSAN leaves a function's own loads and stores
// uninstrumented, not those of the library templates it calls (containers, strings).
struct Quiet {
  Fiber* f;
  EMU_NOSAN Quiet() : f(st().cur) {
    if (f != nullptr) ++f->quiet;
  }
  EMU_NOSAN ~Quiet() {
    if (f != nullptr) --f->quiet;
  }
};

// Report a failure from inside a thread: recorded, and the thread parks until the launch gives up.
[[noreturn]] EMU_NOSAN inline void fail(const std::string& msg) {
  Quiet quiet;
  State& s = st();
  if (s.cur == nullptr) throw std::runtime_error("dlcv_fast emu: " + msg);
  if (s.error.empty())
    s.error = msg + " (block " + std::to_string(s.bid.x) + "," + std::to_string(s.bid.y) + "," +
              std::to_string(s.bid.z) + ", thread " + std::to_string(s.cur->linear) + ")";
  for (;;) yield();
}

EMU_NOSAN inline void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.gen;
    if (std::strcmp(b.what, "__syncwarp") == 0) ++b.syncs;
    ++st().events;
  }
}

EMU_NOSAN inline void arrive_wait(Barrier& b, const char* what) {
  Quiet quiet;
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

EMU_NOSAN inline Warp& this_warp() { return st().warps[st().cur->linear / 32]; }
EMU_NOSAN inline int lane_id() { return st().cur->linear % 32; }

// A warp-wide operation with every lane present: arrive, exchange, leave.
EMU_NOSAN inline Warp& warp_op(const char* what) {
  Quiet quiet;
  Warp& w = this_warp();
  if (w.live != w.size) fail(std::string(what) + " with lanes of the warp already exited");
  return w;
}

EMU_NOSAN inline bool in_smem(const void* p, size_t n) {
  const State& s = st();
  auto c = static_cast<const unsigned char*>(p);
  if (s.dyn != nullptr && c >= s.dyn && c + n <= s.dyn + s.dyn_size) return true;
  return c >= s.arena && c + n <= s.arena + s.arena_used;
}

// The start of the shared-memory region (dynamic or static) holding p, for offsets in messages.
EMU_NOSAN inline const unsigned char* smem_base(const void* p) {
  const State& s = st();
  auto c = static_cast<const unsigned char*>(p);
  return s.dyn != nullptr && c >= s.dyn && c < s.dyn + s.dyn_size ? s.dyn : s.arena;
}

EMU_NOSAN inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

EMU_NOSAN inline const uint3& thread_idx() { return st().cur->tid; }

EMU_NOSAN inline unsigned char* dynamic_smem() { return st().dyn; }

// The block's instance of a static __shared__ variable of type A (key: the address of a static local unique to
// the declaration and template instance).
template <typename A>
EMU_NOSAN A& shared_var(const void* key) {
  Quiet quiet;
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

// ---- Race check ----
// build.py compiles the kernels with GCC's -fsanitize=thread instrumentation but without its runtime: every load
// and store of the kernels' code calls a __tsan_* hook, defined at the end of this file, that lands here (the
// emulation's own functions are EMU_NOSAN). The collective operations (cp.async, ldmatrix, WMMA) report their
// memory traffic themselves. A byte's accesses by two threads are ordered when they are the same thread, or a
// __syncthreads was passed in between (the block barrier's generation moved), or both are in one warp and a
// __syncwarp was passed in between. The other warp-wide operations (shuffles, ldmatrix, mma.sync, WMMA) make the
// lanes converge but do not order their memory accesses (the CUDA memory model; the compiler may move a
// shared-memory store across a shuffle), so they do not count. Two accesses
// to a byte, at least one a write, that are not ordered are a race, reported as a RuntimeError: read after
// write, write after read and write after write, in shared memory (per block) and in global memory, where
// accesses by two blocks of one launch are never ordered (no grid-wide sync, no atomics in csrc/). A cp.async is
// in flight from its issue to the cp.async.wait_group that covers it: any access to its destination meanwhile is
// a race, and other threads see the data only after a barrier that follows the wait. The check is per byte and
// independent of the schedule: it judges the order the barriers guarantee, not the order the emulation ran.
// DLCV_FAST_EMU_RACECHECK=0 turns it off (the results are then judged by their values only).
namespace race {

// Set while a launch with the check on runs its blocks. The hooks test it before anything else: they are also
// called from instrumented host code, the emulation state's own constructor among it.
inline bool live = false;

struct Access {
  int32_t block;
  int16_t thr, warp;
  uint32_t bgen, wgen;
};

EMU_NOSAN inline Access current() {
  State& s = st();
  const int t = s.cur->linear;
  return Access{int32_t(s.block_serial), int16_t(t), int16_t(t / 32), uint32_t(s.block_bar.gen),
                uint32_t(s.warps[t / 32].bar.syncs)};
}

// Whether an earlier access (block, thread, generations) is ordered before the access `a`.
EMU_NOSAN inline bool ordered(int32_t block, int16_t thr, uint32_t bgen, uint32_t wgen, const Access& a) {
  if (block != a.block) return false;
  if (thr == a.thr || a.bgen != bgen) return true;  // generations only grow
  return thr / 32 == a.warp && a.wgen != wgen;
}

// Who made the earlier access, for the report.
EMU_NOSAN inline std::string who(bool other_block, int thr) {
  if (other_block) return "another block of the launch (blocks are not ordered)";
  return thr >= 0 ? "thread " + std::to_string(thr) + " with no barrier between" : "another thread with no barrier between";
}

[[noreturn]] EMU_NOSAN inline void report(const char* kind, const char* space, size_t where, const Access& a,
                                          const char* verb, const std::string& other) {
  char at[32];
  std::snprintf(at, sizeof(at), std::strcmp(space, "global memory") == 0 ? "at %#zx" : "byte %zu", where);
  fail(std::string("race (") + kind + ") on " + space + " " + at + ": thread " +
       std::to_string(a.thr) + " " + verb + " " + other);
}

// Any access to a cp.async destination before the wait that covers it.
EMU_NOSAN inline void check_in_flight(const Cell& c, const Access& a, const char* space, size_t where, bool write) {
  if (c.pending < 0) return;
  const std::string verb = write ? "writes" : "reads";
  if (c.pending == a.thr)
    fail(verb + " its cp.async destination (" + space + " byte " + std::to_string(where) +
         ") before the cp.async.wait_group that covers it");
  report(write ? "write to a cp.async in flight" : "read of a cp.async in flight", space, where, a,
         (verb + " the destination of a cp.async that thread").c_str(),
         std::to_string(c.pending) + " has not waited for (cp.async.wait_group, then a barrier)");
}

EMU_NOSAN inline void on_read(Cell& c, const Access& a, const char* space, size_t where) {
  check_in_flight(c, a, space, where, false);
  if (c.wthr >= 0 && !ordered(c.wblock, c.wthr, c.wbgen, c.wwgen, a))
    report("read after write", space, where, a, "reads what was written by", who(c.wblock != a.block, c.wthr));
  if (c.rthr < 0 || (c.rblock == a.block && c.rbgen != a.bgen)) {  // the first read since the last block barrier
    c.rthr = a.thr;
    c.rblock = a.block;
    c.rbgen = a.bgen;
    c.rwgen = a.wgen;
    c.rwarp = a.warp;
    c.rmulti = false;
  } else if (c.rblock != a.block) {
    c.rblocks = true;
  } else {
    c.rmulti |= a.thr != c.rthr;
    if (a.warp != c.rwarp) c.rwarp = -1;
    c.rwgen = std::max(c.rwgen, a.wgen);
  }
}

// The checks of a write (a store, or a cp.async at its issue); `record`: note it as the byte's last write.
EMU_NOSAN inline void on_write(Cell& c, const Access& a, const char* space, size_t where, bool record = true) {
  check_in_flight(c, a, space, where, true);
  if (c.wthr >= 0 && !ordered(c.wblock, c.wthr, c.wbgen, c.wwgen, a))
    report("write after write", space, where, a, "overwrites what was written by", who(c.wblock != a.block, c.wthr));
  if (c.rthr >= 0) {
    if (c.rblocks || c.rblock != a.block)
      report("write after read", space, where, a, "writes what was read by", who(true, -1));
    const bool others = c.rthr != a.thr || c.rmulti;
    const bool warp_synced = c.rwarp == a.warp && a.wgen != c.rwgen;
    if (c.rbgen == a.bgen && others && !warp_synced)
      report("write after read", space, where, a, "writes what was read by",
             who(false, c.rthr == a.thr ? -1 : c.rthr));
  }
  if (!record) return;
  c.wblock = a.block;
  c.wthr = a.thr;
  c.wbgen = a.bgen;
  c.wwgen = a.wgen;
  c.rthr = -1;
  c.rmulti = c.rblocks = false;
}

enum Kind { kRead, kWrite, kAsyncIssue, kAsyncLand };

// The record of byte p, or nullptr where nothing is checked (the thread's own stack, the emulation's state).
EMU_NOSAN inline Cell* cell(const unsigned char* p, const char** space, size_t* where) {
  State& s = st();
  if (s.dyn != nullptr && p >= s.dyn && p < s.dyn + s.dyn_size) {
    *space = "dynamic shared memory";
    *where = size_t(p - s.dyn);
    Cell& c = s.race_dyn[*where];
    if (c.stamp != s.block_serial) c = Cell{s.block_serial};
    return &c;
  }
  if (p >= s.arena && p < s.arena + kStaticSmem) {
    *space = "static shared memory";
    *where = size_t(p - s.arena);
    Cell& c = s.race_arena[*where];
    if (c.stamp != s.block_serial) c = Cell{s.block_serial};
    return &c;
  }
  const unsigned char* stack = reinterpret_cast<unsigned char*>(s.stacks[s.cur->linear]);
  if (p >= stack && p < stack + kStack) return nullptr;
  if (p >= reinterpret_cast<const unsigned char*>(&s) && p < reinterpret_cast<const unsigned char*>(&s + 1))
    return nullptr;  // blockIdx, gridDim, blockDim
  *space = "global memory";
  *where = reinterpret_cast<uintptr_t>(p);
  return &s.race_global[*where];
}

EMU_NOSAN inline void access(const void* p, size_t n, Kind kind) {
  if (!live) return;
  State& s = st();
  if (s.cur == nullptr) return;
  Quiet quiet;
  const Access a = current();
  for (size_t i = 0; i < n; ++i) {
    const char* space;
    size_t where;
    Cell* c = cell(static_cast<const unsigned char*>(p) + i, &space, &where);
    if (c == nullptr) continue;
    switch (kind) {
      case kRead: on_read(*c, a, space, where); break;
      case kWrite: on_write(*c, a, space, where); break;
      case kAsyncIssue:
        on_write(*c, a, space, where, false);
        c->pending = a.thr;
        break;
      case kAsyncLand:
        c->pending = -1;
        on_write(*c, a, space, where);
        break;
    }
  }
}

// A load or store of the kernel's code (the instrumentation's hooks).
EMU_NOSAN inline void hook(const void* p, size_t n, Kind kind) {
  if (!live) return;
  const Fiber* f = st().cur;
  if (f != nullptr && f->quiet == 0) access(p, n, kind);
}

}  // namespace race

EMU_NOSAN inline void complete(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    race::access(c.dst, 16, race::kAsyncLand);
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}

EMU_NOSAN inline void on_exit() {
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

EMU_NOSAN inline void trampoline() {
  st().body();
  on_exit();
}  // returns to the scheduler (uc_link)

EMU_NOSAN inline void map_dynamic(size_t bytes) {
  State& s = st();
  if (s.dyn_map != nullptr) munmap(s.dyn_map, s.dyn_map_size);
  s.dyn_map = nullptr;
  s.dyn = nullptr;
  s.dyn_size = bytes;
  s.race_dyn.assign(bytes, Cell());
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

EMU_NOSAN inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

EMU_NOSAN inline void run_block(const dim3& bid, unsigned seed) {
  State& s = st();
  const int n = s.nthreads;
  s.bid = bid;
  ++s.block_serial;
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
  auto step = [&](int i) EMU_NOSAN {  // resume thread i until it waits or exits
    Fiber& f = s.fibers[i];
    if (f.done) return;
    s.cur = &f;
    swapcontext(&s.sched, &f.ctx);
    s.cur = nullptr;  // the scheduler's own work is nobody's
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

// An on/off switch from the environment, read at each launch: on unless set to "0".
EMU_NOSAN inline bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr || std::strcmp(e, "0") != 0;
}

EMU_NOSAN inline unsigned seed_from_env() {
  const char* e = std::getenv("DLCV_FAST_EMU_SEED");
  return e != nullptr ? unsigned(std::strtoul(e, nullptr, 10)) : 0u;
}

EMU_NOSAN inline const DeviceProp* device_prop() {
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
  EMU_NOSAN void operator()(A&&... args) {
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
    s.body = [fnp, &params]() EMU_NOSAN {
      auto copy = [&] EMU_NOSAN {  // each thread its own copy of the parameters
        Quiet quiet;
        return params;
      }();
      std::apply(fnp, copy);
    };
    s.grid = grid;
    s.block = block;
    s.nthreads = n;
    const unsigned seed = seed_from_env();
    s.error.clear();
    s.bank_check = env_on("DLCV_FAST_EMU_BANKCHECK");
    s.race_arena.resize(kStaticSmem);
    s.race_global.clear();
    map_dynamic(smem);
    race::live = env_on("DLCV_FAST_EMU_RACECHECK");
    for (unsigned z = 0; z < grid.z && s.error.empty(); ++z)
      for (unsigned y = 0; y < grid.y && s.error.empty(); ++y)
        for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) run_block(dim3(x, y, z), seed);
    race::live = false;
    s.body = nullptr;
    if (!s.error.empty()) {
      std::string msg = "dlcv_fast emu: " + s.error;
      s.error.clear();
      throw std::runtime_error(msg);
    }
  }
};

template <typename... P>
EMU_NOSAN Launch<P...> launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0, int /*stream*/ = 0) {
  return Launch<P...>{fn, grid, block, smem};
}

inline uint16_t half_bits(uint32_t reg, int hi) { return uint16_t(hi ? reg >> 16 : reg & 0xffffu); }

template <typename T>
EMU_NOSAN float bits_to_float(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// Shared memory serves 32 four-byte banks a cycle; ldmatrix reads each 8x8 matrix (8 rows of 16 bytes, the row
// addresses of lanes 8j..8j+7) in one go when the 8 rows fall in 8 different 16-byte bank groups, and in
// several passes otherwise. A conflict is a performance bug in an inner loop (the kernels pad their tile rows to
// avoid them), so the emulation fails on one; DLCV_FAST_EMU_BANKCHECK=0 turns this off.
EMU_NOSAN inline void check_ldmatrix_banks(const Warp& w) {
  if (!st().bank_check) return;
  for (int j = 0; j < 4; ++j) {
    int seen[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    for (int i = 0; i < 8; ++i) {
      const int lane = 8 * j + i, group = int((reinterpret_cast<uintptr_t>(w.ptr[lane]) >> 4) & 7);
      if (seen[group] >= 0)
        fail("ldmatrix bank conflict: the rows of lanes " + std::to_string(seen[group]) + " and " +
             std::to_string(lane) + " are in the same 16-byte bank group (shared-memory offsets " +
             std::to_string(static_cast<const unsigned char*>(w.ptr[seen[group]]) - smem_base(w.ptr[lane])) +
             " and " + std::to_string(static_cast<const unsigned char*>(w.ptr[lane]) - smem_base(w.ptr[lane])) +
             "): pad or swizzle the tile's rows");
      seen[group] = lane;
    }
  }
}
}  // namespace emu

// ---- the CUDA names the kernels use ----

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::st().bid)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

EMU_NOSAN inline void __syncthreads() { ::emu::arrive_wait(::emu::st().block_bar, "__syncthreads"); }
EMU_NOSAN inline void __syncwarp(unsigned = 0xffffffffu) {
  ::emu::arrive_wait(::emu::warp_op("__syncwarp").bar, "__syncwarp");
}

template <typename T>
EMU_NOSAN T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
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
EMU_NOSAN inline int getCurrentCUDAStream() { return 0; }
EMU_NOSAN inline const ::emu::DeviceProp* getCurrentDeviceProperties() { return ::emu::device_prop(); }
EMU_NOSAN inline const ::emu::DeviceProp* getDeviceProperties(int) { return ::emu::device_prop(); }
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
EMU_NOSAN cudaError_t cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (size_t(value) > ::emu::device_prop()->sharedMemPerBlockOptin) return cudaErrorInvalidValue;
    ::emu::st().optin[reinterpret_cast<const void*>(fn)] = value;
  }
  return cudaSuccess;
}

template <typename... P>
EMU_NOSAN cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int threads, size_t smem) {
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

EMU_NOSAN inline void cp_async16(void* dst, const void* src, bool valid) {
  emu::Quiet quiet;
  if (!emu::in_smem(dst, 16)) emu::fail("cp.async destination outside shared memory");
  if (!emu::aligned(dst, 16) || !emu::aligned(src, 16)) emu::fail("cp.async of 16 bytes from/to a misaligned address");
  emu::race::access(dst, 16, emu::race::kAsyncIssue);
  if (valid) emu::race::access(src, 16, emu::race::kRead);
  std::memset(dst, 0xff, 16);  // NaN until the wait that covers it
  emu::st().cur->open.push_back({dst, src, valid});
}

EMU_NOSAN inline void cp_async_commit() {
  emu::Quiet quiet;
  emu::Fiber& f = *emu::st().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

template <int N>
EMU_NOSAN void cp_async_wait() {
  emu::Quiet quiet;
  emu::Fiber& f = *emu::st().cur;
  while (int(f.groups.size()) > N) {
    emu::complete(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

EMU_NOSAN inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::warp_op("ldmatrix");
  const int lane = emu::lane_id();
  if (!emu::in_smem(p, 16) || !emu::aligned(p, 16)) emu::fail("ldmatrix row address not 16-byte aligned shared memory");
  emu::race::access(p, 16, emu::race::kRead);
  w.ptr[lane] = p;
  emu::arrive_wait(w.bar, "ldmatrix");
  if (lane == 0) emu::check_ldmatrix_banks(w);
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
EMU_NOSAN inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix(r, p, false); }
EMU_NOSAN inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix(r, p, true); }

// c += a (16x16, row) * b (16x8, col), the PTX ISA's fragment layouts (see mma.cuh).
template <typename T>
EMU_NOSAN void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp_op("mma.sync");
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) w.u32[lane][i] = a[i];
  w.u32[lane][4] = b0;
  w.u32[lane][5] = b1;
  emu::arrive_wait(w.bar, "mma.sync");
  auto A = [&](int r, int k) EMU_NOSAN {  // a0 (r, k), a1 (r + 8, k), a2 (r, k + 8), a3 (r + 8, k + 8)
    const uint32_t reg = w.u32[(r % 8) * 4 + (k % 8) / 2][(r / 8) + 2 * (k / 8)];
    return emu::bits_to_float<T>(emu::half_bits(reg, k % 2));
  };
  auto B = [&](int k, int n) EMU_NOSAN {  // b0 (rows 2t, 2t + 1; column g), b1 (rows 2t + 8, 2t + 9)
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
EMU_NOSAN void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

EMU_NOSAN inline void check_ptr(const void* p, unsigned ld, size_t elem, const char* what) {
  ::emu::Quiet quiet;
  if (!::emu::aligned(p, 32)) ::emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((size_t(ld) * elem) % 16 != 0) ::emu::fail(std::string(what) + ": leading dimension not a multiple of 16 bytes");
}

// The race check's view of a warp's tile load: lane i < 16 reads the tile's i-th line of 16 elements (rows or
// columns, as laid out), so a write to the tile by another thread that is not ordered before the load is seen.
template <typename T>
EMU_NOSAN void read_share(const T* p, unsigned ld) {
  const int lane = ::emu::lane_id();
  if (lane < 16) ::emu::race::access(p + size_t(lane) * ld, 16 * sizeof(T), ::emu::race::kRead);
}

inline float elem(float x) { return x; }
inline float elem(__half x) { return __half2float(x); }
inline float elem(__nv_bfloat16 x) { return __bfloat162float(x); }

// Operand tiles: matrix_a is (M, K), matrix_b is (K, N); row_major: element (r, c) at p[r * ld + c].
template <typename Use, typename T, typename L>
EMU_NOSAN void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "operand fragment needs a layout");
  ::emu::Warp& w = ::emu::warp_op("wmma::load_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::load_matrix_sync");
  read_share(p, ld);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = elem(std::is_same_v<L, row_major> ? p[r * ld + c] : p[c * ld + r]);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync (read)");
}

template <typename T>
EMU_NOSAN void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ld, layout_t layout) {
  ::emu::Warp& w = ::emu::warp_op("wmma::load_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::load_matrix_sync");
  read_share(p, ld);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = elem(layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]);
  ::emu::arrive_wait(w.bar, "wmma::load_matrix_sync (read)");
}

template <typename T>
EMU_NOSAN void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ld, layout_t layout) {
  ::emu::Warp& w = ::emu::warp_op("wmma::store_matrix_sync");
  check_ptr(p, ld, sizeof(T), "wmma::store_matrix_sync");
  ::emu::arrive_wait(w.bar, "wmma::store_matrix_sync");
  for (int i = ::emu::lane_id(); i < 256; i += 32) {  // each lane its share of the tile
    const int r = i / 16, c = i % 16;
    T* e = p + (layout == mem_row_major ? r * ld + c : c * ld + r);
    ::emu::race::access(e, sizeof(T), ::emu::race::kWrite);
    *e = f.v[r][c];
  }
  ::emu::arrive_wait(w.bar, "wmma::store_matrix_sync (written)");
}

template <typename TA, typename LA, typename TB, typename LB>
EMU_NOSAN void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
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

// ---- the hooks of GCC's -fsanitize=thread instrumentation (the race check; no TSan runtime is linked) ----
// Hidden and weak: each extension has its own copy, bound to its own emulation state.
#define EMU_HOOK extern "C" __attribute__((visibility("hidden"), weak, no_sanitize_thread))
#define EMU_RW(N)                                                                                         \
  EMU_HOOK void __tsan_read##N(void* p) { ::emu::race::hook(p, N, ::emu::race::kRead); }              \
  EMU_HOOK void __tsan_write##N(void* p) { ::emu::race::hook(p, N, ::emu::race::kWrite); }            \
  EMU_HOOK void __tsan_unaligned_read##N(void* p) { ::emu::race::hook(p, N, ::emu::race::kRead); }    \
  EMU_HOOK void __tsan_unaligned_write##N(void* p) { ::emu::race::hook(p, N, ::emu::race::kWrite); }
EMU_RW(1)
EMU_RW(2)
EMU_RW(4)
EMU_RW(8)
EMU_RW(16)
#undef EMU_RW
EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { ::emu::race::hook(p, n, ::emu::race::kRead); }
EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { ::emu::race::hook(p, n, ::emu::race::kWrite); }
EMU_HOOK void __tsan_init() {}
EMU_HOOK void __tsan_func_entry(void*) {}
EMU_HOOK void __tsan_func_exit() {}
EMU_HOOK void __tsan_vptr_update(void**, void*) {}
EMU_HOOK void __tsan_vptr_read(void**) {}
// Atomics are instrumented by replacement: the hook does the operation (seq_cst; the host code's reference counts
// and such: the kernels have none).
#define EMU_ATOMIC(N, T)                                                                                        \
  EMU_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  EMU_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                           \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
  EMU_HOOK T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  EMU_HOOK T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                         \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  EMU_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                           \
  EMU_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
  }                                                                                                           \
  EMU_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
    return c;                                                                                                 \
  }
EMU_ATOMIC(8, char)
EMU_ATOMIC(16, short)
EMU_ATOMIC(32, int)
EMU_ATOMIC(64, long long)
#undef EMU_ATOMIC
EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef EMU_HOOK
