// Adam's and Lion's steps with blockwise quantized moments, for XLA:CPU as FFI custom calls: 8-bit codes into
// bitsandbytes' dynamic maps, 4-bit codes into torchao's maps (two a byte), or FP8 (E4M3) values.
//
// XLA:CPU runs the code lookups of a quantized moment as scalar loops (benchmarks/RESULTS.md, "Where the
// light states' steps spend their time"); this kernel does the whole step of a leaf in one pass over its
// blocks: dequantize both moments, update them, write the step, and quantize them again in place. The
// arithmetic is that of adaopt's traced step (storage.Blockwise and optimizers/adam.py), operation for
// operation in float32, with the fused multiply-adds that XLA:CPU makes in its chunked step (Adam's moments as
// fma(g, 1 - b, old * b); Lion's moment to quantize as fma(old, b, g * (1 - b)) for 8-bit and 4-bit codes, the
// other form for FP8 and for its step) and its division by a block's scale as a product by the reciprocal: the
// same numbers as that step (tests/test_cpu_kernels.py checks it at XLA's default options).
//
// Built on first use by adaopt/_src/layouts/cpu_kernels.py, with the host's C++ compiler and JAX's FFI headers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ADAOPT_AVX512 1
#define ADAOPT_VECTOR 1
#if defined(__AVX512VBMI__)
#define ADAOPT_LOOKUP64 1  // 8-bit codes looked up 64 at a time (Vec::Lookup64)
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ADAOPT_AVX2 1
#define ADAOPT_VECTOR 1
#endif

namespace ffi = xla::ffi;

namespace {

// How a moment is stored (storage.Blockwise.format): a code a byte into a map of 256 entries, two codes a byte
// (the first in the high half) into a map of 16, or float8_e4m3fn values of the elements over their block's scale
// (the "map" is then the 256 values of the codes).
enum Format : int32_t { kDynamic8 = 0, kDynamic4 = 1, kFp8 = 2 };

// The scalars of the step, in this order in the `scalars` argument (Lion reads the betas and the floor). The floor
// is the scales' (FP8's: the storage's floor over 448, as storage.Blockwise.encode compares it).
struct Scalars {
  float b1, one_minus_b1, b2, one_minus_b2, debias1, debias2, eps, eps_root, scale_floor;
};

// An 8-bit map searched by arithmetic (Vec::Codes8) instead of the 64K-entry search table, whose gather took half an
// 8-bit step's time. The code of x is the number of the map's float32 midpoints below x (storage.nearest_index).
// bitsandbytes' dynamic maps are runs of equally spaced entries (one a decade), mirrored about their 0 entry (`zero`),
// the signed one with 1 on top. For y = |x|, or the float above |x| where x is negative (as many midpoints are then
// at most |x| as are below y: a tie goes to the entry further from 0, the lower code), the run is found from y's
// binade i (exponent 96 + i, i = 0..31, every smaller y in the first), which holds at most one run's lowest midpoint
// (`bound[i]`, else inf) above the `below[i]` runs that start under it; and within run r (counted from 1, 0 for the
// zero entry alone) the count is floor(y * slope[r] + offset[r]), at most last[r]. The run's midpoints, where the
// count grows, lie within kBand / 2 of the integers of that line (checked when it is prepared) and the line grows with
// y: so the floor is exact wherever y * slope + offset is further than kBand from an integer. Nearer, and for NaN, the
// vector's codes come from the search table (about 1% of vectors of 16).
constexpr float kBand = 1.0f / 4096;

struct Search8 {
  bool ok;  // the map has this form (Search8Of); else the vector steps take the search table
  int32_t zero;
  bool nonnegative;  // ok, and its lowest entry is 0 (zero is 0)
  float bound[32];
  int32_t below[32];
  float slope[16], offset[16];
  int32_t last[16];
};

// One moment of a leaf: its codes and scales, where the new ones go, its map and its map's search table, and for a
// 4-bit map its 15 midpoints rounded to float32 (storage._search_table's, by which a float32 x's code is the number
// of them below x).
struct Moment {
  const uint8_t* codes;
  const float* scale;
  uint8_t* codes_out;
  float* scale_out;
  const float* map;
  const uint32_t* search;
  float midpoints[15];
  float levels[4][16];  // the midpoint each level of the vector search compares, by the count so far (SetSearch)
  bool sixteenths;       // a 4-bit map of k / 16, k = 1..16 (storage.linear_map), whose codes need no search
  uint8_t planes[4][256];  // an 8-bit map's entries as their bytes, byte k of each in planes[k]
  Search8 search8;         // an 8-bit map's arithmetic search
};

struct Job {
  const float* g;
  float* step;
  Moment m, v;  // Lion's step has no v
  Scalars s;
  int64_t n, block;
  bool safe_divide, eps_root, scale_floor;
};

// storage.nearest_index for float32: one lookup by the top 16 bits, one comparison of the low 16 bits.
inline uint8_t Nearest(float x, const uint32_t* table) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t low = (bits & 0xFFFFu) ^ ((bits >> 31) * 0xFFFFu);
  const uint32_t y = table[bits >> 16] - (low << 8);
  return static_cast<uint8_t>((y & 0xFFu) + (y >> 31));
}

// storage._e4m3_bits: float32 rounded to float8_e4m3fn (ties to even), NaN (0x7F) above 464, with x's sign.
inline uint8_t E4m3(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  uint32_t code;
  if (magnitude > 0x43E80000u) {
    code = 0x7Fu;
  } else if (magnitude < 0x3C800000u) {  // below 2**-6: multiples of 2**-9
    float a;
    std::memcpy(&a, &magnitude, 4);
    code = static_cast<uint32_t>(std::nearbyint(a * 512.0f));
  } else {
    code = ((magnitude + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20) - (120u << 3);
  }
  return static_cast<uint8_t>(code | ((bits >> 24) & 0x80u));
}

// The start of a block's running maximum: XLA's reduction starts at -inf, so a block of NaN alone has the scale -inf
// (its moments NaN from then on, as XLA's); a partial last block also holds the zeros XLA pads it with.
inline float Lowest(const Job& j, int64_t length) {
  return length < j.block ? 0.0f : -std::numeric_limits<float>::infinity();
}

inline float Clip(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// The value (before its scale) of element i of a moment.
template <int F>
inline float Value(const Moment& q, int64_t i) {
  if constexpr (F == kDynamic4) {
    const uint8_t byte = q.codes[i >> 1];
    return q.map[(i & 1) ? (byte & 0xFu) : (byte >> 4)];
  } else {
    return q.map[q.codes[i]];
  }
}

// The code of x, an element over its block's scale.
template <int F>
inline uint8_t Code(float x, const uint32_t* search) {
  if constexpr (F == kFp8) {
    return E4m3(x);
  } else {
    return Nearest(Clip(x), search);
  }
}

// The block's scale: its largest magnitude (over 448 for FP8), NaN elements left out (as XLA:CPU's reduction, and
// bitsandbytes' fmaxf, leave them), at least the floor.
template <int F>
inline float Scale(float largest, const Job& j) {
  const float scale = F == kFp8 ? largest * (1.0f / 448.0f) : largest;  // XLA:CPU divides by a constant so
  return j.scale_floor ? std::max(scale, j.s.scale_floor) : scale;
}

// How a block's values are divided by its scale, as XLA:CPU computes it: times the scale's reciprocal (1 for a
// scale of 0), the values first times `pre`, 1/4 where the reciprocal would be subnormal (a scale above 2**126),
// which XLA:CPU flushes to 0 (storage._over).
struct Divisor {
  float pre, inverse;
};

inline Divisor DivisorOf(float scale) {
  const float divisor = scale > 0.0f ? scale : 1.0f;
  const float pre = divisor > 0x1p126f ? 0.25f : 1.0f;
  return {pre, 1.0f / (divisor * pre)};
}

inline float Step(float m, float v, const Job& j) {
  float inside = v * j.s.debias2;
  if (j.eps_root) inside = inside + j.s.eps_root;
  const float denominator = std::sqrt(inside) + j.s.eps;
  const float inverse = (j.safe_divide && denominator == 0.0f) ? 0.0f : 1.0f / denominator;
  return (m * j.s.debias1) * inverse;
}

// A block's new moment `values` stored: its scale (Scale of its `largest` magnitude), then each value's code, found
// from the value times the scale's reciprocal, as XLA:CPU computes it. 4-bit codes fill the whole block's bytes: a
// partial last block's padding is stored as XLA stores it, the code of 0.
template <int F>
void StoreScalar(const Job& j, const Moment& q, int64_t b, int64_t start, int64_t length, const float* values,
                 float largest) {
  const float scale = Scale<F>(largest, j);
  q.scale_out[b] = scale;
  const Divisor d = DivisorOf(scale);
  if constexpr (F == kDynamic4) {
    const auto code = [&](int64_t k) { return Code<F>(k < length ? values[k] * d.pre * d.inverse : 0.0f, q.search); };
    for (int64_t k = 0; k < j.block; k += 2) q.codes_out[(start + k) >> 1] = (code(k) << 4) | code(k + 1);
  } else {
    for (int64_t k = 0; k < length; ++k) q.codes_out[start + k] = Code<F>(values[k] * d.pre * d.inverse, q.search);
  }
}

// Elements [start, start + length) of block b, one element at a time (any block size, the last partial block).
template <int F>
void BlockScalar(const Job& j, int64_t b, int64_t start, int64_t length, float* m_new, float* v_new) {
  const float m_scale = j.m.scale[b], v_scale = j.v.scale[b];
  float m_largest = Lowest(j, length), v_largest = m_largest;
  for (int64_t k = 0; k < length; ++k) {
    const int64_t i = start + k;
    const float g = j.g[i];
    const float m_old = Value<F>(j.m, i) * m_scale, v_old = Value<F>(j.v, i) * v_scale;
    const float m = std::fma(g, j.s.one_minus_b1, m_old * j.s.b1);
    const float v = std::fma(g * j.s.one_minus_b2, g, v_old * j.s.b2);  // (1 - b2) g g: finite to |g| 1e20
    m_new[k] = m;
    v_new[k] = v;
    m_largest = std::max(m_largest, std::fabs(m));  // a NaN compares false: left out
    v_largest = std::max(v_largest, std::fabs(v));
    j.step[i] = Step(m, v, j);
  }
  StoreScalar<F>(j, j.m, b, start, length, m_new, m_largest);
  StoreScalar<F>(j, j.v, b, start, length, v_new, v_largest);
}

// The vector forms of the steps, for a whole block whose size is a multiple of the vector's lanes: `Vec` holds the
// instruction set's operations, one lane per element, and the generic code below reads them only (the arithmetic
// and its order are the scalar path's, lane by lane).
#if defined(ADAOPT_AVX512)
struct Vec {
  static constexpr int64_t kLanes = 16;
  using F = __m512;
  struct Map16 {
    __m512 t;  // a 4-bit map's 16 entries
  };

  static F Set(float x) { return _mm512_set1_ps(x); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Div(F a, F b) { return _mm512_div_ps(a, b); }
  static F Sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, rounded once
  static F Abs(F a) { return _mm512_abs_ps(a); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  static F Min(F a, F b) { return _mm512_min_ps(a, b); }
  static float ReduceMax(F a) { return _mm512_reduce_max_ps(a); }  // of lanes without NaN
  static bool AnyNan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
  // `x` where `where` is false, `y` where it is true.
  static F Where(__mmask16 where, F x, F y) { return _mm512_mask_mov_ps(x, where, y); }
  static __mmask16 Equal(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static __mmask16 Greater(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static __mmask16 Less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  // x clipped to [-1, 1], NaN kept, as the scalar Clip and jnp.clip (max and min return their second operand when
  // either is NaN): what the search table codes.
  static F Clip(F x) { return Min(Set(1.0f), Max(Set(-1.0f), x)); }

#if defined(ADAOPT_LOOKUP64)
  // A map of 256 entries as four planes of bytes in 16 registers (Moment.planes, 64 entries a register): a code's four
  // bytes are found by AVX512-VBMI's two-register byte permutes, 64 codes at a time. A gather from the map (about 12
  // ns for 16 lanes where the microcode mitigates "gather data sampling") took longer than the rest of an element's
  // step, and permutes of its floats, 16 at a time, more than twice as long as these.
  struct Map256 {
    __m512i plane[4][4];
  };
  static Map256 LoadMap256(const Moment& q) {
    Map256 m;
    for (int k = 0; k < 4; ++k) {
      for (int r = 0; r < 4; ++r) m.plane[k][r] = _mm512_loadu_si512(q.planes[k] + 64 * r);
    }
    return m;
  }
  // Byte k of the map's entries at 64 codes: a permute of 128 entries by the codes' low 7 bits, their top bit choosing.
  static __m512i Plane(const Map256& map, int k, __m512i codes, __mmask64 top) {
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(map.plane[k][0], codes, map.plane[k][1]),
                                  _mm512_permutex2var_epi8(map.plane[k][2], codes, map.plane[k][3]));
  }
  // The map's entries at 64 codes, written to out[0..64). The bytes of each entry are interleaved by unpacks, which
  // work within 128-bit lanes: the codes are first put in the order that makes each output register 16 consecutive
  // entries (byte 16 L + 4 q + d of the reordered codes is code 16 q + 4 L + d).
  static void Lookup64(const Map256& map, const uint8_t* codes, float* out) {
    alignas(64) static constexpr uint8_t kOrder[64] = {
        0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
        22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
        56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    const __m512i ordered = _mm512_permutexvar_epi8(_mm512_load_si512(kOrder), _mm512_loadu_si512(codes));
    const __mmask64 top = _mm512_movepi8_mask(ordered);
    const __m512i b0 = Plane(map, 0, ordered, top), b1 = Plane(map, 1, ordered, top);
    const __m512i b2 = Plane(map, 2, ordered, top), b3 = Plane(map, 3, ordered, top);
    const __m512i low01 = _mm512_unpacklo_epi8(b0, b1), high01 = _mm512_unpackhi_epi8(b0, b1);
    const __m512i low23 = _mm512_unpacklo_epi8(b2, b3), high23 = _mm512_unpackhi_epi8(b2, b3);
    _mm512_storeu_si512(out, _mm512_unpacklo_epi16(low01, low23));
    _mm512_storeu_si512(out + 16, _mm512_unpackhi_epi16(low01, low23));
    _mm512_storeu_si512(out + 32, _mm512_unpacklo_epi16(high01, high23));
    _mm512_storeu_si512(out + 48, _mm512_unpackhi_epi16(high01, high23));
  }
  // The map's entries at the codes (a byte each) of 16 elements (blocks not a multiple of 64): as Lookup64, the codes
  // ordered so that the first output register holds them.
  static F Lookup(const Map256& map, const uint8_t* codes) {
    alignas(64) static constexpr uint8_t kOrder[64] = {0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                       4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                       8, 9, 10, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                       12, 13, 14, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m512i loaded = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __m512i ordered = _mm512_permutexvar_epi8(_mm512_load_si512(kOrder), loaded);
    const __mmask64 top = _mm512_movepi8_mask(ordered);
    const __m512i low01 = _mm512_unpacklo_epi8(Plane(map, 0, ordered, top), Plane(map, 1, ordered, top));
    const __m512i low23 = _mm512_unpacklo_epi8(Plane(map, 2, ordered, top), Plane(map, 3, ordered, top));
    return _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));
  }
#else
  // A map of 256 entries in 16 registers: a gather from it (about 12 ns for 16 lanes where the microcode
  // mitigates "gather data sampling") took longer than the rest of an element's step.
  struct Map256 {
    __m512 t[16];
  };
  static Map256 LoadMap256(const Moment& q) {
    Map256 m;
    for (int k = 0; k < 16; ++k) m.t[k] = _mm512_loadu_ps(q.map + 16 * k);
    return m;
  }
  // The map's entries at the codes (a byte each) of 16 elements: a two-register permute for each 32 entries (by the
  // code's low five bits), then its bits 5, 6 and 7 choose among the eight.
  static F Lookup(const Map256& map, const uint8_t* codes) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __mmask16 bit5 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
    const __mmask16 bit6 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(64));
    const __mmask16 bit7 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(128));
    __m512 part[4];
    for (int k = 0; k < 4; ++k) {
      part[k] = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(map.t[4 * k], index, map.t[4 * k + 1]),
                                     _mm512_permutex2var_ps(map.t[4 * k + 2], index, map.t[4 * k + 3]));
    }
    return _mm512_mask_blend_ps(bit7, _mm512_mask_blend_ps(bit6, part[0], part[1]),
                                _mm512_mask_blend_ps(bit6, part[2], part[3]));
  }
#endif
  // The values of 16 float8_e4m3fn codes (storage._from_e4m3's): each code's bits moved into a binary16's (the sign on
  // top, the 4 exponent bits the low 4 of its 5, the 3 mantissa bits the top of its 10), converted exactly, times 2**8
  // (the exponent bias 15 for 7); the code 0x7F, then 480, as XLA's quiet NaN with its sign (permutes of the 256
  // values took twice as long).
  static F FromE4m3(const uint8_t* codes) {
    const __m256i shifted =
        _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))), 7);
    // The sign from bit 14 to bit 15.
    const __m256i half = _mm256_add_epi16(shifted, _mm256_and_si256(shifted, _mm256_set1_epi16(0x4000)));
    const F value = Mul(_mm512_cvtph_ps(half), Set(256.0f));
    const __m512i nan = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(value), _mm512_set1_epi32(0x80000000)),
                                        _mm512_set1_epi32(0x7FC00000));
    return _mm512_mask_mov_ps(value, _mm512_cmp_ps_mask(Abs(value), Set(480.0f), _CMP_EQ_OQ), _mm512_castsi512_ps(nan));
  }
  static Map16 LoadMap16(const float* map) { return {_mm512_loadu_ps(map)}; }
  // The map's entries at the 4-bit codes of 16 elements, two a byte (the first in the high half): a register permute,
  // which reads the low four bits of each 32-bit lane. 64-bit lane k takes byte k's high half into its low 32 bits and
  // its low half into the high 32 bits (by AVX512-VBMI's bit-field select, else by shifts).
  static F Lookup4(const Map16& map, const uint8_t* bytes) {
#if defined(__AVX512VBMI__)
    // Lane k's byte 0 from bit 8k + 4 of the word, its byte 4 from bit 8k.
    const __m512i select = _mm512_set_epi64(0x380000003C, 0x3000000034, 0x280000002C, 0x2000000024, 0x180000001C,
                                            0x1000000014, 0x080000000C, 0x0000000004);
    int64_t word;
    std::memcpy(&word, bytes, 8);
    const __m512i index = _mm512_multishift_epi64_epi8(select, _mm512_set1_epi64(word));
#else
    const __m512i wide = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    const __m512i index = _mm512_or_si512(_mm512_srli_epi64(wide, 4), _mm512_slli_epi64(wide, 32));
#endif
    return _mm512_permutexvar_ps(index, map.t);
  }
  // storage.nearest_index of 16 elements, their codes a 32-bit lane each (Nearest: a byte each): as the scalar Nearest.
  static __m512i NearestIndex(F x, const uint32_t* table) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i ffff = _mm512_set1_epi32(0xFFFF);
    const __m512i negative = _mm512_srai_epi32(bits, 31);  // all ones for a negative float
    const __m512i low = _mm512_xor_si512(_mm512_and_si512(bits, ffff), _mm512_and_si512(negative, ffff));
    const __m512i entry =
        _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), reinterpret_cast<const int*>(table), 4);
    const __m512i y = _mm512_sub_epi32(entry, _mm512_slli_epi32(low, 8));
    return _mm512_add_epi32(_mm512_and_si512(y, _mm512_set1_epi32(0xFF)), _mm512_srli_epi32(y, 31));
  }
  static __m128i Nearest(F x, const uint32_t* table) { return _mm512_cvtepi32_epi8(NearestIndex(x, table)); }
  // Search8 in registers.
  struct Search8v {
    __m512 bound_low, bound_high, slope, offset;
    __m512i below_low, below_high, last, zero;
    bool ok, nonnegative;
  };
  static Search8v LoadSearch8(const Moment& q) {
    const Search8& s = q.search8;
    return {Load(s.bound),
            Load(s.bound + 16),
            Load(s.slope),
            Load(s.offset),
            _mm512_loadu_si512(s.below),
            _mm512_loadu_si512(s.below + 16),
            _mm512_loadu_si512(s.last),
            _mm512_set1_epi32(s.zero),
            s.ok,
            s.nonnegative};
  }
  // Nearest of 16 elements of an 8-bit map, x clipped to [-1, 1] first (a NaN kept): by Search8 where its map has that
  // form. `Signed` false only for a map whose lowest entry is 0 (Search8::nonnegative), whose codes of x < 0 are 0.
  template <bool Signed>
  static __m128i Codes8(F x, const Search8v& s, const uint32_t* table) {
    return _mm512_cvtepi32_epi8(Codes8Index<Signed>(x, s, table));
  }
  // Codes8 a 32-bit lane each.
  template <bool Signed>
  static __m512i Codes8Index(F x, const Search8v& s, const uint32_t* table) {
    const auto nearest = [&] { return NearestIndex(Clip(x), table); };
    if (!s.ok) return nearest();
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i one = _mm512_set1_epi32(0x3F800000);
    __mmask16 negative = 0;
    __m512i y;
    if constexpr (Signed) {
      // |x| at most 1 (a NaN's 1: the vector takes the table below), then for x < 0 the float above it
      negative = _mm512_movepi32_mask(bits);
      y = _mm512_min_epu32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), one);
      y = _mm512_mask_add_epi32(y, negative, y, _mm512_set1_epi32(1));
    } else {
      y = _mm512_min_epi32(_mm512_max_epi32(bits, _mm512_setzero_si512()), one);  // x < 0 as 0
    }
    // max(exponent - 96, 0), the exponent at most 127 (as 16-bit lanes: the top one's 0 - 96 saturates to 0)
    const __m512i binade = _mm512_subs_epu16(_mm512_srli_epi32(y, 23), _mm512_set1_epi32(96));
    const __m512 bound = _mm512_permutex2var_ps(s.bound_low, binade, s.bound_high);
    const __m512i below = _mm512_permutex2var_epi32(s.below_low, binade, s.below_high);
    const __m512i run = _mm512_mask_add_epi32(below, Less(bound, _mm512_castsi512_ps(y)), below, _mm512_set1_epi32(1));
    const F line =
        Fma(_mm512_castsi512_ps(y), _mm512_permutexvar_ps(run, s.slope), _mm512_permutexvar_ps(run, s.offset));
    const F fraction = _mm512_reduce_ps(line, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // line - floor(line)
    __mmask16 clear = _mm512_cmp_ps_mask(fraction, Set(kBand), _CMP_GE_OQ);
    clear = _mm512_mask_cmp_ps_mask(clear, fraction, Set(1.0f - kBand), _CMP_LE_OQ);
    clear = _mm512_mask_cmp_ps_mask(clear, x, x, _CMP_ORD_Q);
    if (__builtin_expect(clear != 0xFFFF, 0)) return nearest();
    const __m512i count = _mm512_min_epi32(_mm512_cvt_roundps_epi32(line, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                           _mm512_permutexvar_epi32(run, s.last));
    if constexpr (Signed) {
      // zero + count above 0, zero - count below (at least 0: the float above -1 may count the midpoint below 1)
      const __m512i code = _mm512_mask_sub_epi32(_mm512_add_epi32(s.zero, count), negative, s.zero, count);
      return _mm512_max_epi32(code, _mm512_setzero_si512());
    } else {
      return count;
    }
  }
  // A 4-bit map's 15 midpoints as the four levels of a binary search, in registers (a gather from the search table
  // costs as much as the rest of an element's step): Moment.levels.
  struct Search16 {
    F level[4];
    bool sixteenths;
  };
  static Search16 LoadSearch16(const Moment& q) {
    return {{Load(q.levels[0]), Load(q.levels[1]), Load(q.levels[2]), Load(q.levels[3])}, q.sixteenths};
  }
  // The scalar Nearest of 16 elements of a 4-bit map, their 4-bit codes stored two a byte: the number of its midpoints
  // below x, found by halving, each level's midpoint chosen by the count so far. It is the search table's answer for
  // every float but NaN, whose code depends on its bits: unless the caller knows x holds no NaN (`finite`), a vector
  // with a NaN takes Nearest.
  static void Codes4(uint8_t* p, F x, const Search16& s, const uint32_t* table, bool finite) {
    __m512i index;
    if (!finite && _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) {
      index = NearestIndex(Clip(x), table);
    } else if (finite && s.sixteenths) {
      // The midpoints of the map of k / 16 are (j + 1.5) / 16, j = 0..14, below x for j < 16 x - 1.5: ceil(16 x - 1.5)
      // of them, at most 15. 16 x - 1.5 is exact from 16 x = 0.75 on, and below it no midpoint is below x. The
      // finite x of a block is at most its scale's 1 (rounded), where the conversion cannot overflow.
      const __m512i above =
          _mm512_cvt_roundps_epi32(Fma(x, Set(16.0f), Set(-1.5f)), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
      index = _mm512_min_epi32(_mm512_max_epi32(above, _mm512_setzero_si512()), _mm512_set1_epi32(15));
    } else {
      index = _mm512_maskz_mov_epi32(Less(s.level[0], x), _mm512_set1_epi32(8));
      for (int k = 1; k < 4; ++k) {
        const F midpoint = _mm512_permutexvar_ps(index, s.level[k]);
        index = _mm512_mask_add_epi32(index, Less(midpoint, x), index, _mm512_set1_epi32(8 >> k));
      }
    }
    // Each 64-bit lane holds the codes of elements 2k (low half) and 2k + 1: their byte is (first << 4) | second.
    const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(index, 4), _mm512_srli_epi64(index, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm512_cvtepi64_epi8(pairs));
  }
  // The scalar E4m3 of 16 elements.
  static __m128i E4m3(F x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(magnitude, 20), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(magnitude, _mm512_set1_epi32(0x7FFFF)), odd);
    const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(rounded, 20), _mm512_set1_epi32(120 << 3));
    const __m512i small =
        _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(magnitude), _mm512_set1_ps(512.0f)));
    const __mmask16 subnormal = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(0x3C800000));
    __m512i code = _mm512_mask_mov_epi32(normal, subnormal, small);
    code = _mm512_mask_mov_epi32(code, _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x43E80000)),
                                 _mm512_set1_epi32(0x7F));
    code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80)));
    return _mm512_cvtepi32_epi8(code);
  }
  static void StoreCodes(uint8_t* p, __m128i codes) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), codes); }
#if defined(ADAOPT_LOOKUP64)
  // The low bytes of the 64 lanes of four vectors of codes, stored: two byte permutes of two vectors each and one
  // insert, where narrowing each vector (vpmovdb) takes two micro-operations (8-bit codes: 2% of their step; FP8's
  // no faster).
  static void StoreCodes64(uint8_t* p, const __m512i (&codes)[4]) {
    const __m512i low = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x7C787470, 0x6C686460, 0x5C585450, 0x4C484440,
                                         0x3C383430, 0x2C282420, 0x1C181410, 0x0C080400);
    const __m512i first = _mm512_permutex2var_epi8(codes[0], low, codes[1]);
    const __m512i second = _mm512_permutex2var_epi8(codes[2], low, codes[3]);
    _mm512_storeu_si512(p, _mm512_inserti64x4(first, _mm512_castsi512_si256(second), 1));
  }
#endif
};
#elif defined(ADAOPT_AVX2)
struct Vec {
  static constexpr int64_t kLanes = 8;
  using F = __m256;
  struct Map16 {
    __m256 low, high;  // entries 0-7 and 8-15
  };

  static F Set(float x) { return _mm256_set1_ps(x); }
  static F Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F Div(F a, F b) { return _mm256_div_ps(a, b); }
  static F Sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F Abs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static F Max(F a, F b) { return _mm256_max_ps(a, b); }  // b where either is NaN, as AVX-512's
  static F Min(F a, F b) { return _mm256_min_ps(a, b); }
  static float ReduceMax(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static bool AnyNan(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
  static F Where(F where, F x, F y) { return _mm256_blendv_ps(x, y, where); }
  static F Equal(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static F Greater(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static F Less(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F Clip(F x) { return Min(Set(1.0f), Max(Set(-1.0f), x)); }  // as AVX-512's

  struct Map256 {
    const float* map;
  };
  static Map256 LoadMap256(const Moment& q) { return {q.map}; }
  // Eight scalar loads: on Zen 3 a gather from the 1 KiB map took three times as long (the search table's gather,
  // in Nearest, is as fast as scalar loads).
  static F Lookup(const Map256& m, const uint8_t* codes) {
    const float* map = m.map;
    return _mm256_setr_ps(map[codes[0]], map[codes[1]], map[codes[2]], map[codes[3]], map[codes[4]], map[codes[5]],
                          map[codes[6]], map[codes[7]]);
  }
  // The values of 8 float8_e4m3fn codes, by integer arithmetic (storage._from_e4m3's): a gather is slower here.
  static F FromE4m3(const uint8_t* codes) {
    const __m256i bits = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x80)), 24);
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7F));
    const __m256i normal =
        _mm256_or_si256(sign, _mm256_slli_epi32(_mm256_add_epi32(magnitude, _mm256_set1_epi32(120 << 3)), 20));
    const __m256i small = _mm256_or_si256(
        sign, _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0f / 512.0f))));
    const __m256i value = _mm256_blendv_epi8(normal, small, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude));
    const __m256i nan = _mm256_or_si256(sign, _mm256_set1_epi32(0x7FC00000));
    return _mm256_castsi256_ps(
        _mm256_blendv_epi8(value, nan, _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7F))));
  }
  static Map16 LoadMap16(const float* map) { return {_mm256_loadu_ps(map), _mm256_loadu_ps(map + 8)}; }
  // Two permutes of eight entries each (by the code's low three bits), the code's fourth bit choosing between them.
  static F Lookup4(const Map16& map, const uint8_t* bytes) {
    int32_t word;
    std::memcpy(&word, bytes, 4);
    const __m128i packed = _mm_cvtsi32_si128(word);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble), low = _mm_and_si128(packed, nibble);
    const __m256i index = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(high, low));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(map.low, index), _mm256_permutevar8x32_ps(map.high, index),
                            _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }
  // The low byte of each 32-bit lane, the 8 bytes in the low half of the result (a truncation, as AVX-512's).
  static __m128i LowBytes(__m256i x) {
    const __m256i gather = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i bytes = _mm256_shuffle_epi8(x, gather);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
  }
  static __m128i Nearest(F x, const uint32_t* table) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i ffff = _mm256_set1_epi32(0xFFFF);
    const __m256i negative = _mm256_srai_epi32(bits, 31);
    const __m256i low = _mm256_xor_si256(_mm256_and_si256(bits, ffff), _mm256_and_si256(negative, ffff));
    const __m256i entry =
        _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), _mm256_srli_epi32(bits, 16), 4);
    const __m256i y = _mm256_sub_epi32(entry, _mm256_slli_epi32(low, 8));
    return LowBytes(_mm256_add_epi32(_mm256_and_si256(y, _mm256_set1_epi32(0xFF)), _mm256_srli_epi32(y, 31)));
  }
  // The arithmetic search of AVX-512's Codes8 needs its mask registers: the search table here.
  struct Search8v {
    bool nonnegative = false;
  };
  static Search8v LoadSearch8(const Moment&) { return {}; }
  template <bool Signed>
  static __m128i Codes8(F x, const Search8v&, const uint32_t* table) {
    return Nearest(Clip(x), table);
  }
  struct Search16 {
    F m7, t4, t2, t1;
  };
  static Search16 LoadSearch16(const Moment& q) {
    const float* m = q.midpoints;
    return {Set(m[7]), _mm256_setr_ps(m[3], m[11], 0, 0, 0, 0, 0, 0), _mm256_setr_ps(m[1], m[5], m[9], m[13], 0, 0, 0, 0),
            _mm256_setr_ps(m[0], m[2], m[4], m[6], m[8], m[10], m[12], m[14])};
  }
  // As AVX-512's, by permutes of eight entries.
  static void Codes4(uint8_t* p, F x, const Search16& s, const uint32_t* table, bool finite) {
    if (!finite && _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) {
      StoreCodes4(p, Nearest(Clip(x), table));
      return;
    }
    const auto count = [&](F midpoint, int by) {
      return _mm256_and_si256(_mm256_castps_si256(Less(midpoint, x)), _mm256_set1_epi32(by));
    };
    __m256i index = count(s.m7, 8);
    const auto halve = [&](F candidates, int shift, int by) {
      index = _mm256_add_epi32(index, count(_mm256_permutevar8x32_ps(candidates, _mm256_srli_epi32(index, shift)), by));
    };
    halve(s.t4, 3, 4);
    halve(s.t2, 2, 2);
    halve(s.t1, 1, 1);
    StoreCodes4(p, LowBytes(index));
  }
  // As AVX-512's; the magnitudes are below 2**31, so signed comparisons order them as unsigned ones.
  static __m128i E4m3(F x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(magnitude, 20), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(magnitude, _mm256_set1_epi32(0x7FFFF)), odd);
    const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(rounded, 20), _mm256_set1_epi32(120 << 3));
    const __m256i small =
        _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(512.0f)));
    const __m256i subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), magnitude);
    __m256i code = _mm256_blendv_epi8(normal, small, subnormal);
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x43E80000)));
    code = _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80)));
    return LowBytes(code);
  }
  static void StoreCodes(uint8_t* p, __m128i codes) { _mm_storel_epi64(reinterpret_cast<__m128i*>(p), codes); }
  static void StoreCodes4(uint8_t* p, __m128i codes) {
    const __m128i first = _mm_and_si128(codes, _mm_set1_epi16(0x00FF)), second = _mm_srli_epi16(codes, 8);
    const __m128i pairs = _mm_or_si128(_mm_slli_epi16(first, 4), second);
    const int32_t word = _mm_cvtsi128_si32(_mm_packus_epi16(pairs, pairs));
    std::memcpy(p, &word, 4);
  }
};
#endif

#ifdef ADAOPT_VECTOR
using VF = Vec::F;

// A moment's map as Decode reads it: the 16 entries of a 4-bit map or the 256 of an 8-bit one (FP8 codes are converted
// by arithmetic).
struct NoMap {};
template <int F>
using MapOf = std::conditional_t<F == kDynamic4, Vec::Map16, std::conditional_t<F == kFp8, NoMap, Vec::Map256>>;

template <int F>
inline MapOf<F> LoadMap(const Moment& q) {
  if constexpr (F == kDynamic4) {
    return Vec::LoadMap16(q.map);
  } else if constexpr (F == kFp8) {
    return {};
  } else {
    return Vec::LoadMap256(q);
  }
}

// The values (before their scale) of elements [i, i + kLanes) of a moment.
template <int F>
inline VF Decode(const uint8_t* codes, int64_t i, const MapOf<F>& map) {
  if constexpr (F == kDynamic4) {
    return Vec::Lookup4(map, codes + (i >> 1));
  } else if constexpr (F == kFp8) {
    return Vec::FromE4m3(codes + i);
  } else {
    return Vec::Lookup(map, codes + i);
  }
}

// The codes (a byte each) of kLanes elements over their block's scale, for 8-bit codes (`Signed`: Codes8's) and FP8.
template <int F, bool Signed>
inline __m128i Encode(VF x, const uint32_t* search, const Vec::Search8v& search8) {
  if constexpr (F == kFp8) {
    return Vec::E4m3(x);
  } else {
    return Vec::Codes8<Signed>(x, search8, search);
  }
}

// What the vector loops read of a moment, loaded once for a run of blocks into locals: the job's fields would be
// loaded again after each store of codes, which may alias them.
template <int F>
struct MomentVec {
  const uint8_t* codes;
  uint8_t* codes_out;
  const float* scale;
  float* scale_out;
  const uint32_t* search;
  MapOf<F> map;
  Vec::Search16 search16;
  Vec::Search8v search8;
};

template <int F>
MomentVec<F> VectorsOf(const Moment& q) {
  return {q.codes, q.codes_out, q.scale, q.scale_out, q.search, LoadMap<F>(q),
          F == kDynamic4 ? Vec::LoadSearch16(q) : Vec::Search16{},
          F == kDynamic8 ? Vec::LoadSearch8(q) : Vec::Search8v{}};
}

// And of the step: its scalars as vectors, the gradient and the step, the moments (Lion's step has no v).
template <int F>
struct StepVec {
  VF b1, c1, b2, c2, d1, d2, eps, eps_root;
  const float* g;
  float* step;
  int64_t block;
  bool add_eps_root, safe_divide;
  MomentVec<F> m, v;
};

template <int F>
StepVec<F> VectorsOf(const Job& j, bool lion) {
  const Scalars& s = j.s;
  return {Vec::Set(s.b1), Vec::Set(s.one_minus_b1), Vec::Set(s.b2), Vec::Set(s.one_minus_b2), Vec::Set(s.debias1),
          Vec::Set(s.debias2), Vec::Set(s.eps), Vec::Set(s.eps_root), j.g, j.step, j.block, j.eps_root,
          j.safe_divide, VectorsOf<F>(j.m), lion ? MomentVec<F>{} : VectorsOf<F>(j.v)};
}

// A block's scale, stored, from its largest magnitude still a vector's lanes: what StoreVector quantizes by.
// `finite` is a vector whose lanes are all finite when the block's values are (the values times 0, summed).
struct Scaled {
  VF inverse;   // Divisor::inverse, in every lane
  bool no_nan;  // the values over the scale hold no NaN (4-bit codes only)
  bool large;   // Divisor::pre is 1/4
};

template <int F>
[[gnu::always_inline]] inline Scaled ScaleVector(const Job& j, const MomentVec<F>& q, int64_t b, VF largest,
                                                 VF finite) {
  const float scale = Scale<F>(Vec::ReduceMax(largest), j);
  q.scale_out[b] = scale;
  const Divisor d = DivisorOf(scale);
  return {Vec::Set(d.inverse), F == kDynamic4 && !Vec::AnyNan(finite) && std::isfinite(d.inverse), d.pre != 1.0f};
}

// StoreScalar's codes for a whole block whose size is a multiple of kLanes. Inlined into the loop over blocks, as
// the block steps below, which then keeps the vectors of StepVec in registers. `Signed`: Codes8's (8-bit codes only).
template <int F, bool Signed = true>
[[gnu::always_inline]] inline void StoreVector(int64_t block, const MomentVec<F>& q, int64_t start,
                                                const float* values, Scaled scaled) {
  const auto over = [&](int64_t k) {
    const VF x = Vec::Load(values + k);
    return Vec::Mul(__builtin_expect(scaled.large, 0) ? Vec::Mul(x, Vec::Set(0.25f)) : x, scaled.inverse);
  };
  if constexpr (F == kDynamic4) {
    // A 4-bit code needs no clip: the midpoints of a map in [-1, 1] lie in it, so as many are below an x beyond it as
    // below -1 or 1. The products hold no NaN when the values and the reciprocal are finite.
    for (int64_t k = 0; k < block; k += Vec::kLanes) {
      Vec::Codes4(q.codes_out + ((start + k) >> 1), over(k), q.search16, q.search, scaled.no_nan);
    }
  } else {
#if defined(ADAOPT_LOOKUP64)
    if constexpr (F == kDynamic8) {
      if (block % 64 == 0) {
        for (int64_t k = 0; k < block; k += 64) {
          __m512i codes[4];
          for (int r = 0; r < 4; ++r) codes[r] = Vec::Codes8Index<Signed>(over(k + 16 * r), q.search8, q.search);
          Vec::StoreCodes64(q.codes_out + start + k, codes);
        }
        return;
      }
    }
#endif
    for (int64_t k = 0; k < block; k += Vec::kLanes) {
      Vec::StoreCodes(q.codes_out + start + k, Encode<F, Signed>(over(k), q.search, q.search8));
    }
  }
}

// A whole block's values (before their scale) of a moment, written to `values`, where its 8-bit codes can be looked up
// 64 at a time (Vec::Lookup64); false where the block step decodes 16 at a time instead.
template <int F>
[[gnu::always_inline]] inline bool DecodeBlock([[maybe_unused]] const StepVec<F>& p,
                                               [[maybe_unused]] const MomentVec<F>& q, [[maybe_unused]] int64_t start,
                                               [[maybe_unused]] float* values) {
#if defined(ADAOPT_LOOKUP64)
  if constexpr (F == kDynamic8) {
    if (p.block % 64 != 0) return false;
    for (int64_t k = 0; k < p.block; k += 64) Vec::Lookup64(q.map, q.codes + start + k, values + k);
    return true;
  }
#endif
  return false;
}

// A block whose new moments and scales are computed, its codes not yet stored (Blocks stores them after the next
// block's moments, so that its scales' latency, a reduction and a division, overlaps that work).
struct Pending {
  int64_t start;
  const float *m_new, *v_new;
  Scaled m, v;
};

template <int F, bool Lion>
[[gnu::always_inline]] inline void StoreCodes(const StepVec<F>& p, const Pending& pending) {
  StoreVector<F>(p.block, p.m, pending.start, pending.m_new, pending.m);
  if constexpr (!Lion) {
    // Codes into a map from 0 up (the second moment's) need no sign: those of x < 0 are all 0.
    if (p.v.search8.nonnegative) {
      StoreVector<F, false>(p.block, p.v, pending.start, pending.v_new, pending.v);
    } else {
      StoreVector<F>(p.block, p.v, pending.start, pending.v_new, pending.v);
    }
  }
}

// A whole block whose size is a multiple of kLanes: its step and new moments.
template <int F>
[[gnu::always_inline]] inline Pending BlockVector(const Job& j, const StepVec<F>& p, int64_t b, int64_t start,
                                                float* m_new, float* v_new, float* m_old_values,
                                                float* v_old_values) {
  const VF one = Vec::Set(1.0f), zero = Vec::Set(0.0f);
  const VF m_scale = Vec::Set(p.m.scale[b]), v_scale = Vec::Set(p.v.scale[b]);
  VF m_largest = Vec::Set(Lowest(j, p.block)), v_largest = m_largest;
  VF m_finite = zero, v_finite = zero;  // NaN in a lane once a value of it is not finite (4-bit codes only)
  const bool decoded = DecodeBlock<F>(p, p.m, start, m_old_values);
  DecodeBlock<F>(p, p.v, start, v_old_values);
  for (int64_t k = 0; k < p.block; k += Vec::kLanes) {
    const int64_t i = start + k;
    const VF g = Vec::Load(p.g + i);
    const VF gw = Vec::Mul(g, p.c2);  // (1 - b2) g, times g below: finite to |g| 1e20
    const VF m_old = Vec::Mul(decoded ? Vec::Load(m_old_values + k) : Decode<F>(p.m.codes, i, p.m.map), m_scale);
    const VF v_old = Vec::Mul(decoded ? Vec::Load(v_old_values + k) : Decode<F>(p.v.codes, i, p.v.map), v_scale);
    const VF m = Vec::Fma(g, p.c1, Vec::Mul(m_old, p.b1));
    const VF v = Vec::Fma(gw, g, Vec::Mul(v_old, p.b2));
    Vec::Store(m_new + k, m);
    Vec::Store(v_new + k, v);
    m_largest = Vec::Max(Vec::Abs(m), m_largest);  // max gives its second operand for a NaN
    v_largest = Vec::Max(Vec::Abs(v), v_largest);
    if constexpr (F == kDynamic4) {
      m_finite = Vec::Fma(m, zero, m_finite);
      v_finite = Vec::Fma(v, zero, v_finite);
    }
    VF inside = Vec::Mul(v, p.d2);
    if (p.add_eps_root) inside = Vec::Add(inside, p.eps_root);
    const VF denominator = Vec::Add(Vec::Sqrt(inside), p.eps);
    VF inverse = Vec::Div(one, denominator);
    if (p.safe_divide) inverse = Vec::Where(Vec::Equal(denominator, zero), inverse, zero);
    Vec::Store(p.step + i, Vec::Mul(Vec::Mul(m, p.d1), inverse));
  }
  return {start, m_new, v_new, ScaleVector<F>(j, p.m, b, m_largest, m_finite),
          ScaleVector<F>(j, p.v, b, v_largest, v_finite)};
}
#endif

// Lion: the step is sign(b1 m + (1 - b1) g) (zero and NaN kept, as jnp.sign), the moment b2 m + (1 - b2) g; the
// same two forms of fused multiply-add as Adam's step (the moment to quantize, the value the step reads).
inline float Sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }

template <int F>
void LionScalar(const Job& j, int64_t b, int64_t start, int64_t length, float* m_new) {
  const float m_scale = j.m.scale[b];
  float m_largest = Lowest(j, length);
  for (int64_t k = 0; k < length; ++k) {
    const int64_t i = start + k;
    const float g = j.g[i];
    const float m_old = Value<F>(j.m, i) * m_scale;
    const float m = F == kFp8 ? std::fma(g, j.s.one_minus_b2, m_old * j.s.b2)
                              : std::fma(m_old, j.s.b2, g * j.s.one_minus_b2);
    m_new[k] = m;
    m_largest = std::max(m_largest, std::fabs(m));
    j.step[i] = Sign(std::fma(g, j.s.one_minus_b1, m_old * j.s.b1));
  }
  StoreScalar<F>(j, j.m, b, start, length, m_new, m_largest);
}

#ifdef ADAOPT_VECTOR
template <int F>
[[gnu::always_inline]] inline Pending LionVector(const Job& j, const StepVec<F>& p, int64_t b, int64_t start,
                                               float* m_new, float* m_old_values) {
  const VF one = Vec::Set(1.0f), minus_one = Vec::Set(-1.0f), zero = Vec::Set(0.0f);
  const VF m_scale = Vec::Set(p.m.scale[b]);
  VF m_largest = Vec::Set(Lowest(j, p.block)), m_finite = zero;
  const bool decoded = DecodeBlock<F>(p, p.m, start, m_old_values);
  for (int64_t k = 0; k < p.block; k += Vec::kLanes) {
    const int64_t i = start + k;
    const VF g = Vec::Load(p.g + i);
    const VF m_old = Vec::Mul(decoded ? Vec::Load(m_old_values + k) : Decode<F>(p.m.codes, i, p.m.map), m_scale);
    const VF m = F == kFp8 ? Vec::Fma(g, p.c2, Vec::Mul(m_old, p.b2)) : Vec::Fma(m_old, p.b2, Vec::Mul(g, p.c2));
    Vec::Store(m_new + k, m);
    m_largest = Vec::Max(Vec::Abs(m), m_largest);
    if constexpr (F == kDynamic4) m_finite = Vec::Fma(m, zero, m_finite);
    const VF x = Vec::Fma(g, p.c1, Vec::Mul(m_old, p.b1));
    VF sign = Vec::Where(Vec::Greater(x, zero), x, one);
    sign = Vec::Where(Vec::Less(x, zero), sign, minus_one);
    Vec::Store(p.step + i, sign);
  }
  return {start, m_new, nullptr, ScaleVector<F>(j, p.m, b, m_largest, m_finite), Scaled{}};
}
#endif

// Blocks [first, last) of the leaf, Lion's step or Adam's.
template <int F, bool Lion>
void Blocks(const Job& j, int64_t first, int64_t last) {
  // The new moments of two blocks, kept between computing their scales and quantizing them, and the old moments of
  // one, where DecodeBlock writes them.
  const int64_t capacity = (j.block + 15) / 16 * 16;
  std::unique_ptr<float[], void (*)(void*)> buffer(
      static_cast<float*>(std::aligned_alloc(64, 6 * capacity * sizeof(float))), std::free);
  float* const old = buffer.get() + 4 * capacity;
  int64_t b = first;
#ifdef ADAOPT_VECTOR
  if (j.block % Vec::kLanes == 0) {
    // The whole blocks, each one's codes stored after the next one's moments.
    const StepVec<F> vectors = VectorsOf<F>(j, Lion);
    const int64_t whole = std::max(first, std::min(last, j.n / j.block));
    Pending pending{};
    for (; b < whole; ++b) {
      float* m_new = buffer.get() + (b & 1) * 2 * capacity;
      const Pending next = Lion ? LionVector<F>(j, vectors, b, b * j.block, m_new, old)
                                : BlockVector<F>(j, vectors, b, b * j.block, m_new, m_new + capacity, old,
                                                 old + capacity);
      if (b > first) StoreCodes<F, Lion>(vectors, pending);
      pending = next;
    }
    if (whole > first) StoreCodes<F, Lion>(vectors, pending);
  }
#endif
  for (; b < last; ++b) {
    const int64_t start = b * j.block, length = std::min(j.block, j.n - start);
    Lion ? LionScalar<F>(j, b, start, length, buffer.get()) :
           BlockScalar<F>(j, b, start, length, buffer.get(), buffer.get() + capacity);
  }
}

using BlocksFn = void (*)(const Job&, int64_t, int64_t);

template <bool Lion>
BlocksFn BlocksOf(int32_t format) {
  if (format == kDynamic4) return Blocks<kDynamic4, Lion>;
  return format == kFp8 ? Blocks<kFp8, Lion> : Blocks<kDynamic8, Lion>;
}

// The blocks in chunks that the calling thread and the intra-op pool's threads claim one at a time. The caller
// waits only for chunks claimed by running threads, so a pool busy elsewhere delays nothing: a task that starts
// after every chunk is claimed finds none and ends (the state it reads is shared, not on the caller's stack).
struct Work {
  Job job;
  BlocksFn blocks_fn;
  int64_t blocks, per_chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      blocks_fn(job, c * per_chunk, std::min(blocks, (c + 1) * per_chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Every block of the leaf, on the calling thread and the pool's.
void Launch(ffi::ThreadPool& pool, const Job& job, BlocksFn blocks_fn) {
  auto work = std::make_shared<Work>();
  work->job = job;
  work->blocks_fn = blocks_fn;
  work->blocks = (job.n + job.block - 1) / job.block;
  work->per_chunk = std::max<int64_t>(1, 16384 / job.block);  // 64 KiB of float32 per chunk
  work->chunks = (work->blocks + work->per_chunk - 1) / work->per_chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
}

// The midpoint of two entries of a map as storage._lookup rounds it: their sum is exact in float64, its half rounded
// once to float32.
inline float Midpoint(float low, float high) {
  return static_cast<float>((static_cast<double>(low) + static_cast<double>(high)) / 2);
}

// A 4-bit map's midpoints (Midpoint), and the levels of a binary search over them: a count c of the midpoints below x,
// a multiple of 8 >> k before level k, grows by 8 >> k where x exceeds levels[k][c], the midpoint c + (8 >> k) - 1.
void SetSearch(Moment* moment) {
  const float* m = moment->map;
  for (int k = 0; k < 15; ++k) {
    moment->midpoints[k] = Midpoint(m[k], m[k + 1]);
  }
  for (int level = 0; level < 4; ++level) {
    const int step = 16 >> level;  // the counts before this level are multiples of step
    for (int c = 0; c < 16; ++c) moment->levels[level][c] = moment->midpoints[c / step * step + step / 2 - 1];
  }
  moment->sixteenths = true;
  for (int k = 0; k < 16; ++k) moment->sixteenths &= m[k] == static_cast<float>(k + 1) / 16;
}

// An 8-bit map's Search8 (not ok where the map is not of its form). Its runs: from each entry above 0 not yet in one,
// the entries after it at the same spacing (to a thousandth of it).
Search8 Search8Of(const float* map) {
  Search8 s{};
  int zero = -1;
  for (int k = 0; k < 256; ++k) {
    if (k < 255 && !(map[k] < map[k + 1])) return s;  // sorted, without NaN
    if (map[k] == 0.0f) zero = k;
  }
  if (zero < 0) return s;
  for (int k = 1; k <= zero; ++k) {
    if (zero + k > 255 || map[zero - k] != -map[zero + k]) return s;
  }
  // The entries above 0, and the midpoint below each (from the 0 entry for the first).
  const float* entry = map + zero + 1;
  const int above = 255 - zero;
  float midpoint[255];
  for (int i = 0; i < above; ++i) midpoint[i] = Midpoint(entry[i - 1], entry[i]);  // entry[-1] is the 0 entry
  int first[16], runs = 0;  // the first entry of each run, then the end
  for (int start = 0; start < above; start = first[++runs]) {
    if (runs == 15) return s;
    int n = 1;
    if (start + 1 < above) {
      const double spacing = static_cast<double>(entry[start + 1]) - entry[start];
      for (n = 2; start + n < above; ++n) {
        if (std::fabs(static_cast<double>(entry[start + n]) - entry[start + n - 1] - spacing) > 1e-3 * spacing) break;
      }
    }
    first[runs] = start;
    first[runs + 1] = start + n;
  }
  // Run 0, where y is at most the first midpoint: the count 0. Above the first midpoint of run r, the a + 1
  // midpoints up to it (a its first entry), and one more past each of the run's n - 1 midpoints inside.
  for (int r = 0; r < 16; ++r) s.offset[r] = 0.5f;
  for (int r = 1; r <= runs; ++r) {
    const int a = first[r - 1], n = first[r] - a;
    double slope = 0.0, offset = a + 1.5;
    if (n > 1) {
      const double spacing = (static_cast<double>(entry[a + n - 1]) - entry[a]) / (n - 1);
      slope = 1.0 / spacing;
      offset = a + 1.5 - entry[a] / spacing;
    }
    s.slope[r] = static_cast<float>(slope);
    s.offset[r] = static_cast<float>(offset);
    s.last[r] = a + n;
    for (int j = 1; j < n; ++j) {
      if (!(std::fabs(std::fma(midpoint[a + j], s.slope[r], s.offset[r]) - (a + 1 + j)) <= kBand / 2)) return s;
    }
    if (std::floor(std::fma(std::nextafter(midpoint[a], 2.0f), s.slope[r], s.offset[r])) < a + 1) return s;
  }
  for (int i = 0; i < 32; ++i) {
    const float low = i == 0 ? 0.0f : std::ldexp(1.0f, i - 31), high = std::ldexp(1.0f, i - 30);
    s.bound[i] = std::numeric_limits<float>::infinity();
    int inside = 0;
    for (int r = 1; r <= runs; ++r) {
      const float lowest = midpoint[first[r - 1]];
      if (lowest < low) {
        s.below[i] = r;
      } else if (lowest < high) {
        s.bound[i] = lowest;
        ++inside;
      }
    }
    if (inside > 1) return s;
  }
  s.zero = zero;
  s.nonnegative = zero == 0;
  s.ok = true;
  return s;
}

// An 8-bit map's Moment.planes (byte k of entry e at planes[k][e]) and Moment.search8, prepared once a thread for each
// of the last two maps it saw (a step's first and second moments'), not on every call of the kernel (one a leaf):
// about two microseconds a map.
void Prepare8(Moment* moment) {
  struct Prepared {
    float map[256];
    uint8_t planes[4][256];
    Search8 search;
    bool filled;
  };
  thread_local Prepared cache[2];
  thread_local int next = 0;
  Prepared* prepared = nullptr;
  for (Prepared& c : cache) {
    if (c.filled && std::memcmp(c.map, moment->map, sizeof c.map) == 0) prepared = &c;
  }
  if (prepared == nullptr) {
    prepared = &cache[next];
    next ^= 1;
    std::memcpy(prepared->map, moment->map, sizeof prepared->map);
    for (int e = 0; e < 256; ++e) {
      uint32_t bits;
      std::memcpy(&bits, moment->map + e, 4);
      for (int k = 0; k < 4; ++k) prepared->planes[k][e] = static_cast<uint8_t>(bits >> (8 * k));
    }
    prepared->search = Search8Of(moment->map);
    prepared->filled = true;
  }
  std::memcpy(moment->planes, prepared->planes, sizeof moment->planes);
  moment->search8 = prepared->search;
}

// A moment's arrays, checked to fit a leaf of n elements in blocks of block_size stored in `format`: as many codes
// as elements (4-bit: a byte for two elements of every block, a partial last one's whole), a scale per block, the
// format's map and (but for FP8) its search table.
bool MomentOf(int64_t n, int64_t block_size, int32_t format, const ffi::AnyBuffer& codes,
              const ffi::Buffer<ffi::F32>& scales, const ffi::Buffer<ffi::F32>& map,
              const ffi::Buffer<ffi::U32>& search,
              uint8_t* codes_out, float* scales_out, Moment* moment) {
  const int64_t blocks = (n + block_size - 1) / block_size;
  const int64_t code_bytes = format == kDynamic4 ? blocks * block_size / 2 : n;
  const bool fits = codes.element_count() == codes.size_bytes() &&  // a byte a code
                    codes.size_bytes() == static_cast<size_t>(code_bytes) &&
                    scales.element_count() == static_cast<size_t>(blocks) &&
                    map.element_count() == (format == kDynamic4 ? 16u : 256u) &&
                    (format == kFp8 || search.element_count() == 65536);
  *moment = {static_cast<const uint8_t*>(codes.untyped_data()), scales.typed_data(), codes_out, scales_out,
             map.typed_data(), search.typed_data(), {}};
  if (fits && format == kDynamic4) SetSearch(moment);
  if (fits && format == kDynamic8) Prepare8(moment);
  return fits;
}

// A moment's codes, a byte each whatever their type (uint8 codes, float8_e4m3fn values).
uint8_t* Bytes(const ffi::AnyBuffer& codes) { return static_cast<uint8_t*>(codes.untyped_data()); }

bool Valid(int64_t block_size, int32_t format) {
  return block_size > 0 && (format == kDynamic8 || format == kFp8 || (format == kDynamic4 && block_size % 2 == 0));
}

ffi::Error BlockwiseAdam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::AnyBuffer m_codes,
                         ffi::Buffer<ffi::F32> m_scale, ffi::AnyBuffer v_codes, ffi::Buffer<ffi::F32> v_scale,
                         ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> map1, ffi::Buffer<ffi::F32> map2,
                         ffi::Buffer<ffi::U32> search1, ffi::Buffer<ffi::U32> search2, int64_t block_size,
                         int32_t format, int32_t safe_divide, int32_t eps_root, int32_t scale_floor,
                         ffi::ResultBuffer<ffi::F32> step, ffi::Result<ffi::AnyBuffer> m_codes_out,
                         ffi::ResultBuffer<ffi::F32> m_scale_out, ffi::Result<ffi::AnyBuffer> v_codes_out,
                         ffi::ResultBuffer<ffi::F32> v_scale_out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  if (!Valid(block_size, format)) return ffi::Error::InvalidArgument("blockwise Adam: invalid format or block size");
  Job j{g.typed_data(), step->typed_data(), {}, {}, {}, n, block_size, safe_divide != 0, eps_root != 0,
        scale_floor != 0};
  if (!MomentOf(n, block_size, format, m_codes, m_scale, map1, search1, Bytes(*m_codes_out),
                m_scale_out->typed_data(), &j.m) ||
      !MomentOf(n, block_size, format, v_codes, v_scale, map2, search2, Bytes(*v_codes_out),
                v_scale_out->typed_data(), &j.v) ||
      scalars.element_count() != 9) {
    return ffi::Error::InvalidArgument("blockwise Adam: arguments of unexpected sizes");
  }
  std::memcpy(&j.s, scalars.typed_data(), sizeof(Scalars));
  Launch(pool, j, BlocksOf<false>(format));
  return ffi::Error::Success();
}

ffi::Error BlockwiseLion(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::AnyBuffer m_codes,
                         ffi::Buffer<ffi::F32> m_scale, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> map1,
                         ffi::Buffer<ffi::U32> search1, int64_t block_size, int32_t format, int32_t scale_floor,
                         ffi::ResultBuffer<ffi::F32> step, ffi::Result<ffi::AnyBuffer> m_codes_out,
                         ffi::ResultBuffer<ffi::F32> m_scale_out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  if (!Valid(block_size, format)) return ffi::Error::InvalidArgument("blockwise Lion: invalid format or block size");
  Job j{g.typed_data(), step->typed_data(), {}, {}, {}, n, block_size, false, false, scale_floor != 0};
  if (!MomentOf(n, block_size, format, m_codes, m_scale, map1, search1, Bytes(*m_codes_out),
                m_scale_out->typed_data(), &j.m) ||
      scalars.element_count() != 9) {
    return ffi::Error::InvalidArgument("blockwise Lion: arguments of unexpected sizes");
  }
  std::memcpy(&j.s, scalars.typed_data(), sizeof(Scalars));
  Launch(pool, j, BlocksOf<true>(format));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaoptBlockwiseAdam, BlockwiseAdam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::AnyBuffer>()         // first moment's codes (uint8, or FP8 values)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::AnyBuffer>()         // second moment's codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the 9 scalars of Scalars
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the signed map (FP8: the codes' values)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the unsigned map
                                  .Arg<ffi::Buffer<ffi::U32>>()  // their search tables (unused for FP8)
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int32_t>("format")
                                  .Attr<int32_t>("safe_divide")
                                  .Attr<int32_t>("eps_root")
                                  .Attr<int32_t>("scale_floor")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the step
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaoptBlockwiseLion, BlockwiseLion,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::AnyBuffer>()         // the moment's codes (uint8, or FP8 values)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // and scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the 9 scalars of Scalars (the betas, the floor)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the signed map (FP8: the codes' values)
                                  .Arg<ffi::Buffer<ffi::U32>>()  // its search table (unused for FP8)
                                  .Attr<int64_t>("block_size")
                                  .Attr<int32_t>("format")
                                  .Attr<int32_t>("scale_floor")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the step
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// For the tests (tests/test_cpu_kernels.py): how many float32 x in [-4, 4], beyond the largest finite float, and NaN,
// the vector steps code otherwise than the search table codes x clipped to [-1, 1], for an 8-bit `map` and its `table`
// (storage._search_table), every such float tried, by Codes8 and, for a map from 0 up, by its unsigned form too; -1
// where they take the table (the map has no Search8, or the build no AVX-512).
extern "C" int64_t AdaoptCodes8Mismatches(const float* map, const uint32_t* table) {
#if defined(ADAOPT_AVX512)
  Moment moment{};
  moment.map = map;
  Prepare8(&moment);
  if (!moment.search8.ok) return -1;
  const Vec::Search8v search = Vec::LoadSearch8(moment);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t mismatches = 0;
  for (const uint32_t sign : {0u, 0x80000000u}) {
    // |x| from 0 to 4 (0x40800000), then the largest floats, the infinity (0x7F800000) and the NaNs above it
    for (const auto& [from, to] : {std::pair<uint64_t, uint64_t>{0, 0x40800001}, {0x7F7FFFF0, 0x80000000}}) {
      for (uint64_t start = from; start < to; start += 16) {
        const __m512i bits = _mm512_or_si512(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(start)), lane),
                                             _mm512_set1_epi32(static_cast<int32_t>(sign)));
        const __mmask16 inside = static_cast<__mmask16>(to - start >= 16 ? 0xFFFF : (1u << (to - start)) - 1);
        const __m512 x = _mm512_castsi512_ps(bits);
        const __m128i expected = Vec::Nearest(Vec::Clip(x), table);
        const __m128i equal = _mm_cmpeq_epi8(Vec::Codes8<true>(x, search, table), expected);
        mismatches += __builtin_popcount(~_mm_movemask_epi8(equal) & inside);
        if (search.nonnegative) {
          const __m128i same = _mm_cmpeq_epi8(Vec::Codes8<false>(x, search, table), expected);
          mismatches += __builtin_popcount(~_mm_movemask_epi8(same) & inside);
        }
      }
    }
  }
  return mismatches;
#else
  (void)map;
  (void)table;
  return -1;
#endif
}
