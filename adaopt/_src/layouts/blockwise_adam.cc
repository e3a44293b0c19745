// Adam's and Lion's steps with 8-bit blockwise moments (bitsandbytes' dynamic maps), for XLA:CPU as FFI custom calls.
//
// XLA:CPU runs the code lookups of a quantized moment as scalar loops (benchmarks/RESULTS.md, "Where the
// light states' steps spend their time"); this kernel does the whole step of a leaf in one pass over its
// blocks: dequantize both moments, update them, write the step, and quantize them again in place. The
// arithmetic is that of adaopt's traced step (storage.Blockwise and optimizers/adam.py), operation for
// operation in float32, with the fused multiply-adds that XLA:CPU makes in its chunked step (the moments to
// quantize as fma(old, b, g * (1 - b)), the step's as fma(g, 1 - b, old * b)) and its division by a block's
// scale as a product by the reciprocal: the same numbers as that step.
//
// Built on first use by adaopt/_src/layouts/cpu_kernels.py, with the host's C++ compiler and JAX's FFI headers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ADAOPT_AVX512 1
#endif

namespace ffi = xla::ffi;

namespace {

// The scalars of the step, in this order in the `scalars` argument (Lion reads the betas and the floor).
struct Scalars {
  float b1, one_minus_b1, b2, one_minus_b2, debias1, debias2, eps, eps_root, scale_floor;
};

struct Job {
  const float* g;
  const uint8_t* m_codes;
  const float* m_scale;
  const uint8_t* v_codes;
  const float* v_scale;
  float* step;
  uint8_t* m_codes_out;
  float* m_scale_out;
  uint8_t* v_codes_out;
  float* v_scale_out;
  const float* map1;
  const float* map2;
  const uint32_t* search1;
  const uint32_t* search2;
  Scalars s;
  int64_t n, block;
  bool safe_divide, eps_root, scale_floor;
  bool lion;  // Lion's step: one moment (m), no second
};

// storage.nearest_index for float32: one lookup by the top 16 bits, one comparison of the low 16 bits.
inline uint8_t Nearest(float x, const uint32_t* table) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t low = (bits & 0xFFFFu) ^ ((bits >> 31) * 0xFFFFu);
  const uint32_t y = table[bits >> 16] - (low << 8);
  return static_cast<uint8_t>((y & 0xFFu) + (y >> 31));
}

// The block's scale: its largest magnitude, NaN elements left out (as XLA:CPU's reduction, and bitsandbytes'
// fmaxf, leave them), at least the floor.
inline float Scale(float largest, const Job& j) { return j.scale_floor ? std::max(largest, j.s.scale_floor) : largest; }

inline float Clip(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

inline float Step(float m, float v, const Job& j) {
  float inside = v * j.s.debias2;
  if (j.eps_root) inside = inside + j.s.eps_root;
  const float denominator = std::sqrt(inside) + j.s.eps;
  const float inverse = (j.safe_divide && denominator == 0.0f) ? 0.0f : 1.0f / denominator;
  return (m * j.s.debias1) * inverse;
}

// A block's new moment `values` stored: its scale (Scale of its `largest` magnitude), then each value's code, found
// from the value times the scale's reciprocal, as XLA:CPU computes it.
void StoreScalar(const Job& j, int64_t b, int64_t start, int64_t length, const float* values, float largest,
                 const uint32_t* search, uint8_t* codes, float* scales) {
  const float scale = Scale(largest, j);
  scales[b] = scale;
  const float inverse = 1.0f / (scale > 0.0f ? scale : 1.0f);
  for (int64_t k = 0; k < length; ++k) codes[start + k] = Nearest(Clip(values[k] * inverse), search);
}

// Elements [start, start + length) of block b, one element at a time (any block size, the last partial block).
void BlockScalar(const Job& j, int64_t b, int64_t start, int64_t length, float* m_new, float* v_new) {
  const float m_scale = j.m_scale[b], v_scale = j.v_scale[b];
  float m_largest = 0.0f, v_largest = 0.0f;
  for (int64_t k = 0; k < length; ++k) {
    const int64_t i = start + k;
    const float g = j.g[i];
    const float m_old = j.map1[j.m_codes[i]] * m_scale, v_old = j.map2[j.v_codes[i]] * v_scale;
    const float m = std::fma(m_old, j.s.b1, g * j.s.one_minus_b1);
    const float v = std::fma(v_old, j.s.b2, (g * g) * j.s.one_minus_b2);
    m_new[k] = m;
    v_new[k] = v;
    m_largest = std::max(m_largest, std::fabs(m));  // a NaN compares false: left out
    v_largest = std::max(v_largest, std::fabs(v));
    j.step[i] = Step(std::fma(g, j.s.one_minus_b1, m_old * j.s.b1), std::fma(g * g, j.s.one_minus_b2, v_old * j.s.b2), j);
  }
  StoreScalar(j, b, start, length, m_new, m_largest, j.search1, j.m_codes_out, j.m_scale_out);
  StoreScalar(j, b, start, length, v_new, v_largest, j.search2, j.v_codes_out, j.v_scale_out);
}

#ifdef ADAOPT_AVX512
inline __m512 Decode(const uint8_t* codes, const float* map) {
  const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_i32gather_ps(index, map, 4);
}

inline __m128i Encode(__m512 x, const uint32_t* table) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i ffff = _mm512_set1_epi32(0xFFFF);
  const __m512i negative = _mm512_srai_epi32(bits, 31);  // all ones for a negative float
  const __m512i low = _mm512_xor_si512(_mm512_and_si512(bits, ffff), _mm512_and_si512(negative, ffff));
  const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), reinterpret_cast<const int*>(table), 4);
  const __m512i y = _mm512_sub_epi32(entry, _mm512_slli_epi32(low, 8));
  const __m512i index = _mm512_add_epi32(_mm512_and_si512(y, _mm512_set1_epi32(0xFF)), _mm512_srli_epi32(y, 31));
  return _mm512_cvtepi32_epi8(index);
}

inline __m512 ClipVector(__m512 x) {
  // NaN stays NaN, as in the scalar Clip and jnp.clip: max and min return their second operand when either is NaN.
  return _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), x));
}

// StoreScalar for a whole block whose size is a multiple of 16, its largest magnitude still a vector's lanes.
void StoreVector(const Job& j, int64_t b, int64_t start, const float* values, __m512 largest, const uint32_t* search,
                 uint8_t* codes, float* scales) {
  const float scale = Scale(_mm512_reduce_max_ps(largest), j);
  scales[b] = scale;
  const __m512 inverse = _mm512_set1_ps(1.0f / (scale > 0.0f ? scale : 1.0f));
  for (int64_t k = 0; k < j.block; k += 16) {
    const __m128i code = Encode(ClipVector(_mm512_mul_ps(_mm512_load_ps(values + k), inverse)), search);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + start + k), code);
  }
}

// A whole block whose size is a multiple of 16.
void BlockVector(const Job& j, int64_t b, int64_t start, float* m_new, float* v_new) {
  const __m512 b1 = _mm512_set1_ps(j.s.b1), c1 = _mm512_set1_ps(j.s.one_minus_b1);
  const __m512 b2 = _mm512_set1_ps(j.s.b2), c2 = _mm512_set1_ps(j.s.one_minus_b2);
  const __m512 d1 = _mm512_set1_ps(j.s.debias1), d2 = _mm512_set1_ps(j.s.debias2);
  const __m512 eps = _mm512_set1_ps(j.s.eps), eps_root = _mm512_set1_ps(j.s.eps_root);
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 m_scale = _mm512_set1_ps(j.m_scale[b]), v_scale = _mm512_set1_ps(j.v_scale[b]);
  __m512 m_largest = zero, v_largest = zero;
  for (int64_t k = 0; k < j.block; k += 16) {
    const int64_t i = start + k;
    const __m512 g = _mm512_loadu_ps(j.g + i);
    const __m512 g2 = _mm512_mul_ps(g, g);
    const __m512 m_old = _mm512_mul_ps(Decode(j.m_codes + i, j.map1), m_scale);
    const __m512 v_old = _mm512_mul_ps(Decode(j.v_codes + i, j.map2), v_scale);
    const __m512 m = _mm512_fmadd_ps(m_old, b1, _mm512_mul_ps(g, c1));
    const __m512 v = _mm512_fmadd_ps(v_old, b2, _mm512_mul_ps(g2, c2));
    const __m512 m_step = _mm512_fmadd_ps(g, c1, _mm512_mul_ps(m_old, b1));
    const __m512 v_step = _mm512_fmadd_ps(g2, c2, _mm512_mul_ps(v_old, b2));
    _mm512_store_ps(m_new + k, m);
    _mm512_store_ps(v_new + k, v);
    m_largest = _mm512_max_ps(_mm512_abs_ps(m), m_largest);  // max gives its second operand for a NaN
    v_largest = _mm512_max_ps(_mm512_abs_ps(v), v_largest);
    __m512 inside = _mm512_mul_ps(v_step, d2);
    if (j.eps_root) inside = _mm512_add_ps(inside, eps_root);
    const __m512 denominator = _mm512_add_ps(_mm512_sqrt_ps(inside), eps);
    __m512 inverse = _mm512_div_ps(one, denominator);
    if (j.safe_divide) inverse = _mm512_mask_mov_ps(inverse, _mm512_cmp_ps_mask(denominator, zero, _CMP_EQ_OQ), zero);
    _mm512_storeu_ps(j.step + i, _mm512_mul_ps(_mm512_mul_ps(m_step, d1), inverse));
  }
  StoreVector(j, b, start, m_new, m_largest, j.search1, j.m_codes_out, j.m_scale_out);
  StoreVector(j, b, start, v_new, v_largest, j.search2, j.v_codes_out, j.v_scale_out);
}
#endif

// Lion: the step is sign(b1 m + (1 - b1) g) (zero and NaN kept, as jnp.sign), the moment b2 m + (1 - b2) g; the
// same two forms of fused multiply-add as Adam's step (the moment to quantize, the value the step reads).
inline float Sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }

void LionScalar(const Job& j, int64_t b, int64_t start, int64_t length, float* m_new) {
  const float m_scale = j.m_scale[b];
  float m_largest = 0.0f;
  for (int64_t k = 0; k < length; ++k) {
    const int64_t i = start + k;
    const float g = j.g[i];
    const float m_old = j.map1[j.m_codes[i]] * m_scale;
    const float m = std::fma(m_old, j.s.b2, g * j.s.one_minus_b2);
    m_new[k] = m;
    m_largest = std::max(m_largest, std::fabs(m));
    j.step[i] = Sign(std::fma(g, j.s.one_minus_b1, m_old * j.s.b1));
  }
  StoreScalar(j, b, start, length, m_new, m_largest, j.search1, j.m_codes_out, j.m_scale_out);
}

#ifdef ADAOPT_AVX512
void LionVector(const Job& j, int64_t b, int64_t start, float* m_new) {
  const __m512 b1 = _mm512_set1_ps(j.s.b1), c1 = _mm512_set1_ps(j.s.one_minus_b1);
  const __m512 b2 = _mm512_set1_ps(j.s.b2), c2 = _mm512_set1_ps(j.s.one_minus_b2);
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f), zero = _mm512_setzero_ps();
  const __m512 m_scale = _mm512_set1_ps(j.m_scale[b]);
  __m512 m_largest = zero;
  for (int64_t k = 0; k < j.block; k += 16) {
    const int64_t i = start + k;
    const __m512 g = _mm512_loadu_ps(j.g + i);
    const __m512 m_old = _mm512_mul_ps(Decode(j.m_codes + i, j.map1), m_scale);
    const __m512 m = _mm512_fmadd_ps(m_old, b2, _mm512_mul_ps(g, c2));
    _mm512_store_ps(m_new + k, m);
    m_largest = _mm512_max_ps(_mm512_abs_ps(m), m_largest);
    const __m512 x = _mm512_fmadd_ps(g, c1, _mm512_mul_ps(m_old, b1));
    __m512 sign = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), one);
    sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), minus_one);
    _mm512_storeu_ps(j.step + i, sign);
  }
  StoreVector(j, b, start, m_new, m_largest, j.search1, j.m_codes_out, j.m_scale_out);
}
#endif

// Blocks [first, last) of the leaf.
void Blocks(const Job& j, int64_t first, int64_t last) {
  // The new moments of one block, kept between computing its scale and quantizing it.
  const int64_t capacity = (j.block + 15) / 16 * 16;
  std::unique_ptr<float[], void (*)(void*)> buffer(
      static_cast<float*>(std::aligned_alloc(64, 2 * capacity * sizeof(float))), std::free);
  float* m_new = buffer.get();
  float* v_new = buffer.get() + capacity;
  for (int64_t b = first; b < last; ++b) {
    const int64_t start = b * j.block, length = std::min(j.block, j.n - start);
#ifdef ADAOPT_AVX512
    if (length == j.block && j.block % 16 == 0) {
      j.lion ? LionVector(j, b, start, m_new) : BlockVector(j, b, start, m_new, v_new);
      continue;
    }
#endif
    j.lion ? LionScalar(j, b, start, length, m_new) : BlockScalar(j, b, start, length, m_new, v_new);
  }
}

// The blocks in chunks that the calling thread and the intra-op pool's threads claim one at a time. The caller
// waits only for chunks claimed by running threads, so a pool busy elsewhere delays nothing: a task that starts
// after every chunk is claimed finds none and ends (the state it reads is shared, not on the caller's stack).
struct Work {
  Job job;
  int64_t blocks, per_chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      Blocks(job, c * per_chunk, std::min(blocks, (c + 1) * per_chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Every block of the leaf, on the calling thread and the pool's.
void Launch(ffi::ThreadPool& pool, const Job& job) {
  auto work = std::make_shared<Work>();
  work->job = job;
  work->blocks = (job.n + job.block - 1) / job.block;
  work->per_chunk = std::max<int64_t>(1, 16384 / job.block);  // 64 KiB of float32 per chunk
  work->chunks = (work->blocks + work->per_chunk - 1) / work->per_chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
}

// Whether a moment's codes, scales, map and search table fit a leaf of n elements in blocks of block_size.
bool Fits(int64_t n, int64_t block_size, const ffi::Buffer<ffi::U8>& codes, const ffi::Buffer<ffi::F32>& scales,
          const ffi::Buffer<ffi::F32>& map, const ffi::Buffer<ffi::U32>& search) {
  const int64_t blocks = (n + block_size - 1) / block_size;
  return codes.element_count() == static_cast<size_t>(n) && scales.element_count() == static_cast<size_t>(blocks) &&
         map.element_count() == 256 && search.element_count() == 65536;
}

ffi::Error BlockwiseAdam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> m_codes,
                         ffi::Buffer<ffi::F32> m_scale, ffi::Buffer<ffi::U8> v_codes, ffi::Buffer<ffi::F32> v_scale,
                         ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> map1, ffi::Buffer<ffi::F32> map2,
                         ffi::Buffer<ffi::U32> search1, ffi::Buffer<ffi::U32> search2, int64_t block_size,
                         int32_t safe_divide, int32_t eps_root, int32_t scale_floor, ffi::ResultBuffer<ffi::F32> step,
                         ffi::ResultBuffer<ffi::U8> m_codes_out, ffi::ResultBuffer<ffi::F32> m_scale_out,
                         ffi::ResultBuffer<ffi::U8> v_codes_out, ffi::ResultBuffer<ffi::F32> v_scale_out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  if (block_size <= 0) return ffi::Error::InvalidArgument("block_size must be positive");
  if (!Fits(n, block_size, m_codes, m_scale, map1, search1) || !Fits(n, block_size, v_codes, v_scale, map2, search2) ||
      scalars.element_count() != 9) {
    return ffi::Error::InvalidArgument("blockwise Adam: arguments of unexpected sizes");
  }
  Job j{g.typed_data(),          m_codes.typed_data(),     m_scale.typed_data(),     v_codes.typed_data(),
        v_scale.typed_data(),    step->typed_data(),       m_codes_out->typed_data(), m_scale_out->typed_data(),
        v_codes_out->typed_data(), v_scale_out->typed_data(), map1.typed_data(),       map2.typed_data(),
        search1.typed_data(),    search2.typed_data(),     {},                       n,
        block_size,              safe_divide != 0,         eps_root != 0,            scale_floor != 0,
        false};
  std::memcpy(&j.s, scalars.typed_data(), sizeof(Scalars));
  Launch(pool, j);
  return ffi::Error::Success();
}

ffi::Error BlockwiseLion(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> m_codes,
                         ffi::Buffer<ffi::F32> m_scale, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> map1,
                         ffi::Buffer<ffi::U32> search1, int64_t block_size, int32_t scale_floor,
                         ffi::ResultBuffer<ffi::F32> step, ffi::ResultBuffer<ffi::U8> m_codes_out,
                         ffi::ResultBuffer<ffi::F32> m_scale_out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  if (block_size <= 0) return ffi::Error::InvalidArgument("block_size must be positive");
  if (!Fits(n, block_size, m_codes, m_scale, map1, search1) || scalars.element_count() != 9) {
    return ffi::Error::InvalidArgument("blockwise Lion: arguments of unexpected sizes");
  }
  Job j{g.typed_data(), m_codes.typed_data(), m_scale.typed_data(), nullptr, nullptr, step->typed_data(),
        m_codes_out->typed_data(), m_scale_out->typed_data(), nullptr, nullptr, map1.typed_data(), nullptr,
        search1.typed_data(), nullptr, {}, n, block_size, false, false, scale_floor != 0, true};
  std::memcpy(&j.s, scalars.typed_data(), sizeof(Scalars));
  Launch(pool, j);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaoptBlockwiseAdam, BlockwiseAdam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::U8>>()   // first moment's codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::Buffer<ffi::U8>>()   // second moment's codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the 9 scalars of Scalars
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the signed map
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the unsigned map
                                  .Arg<ffi::Buffer<ffi::U32>>()  // their search tables
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int32_t>("safe_divide")
                                  .Attr<int32_t>("eps_root")
                                  .Attr<int32_t>("scale_floor")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the step
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaoptBlockwiseLion, BlockwiseLion,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::U8>>()   // the moment's codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the 9 scalars of Scalars (the betas, the floor)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the signed map
                                  .Arg<ffi::Buffer<ffi::U32>>()  // its search table
                                  .Attr<int64_t>("block_size")
                                  .Attr<int32_t>("scale_floor")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the step
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
