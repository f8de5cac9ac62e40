// The int8-weight matvec of batch-1 decode on CPU, as an XLA FFI custom call (jaxswift/kernels/int8_matvec.py):
//
//   y[R, O] (float32) = x[R, I] (float32) @ codes[O, I]^T (int8) * scale[O]      for R = 1..8 rows (decoding)
//
// XLA:CPU has no int8-weight dot: it converts the whole int8 weight to a float temporary before the dot, or, as a
// reduction over the codes, runs a loop slower than Eigen's float matvec. Decoding one token is memory-bound, so
// reading 1 byte per weight instead of 4 is the whole gain: here each code is read once from memory, converted to
// float in a register and multiplied into every row of x (which stays in L1). Activations stay float32, so the
// result is the dequantized weight's matmul up to float summation order.
//
// The output channels are split into one contiguous chunk per thread; the calling thread and XLA's intra-op pool
// (Ctx<ThreadPool>, the threads XLA's own dots use) claim chunks from one atomic counter. The caller never waits
// for a chunk nobody has started, so a late, busy or missing pool thread costs parallelism, never a deadlock.
//
// jaxswift/kernels/int8_matvec.py compiles this with -O3 -march=native on the machine that runs it: the AVX-512 or
// AVX2 loop below is chosen at compile time by what that machine has; other machines get the plain loop.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define JAXSWIFT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define JAXSWIFT_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;  // DECODE_ROWS in quant/serving.py: more rows take XLA's dot instead

// Software prefetch distance. A tile's TO rows are one contiguous block, but the hardware prefetcher sees TO short
// interleaved streams (a row is I bytes: 576 for SmolLM2) and ramps up too late for each. Fetching the block this
// far ahead made the one-thread loop over SmolLM2's projections ~1.5x faster (4-32 KB measured alike; 8 KB kept).
constexpr int64_t kPrefetchBytes = 8192;

struct Problem {
  const float* x;      // [R, I]
  const int8_t* w;     // [O, I]
  const float* scale;  // [O]
  float* y;            // [R, O]
  int64_t R, I, O;
};

inline void prefetch([[maybe_unused]] const Problem& p, [[maybe_unused]] int64_t offset) {
#if defined(JAXSWIFT_AVX512) || defined(JAXSWIFT_AVX2)
  if (offset < p.O * p.I) _mm_prefetch(reinterpret_cast<const char*>(p.w + offset), _MM_HINT_T0);
#endif
}

// TO output channels at once against all R rows: R * TO independent accumulators keep several FMAs in flight, and
// each converted code vector is used R times. Rows o..o+TO-1 are bytes [o * I, (o + TO) * I) of the codes; each
// step consumes TO * W of them and prefetches as many, kPrefetchBytes ahead.
template <int R, int TO>
inline void tile(const Problem& p, int64_t o) {
  const int8_t* w = p.w + o * p.I;
  [[maybe_unused]] const int64_t ahead = o * p.I + kPrefetchBytes;
  int64_t i = 0;
#if defined(JAXSWIFT_AVX512)
  __m512 acc[R][TO];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TO; ++t) acc[r][t] = _mm512_setzero_ps();
  auto step = [&](__mmask16 m) {  // 16 inputs (masked: the last I % 16, nothing read past a row)
    __m512 wf[TO];
    for (int t = 0; t < TO; ++t)
      wf[t] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + t * p.I + i)));
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, p.x + r * p.I + i);
      for (int t = 0; t < TO; ++t) acc[r][t] = _mm512_fmadd_ps(xv, wf[t], acc[r][t]);
    }
  };
  for (; i + 16 <= p.I; i += 16) {
    for (int b = 0; b < TO * 16; b += 64) prefetch(p, ahead + TO * i + b);
    step(static_cast<__mmask16>(0xFFFF));
  }
  if (i < p.I) step(static_cast<__mmask16>((1u << (p.I - i)) - 1));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TO; ++t) p.y[r * p.O + o + t] = _mm512_reduce_add_ps(acc[r][t]) * p.scale[o + t];
#else
#if defined(JAXSWIFT_AVX2)
  __m256 acc[R][TO];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TO; ++t) acc[r][t] = _mm256_setzero_ps();
  for (; i + 8 <= p.I; i += 8) {
    if (i % 64 == 0)
      for (int b = 0; b < TO * 64; b += 64) prefetch(p, ahead + TO * i + b);
    __m256 wf[TO];
    for (int t = 0; t < TO; ++t)
      wf[t] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + t * p.I + i))));
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(p.x + r * p.I + i);
      for (int t = 0; t < TO; ++t) acc[r][t] = _mm256_fmadd_ps(xv, wf[t], acc[r][t]);
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TO; ++t) {
      float sum = 0.0f;
#if defined(JAXSWIFT_AVX2)
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
#endif
      for (int64_t j = i; j < p.I; ++j) sum += p.x[r * p.I + j] * static_cast<float>(w[t * p.I + j]);
      p.y[r * p.O + o + t] = sum * p.scale[o + t];
    }
#endif
}

template <int R>
void channels(const Problem& p, int64_t begin, int64_t end) {
  constexpr int TO = R <= 2 ? 4 : R <= 4 ? 2 : 1;
  int64_t o = begin;
  for (; o + TO <= end; o += TO) tile<R, TO>(p, o);
  for (; o < end; ++o) tile<R, 1>(p, o);  // the last (end - begin) % TO channels
}

void run_channels(const Problem& p, int64_t begin, int64_t end) {
  switch (p.R) {
    case 1: return channels<1>(p, begin, end);
    case 2: return channels<2>(p, begin, end);
    case 3: return channels<3>(p, begin, end);
    case 4: return channels<4>(p, begin, end);
    case 5: return channels<5>(p, begin, end);
    case 6: return channels<6>(p, begin, end);
    case 7: return channels<7>(p, begin, end);
    default: return channels<8>(p, begin, end);
  }
}

// Chunks of output channels, claimed by whichever thread gets there first. Shared (not on the caller's stack): a
// pool task may start after the caller has run every chunk and returned; it then finds nothing to claim.
struct Job {
  Problem p;
  int64_t chunk = 0, chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run_channels(p, c * chunk, std::min(p.O, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many weight bytes per thread, handing work to a pool thread costs about what the bandwidth it adds
// saves. On a 2-core machine, SmolLM2's decode step took the same time (within noise) with its projections (at
// most 885 KB) on one thread or split at 64 KB; its 28 MB output projection and larger models' weights do split.
constexpr int64_t kMinBytesPerThread = 1024 * 1024;

// One chunk per thread, so each streams one long run. Smaller chunks balance a late starter better but restart the
// prefetch at every chunk boundary, and measured slower over SmolLM2's projections (4 per thread: ~1.2x the time).
// At most one thread per core: XLA sizes its pool by devices too (8 virtual CPU devices give 8 threads on 2 cores).
int64_t cores() {
  static const int64_t n = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return n;
}

void run(const Problem& p, ffi::ThreadPool& pool) {
  const int64_t threads =
      std::max<int64_t>(1, std::min({pool.num_threads(), cores(), p.O * p.I / kMinBytesPerThread}));
  if (threads == 1) return run_channels(p, 0, p.O);
  auto job = std::make_shared<Job>();
  job->p = p;
  job->chunk = ((p.O + threads - 1) / threads + 3) / 4 * 4;  // whole 4-channel tiles
  job->chunks = (p.O + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < job->chunks; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  // Every chunk is claimed now: wait only for those another thread is running (one chunk's time at most).
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spins) {
    if (spins > 4096) std::this_thread::yield();  // that thread may have been preempted: let it run
#if defined(JAXSWIFT_AVX512) || defined(JAXSWIFT_AVX2)
    else _mm_pause();
#endif
  }
}

ffi::Error Int8MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 1 || yd.size() != 2 || wd[1] != xd[1] || sd[0] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[0] || xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument(
        "jaxswift_int8_matvec: expected x [R, I] with 1 <= R <= 8, codes [O, I], scale [O] and y [R, O]");
  run(Problem{x.typed_data(), codes.typed_data(), scale.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]}, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matvec, Int8MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
