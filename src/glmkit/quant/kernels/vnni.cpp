// glmkit's CPU kernels for int4 weights (AVX-512 VNNI): activations are quantized to int8 in blocks of 32 (as
// llama.cpp's Q8 activations), weights stay 4-bit, and products are summed with vpdpbusd (u8 x s8 -> s32).
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
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    int8_t* qb = q.data() + m * K + 32 * b;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
    int64_t i = m * (K / 32) + b;
    scale[i] = amax / 127.f;
    qsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    xsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
  }
};

constexpr int64_t PREFETCH = 1024;  // bytes ahead in a tile's stream of weights (several blocks of 256)

inline __m512 exp16(__m512 x) {  // e^x: 2^n 2^f, n = round(x log2 e), a degree-6 polynomial for 2^f on [-1/2, 1/2]
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188e-4f);
  for (float c : {1.339887440e-3f, 9.618437358e-3f, 5.550332471e-2f, 2.402264791e-1f, 6.931472029e-1f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu(__m512 g) {  // g / (1 + e^-g)
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

inline __m512 bf16x16(const c10::BFloat16* p) {  // 16 bfloat16 -> 16 float32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 rows of one tile times activation row m -> 16 floats
inline __m512 tile_dot(const uint8_t* w, const c10::BFloat16* sz, const Activations& a, int64_t m, int64_t gs) {
  const int64_t K = a.K, per_group = gs / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int8_t* xq = a.q.data() + m * K;
  const int64_t row = m * (K / 32);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / gs; ++g) {
    __m512 s = bf16x16(sz + 32 * g), z = bf16x16(sz + 32 * g + 16);
    float zx = 0.f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      const int32_t* xb = reinterpret_cast<const int32_t*>(xq + 32 * b);
      _mm_prefetch(reinterpret_cast<const char*>(w + 256 * b + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + 256 * b + PREFETCH + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + 256 * b + PREFETCH + 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + 256 * b + PREFETCH + 192), _MM_HINT_T0);
      __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        __m512i v = _mm512_loadu_si512(w + 256 * b + 64 * c);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v, low), _mm512_set1_epi32(xb[2 * c]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), _mm512_set1_epi32(xb[2 * c + 1]));
      }
      // sum (q - 8) x = xs (sum q xq - 8 sum xq): scaled per row by s
      __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(8 * a.qsum[row + b]));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(a.scale[row + b])), acc);
      zx += a.xsum[row + b];
    }
    acc = _mm512_fmadd_ps(z, _mm512_set1_ps(zx), acc);
  }
  return acc;
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
  __m512 tile(int64_t e, int64_t t, const Activations& a, int64_t m) const {
    const int64_t i = e * (N / 16) + t;
    return tile_dot(w + i * K * 8, sz + i * (K / gs) * 32, a, m, gs);
  }
};

// y (M, N) float32 = x (M, K) @ W_e^T
at::Tensor linear(const at::Tensor& x, const Int4Weights& w, int64_t e) {
  const int64_t M = x.size(0), K = x.size(1), N = w.N;
  TORCH_CHECK(x.dim() == 2 && K == w.K && 0 <= e && e < w.E, "glmkit kernels: weight and input sizes differ");
  std::vector<float> xf = as_float(x);
  Activations a(M, K);
  for (int64_t m = 0; m < M; ++m) a.set_row(m, xf.data() + m * K);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * N + 16 * t, w.tile(e, t, a, m));
  });
  return y;
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
        __m512 g = gu.tile(id[j], t, a, 0), u = gu.tile(id[j], t + I / 16, a, 0);
        _mm512_storeu_ps(a32 + 16 * half, _mm512_mul_ps(silu(g), u));
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
        _mm512_storeu_ps(out + 16 * t, _mm512_fmadd_ps(_mm512_set1_ps(wj[j]), down.tile(id[j], t, b, j),
                                                       _mm512_loadu_ps(out + 16 * t)));
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t e, int64_t gs) {
  return linear(x, Int4Weights(packed, sz, gs), e);
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
  m.impl("int4_linear", c10::DispatchKey::CPU, &int4_linear);
  m.impl("moe_int4_token", c10::DispatchKey::CPU, &moe_int4_token);
}
