// The hot path of gaccum: for every gradient g and its FP32 master m,
//     m = (overwrite ? 0 : m) + float(g) * inv_scale     (the product rounded, then the sum: never an FMA)
// with found_inf set when any result is non-finite, optionally zeroing g and
// accumulating sum(m^2) for the gradient norm, all in one pass over memory
// (10 B/element for half gradients, 6 B/element with `overwrite`).
//
// found_inf follows torch.amp.GradScaler's convention: a float32 device scalar
// that the kernel only ever sets to 1.0 (never clears), once per block.
// inv_scale is read from device memory so no host synchronisation is needed.
#include "multi_tensor_apply.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace gaccum {

namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

// ILP elements per thread per step: 16-byte loads of the gradient for half types
// (8 x 2 B), and 16-byte loads of FP32 (4 x 4 B) for both gradient and master.
template <typename T>
struct Ilp {
  static constexpr int value = 16 / sizeof(T) >= 4 ? 16 / sizeof(T) : 4;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// m + g * s with the product rounded before the add, as the CPU fallback computes it: nvcc would
// otherwise contract it into an FMA (1 ulp apart from the fallback, and an overflowing g * s hidden
// by a large opposite m). __fmul_rn / __fadd_rn are never contracted and cost nothing in a
// bandwidth-bound kernel.
__device__ __forceinline__ float unfused(float m, float g, float s) { return __fadd_rn(m, __fmul_rn(g, s)); }

__device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

template <typename T>
__device__ __forceinline__ void process_chunk(const T* __restrict__ g_base,
                                              float* __restrict__ m_base,
                                              int64_t n, int64_t chunk, float inv_scale,
                                              bool overwrite, bool zero_grad, bool want_norm,
                                              bool& bad, float& sq) {
  constexpr int ILP = Ilp<T>::value;
  const int64_t start = chunk * kChunkSize;
  const int64_t rest = n - start;
  const int64_t len = rest < kChunkSize ? rest : kChunkSize;
  const T* g = g_base + start;
  float* m = m_base + start;

  // A vector body over the 16-byte-aligned middle, and a bounded scalar head (to reach alignment) and
  // tail (fewer than ILP elements): a chunk whose length is not a multiple of ILP, or a view that starts
  // off a boundary, no longer runs wholly scalar. Only when the gradient and the master cannot both be
  // aligned by the same head (their offsets differ) does the whole chunk run scalar.
  const int64_t g_off = (int64_t)((reinterpret_cast<uintptr_t>(g) % 16) / sizeof(T));
  int64_t head = g_off ? (int64_t)(16 / sizeof(T)) - g_off : 0;
  if (head > len) head = len;
  const bool vec_ok = is_aligned(g + head, sizeof(T) * ILP) && is_aligned(m + head, 16);
  const int64_t body = vec_ok ? ((len - head) / ILP) * ILP : 0;
  if (!vec_ok) head = len;
  T* gw = const_cast<T*>(g);
  for (int64_t i = head + (int64_t)threadIdx.x * ILP; i < head + body; i += (int64_t)blockDim.x * ILP) {
    Vec<T, ILP> gv = *reinterpret_cast<const Vec<T, ILP>*>(g + i);
    float out[ILP];
#pragma unroll
    for (int k = 0; k < ILP; k += 4) {
      float4 mv = overwrite ? make_float4(0.f, 0.f, 0.f, 0.f)
                            : *reinterpret_cast<const float4*>(m + i + k);
      out[k + 0] = unfused(mv.x, to_float(gv.v[k + 0]), inv_scale);
      out[k + 1] = unfused(mv.y, to_float(gv.v[k + 1]), inv_scale);
      out[k + 2] = unfused(mv.z, to_float(gv.v[k + 2]), inv_scale);
      out[k + 3] = unfused(mv.w, to_float(gv.v[k + 3]), inv_scale);
      *reinterpret_cast<float4*>(m + i + k) =
          make_float4(out[k + 0], out[k + 1], out[k + 2], out[k + 3]);
    }
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      bad |= !isfinite(out[k]);
      if (want_norm) sq += out[k] * out[k];
    }
    if (zero_grad) {
      Vec<T, ILP> z;
#pragma unroll
      for (int k = 0; k < ILP; ++k) z.v[k] = zero_of<T>();
      *reinterpret_cast<Vec<T, ILP>*>(gw + i) = z;
    }
  }
  // Bounds-checked scalar part: the head [0, head) and the tail [head + body, len), as one index range.
  const int64_t scalar = len - body;
  for (int64_t j = threadIdx.x; j < scalar; j += blockDim.x) {
    const int64_t i = j < head ? j : j + body;
    float o = unfused(overwrite ? 0.f : m[i], to_float(g[i]), inv_scale);
    m[i] = o;
    bad |= !isfinite(o);
    if (want_norm) sq += o * o;
    if (zero_grad) gw[i] = zero_of<T>();
  }
}

__global__ void __launch_bounds__(kBlockThreads)
unscale_check_accumulate_kernel(const TensorTable table, const float* __restrict__ inv_scale_ptr,
                                float* __restrict__ found_inf, float* __restrict__ partials,
                                int overwrite, int zero_grad) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t n = table.sizes[t];
  const float inv_scale = *inv_scale_ptr;
  const bool want_norm = partials != nullptr;
  bool bad = false;
  float sq = 0.f;
  switch (table.dtypes[t]) {
    case kFloat16:
      process_chunk<__half>(static_cast<const __half*>(table.grads[t]), table.masters[t], n,
                            chunk, inv_scale, overwrite, zero_grad, want_norm, bad, sq);
      break;
    case kBFloat16:
      process_chunk<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(table.grads[t]),
                                   table.masters[t], n, chunk, inv_scale, overwrite, zero_grad,
                                   want_norm, bad, sq);
      break;
    default:
      process_chunk<float>(static_cast<const float*>(table.grads[t]), table.masters[t], n,
                           chunk, inv_scale, overwrite, zero_grad, want_norm, bad, sq);
      break;
  }
  // One write of found_inf per block, never a clear; atomic, so blocks that all found an inf never race
  // (free: it runs only when something is non-finite).
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(found_inf, 1.f);
  if (want_norm) {
    __shared__ float partial[kBlockThreads / 32];
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = sq;
    __syncthreads();
    if (warp == 0) {
      sq = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
      for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
      if (lane == 0) partials[blockIdx.x] = sq;  // summed in a fixed order after the launches: reproducible
    }
  }
}

// The squared norm's second stage: one block adds the per-block partial sums in a fixed order (each thread a
// fixed stride, then a fixed tree), so the result is the same bits whatever order the blocks ran in.
__global__ void __launch_bounds__(kBlockThreads)
sum_partials_kernel(const float* __restrict__ partials, int64_t count, float* __restrict__ sq_norm) {
  __shared__ float part[kBlockThreads];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half >>= 1) {
    if ((int)threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *sq_norm += part[0];
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("gaccum CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

// Host launcher over parallel arrays (one entry per tensor). Validation (devices, dtypes, contiguity,
// sizes) happens in Python before any pointer gets here; this only packs tables and launches.
void launch_tables(const uintptr_t* grads, const uintptr_t* masters, const int64_t* sizes,
                   const uint8_t* dtypes, size_t count, uintptr_t inv_scale, uintptr_t found_inf,
                   uintptr_t sq_norm, bool overwrite, bool zero_grad, uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // An error left by earlier work (torch's kernels, an earlier launch) is said as such, never reported
  // as this launch's failure.
  const cudaError_t earlier = cudaGetLastError();
  if (earlier != cudaSuccess) {
    throw std::runtime_error(std::string("gaccum: a CUDA error was pending before gaccum's launch (from earlier "
                                         "work, not this launch): ") + cudaGetErrorString(earlier));
  }
  // With a norm asked for, every block writes its partial sum to a scratch array (stream-ordered), added up
  // by one more small launch at the end.
  float* partials = nullptr;
  int64_t total_blocks = 0, written = 0;
  if (sq_norm != 0) {
    for (size_t i = 0; i < count; ++i) total_blocks += (sizes[i] + kChunkSize - 1) / kChunkSize;
    if (total_blocks > 0)
      check(cudaMallocAsync(reinterpret_cast<void**>(&partials), total_blocks * sizeof(float), stream),
            "allocating the norm's partial sums");
  }
  TensorTable table;
  int nt = 0, nb = 0;
  auto flush = [&]() {
    if (nb == 0) return;
    unscale_check_accumulate_kernel<<<nb, kBlockThreads, 0, stream>>>(
        table, reinterpret_cast<const float*>(inv_scale), reinterpret_cast<float*>(found_inf),
        partials != nullptr ? partials + written : nullptr, overwrite ? 1 : 0, zero_grad ? 1 : 0);
    check(cudaGetLastError(), "kernel launch");
    written += nb;
    nt = 0;
    nb = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = sizes[i];
    if (n == 0) continue;
    if (dtypes[i] > kBFloat16) throw std::invalid_argument("gaccum: unknown gradient dtype code");
    table.grads[nt] = reinterpret_cast<const void*>(grads[i]);
    table.masters[nt] = reinterpret_cast<float*>(masters[i]);
    table.sizes[nt] = n;
    table.dtypes[nt] = dtypes[i];
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[nb] = static_cast<uint16_t>(nt);
      table.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool blocks_full = nb == kMaxBlocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks_full) {
        flush();
        if (!last_chunk) {
          // The tensor continues into the next launch: carry its metadata over.
          table.grads[0] = reinterpret_cast<const void*>(grads[i]);
          table.masters[0] = reinterpret_cast<float*>(masters[i]);
          table.sizes[0] = n;
          table.dtypes[0] = dtypes[i];
          nt = 0;
        } else {
          nt = -1;
        }
      }
    }
    ++nt;
    if (nt == kMaxTensors) flush();
  }
  flush();
  if (partials != nullptr) {
    sum_partials_kernel<<<1, kBlockThreads, 0, stream>>>(partials, total_blocks, reinterpret_cast<float*>(sq_norm));
    check(cudaGetLastError(), "norm reduction launch");
    check(cudaFreeAsync(partials, stream), "freeing the norm's partial sums");
  }
}

void launch_unscale_check_accumulate(const std::vector<uintptr_t>& grads,
                                     const std::vector<uintptr_t>& masters,
                                     const std::vector<int64_t>& sizes,
                                     const std::vector<uint8_t>& dtypes, uintptr_t inv_scale,
                                     uintptr_t found_inf, uintptr_t sq_norm, bool overwrite,
                                     bool zero_grad, uintptr_t stream_handle) {
  const size_t count = grads.size();
  if (masters.size() != count || sizes.size() != count || dtypes.size() != count) {
    throw std::invalid_argument("gaccum: grads, masters, sizes and dtypes differ in length");
  }
  launch_tables(grads.data(), masters.data(), sizes.data(), dtypes.data(), count, inv_scale, found_inf,
                sq_norm, overwrite, zero_grad, stream_handle);
}

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace gaccum
