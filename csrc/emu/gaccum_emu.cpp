// The emulation's runtime: fibers (one per CUDA thread), the per-block scheduler that runs them to their
// barriers, and the grid executor. See gaccum_emu.h for what is modelled and why.
#include "gaccum_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define GACCUM_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define GACCUM_EMU_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#error "gaccum's CUDA emulation switches fibers with x86-64 assembly; port gaccum_emu_swap to this CPU"
#endif

namespace {
thread_local cudaError_t g_last_error = cudaSuccess;
}

cudaError_t cudaGetLastError() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated launch)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated allocation)";
    default: return "unspecified launch failure (emulated launch)";
  }
}

cudaError_t cudaMallocAsync(void** ptr, std::size_t bytes, cudaStream_t /*stream*/) {
  *ptr = std::malloc(bytes ? bytes : 1);
  return *ptr != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t /*stream*/) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;  // the emulated device
  return cudaSuccess;
}

// ---- fiber switching ---------------------------------------------------------------------------
// gaccum_emu_swap(save, to): push the callee-saved registers and the FP control words on the current
// stack, store the stack pointer in *save, load `to`, pop the same and return there. No syscall (unlike
// swapcontext), so half a million fibers a second is cheap.
extern "C" {
__attribute__((visibility("hidden"))) void gaccum_emu_swap(void** save_sp, void* to_sp);
__attribute__((visibility("hidden"))) void gaccum_emu_trampoline();
__attribute__((visibility("hidden"), noreturn)) void gaccum_emu_fiber_main(void* fiber);
}

asm(R"(
  .text
  .globl gaccum_emu_swap
  .hidden gaccum_emu_swap
  .type gaccum_emu_swap,@function
gaccum_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gaccum_emu_swap,.-gaccum_emu_swap

  .globl gaccum_emu_trampoline
  .hidden gaccum_emu_trampoline
  .type gaccum_emu_trampoline,@function
gaccum_emu_trampoline:
  movq %r12, %rdi
  call gaccum_emu_fiber_main
  ud2
  .size gaccum_emu_trampoline,.-gaccum_emu_trampoline
)");

namespace gaccum_emu {


namespace {

enum class State { Runnable, AtSync, AtShfl, Done };

#if defined(GACCUM_EMU_ASAN) || defined(GACCUM_EMU_TSAN)
constexpr std::size_t kStack = 256 << 10;
#else
constexpr std::size_t kStack = 64 << 10;
#endif

struct Worker;

struct Fiber {
  ThreadCtx ctx{};
  void* sp = nullptr;
  char* stack_lo = nullptr;  // usable stack, above its guard page
  State state = State::Done;
  int pred = 0, result_i = 0;
  const char* kind = "";
  float shfl_v = 0.f, result_f = 0.f;
  unsigned shfl_mask = 0, shfl_delta = 0;
  void* fake_stack = nullptr;
  void* tsan_fiber = nullptr;
  Worker* worker = nullptr;
};

// One per OS thread that runs blocks: its fibers and their stacks, reused block after block.
struct Worker {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  std::size_t mapped = 0;
  void* sched_sp = nullptr;
  const void* sched_bottom = nullptr;
  std::size_t sched_size = 0;
  void* sched_fake = nullptr;
  void* sched_tsan = nullptr;
  const std::function<void()>* body = nullptr;
  Fiber* running = nullptr;

  void ensure(std::size_t n) {
    if (fibers.size() >= n) return;
    release();
    const std::size_t page = (std::size_t)sysconf(_SC_PAGESIZE);
    const std::size_t each = kStack + page;
    mapped = each * n;
    void* mem = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "gaccum_emu: cannot map %zu fiber stacks\n", n);
      std::abort();
    }
    stacks = static_cast<char*>(mem);
    fibers.assign(n, Fiber{});
    for (std::size_t i = 0; i < n; ++i) {
      char* lo = stacks + i * each;
      mprotect(lo, page, PROT_NONE);  // a fiber that overflows its stack faults instead of corrupting another
      fibers[i].stack_lo = lo + page;
      fibers[i].worker = this;
#if defined(GACCUM_EMU_TSAN)
      fibers[i].tsan_fiber = __tsan_create_fiber(0);
#endif
    }
  }
  void release() {
#if defined(GACCUM_EMU_TSAN)
    for (auto& f : fibers) __tsan_destroy_fiber(f.tsan_fiber);
#endif
    fibers.clear();
    if (stacks) munmap(stacks, mapped);
    stacks = nullptr;
  }
  ~Worker() { release(); }
};

thread_local std::unique_ptr<Worker> tls_worker;

Worker& worker() {
  if (!tls_worker) tls_worker = std::make_unique<Worker>();
  return *tls_worker;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "gaccum_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

void init_fiber(Fiber& f) {
#if defined(GACCUM_EMU_ASAN)
  __asan_unpoison_memory_region(f.stack_lo, kStack);  // redzones left by the fiber that used it last
#endif
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_lo) + kStack) & ~uintptr_t{15};
  uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);  // 8 mod 16: the callee sees a call-aligned stack
  ret[0] = reinterpret_cast<uint64_t>(&gaccum_emu_trampoline);
  ret[-1] = 0;                                   // rbp
  ret[-2] = 0;                                   // rbx
  ret[-3] = reinterpret_cast<uint64_t>(&f);      // r12: the trampoline's argument
  ret[-4] = ret[-5] = ret[-6] = 0;               // r13, r14, r15
  unsigned char* ctl = reinterpret_cast<unsigned char*>(ret) - 64;
  const uint16_t fpcw = 0x037f;
  const uint32_t mxcsr = 0x1f80;
  std::memcpy(ctl, &fpcw, 2);
  std::memcpy(ctl + 8, &mxcsr, 4);
  f.sp = ctl;
  f.state = State::Runnable;
  f.fake_stack = nullptr;
}

// One stack switch, annotated for the sanitizers: ASan is told whose stack runs next (`fake` keeps this
// side's fake stack; nullptr when this side will never run again) and, once switched back, learns the
// bounds of the stack that switched to it (`back_lo`/`back_size` may be nullptr); TSan is told which
// fiber runs next. Every switch goes through here: scheduler to fiber, fiber to scheduler, a fiber's end.
void switch_stack(void** save_sp, void* to_sp, void** fake, const void* to_lo, std::size_t to_size,
                  [[maybe_unused]] void* to_tsan, [[maybe_unused]] const void** back_lo,
                  [[maybe_unused]] std::size_t* back_size) {
#if defined(GACCUM_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake, to_lo, to_size);
#else
  (void)fake, (void)to_lo, (void)to_size;
#endif
#if defined(GACCUM_EMU_TSAN)
  __tsan_switch_to_fiber(to_tsan, 0);
#endif
  gaccum_emu_swap(save_sp, to_sp);
#if defined(GACCUM_EMU_ASAN)
  __sanitizer_finish_switch_fiber(*fake, back_lo, back_size);
#endif
}

void resume(Worker& w, Fiber& f) {
  current = &f.ctx;
  w.running = &f;
  switch_stack(&w.sched_sp, f.sp, &w.sched_fake, f.stack_lo, kStack, f.tsan_fiber, nullptr, nullptr);
  w.running = nullptr;
  current = nullptr;
}

// From inside a fiber: back to the block's scheduler until the barrier releases this thread.
void yield(Fiber& f) {
  Worker& w = *f.worker;
  switch_stack(&f.sp, w.sched_sp, &f.fake_stack, w.sched_bottom, w.sched_size, w.sched_tsan, &w.sched_bottom,
               &w.sched_size);
}

Fiber& running_fiber(const char* what) {
  if (!tls_worker || !tls_worker->running) {
    std::fprintf(stderr, "gaccum_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *tls_worker->running;
}

std::mutex g_mu;
Schedule g_schedule;
std::atomic<uint64_t> s_launches{0}, s_blocks{0}, s_threads{0}, s_param{0};

// OS threads that run blocks beside the launching thread; kept across launches (a thread and its fiber
// stacks cost far more to make than a small launch takes to run).
class Pool {
 public:
  void run(std::size_t extra, const std::function<void(std::size_t)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    while (threads_.size() < extra) threads_.emplace_back([this, k = threads_.size() + 1] { loop(k); });
    job_ = &job;
    busy_ = threads_.size();
    ++generation_;
    wake_.notify_all();
    lock.unlock();
    job(0);
    lock.lock();
    idle_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void loop(std::size_t index) {  // index 1, 2, ...: the launching thread is 0
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const std::function<void(std::size_t)>* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--busy_ == 0) idle_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable wake_, idle_;
  std::vector<std::thread> threads_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  uint64_t generation_ = 0;
  std::size_t busy_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}

void run_block(Worker& w, const std::function<void()>& body, uint3 bid, dim3 grid, dim3 block, uint64_t seed,
               uint64_t linear) {
  const unsigned n = block.x * block.y * block.z;
  w.ensure(n);
  w.body = &body;
#if defined(GACCUM_EMU_TSAN)
  w.sched_tsan = __tsan_get_current_fiber();
#endif
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + linear);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = w.fibers[t];
    f.ctx.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.ctx.block_idx = bid;
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    init_fiber(f);
  }
  const unsigned warps = (n + 31) / 32;
  for (;;) {
    if (seed) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned t : order)
      if (w.fibers[t].state == State::Runnable) resume(w, w.fibers[t]);
    bool released = false;
    unsigned at_sync = 0, done = 0;
    for (unsigned wi = 0; wi < warps; ++wi) {
      const unsigned lo = wi * 32, lanes = std::min(32u, n - lo);
      unsigned at = 0;
      for (unsigned l = 0; l < lanes; ++l) at += w.fibers[lo + l].state == State::AtShfl;
      if (at != lanes) continue;
      const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      for (unsigned l = 0; l < lanes; ++l) {
        const Fiber& f = w.fibers[lo + l];
        if (f.shfl_mask != full || f.shfl_delta != w.fibers[lo].shfl_delta)
          fail("__shfl_down_sync: lanes of one warp disagree on the mask or the offset, or the mask names lanes "
               "that are not all active");
      }
      for (unsigned l = 0; l < lanes; ++l) {
        Fiber& f = w.fibers[lo + l];
        const unsigned src = l + f.shfl_delta;
        f.result_f = src < lanes ? w.fibers[lo + src].shfl_v : f.shfl_v;
      }
      for (unsigned l = 0; l < lanes; ++l) w.fibers[lo + l].state = State::Runnable;
      released = true;
    }
    for (unsigned t = 0; t < n; ++t) {
      at_sync += w.fibers[t].state == State::AtSync;
      done += w.fibers[t].state == State::Done;
    }
    if (at_sync == n) {
      int any = 0;
      for (unsigned t = 0; t < n; ++t) any |= w.fibers[t].pred;
      for (unsigned t = 0; t < n; ++t) {
        w.fibers[t].result_i = any;
        w.fibers[t].state = State::Runnable;
      }
      released = true;
    }
    if (released) continue;
    if (done == n) break;
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "deadlock in block %llu: %u of %u threads wait at a block barrier, %u have returned, the "
                  "others wait at a warp shuffle (a barrier not reached by every thread hangs a GPU)",
                  (unsigned long long)linear, at_sync, n, done);
    fail(msg);
  }
  w.body = nullptr;
}

}  // namespace

int sync_or(int pred, const char* kind) {
  Fiber& f = running_fiber(kind);
  f.state = State::AtSync;
  f.pred = pred;
  f.kind = kind;
  yield(f);
  return f.result_i;
}

float shfl_down(unsigned mask, float v, unsigned delta) {
  Fiber& f = running_fiber("__shfl_down_sync");
  f.state = State::AtShfl;
  f.shfl_mask = mask;
  f.shfl_v = v;
  f.shfl_delta = delta;
  yield(f);
  return f.result_f;
}

void set_schedule(const Schedule& s) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_schedule = s;
}

Stats stats() {
  return Stats{s_launches.load(), s_blocks.load(), s_threads.load(), s_param.load()};
}

void reset_stats() {
  s_launches = s_blocks = s_threads = s_param = 0;
}

void run_grid(dim3 grid, dim3 block, std::size_t param_bytes, const std::function<void()>& body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (param_bytes > 32764 || threads == 0 || threads > 1024 || threads % 32 != 0 || blocks == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    if (param_bytes > 32764)
      std::fprintf(stderr, "gaccum_emu: kernel parameters take %zu bytes, over the 32764-byte limit\n", param_bytes);
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  Schedule sched;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    sched = g_schedule;
  }
  // GACCUM_EMU_NO_EXEC=1: launches are checked and counted but no block runs -- a no-op device, so a
  // benchmark of the host side (benchmarks/bench_host_overhead.py) times everything up to the launch.
  static const bool no_exec = [] {
    const char* v = std::getenv("GACCUM_EMU_NO_EXEC");
    return v && v[0] == '1';
  }();
  ++s_launches;
  s_blocks += blocks;
  s_threads += blocks * threads;
  uint64_t prev = s_param.load();
  while (prev < param_bytes && !s_param.compare_exchange_weak(prev, param_bytes)) {
  }
  if (no_exec) return;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0ull);
  if (sched.seed) {
    std::mt19937_64 rng(sched.seed);
    std::shuffle(order.begin(), order.end(), rng);
  }
  // Worker k runs blocks k, k + W, k + 2W, ... of the order: fixed, so a run can be repeated exactly, and
  // neighbouring blocks always land on different OS threads.
  const uint64_t workers = (uint64_t)std::max(1, sched.workers);
  const std::function<void(std::size_t)> drain = [&](std::size_t k) {
    Worker& w = worker();
    for (uint64_t i = k; i < blocks; i += workers) {
      const uint64_t b = order[i];
      const uint3 bid{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / (1ull * grid.x * grid.y))};
      run_block(w, body, bid, grid, block, sched.seed, b);
    }
  };
  if (sched.workers > 1) pool().run(sched.workers - 1, drain);
  else drain(0);
}

}  // namespace gaccum_emu

extern "C" void gaccum_emu_fiber_main(void* p) {
  using namespace gaccum_emu;
  Fiber& f = *static_cast<Fiber*>(p);
  Worker& w = *f.worker;
#if defined(GACCUM_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
  (*w.body)();
  f.state = State::Done;
  // Finished for good: no fake stack to keep, and the switch never comes back.
  switch_stack(&f.sp, w.sched_sp, nullptr, w.sched_bottom, w.sched_size, w.sched_tsan, nullptr, nullptr);
  __builtin_unreachable();
}
