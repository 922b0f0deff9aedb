// kernel-check: csrc/'s kernel, built for the host with gaccum_emu.h, against a float64 reference.
//
// Every case builds its tensors in their own allocations with canaries on both sides (and views that
// start 1 or 3 elements in), runs one call of the real host launcher (so table packing, launch splitting
// and carry-over are the real code), and checks each master bit for bit against
//     e = float32( (overwrite ? 0 : m) + float32(float64(g) * s) )
// (float64 then rounded gives the correctly rounded float32 of each step), found_inf against "set
// before, or any e non-finite", sq_norm against a float64 sum, gradients zeroed or untouched, and every
// canary intact. Run under ASan + UBSan (make kernel-check), ThreadSanitizer with blocks on two OS
// threads (a subset), and an FMA-contracting build.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gaccum_emu.h"

namespace gaccum {
void launch_unscale_check_accumulate(const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& masters,
                                     const std::vector<int64_t>& sizes, const std::vector<uint8_t>& dtypes,
                                     uintptr_t inv_scale, uintptr_t found_inf, uintptr_t sq_norm, bool overwrite,
                                     bool zero_grad, uintptr_t stream_handle);
}

namespace {

constexpr int64_t kChunk = 65536;
constexpr int kCanary = 64;  // bytes on each side of every buffer
constexpr unsigned char kCanaryByte = 0xA5;
const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
float uniform(uint64_t seed, int64_t k, float lo, float hi) {
  const uint64_t h = mix(seed * 0x100000001b3ull ^ (uint64_t)k);
  return lo + (hi - lo) * (float)((h >> 40) * (1.0 / 16777216.0));
}

int esize(int dt) { return dt == 0 ? 4 : 2; }
const char* dname(int dt) { return dt == 0 ? "fp32" : dt == 1 ? "fp16" : "bf16"; }

// The value a gradient of dtype dt holds when asked to hold v (rounded as the dtype rounds).
float as_dtype(int dt, float v) {
  if (dt == 1) return __half2float(__float2half(v));
  if (dt == 2) return __bfloat162float(__float2bfloat16(v));
  return v;
}
void store(int dt, unsigned char* p, int64_t k, float v) {
  if (dt == 0) std::memcpy(p + 4 * k, &v, 4);
  else {
    const uint16_t b = dt == 1 ? __float2half(v).bits : __float2bfloat16(v).bits;
    std::memcpy(p + 2 * k, &b, 2);
  }
}
float load(int dt, const unsigned char* p, int64_t k) {
  if (dt == 0) {
    float v;
    std::memcpy(&v, p + 4 * k, 4);
    return v;
  }
  uint16_t b;
  std::memcpy(&b, p + 2 * k, 2);
  return dt == 1 ? __half2float(__half{b}) : __bfloat162float(__nv_bfloat16{b});
}

struct Special {
  int64_t at;
  float value;
};

struct Tensor {
  int dt = 0;
  int64_t n = 0;
  int goff = 0, moff = 0;  // elements into their buffers: misaligned views
  uint64_t seed = 0;
  std::vector<Special> g_special, m_special;
  std::vector<unsigned char> gbuf, mbuf;  // canary | offset | data | canary
  float gfree = 8.f;                      // gradients drawn from [-gfree, gfree)

  float g0(int64_t k) const {
    for (const Special& s : g_special)
      if (s.at == k) return as_dtype(dt, s.value);
    return as_dtype(dt, uniform(seed, k, -gfree, gfree));
  }
  float m0(int64_t k) const {
    for (const Special& s : m_special)
      if (s.at == k) return s.value;
    return uniform(seed + 7, k, -4.f, 4.f);
  }
  unsigned char* g() { return gbuf.data() + kCanary + goff * esize(dt); }
  float* m() { return reinterpret_cast<float*>(mbuf.data() + kCanary + moff * 4); }
};

struct Case {
  std::string name;
  std::vector<Tensor> t;
  float inv_scale = 1.f;
  bool overwrite = false, zero_grad = false, norm = false;
  float found_init = 0.f;
  int64_t want_launches = -1;  // when set: the launcher must split the call into this many launches
};

std::vector<unsigned char> with_canaries(std::size_t bytes) {
  // 64 canary bytes before keep the data 16-byte aligned (std::vector<unsigned char> storage from new is).
  return std::vector<unsigned char>(bytes + 2 * kCanary, kCanaryByte);
}

bool canaries_ok(const std::vector<unsigned char>& b, std::size_t used_from, std::size_t used_to) {
  for (std::size_t i = 0; i < b.size(); ++i)
    if ((i < used_from || i >= used_to) && b[i] != kCanaryByte) return false;
  return true;
}

bool same(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

float reference(const Case& c, const Tensor& t, int64_t k) {
  const double p = (double)t.g0(k) * (double)c.inv_scale;
  const float pf = (float)p;  // the product rounded to float32 first
  const double m = c.overwrite ? 0.0 : (double)t.m0(k);
  return (float)(m + (double)pf);
}

int failures = 0;
long long n_cases = 0;

bool fail(const Case& c, const std::string& what) {
  std::fprintf(stderr, "kernel-check FAILED [%s]: %s\n", c.name.c_str(), what.c_str());
  ++failures;
  return false;
}

bool run(Case& c) {
  ++n_cases;
  std::vector<uintptr_t> gp, mp;
  std::vector<int64_t> sizes;
  std::vector<uint8_t> dts;
  for (Tensor& t : c.t) {
    t.gbuf = with_canaries((t.n + t.goff) * esize(t.dt));
    t.mbuf = with_canaries((t.n + t.moff) * 4);
    for (int64_t k = 0; k < t.n; ++k) {
      store(t.dt, t.g(), k, t.g0(k));
      t.m()[k] = t.m0(k);
    }
    gp.push_back(reinterpret_cast<uintptr_t>(t.g()));
    mp.push_back(reinterpret_cast<uintptr_t>(t.m()));
    sizes.push_back(t.n);
    dts.push_back((uint8_t)t.dt);
  }
  std::vector<unsigned char> scal = with_canaries(12);
  float* inv_scale = reinterpret_cast<float*>(scal.data() + kCanary);
  float* found_inf = inv_scale + 1;
  float* sq = inv_scale + 2;
  *inv_scale = c.inv_scale;
  *found_inf = c.found_init;
  const float sq_init = 0.5f;
  *sq = sq_init;
  const auto before = gaccum_emu::stats();
  try {
    gaccum::launch_unscale_check_accumulate(gp, mp, sizes, dts, reinterpret_cast<uintptr_t>(inv_scale),
                                            reinterpret_cast<uintptr_t>(found_inf),
                                            c.norm ? reinterpret_cast<uintptr_t>(sq) : 0, c.overwrite, c.zero_grad, 0);
  } catch (const std::exception& e) {
    return fail(c, std::string("the launcher threw: ") + e.what());
  }
  const auto after = gaccum_emu::stats();
  if (c.want_launches >= 0 && (int64_t)(after.launches - before.launches) != c.want_launches)
    return fail(c, "expected " + std::to_string(c.want_launches) + " launches, got " +
                       std::to_string(after.launches - before.launches));
  bool any_bad = false;
  double sum = 0.0;
  for (std::size_t i = 0; i < c.t.size(); ++i) {
    Tensor& t = c.t[i];
    for (int64_t k = 0; k < t.n; ++k) {
      const float e = reference(c, t, k);
      const float got = t.m()[k];
      if (!same(got, e)) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "tensor %zu (%s, n=%lld, views +%d/+%d) element %lld (chunk %lld): master %.9g, "
                      "expected %.9g (m0 %.9g, g %.9g, s %.9g)", i, dname(t.dt), (long long)t.n, t.goff, t.moff,
                      (long long)k, (long long)(k / kChunk), got, e, t.m0(k), t.g0(k), c.inv_scale);
        return fail(c, msg);
      }
      any_bad |= !std::isfinite(e);
      sum += (double)e * (double)e;
      const float gnow = load(t.dt, t.g(), k);
      const float gwant = c.zero_grad ? 0.f : t.g0(k);
      if (!same(gnow, gwant)) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "tensor %zu element %lld: gradient %.9g after the call, expected %.9g%s", i,
                      (long long)k, gnow, gwant, c.zero_grad ? " (zero_grad)" : " (untouched)");
        return fail(c, msg);
      }
    }
    const std::size_t gfrom = kCanary + t.goff * esize(t.dt), mfrom = kCanary + t.moff * 4;
    if (!canaries_ok(t.gbuf, gfrom, gfrom + t.n * esize(t.dt)))
      return fail(c, "tensor " + std::to_string(i) + ": a write outside its gradient");
    if (!canaries_ok(t.mbuf, mfrom, mfrom + t.n * 4))
      return fail(c, "tensor " + std::to_string(i) + ": a write outside its master");
  }
  if (!canaries_ok(scal, kCanary, kCanary + 12)) return fail(c, "a write outside inv_scale/found_inf/sq_norm");
  if (*inv_scale != c.inv_scale) return fail(c, "inv_scale was written");
  const float want_found = (any_bad || c.found_init != 0.f) ? 1.f : 0.f;
  if (*found_inf != want_found)
    return fail(c, "found_inf is " + std::to_string(*found_inf) + ", expected " + std::to_string(want_found) +
                       (c.found_init != 0.f ? " (it was set before the call and must never be cleared)" : ""));
  if (c.norm && !any_bad) {
    const double want = sq_init + sum;
    if (std::fabs((double)*sq - want) > 1e-4 * want + 1e-6)
      return fail(c, "sq_norm " + std::to_string(*sq) + ", expected " + std::to_string(want));
  }
  if (!c.norm && *sq != sq_init) return fail(c, "sq_norm was written though none was asked for");
  for (Tensor& t : c.t) {  // free as we go: the big cases need the memory
    std::vector<unsigned char>().swap(t.gbuf);
    std::vector<unsigned char>().swap(t.mbuf);
  }
  return true;
}

// The squared norm does not depend on the order the blocks run in: 41 blocks in the natural order and in a
// permuted one give the same bits (each block writes its partial; one block adds them in a fixed order).
void reproducible_norm(gaccum_emu::Schedule sched) {
  ++n_cases;
  const int64_t n = 40 * kChunk + 123;
  std::vector<float> g(n);
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  for (float& v : g) v = dist(rng);
  float got[2];
  for (int k = 0; k < 2; ++k) {
    std::vector<float> m(n, 0.25f);
    float scal[3] = {0.5f, 0.f, 0.f};  // inv_scale, found_inf, sq_norm
    sched.seed = k ? 104729 : 0;
    gaccum_emu::set_schedule(sched);
    gaccum::launch_unscale_check_accumulate({reinterpret_cast<uintptr_t>(g.data())}, {reinterpret_cast<uintptr_t>(m.data())},
                                            {n}, {0}, reinterpret_cast<uintptr_t>(&scal[0]),
                                            reinterpret_cast<uintptr_t>(&scal[1]), reinterpret_cast<uintptr_t>(&scal[2]),
                                            false, false, 0);
    got[k] = scal[2];
  }
  if (std::memcmp(&got[0], &got[1], sizeof(float)) != 0) {
    std::fprintf(stderr, "kernel-check FAILED [reproducible norm]: %.9g in the natural block order, %.9g in a "
                 "permuted one\n", got[0], got[1]);
    ++failures;
  }
}

Tensor tensor(int dt, int64_t n, uint64_t seed, int goff = 0, int moff = 0) {
  Tensor t;
  t.dt = dt;
  t.n = n;
  t.seed = seed;
  t.goff = goff;
  t.moff = moff;
  return t;
}

const float kScales[] = {1.f, 0.25f, 1.f / 3.f, 1.f / 65536.f, 3.f};
const int64_t kSizes[] = {0, 1, 7, 8, 9, 15, 17, 4097, 65535, 65536, 65537, 3 * 65536 + 5};  // odd: vector body + tail
const int kViews[][2] = {{0, 0}, {1, 1}, {3, 0}, {0, 3}};
struct Mode {
  const char* name;
  bool overwrite, zero_grad, norm;
};
const Mode kModes[] = {{"add", false, false, false},
                       {"overwrite", true, false, false},
                       {"zero_grad", false, true, false},
                       {"sq_norm", false, false, true},
                       {"overwrite+zero_grad+sq_norm", true, true, true}};

// Every dtype x mode x size x view, one tensor per call; then all sizes in one mixed call.
void core(bool quick) {
  uint64_t seed = 1;
  for (int dt = 0; dt < 3; ++dt)
    for (const Mode& md : kModes)
      for (int64_t n : kSizes)
        for (const auto& v : kViews) {
          if (quick && n > 65537) continue;
          Case c;
          c.name = std::string("core ") + dname(dt) + " " + md.name + " n=" + std::to_string(n) + " views +" +
                   std::to_string(v[0]) + "/+" + std::to_string(v[1]);
          c.t.push_back(tensor(dt, n, ++seed, v[0], v[1]));
          c.inv_scale = kScales[seed % 5];
          c.overwrite = md.overwrite;
          c.zero_grad = md.zero_grad;
          c.norm = md.norm;
          run(c);
        }
  for (const Mode& md : kModes) {
    Case c;
    c.name = std::string("mixed dtypes, all sizes, one call ") + md.name;
    int i = 0;
    for (int64_t n : kSizes)
      for (const auto& v : kViews) c.t.push_back(tensor(i++ % 3, n, ++seed, v[0], v[1]));
    c.inv_scale = 0.25f;
    c.overwrite = md.overwrite;
    c.zero_grad = md.zero_grad;
    c.norm = md.norm;
    run(c);
  }
}

// +inf, -inf and NaN at a chunk's first, a middle and its last element, in the vector and the scalar path.
void specials() {
  uint64_t seed = 1000;
  const float values[] = {kInf, -kInf, kNaN};
  const int64_t where[] = {kChunk, kChunk + 32771, 2 * kChunk - 1};
  for (int dt = 0; dt < 3; ++dt)
    for (int path = 0; path < 2; ++path)
      for (int64_t at : where)
        for (float v : values) {
          Case c;
          c.name = std::string("special ") + dname(dt) + (path ? " scalar path" : " vector path") + " " +
                   std::to_string(v) + " at " + std::to_string(at);
          Tensor t = path ? tensor(dt, 2 * kChunk + 3, ++seed, 1, 1) : tensor(dt, 2 * kChunk, ++seed);
          t.g_special.push_back({at, v});
          c.t.push_back(t);
          c.t.push_back(tensor(dt, 1000, ++seed));  // a finite neighbour in the same launch
          c.inv_scale = 0.5f;
          c.norm = (at & 1) != 0;
          run(c);
        }
  // Overflow the gradient alone would not show: g * s, m + g, and a master that was already non-finite.
  struct Over {
    const char* name;
    int dt;
    float m, g, s;
  } overs[] = {{"g*s overflows under an opposite m (an FMA would hide it)", 0, -3e38f, 3e38f, 2.f},
               {"m + g overflows", 0, 3e38f, 3e38f, 1.f},
               {"fp16 g times a large inv_scale", 1, 0.f, 65504.f, 1e35f},
               {"master already inf", 2, kInf, 1.f, 1.f},
               {"master already NaN", 0, kNaN, 1.f, 1.f}};
  for (const Over& o : overs)
    for (int path = 0; path < 2; ++path) {
      Case c;
      c.name = std::string("overflow: ") + o.name + (path ? " (scalar path)" : " (vector path)");
      Tensor t = path ? tensor(o.dt, 9, ++seed, 1, 3) : tensor(o.dt, 64, ++seed);
      t.gfree = 1.f;
      t.m_special.push_back({5, o.m});
      t.g_special.push_back({5, o.g});
      c.t.push_back(t);
      c.inv_scale = o.s;
      run(c);
    }
  // found_inf is never cleared: set before a call whose results are all finite.
  for (int dt = 0; dt < 3; ++dt)
    for (bool ow : {false, true}) {
      Case c;
      c.name = std::string("found_inf stays set ") + dname(dt) + (ow ? " overwrite" : "");
      c.t.push_back(tensor(dt, 70001, ++seed));
      c.t.push_back(tensor(dt, 13, ++seed, 1, 1));
      c.found_init = 1.f;
      c.overwrite = ow;
      run(c);
    }
}

// Tensor counts around the 448-tensor table, mixed dtypes, odd sizes, zeros and misaligned views.
void counts(const std::vector<int>& ns) {
  uint64_t seed = 5000;
  for (int count : ns) {
    Case c;
    c.name = "tensor count " + std::to_string(count);
    for (int i = 0; i < count; ++i) {
      const uint64_t h = mix(seed + i);
      const int64_t n = (h % 7 == 0) ? 0 : (int64_t)(h % 300);
      c.t.push_back(tensor((int)(h % 3), n, seed + i, (int)((h >> 8) % 2), (int)((h >> 9) % 2) * 3));
    }
    seed += count;
    c.inv_scale = 0.125f;
    c.norm = count % 2;
    run(c);
  }
}

// More than 65,535 tensors (the uint16 block->tensor index is per launch, never global).
void many() {
  Case c;
  c.name = "65,540 tensors";
  for (int i = 0; i < 65540; ++i) c.t.push_back(tensor(i % 3, 1 + i % 2, 90000 + i));
  c.inv_scale = 2.f;
  run(c);
}

// A tensor spanning three launches, after one that starts the first launch, so the 2560-block limit
// falls mid-tensor twice and its table entry must be carried into each next launch.
void big() {
  Case c;
  c.name = "one tensor across three launches";
  c.t.push_back(tensor(2, 70000, 424242));  // 2 chunks: the big one starts at block 2
  // 5,119 chunks from block 2: 2,558 in the first launch, 2,560 in the second, the last in the third.
  c.t.push_back(tensor(2, 5118 * kChunk + 17, 434343));
  c.t.push_back(tensor(0, 3 * kChunk, 444444, 1, 1));  // and a misaligned one after it in the third launch
  c.inv_scale = 0.5f;
  c.want_launches = 3;
  run(c);
}

// For ThreadSanitizer, with blocks on two OS threads: what blocks share -- the norm's partial sums, found_inf
// set by many blocks at once, tables across launches.
void subset() {
  Case a;
  a.name = "subset: sq_norm over 12 blocks";
  a.t.push_back(tensor(0, 6 * kChunk + 5, 77));
  a.t.push_back(tensor(1, 6 * kChunk - 1, 78, 1, 1));
  a.norm = true;
  a.inv_scale = 0.5f;
  run(a);
  Case b;
  b.name = "subset: an inf in every block";
  Tensor t = tensor(2, 8 * kChunk, 79);
  for (int64_t k = 0; k < 8; ++k) t.g_special.push_back({k * kChunk + 100, kInf});
  b.t.push_back(t);
  run(b);
  counts({449});
}

// Two entries of one call naming the same master (refused in Python): on a GPU two blocks race on it.
// Under ThreadSanitizer with two workers this must be reported; the planted-bug test checks that it is.
void race_demo() {
  const int64_t n = 7 * kChunk;  // 7 blocks each: the two updates of chunk 0 are blocks 0 and 7, on two workers
  std::vector<float> m(n, 0.f), g(n, 1.f);
  const uintptr_t mp = reinterpret_cast<uintptr_t>(m.data()), gp = reinterpret_cast<uintptr_t>(g.data());
  float s = 1.f, found = 0.f;
  gaccum::launch_unscale_check_accumulate({gp, gp}, {mp, mp}, {n, n}, {0, 0},
                                          reinterpret_cast<uintptr_t>(&s), reinterpret_cast<uintptr_t>(&found), 0,
                                          false, false, 0);
  std::printf("race-demo: master[0] = %g (2 if the updates were not lost)\n", m[0]);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, with_big = false, with_many = false, only_subset = false, race = false;
  gaccum_emu::Schedule sched;
  int orders = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--big") with_big = true;
    else if (a == "--many") with_many = true;
    else if (a == "--subset") only_subset = true;
    else if (a == "--race-demo") race = true;
    else if (a == "--workers" && i + 1 < argc) sched.workers = std::atoi(argv[++i]);
    else if (a == "--orders" && i + 1 < argc) orders = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--quick | --subset] [--big] [--many] [--race-demo] [--workers N] [--orders K]\n", argv[0]);
      return 2;
    }
  }
  if (race || only_subset) {
    gaccum_emu::set_schedule(sched);
    if (race) race_demo();
    if (only_subset) subset();
    orders = 0;
  }
  for (int o = 0; o < orders && failures == 0; ++o) {
    sched.seed = (uint64_t)o * 7919;  // 0: natural thread and block orders; then permuted ones
    gaccum_emu::set_schedule(sched);
    core(quick || o > 0);
    if (failures) break;
    specials();
    if (failures) break;
    counts(quick ? std::vector<int>{449, 897} : std::vector<int>{447, 448, 449, 896, 897});
  }
  if (!failures && !race && !only_subset) reproducible_norm(sched);
  sched.seed = 0;
  gaccum_emu::set_schedule(sched);
  if (!failures && with_many) many();
  if (!failures && with_big) big();
  const auto s = gaccum_emu::stats();
  std::printf("kernel-check: %lld cases, %s; %llu launches, %llu blocks, %llu emulated threads, largest parameter "
              "block %llu bytes, %d worker thread(s), %d order(s)\n",
              n_cases, failures ? "FAILED" : "all equal to the float64 reference", (unsigned long long)s.launches,
              (unsigned long long)s.blocks, (unsigned long long)s.threads, (unsigned long long)s.max_param_bytes,
              sched.workers, orders);
  return failures ? 1 : 0;
}
