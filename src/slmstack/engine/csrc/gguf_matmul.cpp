// y = x @ Wᵀ for weights kept in GGUF's own block forms, with float32 inputs and float32 sums.
//
// int4: each group of 32 inputs of an output row holds 16 bytes (byte j: value j in the low nibble, value j + 16 in
//       the high one, as GGUF's Q4 blocks lay them out), a scale and a low: w = low + q * scale.
// int8: each group of 32 inputs holds 32 signed bytes and a scale (GGUF's Q8_0): w = q * scale.
//
// int4 (AVX-512): a group's 16 possible weights, low + k * scale, are one register; each nibble picks its weight
// with a permute, and the products are summed in a vector register per output row (one horizontal sum a row), four
// output rows at a time so that each group of the input is loaded once for four. int8: the bytes are widened to
// float and summed per group, times the group's scale. Output rows are split over threads (at::parallel_for).
// Elsewhere a plain loop (the compiler vectorises what it can). Built at first use with the machine's compiler (slmstack/engine/cpu_kernels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t G = 32;

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

#if defined(__AVX512F__)
// The 16 values of a group's grid, low + k * scale for k = 0..15: a nibble picks its weight with one permute.
inline __m512 grid(float scale, float low) {
  const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_fmadd_ps(k, _mm512_set1_ps(scale), _mm512_set1_ps(low));
}

// Output rows o0..o1 for input row r, R output rows at a time (the input's group is loaded once for R rows).
template <int R>
inline void int4_block(const float* xr, const uint8_t* q, const float* scale, const float* low, float* yr,
                       int64_t in, int64_t o) {
  const int64_t groups = in / G;
  __m512 acc[R];
  for (int k = 0; k < R; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 xl = _mm512_loadu_ps(xr + g * G), xh = _mm512_loadu_ps(xr + g * G + 16);
    for (int k = 0; k < R; ++k) {
      const int64_t row = o + k;
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + row * (in / 2) + g * 16)));
      const __m512 table = grid(scale[row * groups + g], low[row * groups + g]);
      // a permute reads only the low 4 bits of each index: the byte itself picks by its low nibble
      const __m512 wl = _mm512_permutexvar_ps(bytes, table);
      const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      acc[k] = _mm512_fmadd_ps(wl, xl, acc[k]);
      acc[k] = _mm512_fmadd_ps(wh, xh, acc[k]);
    }
  }
  for (int k = 0; k < R; ++k) yr[o + k] = hsum(acc[k]);
}
#endif

void int4_rows(const float* x, const uint8_t* q, const float* scale, const float* low, float* y, int64_t n,
               int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const int64_t groups = in / G;
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    float* yr = y + r * out;
    int64_t o = o0;
#if defined(__AVX512F__)
    for (; o + 8 <= o1; o += 8) int4_block<8>(xr, q, scale, low, yr, in, o);
    for (; o < o1; ++o) int4_block<1>(xr, q, scale, low, yr, in, o);
#endif
    for (; o < o1; ++o) {
      const uint8_t* qo = q + o * (in / 2);
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[o * groups + g], l = low[o * groups + g];
        const float* xg = xr + g * G;
        for (int j = 0; j < 16; ++j) {
          acc += (l + float(qo[g * 16 + j] & 0x0F) * s) * xg[j];
          acc += (l + float(qo[g * 16 + j] >> 4) * s) * xg[j + 16];
        }
      }
      yr[o] = acc;
    }
  }
}

#if defined(__AVX512F__)
template <int R>
inline void int8_block(const float* xr, const int8_t* q, const float* scale, float* yr, int64_t in, int64_t o) {
  const int64_t groups = in / G;
  __m512 acc[R];
  for (int k = 0; k < R; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 xl = _mm512_loadu_ps(xr + g * G), xh = _mm512_loadu_ps(xr + g * G + 16);
    for (int k = 0; k < R; ++k) {
      const int8_t* b = q + (o + k) * in + g * G;
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
      const __m512 c =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16))));
      const __m512 t = _mm512_fmadd_ps(c, xh, _mm512_mul_ps(a, xl));
      acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(scale[(o + k) * groups + g]), t, acc[k]);
    }
  }
  for (int k = 0; k < R; ++k) yr[o + k] = hsum(acc[k]);
}
#endif

void int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t n, int64_t in, int64_t out,
               int64_t o0, int64_t o1) {
  const int64_t groups = in / G;
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    float* yr = y + r * out;
    int64_t o = o0;
#if defined(__AVX512F__)
    for (; o + 4 <= o1; o += 4) int8_block<4>(xr, q, scale, yr, in, o);
    for (; o < o1; ++o) int8_block<1>(xr, q, scale, yr, in, o);
#endif
    for (; o < o1; ++o) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.f;
        for (int j = 0; j < G; ++j) t += float(q[o * in + g * G + j]) * xr[g * G + j];
        acc += scale[o * groups + g] * t;
      }
      yr[o] = acc;
    }
  }
}

void check(const torch::Tensor& x, int64_t in) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (N, in) float32");
  TORCH_CHECK(x.size(1) == in && in % G == 0, "x: its width must be the weight's input size, a multiple of 32");
}

}  // namespace

torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor low) {
  const int64_t n = x.size(0), in = q.size(1) * 2, out = q.size(0);
  check(x, in);
  auto y = torch::empty({n, out}, x.options());
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    int4_rows(x.data_ptr<float>(), q.data_ptr<uint8_t>(), scale.data_ptr<float>(), low.data_ptr<float>(),
              y.data_ptr<float>(), n, in, out, o0, o1);
  });
  return y;
}

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t n = x.size(0), in = q.size(1), out = q.size(0);
  check(x, in);
  auto y = torch::empty({n, out}, x.options());
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    int8_rows(x.data_ptr<float>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), y.data_ptr<float>(), n, in, out,
              o0, o1);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_matmul", &int4_matmul, "x (N, in) float32 @ int4 groups (q (out, in/2) uint8, scale, low (out, in/32))");
  m.def("int8_matmul", &int8_matmul, "x (N, in) float32 @ int8 groups (q (out, in) int8, scale (out, in/32))");
}
