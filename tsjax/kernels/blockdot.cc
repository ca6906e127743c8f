// Block-quantized matmuls for XLA:CPU, called from jitted code through jax.ffi (tsjax.kernels).
//
//   y[M, N] = x[M, K] @ W[N, K]^T, W in blocks of 32 along K:
//   - q8: int8 values [N, K] and one float16 scale per block [K/32, N] (GGUF's Q8_0, unpacked)
//   - q4: 4-bit values [N, K/2] (byte j of a block holds element j in its low nibble and
//         element j+16 in its high one, as GGUF's Q4_0/Q4_1), a float16 scale and a float16
//         offset per block [K/32, N]: w = d * q + m, q in 0..15 (GGUF's Q4_1; Q4_0 and Q4_K's
//         sub-blocks are the same form)
//
// The activations are quantized inside the call to int8 with one float scale per block of 32
// (as llama.cpp quantizes them for these weight types), the block products are exact int32
// sums, and each block's sum is scaled once. Each group of 8 (or 2) output channels is taken
// once, its blocks staying in L1 while every tile of up to 4 rows runs against it, and the output
// channels are split into chunks taken by the caller and XLA's intra-op thread pool. Compiled for the build machine
// (-march=native): AVX512-VNNI / AVX-VNNI, AVX2, or portable C++ elsewhere.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
// 512-bit tiles of 16 output channels (AVX-512 with VNNI: Intel since Ice Lake, AMD since Zen 4)
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define TSJAX_ZMM 1
#endif
// Intel AMX (Sapphire Rapids and later): 16-row tiles of int8 products in the tile unit
#if defined(TSJAX_ZMM) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define TSJAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t QK = 32;  // values per block
constexpr int MR = 4;       // activation rows per register tile
constexpr int NR = 2;       // output channels per register tile

float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 113;
      while (!(man & 0x400)) man <<= 1, --exp;
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// x [M, K] float32 -> int8 per block of 32: q, |q| (the AVX2 sign trick's unsigned operand),
// the block's scale, and scale * sum(q) (the q4 offset term).
struct Acts {
  int64_t M = 0, K = 0, G = 0;
  std::vector<int8_t> q;
  std::vector<uint8_t> a, u;  // |q|, and q + 128 (AVX-512's q8 operand; see q8_tile16)
  std::vector<float> s, sum;

  void resize(int64_t m_, int64_t k_) {
    M = m_, K = k_, G = k_ / QK;
    q.resize(M * K), a.resize(M * K), s.resize(M * G), sum.resize(M * G);
#if defined(TSJAX_ZMM)
    u.resize(M * K);
#endif
  }

  // Rows [m0, m1) of x (after `resize`).
  void quantize_rows(const float* x, int64_t m0, int64_t m1) {
    for (int64_t b = m0 * G; b < m1 * G; ++b) quantize_block(x + b * QK, b);
  }

  // One block: d = max|x| / 127, q = round-half-even(x / d), the rounding nearbyint does in
  // the default mode (the vector forms divide too, so every build gives the same bits).
  void quantize_block(const float* xb, int64_t b) {
#if defined(TSJAX_ZMM)
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.f;
    __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
    if (d > 0.f) {
      const __m512 dv = _mm512_set1_ps(d);
      i0 = _mm512_cvtps_epi32(_mm512_div_ps(v0, dv));
      i1 = _mm512_cvtps_epi32(_mm512_div_ps(v1, dv));
    }
    const __m256i q8 = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm512_cvtsepi32_epi8(i0)), _mm512_cvtsepi32_epi8(i1), 1);
    _mm256_storeu_si256((__m256i*)(q.data() + b * QK), q8);
    _mm256_storeu_si256((__m256i*)(a.data() + b * QK), _mm256_abs_epi8(q8));
    _mm256_storeu_si256((__m256i*)(u.data() + b * QK),
                        _mm256_xor_si256(q8, _mm256_set1_epi8((char)0x80)));
    s[b] = d;
    sum[b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.f;
    __m256i i32[4], total = _mm256_setzero_si256();
    const __m256 dv = _mm256_set1_ps(d);
    for (int i = 0; i < 4; ++i) {
      i32[i] = d > 0.f ? _mm256_cvtps_epi32(_mm256_div_ps(v[i], dv)) : _mm256_setzero_si256();
      total = _mm256_add_epi32(total, i32[i]);
    }
    // int32 -> int8: the packs interleave 128-bit halves; 4-byte groups 0,4,1,5,.. restore order.
    const __m256i q8 = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(q.data() + b * QK), q8);
    _mm256_storeu_si256((__m256i*)(a.data() + b * QK), _mm256_abs_epi8(q8));
#if defined(TSJAX_ZMM)
    _mm256_storeu_si256((__m256i*)(u.data() + b * QK),
                        _mm256_xor_si256(q8, _mm256_set1_epi8((char)0x80)));
#endif
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t4 = _mm_hadd_epi32(t4, t4);
    t4 = _mm_hadd_epi32(t4, t4);
    s[b] = d;
    sum[b] = d * (float)_mm_cvtsi128_si32(t4);
#else
    float amax = 0.f;
    for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f;
    int32_t total = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int v = d > 0.f ? (int)std::nearbyint(xb[j] / d) : 0;
      q[b * QK + j] = (int8_t)v;
      a[b * QK + j] = (uint8_t)std::abs(v);
      total += v;
    }
    s[b] = d;
    sum[b] = d * (float)total;
#endif
  }
};

#if defined(__AVX2__)
float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum over groups of 4 of u8 x s8 products, as int32 [8] (no saturation: |u| <= 127 or <= 15).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

template <int R, int C>
void q8_tile(const Acts& A, int64_t m0, const int8_t* w, const uint16_t* ws, int64_t n0, float* y,
             int64_t N) {
  const int64_t K = A.K, G = A.G;
  __m256 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i wv[C];
    float wd[C];
    for (int j = 0; j < C; ++j) {
      wv[j] = _mm256_loadu_si256((const __m256i*)(w + (n0 + j) * K + g * QK));
      wd[j] = f16_to_f32(ws[g * N + n0 + j]);
    }
    for (int i = 0; i < R; ++i) {
      const int64_t xo = (m0 + i) * K + g * QK;
      const __m256i xa = _mm256_loadu_si256((const __m256i*)(A.a.data() + xo));
      const __m256i xq = _mm256_loadu_si256((const __m256i*)(A.q.data() + xo));
      const float xs = A.s[(m0 + i) * G + g];
      for (int j = 0; j < C; ++j) {
        const __m256i p = dot_u8s8(xa, _mm256_sign_epi8(wv[j], xq));
        acc[i][j] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd[j] * xs), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[(m0 + i) * N + n0 + j] = hsum(acc[i][j]);
}

template <int R, int C>
void q4_tile(const Acts& A, int64_t m0, const uint8_t* qs, const uint16_t* d, const uint16_t* mn,
             int64_t n0, float* y, int64_t N) {
  const int64_t K = A.K, G = A.G;
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256 acc[R][C];
  float off[R][C] = {};
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i wv[C];
    float wd[C], wm[C];
    for (int j = 0; j < C; ++j) {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(qs + (n0 + j) * (K / 2) + g * QK / 2));
      wv[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
      wd[j] = f16_to_f32(d[g * N + n0 + j]);
      wm[j] = f16_to_f32(mn[g * N + n0 + j]);
    }
    for (int i = 0; i < R; ++i) {
      const int64_t xo = (m0 + i) * K + g * QK;
      const __m256i xq = _mm256_loadu_si256((const __m256i*)(A.q.data() + xo));
      const float xs = A.s[(m0 + i) * G + g], xsum = A.sum[(m0 + i) * G + g];
      for (int j = 0; j < C; ++j) {
        const __m256i p = dot_u8s8(wv[j], xq);
        acc[i][j] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd[j] * xs), acc[i][j]);
        off[i][j] += wm[j] * xsum;
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[(m0 + i) * N + n0 + j] = hsum(acc[i][j]) + off[i][j];
}


// Eight output channels at once: their 16-byte blocks are transposed in registers so that each
// 32-bit lane holds one channel's 4 (low nibbles) + 4 (high nibbles) values, the activations'
// 4-byte groups are broadcast against them, and the 8 channels' sums come out as one vector
// (no horizontal sums; the 8 scales load as one vector from the [K/32, N] scale layout).
// AVX2: the 8 u8 x s8 products of a block stay within int16 (8 * 2 * 15 * 127 < 32768).
template <int R>
void q4_tile8(const Acts& A, int64_t m0, const uint8_t* qs, const uint16_t* d, const uint16_t* mn,
              int64_t n0, float* y, int64_t N) {
  const int64_t K = A.K, G = A.G, rb = K / 2;
  const __m256i low = _mm256_set1_epi8(0x0f);
  const int8_t* xq = A.q.data() + m0 * K;
  const float* xs = A.s.data() + m0 * G;
  const float* xsum = A.sum.data() + m0 * G;
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const uint8_t* p = qs + n0 * rb;
  for (int64_t g = 0; g < G; ++g, p += QK / 2) {
    auto pair = [&](int c) {
      return _mm256_setr_m128i(_mm_loadu_si128((const __m128i*)(p + c * rb)),
                               _mm_loadu_si128((const __m128i*)(p + (c + 4) * rb)));
    };
    const __m256i a0 = pair(0), a1 = pair(1), a2 = pair(2), a3 = pair(3);
    const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpackhi_epi32(a0, a1);
    const __m256i t2 = _mm256_unpacklo_epi32(a2, a3), t3 = _mm256_unpackhi_epi32(a2, a3);
    const __m256i r[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                          _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    __m256i w[8];  // w[j]: values 4j..4j+3 of each channel; w[4 + j]: values 16 + 4j..
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm256_and_si256(r[j], low);
      w[4 + j] = _mm256_and_si256(_mm256_srli_epi16(r[j], 4), low);
    }
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + g * N + n0)));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + g * N + n0)));
    for (int i = 0; i < R; ++i) {
      const int32_t* xw = (const int32_t*)(xq + i * K + g * QK);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
      __m256i s32 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        s32 = _mm256_dpbusd_epi32(s32, w[j], _mm256_set1_epi32(xw[j]));
#else
        s32 = _mm256_dpbusd_avx_epi32(s32, w[j], _mm256_set1_epi32(xw[j]));
#endif
      }
#else
      __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xw[0]));
      for (int j = 1; j < 8; ++j)
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(xw[j])));
      const __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
      const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(xs[i * G + g]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[i]);
      acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[i * G + g]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}


// q8, eight output channels at once: an 8 x 8 transpose of their blocks' 32-bit words puts
// values 4j..4j+3 of each channel in w[j]; the activations' 4-byte groups are broadcast against
// them (the sign moved onto the weights, |x| as the unsigned operand).
template <int R>
void q8_tile8(const Acts& A, int64_t m0, const int8_t* wq, const uint16_t* d, int64_t n0, float* y,
              int64_t N) {
  const int64_t K = A.K, G = A.G;
  const int8_t* xq = A.q.data() + m0 * K;
  const uint8_t* xa = A.a.data() + m0 * K;
  const float* xs = A.s.data() + m0 * G;
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const int8_t* p = wq + n0 * K;
  for (int64_t g = 0; g < G; ++g, p += QK) {
    __m256i c[8], t[8], w[8];
    for (int k = 0; k < 8; ++k) c[k] = _mm256_loadu_si256((const __m256i*)(p + k * K));
    for (int k = 0; k < 8; k += 2) {
      t[k] = _mm256_unpacklo_epi32(c[k], c[k + 1]);
      t[k + 1] = _mm256_unpackhi_epi32(c[k], c[k + 1]);
    }
    for (int h = 0; h < 8; h += 4) {  // channels h..h+3: words (0,4) (1,5) (2,6) (3,7)
      c[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
      c[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
      c[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
      c[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm256_permute2x128_si256(c[j], c[4 + j], 0x20);
      w[4 + j] = _mm256_permute2x128_si256(c[j], c[4 + j], 0x31);
    }
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + g * N + n0)));
    for (int i = 0; i < R; ++i) {
      const int32_t* xw = (const int32_t*)(xq + i * K + g * QK);
      const int32_t* aw = (const int32_t*)(xa + i * K + g * QK);
      __m256i s32 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i sw = _mm256_sign_epi8(w[j], _mm256_set1_epi32(xw[j]));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        s32 = _mm256_dpbusd_epi32(s32, _mm256_set1_epi32(aw[j]), sw);
#elif defined(__AVXVNNI__)
        s32 = _mm256_dpbusd_avx_epi32(s32, _mm256_set1_epi32(aw[j]), sw);
#else
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(_mm256_maddubs_epi16(
                                        _mm256_set1_epi32(aw[j]), sw), _mm256_set1_epi16(1)));
#endif
      }
      const __m256 scale = _mm256_mul_ps(dv, _mm256_set1_ps(xs[i * G + g]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}

#if defined(TSJAX_ZMM)
// Sixteen channels at once: one 16-byte piece of each channel's block per 128-bit lane (lane l
// of z[a] holds channel a + 4l), a 4 x 4 transpose of 32-bit words inside each lane, and
// r[j] holds word j of channels 0..15 in order.
inline void transpose16(const uint8_t* p, int64_t stride, __m512i r[4]) {
  __m512i z[4];
  for (int a = 0; a < 4; ++a) {
    z[a] = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i*)(p + a * stride)));
    z[a] = _mm512_inserti32x4(z[a], _mm_loadu_si128((const __m128i*)(p + (a + 4) * stride)), 1);
    z[a] = _mm512_inserti32x4(z[a], _mm_loadu_si128((const __m128i*)(p + (a + 8) * stride)), 2);
    z[a] = _mm512_inserti32x4(z[a], _mm_loadu_si128((const __m128i*)(p + (a + 12) * stride)), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  r[0] = _mm512_unpacklo_epi64(t0, t2), r[1] = _mm512_unpackhi_epi64(t0, t2);
  r[2] = _mm512_unpacklo_epi64(t1, t3), r[3] = _mm512_unpackhi_epi64(t1, t3);
}

template <int R>
void q4_tile16(const Acts& A, int64_t m0, const uint8_t* qs, const uint16_t* d, const uint16_t* mn,
               int64_t n0, float* y, int64_t N) {
  const int64_t K = A.K, G = A.G, rb = K / 2;
  const __m512i low = _mm512_set1_epi8(0x0f);
  const int8_t* xq = A.q.data() + m0 * K;
  const float* xs = A.s.data() + m0 * G;
  const float* xsum = A.sum.data() + m0 * G;
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* p = qs + n0 * rb;
  for (int64_t g = 0; g < G; ++g, p += QK / 2) {
    __m512i r[4], w[8];  // w[j]: values 4j..4j+3 of each channel; w[4 + j]: values 16 + 4j..
    transpose16(p, rb, r);
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm512_and_si512(r[j], low);
      w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(r[j], 4), low);
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + g * N + n0)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + g * N + n0)));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const int32_t* xw = (const int32_t*)(xq + i * K + g * QK);
      __m512i s32 = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) s32 = _mm512_dpbusd_epi32(s32, w[j], _mm512_set1_epi32(xw[j]));
      const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(xs[i * G + g]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), scale, acc[i]);
      acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[i * G + g]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}

// q8, sixteen channels: AVX-512 has no byte sign instruction, so the activations enter as
// unsigned q + 128 and each block's product loses 128 x the channel's sum of weights (one more
// dot per block and channel group, shared by every row).
template <int R>
void q8_tile16(const Acts& A, int64_t m0, const int8_t* wq, const uint16_t* d, int64_t n0,
               float* y, int64_t N) {
  const int64_t K = A.K, G = A.G;
  const uint8_t* xu = A.u.data() + m0 * K;
  const float* xs = A.s.data() + m0 * G;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* p = (const uint8_t*)(wq + n0 * K);
  for (int64_t g = 0; g < G; ++g, p += QK) {
    __m512i w[8];  // w[j]: values 4j..4j+3 of each channel
    transpose16(p, K, w);
    transpose16(p + 16, K, w + 4);
    __m512i wsum = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) wsum = _mm512_dpbusd_epi32(wsum, ones, w[j]);
    wsum = _mm512_slli_epi32(wsum, 7);
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + g * N + n0)));
    for (int i = 0; i < R; ++i) {
      const int32_t* xw = (const int32_t*)(xu + i * K + g * QK);
      __m512i s32 = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) s32 = _mm512_dpbusd_epi32(s32, _mm512_set1_epi32(xw[j]), w[j]);
      const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(xs[i * G + g]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s32, wsum)), scale, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}

// Rows in tiles of up to 8 against one group of 16 channels (its unpacked blocks in registers
// across a tile; its raw blocks in L1 across the tiles).
constexpr int MR16 = 8;

template <class Tile>
void zmm_rows(int64_t m_from, int64_t M, int64_t n0, Tile tile) {
  for (int64_t m0 = m_from; m0 < M; m0 += MR16) tile(std::min<int64_t>(MR16, M - m0), m0, n0);
}

template <class Tile>
void zmm_groups(int64_t M, int64_t& n_begin, int64_t n_end, Tile tile) {
  const int64_t n16 = n_begin + (n_end - n_begin) / 16 * 16;
  for (int64_t n0 = n_begin; n0 < n16; n0 += 16) zmm_rows(0, M, n0, tile);
  n_begin = n16;
}
#endif  // TSJAX_ZMM

#if defined(TSJAX_AMX)
// AMX: a tile of up to 16 activation rows x one block of 32 (int8) times the block of 16
// channels (B: 8 rows of 16 channels x 4 values, the order `transpose16` gives) accumulates
// exact int32 sums in the tile unit; each block's sums are stored and scaled on the vector
// units, as the other paths do. The tile unit's state needs Linux's permission once per
// process (refused: the 16-channel vector path runs instead).
constexpr int64_t AMX_MIN_ROWS = 8;  // fewer rows: the vector tiles are as fast
static_assert(AMX_MIN_ROWS == 8, "amx_chunk instantiates row tiles of 8 to 16");

bool amx_ready() {
  static const bool ok = [] {
    const char* env = std::getenv("TSJAX_AMX");
    if (env != nullptr && (std::strcmp(env, "off") == 0 || std::strcmp(env, "0") == 0))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Blocks in pairs, software-pipelined (the tile unit's products and stores take tens of
// cycles: one block at a time, the vector units mostly waited for them): the products of a
// pair are issued, the previous pair's sums are scaled meanwhile, and then stored. tmm0, tmm1:
// activations [rows x 32 B] of blocks g, g + 1; tmm2, tmm3: their weights [8 x 64 B]; tmm4-7:
// sums [rows x 16 int32], pairs alternating between tmm4/5 and tmm6/7. Loaded on every call:
// another library on this thread may use the tiles too.
void amx_configure(int rows) {
  TileConfig c;
  c.rows[0] = c.rows[1] = (uint8_t)rows;
  c.colsb[0] = c.colsb[1] = 32;
  c.rows[2] = c.rows[3] = 8;
  c.colsb[2] = c.colsb[3] = 64;
  for (int t = 4; t < 8; ++t) c.rows[t] = (uint8_t)rows, c.colsb[t] = 64;
  // GCC 12 dropped stores into `c` that only the tile-config load reads (it then faulted on
  // a config of garbage): a barrier keeps them
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// One block's sums (`sums`, [rows x 16] int32) scaled into the accumulators, as the vector
// tiles do.
template <bool Q8, int R>
inline void amx_scale(__m512* acc, const int32_t* sums, int64_t g, int64_t G,
                      const float* xs, const float* xsum, const uint16_t* d, const uint16_t* mn,
                      int64_t n0, int64_t N) {
  const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + g * N + n0)));
  if constexpr (Q8) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * i)),
                               _mm512_mul_ps(dv, _mm512_set1_ps(xs[i * G + g])), acc[i]);
  } else {
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + g * N + n0)));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * i)),
                               _mm512_mul_ps(dv, _mm512_set1_ps(xs[i * G + g])), acc[i]);
      acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[i * G + g]), acc[i]);
    }
  }
}

// Runs `rows` rows from m0 against the 16 channels from n0 whose blocks `unpacked` holds
// (G x 512 bytes, B tiles); `Q8`: signed weights (else q4's unsigned 0..15, with its offset
// term).
template <bool Q8, int R>
void amx_rows(const Acts& A, int64_t m0, const uint8_t* unpacked, const uint16_t* d,
              const uint16_t* mn, int64_t n0, float* y, int64_t N) {
  const int64_t K = A.K, G = A.G;
  alignas(64) int32_t sums[2][2][16 * 16];  // [pair parity][block of the pair]
  __m512 acc[R];  // R a constant, the loops over it unrolled: the accumulators stay in registers
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const int8_t* xq = A.q.data() + m0 * K;
  const float* xs = A.s.data() + m0 * G;
  const float* xsum = A.sum.data() + m0 * G;
  const int64_t pairs = G / 2;
  // the tile numbers are immediates: each parity spelled out
#define TSJAX_ISSUE(C0, C1, g)                                          \
  _tile_zero(C0);                                                       \
  _tile_zero(C1);                                                       \
  _tile_loadd(0, xq + (g) * QK, K);                                     \
  _tile_loadd(2, unpacked + (g) * 512, 64);                             \
  _tile_loadd(1, xq + ((g) + 1) * QK, K);                               \
  _tile_loadd(3, unpacked + ((g) + 1) * 512, 64);                       \
  if constexpr (Q8) {                                                   \
    _tile_dpbssd(C0, 0, 2);                                             \
    _tile_dpbssd(C1, 1, 3);                                             \
  } else {                                                              \
    _tile_dpbsud(C0, 0, 2);                                             \
    _tile_dpbsud(C1, 1, 3);                                             \
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t g = 2 * p;
    if (p % 2 == 0) {
      TSJAX_ISSUE(4, 5, g)
    } else {
      TSJAX_ISSUE(6, 7, g)
    }
    if (p > 0) {  // the previous pair, while this one's products run
      amx_scale<Q8, R>(acc, sums[(p - 1) % 2][0], g - 2, G, xs, xsum, d, mn, n0, N);
      amx_scale<Q8, R>(acc, sums[(p - 1) % 2][1], g - 1, G, xs, xsum, d, mn, n0, N);
    }
    if (p % 2 == 0) {
      _tile_stored(4, sums[0][0], 64);
      _tile_stored(5, sums[0][1], 64);
    } else {
      _tile_stored(6, sums[1][0], 64);
      _tile_stored(7, sums[1][1], 64);
    }
  }
#undef TSJAX_ISSUE
  if (pairs > 0) {
    amx_scale<Q8, R>(acc, sums[(pairs - 1) % 2][0], 2 * pairs - 2, G, xs, xsum, d, mn, n0, N);
    amx_scale<Q8, R>(acc, sums[(pairs - 1) % 2][1], 2 * pairs - 1, G, xs, xsum, d, mn, n0, N);
  }
  if (G % 2) {  // an odd block count: the last alone
    const int64_t g = G - 1;
    _tile_zero(4);
    _tile_loadd(0, xq + g * QK, K);
    _tile_loadd(2, unpacked + g * 512, 64);
    if constexpr (Q8) {
      _tile_dpbssd(4, 0, 2);
    } else {
      _tile_dpbsud(4, 0, 2);
    }
    _tile_stored(4, sums[0][0], 64);
    amx_scale<Q8, R>(acc, sums[0][0], g, G, xs, xsum, d, mn, n0, N);
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(y + (m0 + i) * N + n0, acc[i]);
}

// Every 16-channel group of [n_begin, n_end): its blocks unpacked once into B tiles, then every
// full tile of 16 rows (and a rest of AMX_MIN_ROWS or more) against them; fewer rows left
// are the vector tiles' (`rest(first row, n0)`). Leaves n_begin past the groups it ran.
template <bool Q8, class Rest>
void amx_chunk(int64_t M, int64_t& n_begin, int64_t n_end, const Acts* A, const uint8_t* w,
               const uint16_t* d, const uint16_t* mn, float* y, int64_t N, Rest rest) {
  const int64_t K = A->K, G = A->G;
  const int64_t amx_rows_total = M / 16 * 16 + (M % 16 >= AMX_MIN_ROWS ? M % 16 : 0);
  if (amx_rows_total == 0 || !amx_ready()) return;
  thread_local std::vector<uint8_t> buf;
  buf.resize(G * 512 + 64);
  uint8_t* unpacked = (uint8_t*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
  const int64_t n16 = n_begin + (n_end - n_begin) / 16 * 16;
  int configured = 0;
  for (int64_t n0 = n_begin; n0 < n16; n0 += 16) {
    if constexpr (Q8) {
      const uint8_t* p = w + n0 * K;
      for (int64_t g = 0; g < G; ++g, p += QK) {
        __m512i r[8];
        transpose16(p, K, r);
        transpose16(p + 16, K, r + 4);
        for (int j = 0; j < 8; ++j) _mm512_store_si512(unpacked + g * 512 + 64 * j, r[j]);
      }
    } else {
      const __m512i low = _mm512_set1_epi8(0x0f);
      const uint8_t* p = w + n0 * (K / 2);
      for (int64_t g = 0; g < G; ++g, p += QK / 2) {
        __m512i r[4];
        transpose16(p, K / 2, r);
        for (int j = 0; j < 4; ++j) {
          _mm512_store_si512(unpacked + g * 512 + 64 * j, _mm512_and_si512(r[j], low));
          _mm512_store_si512(unpacked + g * 512 + 64 * (4 + j),
                             _mm512_and_si512(_mm512_srli_epi16(r[j], 4), low));
        }
      }
    }
    for (int64_t m0 = 0; m0 < amx_rows_total; m0 += 16) {
      const int rows = (int)std::min<int64_t>(16, amx_rows_total - m0);
      if (rows != configured) amx_configure(configured = rows);
      switch (rows) {
#define TSJAX_AMX_ROWS(R) case R: amx_rows<Q8, R>(*A, m0, unpacked, d, mn, n0, y, N); break;
        TSJAX_AMX_ROWS(8) TSJAX_AMX_ROWS(9) TSJAX_AMX_ROWS(10) TSJAX_AMX_ROWS(11)
        TSJAX_AMX_ROWS(12) TSJAX_AMX_ROWS(13) TSJAX_AMX_ROWS(14) TSJAX_AMX_ROWS(15)
        default: amx_rows<Q8, 16>(*A, m0, unpacked, d, mn, n0, y, N); break;
#undef TSJAX_AMX_ROWS
      }
    }
    if (amx_rows_total < M) rest(amx_rows_total, n0);
  }
  if (configured) _tile_release();
  n_begin = n16;
}
#endif  // TSJAX_AMX

#else  // portable C++

template <int R, int C>
void q8_tile(const Acts& A, int64_t m0, const int8_t* w, const uint16_t* ws, int64_t n0, float* y,
             int64_t N) {
  const int64_t K = A.K, G = A.G;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      const int8_t* wr = w + (n0 + j) * K;
      const int8_t* xr = A.q.data() + (m0 + i) * K;
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s = 0;
        for (int64_t k = g * QK; k < (g + 1) * QK; ++k) s += (int32_t)wr[k] * xr[k];
        total += (float)s * f16_to_f32(ws[g * N + n0 + j]) * A.s[(m0 + i) * G + g];
      }
      y[(m0 + i) * N + n0 + j] = total;
    }
}

template <int R, int C>
void q4_tile(const Acts& A, int64_t m0, const uint8_t* qs, const uint16_t* d, const uint16_t* mn,
             int64_t n0, float* y, int64_t N) {
  const int64_t K = A.K, G = A.G;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      const uint8_t* wr = qs + (n0 + j) * (K / 2);
      const int8_t* xr = A.q.data() + (m0 + i) * K;
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s = 0;
        for (int64_t t = 0; t < QK / 2; ++t) {
          const uint8_t b = wr[g * QK / 2 + t];
          s += (int32_t)(b & 0x0f) * xr[g * QK + t] + (int32_t)(b >> 4) * xr[g * QK + t + 16];
        }
        const int64_t wb = g * N + n0 + j, xb = (m0 + i) * G + g;
        total += (float)s * f16_to_f32(d[wb]) * A.s[xb] + f16_to_f32(mn[wb]) * A.sum[xb];
      }
      y[(m0 + i) * N + n0 + j] = total;
    }
}
#endif

// Runs tile<R, C>(m0, n0) over every (row tile, channel pair) of one chunk of channels.
template <template <int, int> class T, class... Args>
void run_chunk(int64_t M, int64_t n_begin, int64_t n_end, Args... args) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
    const bool pair = n0 + 1 < n_end;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t r = std::min<int64_t>(MR, M - m0);
#define TSJAX_TILE(R)                                 \
  case R:                                             \
    if (pair)                                         \
      T<R, 2>::run(m0, n0, args...);                  \
    else                                              \
      T<R, 1>::run(m0, n0, args...);                  \
    break;
      switch (r) {
        TSJAX_TILE(1)
        TSJAX_TILE(2)
        TSJAX_TILE(3)
        TSJAX_TILE(4)
      }
#undef TSJAX_TILE
    }
  }
}

void q8_chunk(int64_t M, int64_t n_begin, int64_t n_end, const Acts* A, const int8_t* w,
              const uint16_t* d, float* y, int64_t N);

template <int R, int C>
struct Q8Tile {
  static void run(int64_t m0, int64_t n0, const Acts* A, const int8_t* w, const uint16_t* ws,
                  float* y, int64_t N) {
    q8_tile<R, C>(*A, m0, w, ws, n0, y, N);
  }
};

// q4 over one chunk of channels: eight channels at a time (AVX2), the rest one pair at a time.
void q4_chunk(int64_t M, int64_t n_begin, int64_t n_end, const Acts* A, const uint8_t* qs,
              const uint16_t* d, const uint16_t* mn, float* y, int64_t N);

template <int R, int C>
struct Q4Tile {
  static void run(int64_t m0, int64_t n0, const Acts* A, const uint8_t* qs, const uint16_t* d,
                  const uint16_t* mn, float* y, int64_t N) {
    q4_tile<R, C>(*A, m0, qs, d, mn, n0, y, N);
  }
};


void q8_chunk(int64_t M, int64_t n_begin, int64_t n_end, const Acts* A, const int8_t* w,
              const uint16_t* d, float* y, int64_t N) {
  // Without VNNI the transposed tile loses to one channel at a time (its sign trick and
  // int16 -> int32 steps per 4 values outweigh the shared loads): 28 vs 24 GMAC/s a core, AVX2.
#if defined(TSJAX_ZMM)
  auto tile = [&](int64_t r, int64_t m0, int64_t n0) {
    switch (r) {
#define TSJAX_Q8(R) case R: q8_tile16<R>(*A, m0, w, d, n0, y, N); break;
      TSJAX_Q8(1) TSJAX_Q8(2) TSJAX_Q8(3) TSJAX_Q8(4) TSJAX_Q8(5) TSJAX_Q8(6) TSJAX_Q8(7)
      default: q8_tile16<8>(*A, m0, w, d, n0, y, N); break;
#undef TSJAX_Q8
    }
  };
#if defined(TSJAX_AMX)
  amx_chunk<true>(M, n_begin, n_end, A, (const uint8_t*)w, d, nullptr, y, N,
                  [&](int64_t m_from, int64_t n0) { zmm_rows(m_from, M, n0, tile); });
#endif
  zmm_groups(M, n_begin, n_end, tile);
#endif
#if defined(__AVX2__) && (defined(__AVXVNNI__) || defined(__AVX512VNNI__) && defined(__AVX512VL__))
  const int64_t n8 = n_begin + (n_end - n_begin) / 8 * 8;
  for (int64_t n0 = n_begin; n0 < n8; n0 += 8) {  // a channel group's blocks stay in L1
    for (int64_t m0 = 0; m0 < M; m0 += MR) {          // across all the row tiles
      const int64_t r = std::min<int64_t>(MR, M - m0);
      switch (r) {
        case 1: q8_tile8<1>(*A, m0, w, d, n0, y, N); break;
        case 2: q8_tile8<2>(*A, m0, w, d, n0, y, N); break;
        case 3: q8_tile8<3>(*A, m0, w, d, n0, y, N); break;
        default: q8_tile8<4>(*A, m0, w, d, n0, y, N); break;
      }
    }
  }
  n_begin = n8;
#endif
  if (n_begin < n_end) run_chunk<Q8Tile>(M, n_begin, n_end, A, w, d, y, N);
}

void q4_chunk(int64_t M, int64_t n_begin, int64_t n_end, const Acts* A, const uint8_t* qs,
              const uint16_t* d, const uint16_t* mn, float* y, int64_t N) {
#if defined(TSJAX_ZMM)
  auto tile = [&](int64_t r, int64_t m0, int64_t n0) {
    switch (r) {
#define TSJAX_Q4(R) case R: q4_tile16<R>(*A, m0, qs, d, mn, n0, y, N); break;
      TSJAX_Q4(1) TSJAX_Q4(2) TSJAX_Q4(3) TSJAX_Q4(4) TSJAX_Q4(5) TSJAX_Q4(6) TSJAX_Q4(7)
      default: q4_tile16<8>(*A, m0, qs, d, mn, n0, y, N); break;
#undef TSJAX_Q4
    }
  };
#if defined(TSJAX_AMX)
  amx_chunk<false>(M, n_begin, n_end, A, qs, d, mn, y, N,
                   [&](int64_t m_from, int64_t n0) { zmm_rows(m_from, M, n0, tile); });
#endif
  zmm_groups(M, n_begin, n_end, tile);
#endif
#if defined(__AVX2__)
  const int64_t n8 = n_begin + (n_end - n_begin) / 8 * 8;
  for (int64_t n0 = n_begin; n0 < n8; n0 += 8) {  // a channel group's blocks stay in L1
    for (int64_t m0 = 0; m0 < M; m0 += MR) {          // across all the row tiles
      const int64_t r = std::min<int64_t>(MR, M - m0);
      switch (r) {
        case 1: q4_tile8<1>(*A, m0, qs, d, mn, n0, y, N); break;
        case 2: q4_tile8<2>(*A, m0, qs, d, mn, n0, y, N); break;
        case 3: q4_tile8<3>(*A, m0, qs, d, mn, n0, y, N); break;
        default: q4_tile8<4>(*A, m0, qs, d, mn, n0, y, N); break;
      }
    }
  }
  n_begin = n8;
#endif
  if (n_begin < n_end) run_chunk<Q4Tile>(M, n_begin, n_end, A, qs, d, mn, y, N);
}

// Chunks of channels handed out through an atomic counter to the caller and to tasks on XLA's
// pool. The caller waits only for chunks others have taken (a task that starts late finds none
// left), so a busy pool never blocks the call. The job outlives the call in late tasks.
struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n_chunks = 0;
  std::function<void(int64_t)> work;

  void run() {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= n_chunks) return;
      work(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Calls below this much work (weight bytes streamed + multiply-adds / 8) run on the calling
// thread alone: handing a chunk to the pool costs ~8 us, what a 256 KB read takes.
constexpr int64_t kParallelWork = 256 * 1024;

#if defined(TSJAX_ZMM)
constexpr int64_t kChannelTile = 16;
#else
constexpr int64_t kChannelTile = 8;
#endif

// `chunk_fn` over [0, N) in chunks of whole `tile`s.
void parallel_channels(ffi::ThreadPool& pool, int64_t work, int64_t N,
                       std::function<void(int64_t, int64_t)> chunk_fn,
                       int64_t tile = kChannelTile) {
  const int64_t threads = work < kParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  if (threads == 1) return chunk_fn(0, N);
  // ~4 chunks a thread (balance), whole channel tiles.
  int64_t size = std::max<int64_t>(tile, (N + 4 * threads - 1) / (4 * threads));
  size = (size + tile - 1) / tile * tile;
  auto job = std::make_shared<Job>();
  job->n_chunks = (N + size - 1) / size;
  job->work = [=](int64_t c) { chunk_fn(c * size, std::min(N, (c + 1) * size)); };
  for (int64_t t = 1; t < std::min(threads, job->n_chunks); ++t) pool.Schedule([job] { job->run(); });
  job->run();
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) std::this_thread::yield();
}

// x [M, K] into A: rows split over the pool when there are enough of them (on the calling
// thread alone, quantizing 64 rows took a fifth to a quarter of a 64-row call on SmolLM2's
// shapes, the other thread idle meanwhile).
void quantize_acts(ffi::ThreadPool& pool, Acts& A, const float* x, int64_t M, int64_t K) {
  A.resize(M, K);
  Acts* a = &A;
  parallel_channels(pool, M * K * (int64_t)sizeof(float), M,
                    [=](int64_t m0, int64_t m1) { a->quantize_rows(x, m0, m1); }, 1);
}

ffi::Error check_shapes(int64_t K, int64_t N, int64_t w_cols, int64_t w_per_k,
                        ffi::Span<const int64_t> scale_dims) {
  if (K % QK != 0) return ffi::Error::InvalidArgument("K must be a multiple of 32");
  if (w_cols * w_per_k != K) return ffi::Error::InvalidArgument("weight columns do not match K");
  if (scale_dims.size() != 2 || scale_dims[0] != K / QK || scale_dims[1] != N)
    return ffi::Error::InvalidArgument("block scales must be [K/32, N]");
  return ffi::Error::Success();
}

ffi::Error Q8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F16> ws, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("x, w must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (auto e = check_shapes(K, N, wd[1], 1, ws.dimensions()); e.failure()) return e;
  thread_local Acts A;
  quantize_acts(pool, A, x.typed_data(), M, K);
  const Acts* a = &A;
  const int8_t* wp = w.typed_data();
  const uint16_t* sp = ws.typed_data();
  float* yp = y->typed_data();
  parallel_channels(pool, N * K + M * N * K / 8, N, [=](int64_t n0, int64_t n1) {
    q8_chunk(M, n0, n1, a, wp, sp, yp, N);
  });
  return ffi::Error::Success();
}

ffi::Error Q4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> qs,
                        ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = qs.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("x, qs must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (auto e = check_shapes(K, N, wd[1], 2, d.dimensions()); e.failure()) return e;
  if (auto e = check_shapes(K, N, wd[1], 2, m.dimensions()); e.failure()) return e;
  thread_local Acts A;
  quantize_acts(pool, A, x.typed_data(), M, K);
  const Acts* a = &A;
  const uint8_t* qp = qs.typed_data();
  const uint16_t *dp = d.typed_data(), *mp = m.typed_data();
  float* yp = y->typed_data();
  parallel_channels(pool, N * K / 2 + M * N * K / 8, N, [=](int64_t n0, int64_t n1) {
    q4_chunk(M, n0, n1, a, qp, dp, mp, yp, N);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Attention over the blocked KV cache (tsjax.cache.cpu_kernels) where its blocks lie: n rows of
// queries, T tokens each, one query per head, each against the keys and values of its own cache
// row. XLA:CPU ran this as ~8 fused ops a layer (two batched dots, the mask, exponentials, sums,
// a divide) over the whole bucket, each a pass over memory, and a prefill first gathered its
// row out of the blocks; here each query reads only the positions it sees, where they lie.
//
// q [n, T, K, G, H] (already scaled); pos [n, T] (each query's position: it sees positions p
// with pos - window < p <= pos, or every p <= pos where window <= 0; up to key_end instead,
// key_end [n, T] or [0], where an image's positions see each other); rows [n] (each query row's
// cache row); sinks [K * G] or [0] (per-head sink logits: one more term of the softmax's
// denominator); then the key blocks and the value blocks, each a grid of row blocks by
// `pos_blocks` position blocks in row-major order, each block [r, K, P_b, H]. out [n, T, K, G,
// H]. A query that sees no position, or whose row is outside the blocks, gets zeros.

// exp(x) for x <= 0 (a score minus the largest) in plain arithmetic the compiler vectorizes:
// Cody-Waite reduction and a degree-6 polynomial (~1 ulp); below -87, where float32's exp
// underflows, about 1e-38.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  // round to nearest by the float trick (1.5 * 2^23), which stays plain arithmetic
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct AttnBlock {
  const float* k;
  const float* v;
  int64_t start, len;  // its first position, its positions
};

// q . k over H values: one 512-bit accumulator and one horizontal sum where H is a multiple of
// 16; elsewhere 16 partial sums the compiler vectorizes.
inline float dot_h(const float* a, const float* b, int64_t H) {
#if defined(__AVX512F__)
  if (H % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t h = 0; h < H; h += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + h), _mm512_loadu_ps(b + h), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float part[16] = {};
  int64_t h = 0;
  for (; h + 16 <= H; h += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[h + j] * b[h + j];
  float sum = 0;
  for (; h < H; ++h) sum += a[h] * b[h];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return sum + part[0];
}

// The largest and the sum of n values, in 16 lanes the compiler vectorizes (a plain running max
// or sum is one serial chain: float arithmetic is not reassociated).
inline float max_of(const float* x, int64_t n) {
  float lane[16];
  std::fill(lane, lane + 16, -3.0e38f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] = lane[j] > x[i + j] ? lane[j] : x[i + j];
  float m = -3.0e38f;
  for (; i < n; ++i) m = std::max(m, x[i]);
  for (int j = 0; j < 16; ++j) m = std::max(m, lane[j]);
  return m;
}

inline float sum_of(const float* x, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] += x[i + j];
  float sum = 0;
  for (; i < n; ++i) sum += x[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) lane[j] += lane[j + w];
  return sum + lane[0];
}

// Scores of G queries (q [G, H]) against `len` keys ([len, H], consecutive) into sc[g * stride].
inline void scores(const float* q, int64_t G, int64_t H, const float* k, int64_t len, float* sc,
                   int64_t stride) {
  for (int64_t s = 0; s < len; ++s)
    for (int64_t g = 0; g < G; ++g) sc[g * stride + s] = dot_h(q + g * H, k + s * H, H);
}

// out[H] += sum over s < len of p[s] * v[s, H] (v's rows consecutive): 64 values at a time in
// four 512-bit accumulators across all s (a plain loop reloads and stores out for every s).
inline void weighted_sum(const float* p, const float* v, int64_t len, int64_t H, float* out) {
  int64_t h = 0;
#if defined(__AVX512F__)
  for (; h + 64 <= H; h += 64) {
    __m512 a0 = _mm512_loadu_ps(out + h), a1 = _mm512_loadu_ps(out + h + 16);
    __m512 a2 = _mm512_loadu_ps(out + h + 32), a3 = _mm512_loadu_ps(out + h + 48);
    for (int64_t s = 0; s < len; ++s) {
      const __m512 w = _mm512_set1_ps(p[s]);
      const float* vs = v + s * H + h;
      a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vs), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vs + 16), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vs + 32), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vs + 48), a3);
    }
    _mm512_storeu_ps(out + h, a0);
    _mm512_storeu_ps(out + h + 16, a1);
    _mm512_storeu_ps(out + h + 32, a2);
    _mm512_storeu_ps(out + h + 48, a3);
  }
#endif
  for (int64_t s = 0; s < len; ++s)
    for (int64_t j = h; j < H; ++j) out[j] += p[s] * v[s * H + j];
}

// Scores of the G queries of nt tokens (query (j, g) at q + j * qstride + g * H) against `len`
// keys ([len, H], consecutive) into sc[(j * G + g) * stride + s]: 16 keys at a time transposed
// into [H, 16], each query then a broadcast-multiply-add per value, with no horizontal sums
// (for several tokens: the transpose is shared by all their queries).
void tile_scores(const float* q, int64_t qstride, int64_t nt, int64_t G, int64_t H,
                 const float* k, int64_t len, float* sc, int64_t stride) {
  thread_local std::vector<float> kt;
  if (static_cast<int64_t>(kt.size()) < H * 16) kt.resize(H * 16);
  float* t = kt.data();
  const int64_t nq = nt * G;
  auto query = [&](int64_t x) { return q + (x / G) * qstride + (x % G) * H; };  // x = j * G + g
  for (int64_t c = 0; c < len; c += 16) {
    const int64_t m = std::min<int64_t>(16, len - c);
    if (m < 16) std::fill(t, t + H * 16, 0.0f);
    for (int64_t l = 0; l < m; ++l)
      for (int64_t h = 0; h < H; ++h) t[h * 16 + l] = k[(c + l) * H + h];
#if defined(__AVX512F__)
    // four queries at a time: four independent chains of multiply-adds
    const __mmask16 keep = static_cast<__mmask16>((1u << m) - 1);
    for (int64_t a0 = 0; a0 < nq; a0 += 4) {
      const float* qv[4];
      for (int a = 0; a < 4; ++a) qv[a] = query(std::min(a0 + a, nq - 1));
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      for (int64_t h = 0; h < H; ++h) {
        const __m512 th = _mm512_loadu_ps(t + h * 16);
        for (int a = 0; a < 4; ++a) acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(qv[a][h]), th, acc[a]);
      }
      for (int a = 0; a < 4 && a0 + a < nq; ++a)
        _mm512_mask_storeu_ps(sc + (a0 + a) * stride + c, keep, acc[a]);
    }
#else
    for (int64_t x = 0; x < nq; ++x) {
      const float* qv = query(x);
      float acc[16] = {};
      for (int64_t h = 0; h < H; ++h)
        for (int l = 0; l < 16; ++l) acc[l] += qv[h] * t[h * 16 + l];
      for (int64_t l = 0; l < m; ++l) sc[x * stride + c + l] = acc[l];
    }
#endif
  }
}

// The queries of nt consecutive tokens of one row and KV head k (the G queries of token j at
// q + j * qstride, its output at out + j * qstride), token j seeing positions lo[j]..hi[j]
// (inclusive), against local row i of a row block's position blocks.
void attend_tokens(const float* q, int64_t qstride, const int64_t* lo, const int64_t* hi,
                   int64_t nt, const float* sinks, const std::vector<AttnBlock>& blocks,
                   int64_t i, int64_t k, int64_t K, int64_t G, int64_t H, float* out) {
  int64_t LO = std::numeric_limits<int64_t>::max(), HI = -1;
  for (int64_t j = 0; j < nt; ++j) {
    std::fill(out + j * qstride, out + j * qstride + G * H, 0.0f);
    if (hi[j] >= lo[j]) LO = std::min(LO, lo[j]), HI = std::max(HI, hi[j]);
  }
  if (HI < LO) return;
  const int64_t L = HI - LO + 1;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < nt * G * L) buf.resize(nt * G * L);
  float* sc = buf.data();
  // one token's few queries: a dot and a horizontal sum each; more: the transposed tiles
  const bool tiled = nt * G >= 8;
  for (const AttnBlock& b : blocks) {
    const int64_t s0 = std::max(LO, b.start), s1 = std::min(HI + 1, b.start + b.len);
    if (s0 >= s1) continue;
    const float* kb = b.k + ((i * K + k) * b.len + (s0 - b.start)) * H;
    if (tiled) {
      tile_scores(q, qstride, nt, G, H, kb, s1 - s0, sc + (s0 - LO), L);
    } else {
      for (int64_t j = 0; j < nt; ++j)
        scores(q + j * qstride, G, H, kb, s1 - s0, sc + j * G * L + (s0 - LO), L);
    }
  }
  for (int64_t j = 0; j < nt; ++j) {
    if (hi[j] < lo[j]) continue;
    const int64_t len = hi[j] - lo[j] + 1;
    for (int64_t g = 0; g < G; ++g) {
      float* sg = sc + (j * G + g) * L + (lo[j] - LO);
      const float top = std::max(max_of(sg, len), sinks ? sinks[k * G + g] : sg[0]);
      for (int64_t s = 0; s < len; ++s) sg[s] = exp_neg(sg[s] - top);
      const float den = sum_of(sg, len) + (sinks ? exp_neg(sinks[k * G + g] - top) : 0.0f);
      const float inv = 1.0f / den;
      for (int64_t s = 0; s < len; ++s) sg[s] *= inv;
    }
  }
  for (const AttnBlock& b : blocks) {
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t s0 = std::max(lo[j], b.start), s1 = std::min(hi[j] + 1, b.start + b.len);
      if (s0 >= s1) continue;
      const float* vb = b.v + ((i * K + k) * b.len + (s0 - b.start)) * H;
      for (int64_t g = 0; g < G; ++g)
        weighted_sum(sc + (j * G + g) * L + (s0 - LO), vb, s1 - s0, H,
                     out + j * qstride + g * H);
    }
  }
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> pos,
                         ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> window,
                         ffi::Buffer<ffi::F32> sinks, ffi::Buffer<ffi::S32> key_end,
                         ffi::RemainingArgs kv, ffi::ResultBuffer<ffi::F32> out,
                         int64_t pos_blocks) {
  auto qd = q.dimensions();
  if (qd.size() != 5) return ffi::Error::InvalidArgument("q must be [n, T, K, G, H]");
  const int64_t n = qd[0], T = qd[1], K = qd[2], G = qd[3], H = qd[4];
  if (pos.element_count() != n * T) return ffi::Error::InvalidArgument("pos must be [n, T]");
  if (rows.element_count() != n) return ffi::Error::InvalidArgument("rows must be [n]");
  if (key_end.element_count() != 0 && key_end.element_count() != n * T)
    return ffi::Error::InvalidArgument("key_end must be [n, T] or empty");
  if (sinks.element_count() != 0 && sinks.element_count() != K * G)
    return ffi::Error::InvalidArgument("sinks must be [K * G] or empty");
  const int64_t nb = static_cast<int64_t>(kv.size()) / 2;
  if (pos_blocks <= 0 || kv.size() % 2 != 0 || nb % pos_blocks != 0)
    return ffi::Error::InvalidArgument("key and value blocks: a grid of row x position blocks");
  // grid[rb]: row block rb's position blocks; row_start[rb]: its first row
  std::vector<std::vector<AttnBlock>> grid(nb / pos_blocks);
  std::vector<int64_t> row_start(grid.size() + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    auto kb = kv.get<ffi::Buffer<ffi::F32>>(b);
    auto vb = kv.get<ffi::Buffer<ffi::F32>>(nb + b);
    if (kb.has_error()) return kb.error();
    if (vb.has_error()) return vb.error();
    auto kd = kb->dimensions(), vd = vb->dimensions();
    const int64_t rb = b / pos_blocks;
    std::vector<AttnBlock>& row = grid[rb];
    const int64_t start = row.empty() ? 0 : row.back().start + row.back().len;
    if (kd.size() != 4 || vd.size() != 4 || kd[1] != K || kd[3] != H || vd[0] != kd[0] ||
        vd[1] != K || vd[2] != kd[2] || vd[3] != H ||
        (!row.empty() && kd[0] != row_start[rb + 1] - row_start[rb]))
      return ffi::Error::InvalidArgument("key and value blocks must be [r, K, P, H]");
    if (row.empty()) row_start[rb + 1] = row_start[rb] + kd[0];
    row.push_back({kb->typed_data(), vb->typed_data(), start, kd[2]});
  }
  const float* qp = q.typed_data();
  const int32_t *pp = pos.typed_data(), *rp = rows.typed_data();
  const int32_t* ep = key_end.element_count() ? key_end.typed_data() : nullptr;
  const int64_t w = window.typed_data()[0];
  const float* sp = sinks.element_count() ? sinks.typed_data() : nullptr;
  float* op = out->typed_data();
  const int64_t total = grid.empty() || grid[0].empty() ? 0 : grid[0].back().start + grid[0].back().len;
  // Tasks: (query row, tile of kTokens tokens, KV head); the work is about the positions read.
  constexpr int64_t kTokens = 8;
  const int64_t tiles = (T + kTokens - 1) / kTokens;
  const int64_t tasks = n * tiles * K;
  const int64_t work = n * T * K * std::max<int64_t>(total, 1) * H * 4;
  parallel_channels(
      pool, work, tasks,
      [&, qp, pp, rp, ep, sp, op](int64_t t0, int64_t t1) {
        int64_t lo[kTokens], hi[kTokens];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k = t % K, tile = (t / K) % tiles, i = t / K / tiles;
          const int64_t j0 = tile * kTokens, nt = std::min(kTokens, T - j0);
          const int64_t first = (i * T + j0) * K + k;  // (row i, token j0, head k)
          const int64_t row = rp[i];
          const int64_t rb = std::upper_bound(row_start.begin(), row_start.end(), row) -
                             row_start.begin() - 1;
          for (int64_t j = 0; j < nt; ++j) {
            const int64_t it = i * T + j0 + j, p = pp[it];
            lo[j] = w > 0 ? std::max<int64_t>(0, p - w + 1) : 0;
            hi[j] = std::min<int64_t>(ep ? ep[it] - 1 : p, total - 1);
            if (row < 0 || rb >= static_cast<int64_t>(grid.size())) hi[j] = lo[j] - 1;
          }
          const int64_t local = rb < static_cast<int64_t>(grid.size()) ? row - row_start[rb] : 0;
          const auto& blocks = rb < static_cast<int64_t>(grid.size()) ? grid[rb] : grid[0];
          attend_tokens(qp + first * G * H, K * G * H, lo, hi, nt, sp, blocks, local, k, K, G,
                        H, op + first * G * H);
        }
      },
      1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxQ8Matmul, Q8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxQ4Matmul, Q4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TsjaxAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // window
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sinks
                                  .Arg<ffi::Buffer<ffi::S32>>()   // key_end
                                  .RemainingArgs()                // key blocks, value blocks
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pos_blocks"));

extern "C" const char* tsjax_blockdot_isa() {
#if defined(TSJAX_AMX)
  return amx_ready() ? "amx" : "avx512-vnni";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}
