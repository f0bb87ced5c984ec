// glmkit's CPU kernels for int4 weights: activations are quantized to int8 in blocks of 32 (as llama.cpp's Q8
// activations), weights stay 4-bit, and products are summed in integers: vpdpbusd (u8 x s8 -> s32) with AVX-512
// VNNI, vpmaddubsw + vpmaddwd with AVX2. The build's flags choose the instruction set (cpu_kernels.py).
//
// Weight layout ("vnni"), per (N, K) matrix of values 0..15 with w = (q - 8) * scale + zero per `gs` columns:
//   packed (N / 16, K / 8, 16, 4) uint8: tile t of 16 rows, chunk c of 8 columns; byte (r, j) holds
//     q[16 t + r, 8 c + j] in its low nibble and q[16 t + r, 8 c + 4 + j] in its high one;
//   sz (N / 16, K / gs, 2, 16) bfloat16: the tile's 16 scales, then its 16 zeros, of each group.
// Stacked experts add a leading E. Results are float32.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

// e^x = 2^n 2^f with n = round(x log2 e): 2^f on [-1/2, 1/2] by a degree-6 polynomial, highest power first
constexpr float EXP2_POLY[7] = {1.535336188e-4f, 1.339887440e-3f, 9.618437358e-3f, 5.550332471e-2f,
                                2.402264791e-1f, 6.931472029e-1f, 1.f};

#if defined(__AVX512VNNI__)
struct Floats16 {  // 16 float32 lanes: one AVX-512 register
  __m512 v;
};
inline Floats16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store16(float* p, Floats16 a) { _mm512_storeu_ps(p, a.v); }
inline Floats16 splat16(float f) { return {_mm512_set1_ps(f)}; }
inline Floats16 mul(Floats16 a, Floats16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }

inline __m512 exp_ps(__m512 x) {  // e^x (EXP2_POLY)
  __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f)),
                           _mm512_set1_ps(1.44269504f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
  return _mm512_scalef_ps(p, n);
}

inline Floats16 silu(Floats16 g) {  // g / (1 + e^-g)
  return {_mm512_div_ps(g.v, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g.v))))};
}

inline Floats16 bf16x16(const c10::BFloat16* p) {  // 16 bfloat16 -> 16 float32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}

// 32 floats -> 32 int8 (x * 127 / max|x|, rounded to nearest even); returns max|x|, adds the sums of q and x
inline float quantize_block(const float* xb, int8_t* qb, int32_t* qsum, float* xsum) {
  __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
  *qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  *xsum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
  return amax;
}

// Sum over one block of 32 columns (256 bytes of a tile) of q * xq for the tile's 16 rows -> 16 int32
inline __m512i block_dot(const uint8_t* w, const int32_t* xb) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
  for (int c = 0; c < 4; ++c) {
    __m512i v = _mm512_loadu_si512(w + 64 * c);
    d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v, low), _mm512_set1_epi32(xb[2 * c]));
    d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), _mm512_set1_epi32(xb[2 * c + 1]));
  }
  return _mm512_add_epi32(d0, d1);
}

// acc + (d - 8 qsum) * s * xscale, the block's integer sums as floats
inline Floats16 add_block(Floats16 acc, __m512i d, int32_t qsum, Floats16 s, float xscale) {
  __m512i centred = _mm512_sub_epi32(d, _mm512_set1_epi32(8 * qsum));
  return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(s.v, _mm512_set1_ps(xscale)), acc.v)};
}
// int8 weights: the same sum over one block of 32 columns (512 bytes: 8 chunks of 4 columns) -> 16 exact int32;
// vpdpbusd wants unsigned weights, so it sums (q + 128) xq and takes 128 sum(xq) off
inline __m512i block_dot8(const int8_t* w, const int32_t* xb, int32_t qsum) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i d = _mm512_setzero_si512();
  for (int c = 0; c < 8; ++c)
    d = _mm512_dpbusd_epi32(d, _mm512_xor_si512(_mm512_loadu_si512(w + 64 * c), flip), _mm512_set1_epi32(xb[c]));
  return _mm512_sub_epi32(d, _mm512_set1_epi32(128 * qsum));
}
inline Floats16 add_scaled(Floats16 acc, __m512i d, float scale) {  // acc + d * scale
  return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(scale), acc.v)};
}
#else  // AVX2 + FMA
struct Floats16 {  // 16 float32 lanes: two AVX2 registers
  __m256 lo, hi;
};
inline Floats16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store16(float* p, Floats16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline Floats16 splat16(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline Floats16 mul(Floats16 a, Floats16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Floats16 fmadd(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}

inline __m256 exp_ps(__m256 x) {  // e^x (EXP2_POLY); 2^n built in the exponent bits
  __m256 t = _mm256_mul_ps(_mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-88.f)),
                           _mm256_set1_ps(1.44269504f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 silu8(__m256 g) {
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
inline Floats16 silu(Floats16 g) { return {silu8(g.lo), silu8(g.hi)}; }

inline __m256 bf16x8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Floats16 bf16x16(const c10::BFloat16* p) { return {bf16x8(p), bf16x8(p + 8)}; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

inline float quantize_block(const float* xb, int8_t* qb, int32_t* qsum, float* xsum) {  // as above
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax8 = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(xb + 8 * i)));
  float amax = hmax(amax8);
  __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  *qsum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  *xsum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  // pack with saturation (each step interleaves the two 128-bit lanes), then put the 8 words back in order
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), bytes);
  return amax;
}

struct Ints16 {  // 16 int32 lanes: rows 0..7 and 8..15 of a tile
  __m256i lo, hi;
};

inline __m256i half_block_dot(const uint8_t* w, const int32_t* xb) {  // 8 rows: 4 x 32 bytes, 64 bytes apart
  const __m256i low = _mm256_set1_epi8(0x0F);
  // u8 x s8 pairs summed to int16 (|.| <= 2 * 15 * 127), 8 such per lane still fit in int16
  __m256i d = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c));
    d = _mm256_add_epi16(d, _mm256_maddubs_epi16(_mm256_and_si256(v, low), _mm256_set1_epi32(xb[2 * c])));
    d = _mm256_add_epi16(d, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                                 _mm256_set1_epi32(xb[2 * c + 1])));
  }
  return _mm256_madd_epi16(d, _mm256_set1_epi16(1));  // pairs of int16 -> each row's int32 sum
}
inline Ints16 block_dot(const uint8_t* w, const int32_t* xb) { return {half_block_dot(w, xb), half_block_dot(w + 32, xb)}; }

inline Floats16 add_block(Floats16 acc, Ints16 d, int32_t qsum, Floats16 s, float xscale) {
  const __m256i q8 = _mm256_set1_epi32(8 * qsum);
  const __m256 xs = _mm256_set1_ps(xscale);
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d.lo, q8)), _mm256_mul_ps(s.lo, xs), acc.lo),
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d.hi, q8)), _mm256_mul_ps(s.hi, xs), acc.hi)};
}

inline __m256i half_block_dot8(const int8_t* w, const int32_t* xb) {  // 8 rows: 8 x 32 bytes, 64 bytes apart
  // vpmaddubsw wants one unsigned side: |xq| times q with xq's sign; pairs (<= 2 * 127 * 127) fit in int16
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i d = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    __m256i x = _mm256_set1_epi32(xb[c]), v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(v, x)), ones));
  }
  return d;
}
inline Ints16 block_dot8(const int8_t* w, const int32_t* xb, int32_t) {
  return {half_block_dot8(w, xb), half_block_dot8(w + 32, xb)};
}
inline Floats16 add_scaled(Floats16 acc, Ints16 d, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(d.lo), s, acc.lo), _mm256_fmadd_ps(_mm256_cvtepi32_ps(d.hi), s, acc.hi)};
}
#endif

struct Activations {  // rows of K values as int8 blocks of 32: q (M, K), per block scale, sum of q, sum of x
  int64_t K;
  std::vector<int8_t> q;
  std::vector<float> scale, xsum;
  std::vector<int32_t> qsum;
  Activations(int64_t M, int64_t K) : K(K), q(M * K), scale(M * K / 32), xsum(M * K / 32), qsum(M * K / 32) {}
  void set_row(int64_t m, const float* x) {
    for (int64_t b = 0; b < K / 32; ++b) set_block(m, b, x + 32 * b);
  }
  void set_block(int64_t m, int64_t b, const float* xb) {  // row m's columns 32 b .. 32 b + 31
    int64_t i = m * (K / 32) + b;
    scale[i] = quantize_block(xb, q.data() + m * K + 32 * b, &qsum[i], &xsum[i]) / 127.f;
  }
};

constexpr int64_t PREFETCH = 1024;  // bytes ahead in a tile's stream of weights (several blocks of 256)

// 16 rows of one tile times activation row m -> 16 floats
inline Floats16 tile_dot(const uint8_t* w, const c10::BFloat16* sz, const Activations& a, int64_t m, int64_t gs) {
  const int64_t K = a.K, per_group = gs / 32;
  const int8_t* xq = a.q.data() + m * K;
  const int64_t row = m * (K / 32);
  Floats16 acc = splat16(0.f);
  for (int64_t g = 0; g < K / gs; ++g) {
    Floats16 s = bf16x16(sz + 32 * g), z = bf16x16(sz + 32 * g + 16);
    float zx = 0.f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      for (int64_t line = 0; line < 256; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + 256 * b + PREFETCH + line), _MM_HINT_T0);
      // sum (q - 8) x = xs (sum q xq - 8 sum xq): scaled per row by s
      acc = add_block(acc, block_dot(w + 256 * b, reinterpret_cast<const int32_t*>(xq + 32 * b)), a.qsum[row + b], s,
                      a.scale[row + b]);
      zx += a.xsum[row + b];
    }
    acc = fmadd(z, splat16(zx), acc);
  }
  return acc;
}

// int8 weights (N, K) with per-row float32 scales, in tiles: (N / 16, K / 4, 16, 4) int8, byte (r, j) of chunk c
// holding q[16 t + r, 4 c + j]. 16 rows of tile `w` times activation row m -> 16 floats
inline Floats16 tile_dot8(const int8_t* w, const float* row_scales, const Activations& a, int64_t m) {
  const int64_t K = a.K, row = m * (K / 32);
  const int8_t* xq = a.q.data() + m * K;
  Floats16 acc = splat16(0.f);
  for (int64_t b = 0; b < K / 32; ++b) {
    for (int64_t line = 0; line < 512; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + 512 * b + PREFETCH + line), _MM_HINT_T0);
    acc = add_scaled(acc, block_dot8(w + 512 * b, reinterpret_cast<const int32_t*>(xq + 32 * b), a.qsum[row + b]),
                     a.scale[row + b]);
  }
  return mul(acc, load16(row_scales));
}

std::vector<float> as_float(const at::Tensor& x) {  // (M, K) float32 or bfloat16 -> float32 values
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "glmkit kernels: contiguous float32 or bfloat16 activations");
  std::vector<float> out(x.numel());
  if (x.scalar_type() == at::kFloat) {
    std::copy(x.data_ptr<float>(), x.data_ptr<float>() + x.numel(), out.begin());
  } else {
    const c10::BFloat16* p = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = static_cast<float>(p[i]);
  }
  return out;
}

// Stacked (E, N, K) int4 weights; tile(e, t, a, m) -> rows 16 t .. 16 t + 15 of expert e times activation row m
struct Int4Weights {
  const uint8_t* w;
  const c10::BFloat16* sz;
  int64_t E, N, K, gs;
  Int4Weights(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group_size)
      : E(packed.size(0)), N(packed.size(1) * 16), K(packed.size(2) * 8), gs(group_size) {
    TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                scales_zeros.numel() == E * N * (K / gs) * 2 && gs % 32 == 0 && K % gs == 0,
                "int4 kernels: (E, N/16, K/8, 16, 4) uint8 values and (E, N/16, K/gs, 2, 16) bfloat16 scales");
    w = packed.data_ptr<uint8_t>();
    sz = scales_zeros.data_ptr<c10::BFloat16>();
  }
  Floats16 tile(int64_t e, int64_t t, const Activations& a, int64_t m) const {
    const int64_t i = e * (N / 16) + t;
    return tile_dot(w + i * K * 8, sz + i * (K / gs) * 32, a, m, gs);
  }
};

// y (M, N) float32 = x (M, K) @ W_e^T
Activations quantized_rows(const at::Tensor& x) {  // (M, K) -> int8 blocks
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(x.dim() == 2 && K % 32 == 0, "glmkit kernels: (M, K) activations with K a multiple of 32");
  std::vector<float> xf = as_float(x);
  Activations a(M, K);
  for (int64_t m = 0; m < M; ++m) a.set_row(m, xf.data() + m * K);
  return a;
}

// y (M, N) float32 from tile(t, a, m) -> rows 16 t .. 16 t + 15 of row m's product
template <typename Tile>
at::Tensor tiled_product(const at::Tensor& x, const Activations& a, int64_t N, Tile tile) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t m = 0; m < M; ++m) store16(out + m * N + 16 * t, tile(t, m));
  });
  return y;
}

// y (M, N) float32 = x (M, K) @ W_e^T
at::Tensor linear(const at::Tensor& x, const Int4Weights& w, int64_t e) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K && 0 <= e && e < w.E, "glmkit kernels: weight and input sizes differ");
  Activations a = quantized_rows(x);
  return tiled_product(x, a, w.N, [&](int64_t t, int64_t m) { return w.tile(e, t, a, m); });
}

// One token x (1, C) through its k experts `ids` (k,) weighted by `weights` (1, k): SwiGLU experts with
// gate_up (E, 2I, C) (gate rows, then up rows) and down (E, C, I) -> (1, C) float32.
at::Tensor moe_token(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const Int4Weights& gu,
                     const Int4Weights& down) {
  const int64_t C = x.size(1), k = ids.numel(), I = gu.N / 2;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && gu.K == C && down.N == C && down.K == I && gu.E == down.E &&
              I % 32 == 0 && weights.numel() == k, "glmkit kernels: expert and input sizes differ");
  at::Tensor ids64 = ids.to(at::kLong).contiguous(), wf = weights.to(at::kFloat).contiguous();
  const int64_t* id = ids64.data_ptr<int64_t>();
  const float* wj = wf.data_ptr<float>();
  for (int64_t j = 0; j < k; ++j) TORCH_CHECK(0 <= id[j] && id[j] < gu.E, "glmkit kernels: expert id out of range");
  std::vector<float> xf = as_float(x);
  Activations a(1, C);
  a.set_row(0, xf.data());
  // 32 columns of the activation at a time: gate and up rows, silu(gate) * up, quantized as a block
  std::vector<float> act(k * I);  // (k, I)
  Activations b(k, I);
  const int64_t blocks = I / 32;
  at::parallel_for(0, k * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      int64_t j = i / blocks, c = i % blocks;
      float* a32 = act.data() + j * I + 32 * c;
      for (int64_t half = 0; half < 2; ++half) {
        int64_t t = 2 * c + half;  // gate tile; its up tile is I / 16 tiles below
        Floats16 g = gu.tile(id[j], t, a, 0), u = gu.tile(id[j], t + I / 16, a, 0);
        store16(a32 + 16 * half, mul(silu(g), u));
      }
      b.set_block(j, c, a32);
    }
  });
  // the down projections, expert by expert over this thread's tiles (each expert's rows read in one stream)
  at::Tensor y = at::zeros({1, C}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  at::parallel_for(0, C / 16, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = lo; t < hi; ++t)
        store16(out + 16 * t, fmadd(splat16(wj[j]), down.tile(id[j], t, b, j), load16(out + 16 * t)));
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t e, int64_t gs) {
  return linear(x, Int4Weights(packed, sz, gs), e);
}

// y (M, N) float32 = x (M, K) @ W^T for int8 tiles (N / 16, K / 4, 16, 4) and row scales (N,) float32
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 4 && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous() && scales.numel() == packed.size(0) * 16,
              "int8 kernel: (N/16, K/4, 16, 4) int8 values and (N,) float32 scales");
  const int64_t N = packed.size(0) * 16, K = packed.size(1) * 4;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "glmkit kernels: weight and input sizes differ");
  Activations a = quantized_rows(x);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  return tiled_product(x, a, N, [&](int64_t t, int64_t m) { return tile_dot8(w + t * 16 * K, s + 16 * t, a, m); });
}

at::Tensor moe_int4_token(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                          const at::Tensor& gu, const at::Tensor& gu_sz, const at::Tensor& down,
                          const at::Tensor& down_sz, int64_t gs_gu, int64_t gs_down) {
  return moe_token(x, ids, weights, Int4Weights(gu, gu_sz, gs_gu), Int4Weights(down, down_sz, gs_down));
}

}  // namespace

TORCH_LIBRARY(glmkit, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor sz, int expert, int group_size) -> Tensor");
  m.def("moe_int4_token(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor gate_up_sz, Tensor down, "
        "Tensor down_sz, int gate_up_group_size, int down_group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.impl("int4_linear", c10::DispatchKey::CPU, &int4_linear);
  m.impl("int8_linear", c10::DispatchKey::CPU, &int8_linear);
  m.impl("moe_int4_token", c10::DispatchKey::CPU, &moe_int4_token);
}
