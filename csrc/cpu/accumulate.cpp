// The CPU twin of csrc/unscale_check_accumulate.cu: unscale, inf/NaN check and accumulate into FP32
// masters in one pass over memory, with the same semantics bit for bit (ops.py says them):
//   m = (overwrite ? 0 : m) + float32(g) * s     -- the product rounded first, never a fused multiply-add
//   non_finite |= any updated m is inf/NaN        -- every inf/NaN in g, an overflow of g*s or of m + g*s
//   sq = sum of squares of the updated masters    -- in a fixed order, whatever the thread count
// Torch-independent like the CUDA core: it sees pointers, sizes and dtype codes; ops.py keeps the tensors
// alive and calls it only for contiguous tensors of one layout. Built with -ffp-contract=off (setup.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

constexpr int64_t kUnit = int64_t{1} << 12;  // elements per work unit; a unit's sum is one term of the total
constexpr int64_t kSerialBelow = int64_t{1} << 18;  // fewer elements than this: no thread is started

enum Code : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };  // ops._GRAD_DTYPES

// Four lanes at a time with GCC/Clang vector types: every compiler turns them into the machine's vectors
// (SSE2 on any x86-64, NEON on arm64) without depending on the auto-vectorizer; each lane does the scalar
// operations in the scalar order, so the results are the same bits as one element at a time.
typedef float f4 __attribute__((vector_size(16)));
typedef uint32_t u4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef uint16_t h4 __attribute__((vector_size(8)));

template <class V, class T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Four 16-bit values zero-extended to 32 bits: one unpack on x86-64 (SSE2) and arm64 (NEON), where the
// generic form compiles to a load twice and three shuffles.
inline u4 widen(const uint16_t* p) {
#if defined(__SSE2__)
  return (u4)_mm_unpacklo_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), _mm_setzero_si128());
#elif defined(__ARM_NEON)
  return (u4)vmovl_u16(vld1_u16(p));
#else
  return __builtin_convertvector(load<h4>(p), u4);
#endif
}

template <class To, class From>
inline To bitcast(From x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

struct F32 {
  using Storage = float;
  static float one(float x) { return x; }
  static f4 four(const float* p) { return load<f4>(p); }
};

struct BF16 {
  using Storage = uint16_t;
  static float one(uint16_t x) { return bitcast<float>(uint32_t{x} << 16); }
  static f4 four(const uint16_t* p) { return bitcast<f4>(widen(p) << 16); }
};

// IEEE half to float without F16C, exact for every input: exponent and mantissa moved into float's fields
// and rebiased by a power-of-two product (a subnormal half becomes a normal float), inf/NaN kept as such.
struct F16 {
  using Storage = uint16_t;
  static float one(uint16_t h) {
    const uint32_t em = h & 0x7fffu;
    const uint32_t mag = em >= 0x7c00u ? (em << 13) | 0x7f800000u : bitcast<uint32_t>(bitcast<float>(em << 13) * 0x1p112f);
    return bitcast<float>(mag | ((uint32_t{h} & 0x8000u) << 16));
  }
  static f4 four(const uint16_t* p) {
    const u4 h = widen(p);
    const u4 em = h & 0x7fffu;
    const u4 finite = bitcast<u4>(bitcast<f4>(em << 13) * 0x1p112f);
    const u4 special = bitcast<u4>(em >= 0x7c00u);  // all ones where inf/NaN
    const u4 mag = (finite & ~special) | (((em << 13) | 0x7f800000u) & special);
    return bitcast<f4>(mag | ((h & 0x8000u) << 16));
  }
};

struct Part {
  double sq = 0.0;
  bool non_finite = false;
};

// One unit in one pass: four vectors (16 elements) a step, each with its own partial sum of squares and its
// own inf/NaN mask, so the order of the additions is fixed; the last < 16 elements one at a time.
template <class From, bool Overwrite>
Part run(const typename From::Storage* __restrict g, float* __restrict m, int64_t n, float s) {
  f4 sq[4] = {};
  i4 bad[4] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 4; ++k) {
      const f4 p = From::four(g + i + 4 * k) * s;  // the product rounded here: never a fused multiply-add
      const f4 v = Overwrite ? p : load<f4>(m + i + 4 * k) + p;
      std::memcpy(m + i + 4 * k, &v, sizeof v);
      sq[k] += v * v;
      bad[k] |= (v - v) != 0.0f;  // 0 for a finite value, NaN (unequal) for inf or NaN
    }
  }
  float tail_sq = 0.0f;
  bool tail_bad = false;
  for (; i < n; ++i) {
    const float p = From::one(g[i]) * s;
    const float v = Overwrite ? p : m[i] + p;
    m[i] = v;
    tail_sq += v * v;
    tail_bad = tail_bad || (v - v) != 0.0f;
  }
  Part out;
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < 4; ++l) {
      out.sq += sq[k][l];
      out.non_finite = out.non_finite || bad[k][l] != 0;
    }
  out.sq += tail_sq;
  out.non_finite = out.non_finite || tail_bad;
  return out;
}

template <bool Overwrite>
Part run_code(uint8_t code, const void* g, float* m, int64_t n, float s) {
  switch (code) {
    case kF32: return run<F32, Overwrite>(static_cast<const float*>(g), m, n, s);
    case kF16: return run<F16, Overwrite>(static_cast<const uint16_t*>(g), m, n, s);
    case kBF16: return run<BF16, Overwrite>(static_cast<const uint16_t*>(g), m, n, s);
  }
  throw std::invalid_argument("gaccum._cpu: unknown gradient dtype code");
}

struct Unit {
  const void* g;
  float* m;
  int64_t n;
  uint8_t code;
};

std::pair<double, bool> accumulate(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& masters,
                                   const std::vector<int64_t>& sizes, const std::vector<uint8_t>& dtypes,
                                   float s, bool overwrite, int threads) {
  const size_t count = grads.size();
  if (masters.size() != count || sizes.size() != count || dtypes.size() != count)
    throw std::invalid_argument("gaccum._cpu: gradients, masters, sizes and dtypes differ in length");
  std::vector<Unit> units;
  int64_t total = 0;
  for (size_t t = 0; t < count; ++t) {
    if (dtypes[t] > kBF16) throw std::invalid_argument("gaccum._cpu: unknown gradient dtype code");
    if (sizes[t] < 0) throw std::invalid_argument("gaccum._cpu: a negative size");
    const size_t width = dtypes[t] == kF32 ? 4 : 2;
    for (int64_t a = 0; a < sizes[t]; a += kUnit) {
      const void* g = reinterpret_cast<const char*>(grads[t]) + a * width;
      units.push_back({g, reinterpret_cast<float*>(masters[t]) + a, std::min(kUnit, sizes[t] - a), dtypes[t]});
    }
    total += sizes[t];
  }
  std::vector<Part> parts(units.size());
  auto work = [&](size_t lo, size_t hi) {
    for (size_t u = lo; u < hi; ++u) {
      const Unit& x = units[u];
      parts[u] = overwrite ? run_code<true>(x.code, x.g, x.m, x.n, s) : run_code<false>(x.code, x.g, x.m, x.n, s);
    }
  };
  const size_t workers =
      total < kSerialBelow ? 1 : std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads), units.size()));
  {
    pybind11::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers; ++w) {
      const size_t lo = units.size() * w / workers, hi = units.size() * (w + 1) / workers;
      try {
        pool.emplace_back(work, lo, hi);
      } catch (const std::system_error&) {  // no thread to be had: this one does the share
        work(lo, hi);
      }
    }
    work(0, units.size() / workers);
    for (auto& t : pool) t.join();
  }
  double sq = 0.0;  // unit by unit, in order: the same sum for any number of threads
  bool non_finite = false;
  for (const Part& p : parts) {
    sq += p.sq;
    non_finite = non_finite || p.non_finite;
  }
  return {sq, non_finite};
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "gaccum's fused CPU pass (csrc/cpu/accumulate.cpp): unscale, check and accumulate in one pass";
  m.def("accumulate", &accumulate, pybind11::arg("grads"), pybind11::arg("masters"), pybind11::arg("sizes"),
        pybind11::arg("dtypes"), pybind11::arg("inv_scale"), pybind11::arg("overwrite"), pybind11::arg("threads"),
        "masters (+)= grads * inv_scale for contiguous tensors at the given addresses; returns (the sum of "
        "squares of the updated masters, whether any of them is inf/NaN)");
}
