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
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
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
  std::vector<uint8_t> a;
  std::vector<float> s, sum;

  void quantize(const float* x, int64_t m_, int64_t k_) {
    M = m_, K = k_, G = k_ / QK;
    q.resize(M * K), a.resize(M * K), s.resize(M * G), sum.resize(M * G);
    for (int64_t b = 0; b < M * G; ++b) quantize_block(x + b * QK, b);
  }

  // One block: d = max|x| / 127, q = round-half-even(x / d), the rounding nearbyint does in
  // the default mode (the AVX2 form divides too, so both builds give the same bits).
  void quantize_block(const float* xb, int64_t b) {
#if defined(__AVX2__)
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

void parallel_channels(ffi::ThreadPool& pool, int64_t work, int64_t N,
                       std::function<void(int64_t, int64_t)> chunk_fn) {
  const int64_t threads = work < kParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  if (threads == 1) return chunk_fn(0, N);
  // ~4 chunks a thread (balance), whole 8-channel tiles.
  int64_t size = std::max<int64_t>(8, (N + 4 * threads - 1) / (4 * threads));
  size = (size + 7) / 8 * 8;
  auto job = std::make_shared<Job>();
  job->n_chunks = (N + size - 1) / size;
  job->work = [=](int64_t c) { chunk_fn(c * size, std::min(N, (c + 1) * size)); };
  for (int64_t t = 1; t < std::min(threads, job->n_chunks); ++t) pool.Schedule([job] { job->run(); });
  job->run();
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) std::this_thread::yield();
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
  A.quantize(x.typed_data(), M, K);
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
  A.quantize(x.typed_data(), M, K);
  const Acts* a = &A;
  const uint8_t* qp = qs.typed_data();
  const uint16_t *dp = d.typed_data(), *mp = m.typed_data();
  float* yp = y->typed_data();
  parallel_channels(pool, N * K / 2 + M * N * K / 8, N, [=](int64_t n0, int64_t n1) {
    q4_chunk(M, n0, n1, a, qp, dp, mp, yp, N);
  });
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

extern "C" const char* tsjax_blockdot_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}
