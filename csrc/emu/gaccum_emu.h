// A small CUDA emulation for the host, so that csrc/'s exact kernel source runs where CI runs (no GPU).
//
// What it models, and why it is enough for gaccum's kernel:
//   * every CUDA thread is a fiber with its own stack; a block's fibers run on one OS thread until each
//     reaches a barrier (__syncthreads*, __shfl*_sync) or returns, and a barrier releases its threads only
//     when all of them (the block, or the warp for a shuffle) have arrived -- a barrier that can never be
//     completed is reported as a deadlock, as a divergent __syncthreads would hang a GPU;
//   * __shared__ is a thread-local static: all fibers of a block share it, blocks on other OS threads don't;
//   * blocks run in a chosen order, on one or more OS threads (ThreadSanitizer then sees real races between
//     blocks, e.g. two blocks updating one master); thread and block orders can be permuted per run;
//   * the launch checks what a GPU would refuse: the kernel's parameters must fit the 32764-byte parameter
//     space, blockDim must be within 1024 and a multiple of the warp size;
//   * __fmul_rn / __fadd_rn are never contracted into an FMA, whatever the host compiler's -ffp-contract.
// What it does not model: memory coherence between warps without a barrier, timing, the memory spaces.
// A `kernel<<<grid, block, smem, stream>>>(args)` launch is rewritten mechanically (gaccum/_hostemu.py)
// into `::gaccum_emu::Launch(grid, block, smem, stream)(kernel, args)`, keeping #line, so every report
// names the .cu line.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local

using std::isfinite;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- half types: IEEE binary16 and bfloat16, bit-exact conversions (round to nearest even) ----------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace gaccum_emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace gaccum_emu

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return gaccum_emu::u2f(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return gaccum_emu::u2f(sign);
    float v = std::ldexp((float)man, -24);  // subnormal: exact
    return sign ? -v : v;
  }
  return gaccum_emu::u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half(float f) {
  const uint32_t u = gaccum_emu::f2u(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au >= 0x7f800000u) return __half{(uint16_t)(sign | 0x7c00u | (au > 0x7f800000u ? 0x200u : 0u))};
  if (au >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (au < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal, RNE in units of 2^-24
    const float a = gaccum_emu::u2f(au);
    const float q = std::nearbyint(a * 16777216.0f);  // exact scaling; nearbyint rounds half to even
    return __half{(uint16_t)(sign | (uint16_t)q)};
  }
  uint32_t mant = au & 0x7fffffu, exp = (au >> 23) - 112u;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return __half{(uint16_t)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return gaccum_emu::u2f((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = gaccum_emu::f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(r >> 16)};
}

// ---- arithmetic that must not be contracted ------------------------------------------------------
// The empty asm makes the value opaque, so no compiler can fuse the rounded product with a later add.
inline float __fmul_rn(float a, float b) {
  float r = a * b;
  __asm__ volatile("" : "+x"(r));
  return r;
}
inline float __fadd_rn(float a, float b) {
  float r = a + b;
  __asm__ volatile("" : "+x"(r));
  return r;
}

inline float atomicAdd(float* addr, float v) {
  return std::atomic_ref<float>(*addr).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicExch(float* addr, float v) {
  return std::atomic_ref<float>(*addr).exchange(v, std::memory_order_relaxed);
}

// ---- the runtime API the kernel's host code uses -------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 4 };
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDeviceCount(int* n);
// Stream-ordered allocation: the emulated device runs every launch to its end before returning, so host
// memory with the stream ignored is the same order.
cudaError_t cudaMallocAsync(void** ptr, std::size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);

namespace gaccum_emu {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local ThreadCtx* current = nullptr;  // the CUDA thread running on this OS thread

// Barriers, called from inside a fiber.
int sync_or(int pred, const char* kind);
float shfl_down(unsigned mask, float v, unsigned delta);

// Run `body` (one CUDA thread: it reads threadIdx etc. through `current`) over a whole grid.
void run_grid(dim3 grid, dim3 block, std::size_t param_bytes, const std::function<void()>& body);

// The order and parallelism the next launches use, and what they have done (tests read these).
struct Schedule {
  uint64_t seed = 0;   // 0: natural orders; otherwise blocks and threads are run in a permuted order
  int workers = 1;     // OS threads that run blocks
};
void set_schedule(const Schedule& s);
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, max_param_bytes = 0;
};
Stats stats();
void reset_stats();

template <typename... P>
struct ParamBytes {
  static constexpr std::size_t value = (std::size_t{0} + ... + sizeof(std::decay_t<P>));
};

struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, std::size_t /*smem*/ = 0, cudaStream_t /*stream*/ = nullptr) : grid(g), block(b) {}
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    // Arguments are copied once, as a launch copies them into the parameter space.
    auto packed = std::make_tuple(static_cast<std::decay_t<P>>(args)...);
    run_grid(grid, block, ParamBytes<P...>::value, [&]() { std::apply(kernel, packed); });
  }
};

}  // namespace gaccum_emu

#define threadIdx (::gaccum_emu::current->thread_idx)
#define blockIdx (::gaccum_emu::current->block_idx)
#define blockDim (::gaccum_emu::current->block_dim)
#define gridDim (::gaccum_emu::current->grid_dim)

inline int __syncthreads_or(int pred) { return gaccum_emu::sync_or(pred != 0, "__syncthreads_or"); }
inline void __syncthreads() { (void)gaccum_emu::sync_or(0, "__syncthreads"); }
inline float __shfl_down_sync(unsigned mask, float v, unsigned delta) {
  return gaccum_emu::shfl_down(mask, v, delta);
}
