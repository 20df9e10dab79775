// Quantized weights on CPUs: dequantize, and x @ W.T straight from the quantized bytes.
//
// Formats are memory/quant_formats.py's: llama.cpp's q8_0, q4_0, q4_1, q4_k and q6_k blocks
// exactly as ggml-common.h lays them out, and tokenpool's int8 (a float32 scale per row, then
// the row's int8 values). Rows are independent and row-major.
//
// Decoding is exact: a GGUF weight is a float16 scale times a small integer (plus a float16
// minimum), a product float32 holds exactly, so the values equal llama.cpp's and the gguf
// package's bit for bit however the compiler fuses the arithmetic (int8's float32 scale times
// its integer is one rounding, as in torch).
//
// quant_linear is for few activation rows (decode steps), where reading the weights is the
// cost: each weight's bytes are read once per call whatever M is, and threads split the output
// rows. Up to DIRECT_MAX activation rows, each decoded vector goes straight into FMAs with
// every row of x; beyond that a thread decodes a tile of output rows into a small buffer that
// stays in cache and runs a register-blocked tile of dot products over it. Activations stay
// float32: the result is x @ dequantize(W).T up to summation order. Much larger M is better
// served by dequantizing into a buffer and calling BLAS (gpu_pool/quant_kernels.py decides).
//
// The matmul's float vectors are GCC/Clang vector extensions (AVX-512's and AVX2's own types
// are such vectors): 16 floats with AVX-512, 8 with AVX2, 4 elsewhere. Widening packed bytes to
// floats uses intrinsics, as compilers lower byte-vector conversions poorly; without AVX2 the
// decoders are plain loops (SSE2, NEON or scalar, as the compiler manages).

// ATen and torch's pybind casters, not torch/extension.h: the whole C++ frontend triples the
// build time (12 s against 33 s), and a fresh machine builds this on first use.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;    // floats per vector
constexpr int ROWS = 4;   // output rows per tile: each activation load feeds ROWS FMAs
constexpr int XROWS = 4;  // activation rows per tile: ROWS * XROWS accumulators in registers
// Activation rows the decode-and-multiply path serves (their accumulators and the decoder's
// temporaries fill the 32 zmm registers); more go through the decode-then-dot tiles.
constexpr int DIRECT_MAX = 8;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__)
constexpr int VW = 8;
constexpr int ROWS = 2;  // 16 ymm registers: 8 accumulators, 2 weights, 1 activation
constexpr int XROWS = 4;
constexpr int DIRECT_MAX = 4;  // 16 ymm registers
constexpr const char* kIsa = "avx2";
#else
constexpr int VW = 4;
constexpr int ROWS = 2;
constexpr int XROWS = 4;
constexpr int DIRECT_MAX = 4;
constexpr const char* kIsa = "generic";
#endif

typedef float vf __attribute__((vector_size(VW * 4)));

#define INLINE inline __attribute__((always_inline))

template <typename V>
INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// GCC folds a reused load into each FMA that reads it (a memory operand looks free), which
// turns the register-blocked loops below load-bound; an empty asm pins the value in a register.
INLINE void in_register(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__)
  asm("" : "+x"(v));
#endif
}

INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

INLINE float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Sixteen packed bytes and emit(): 16 weights y[i] = d * q[i] + m from them. Every format's
// value has that form exactly (q4_0's d * (q - 8) is d * q + (-8d); q6_k's likewise).
#if defined(__AVX2__)
typedef __m128i Bytes;
INLINE Bytes load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
INLINE __m128i load8(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}
INLINE Bytes low4(Bytes b) { return _mm_and_si128(b, _mm_set1_epi8(0x0f)); }
INLINE Bytes high4(Bytes b) { return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f)); }
INLINE Bytes low2(Bytes b, int shift) {  // (b >> shift) & 3, moved to bits 4-5
  return _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(3)), 4);
}
INLINE Bytes either(Bytes a, Bytes b) { return _mm_or_si128(a, b); }
template <bool Signed, typename Sink>
INLINE void emit(Bytes q, Sink& s, int64_t k, int off, float d, float m) {
#if defined(__AVX512F__)
  const __m512i w = Signed ? _mm512_cvtepi8_epi32(q) : _mm512_cvtepu8_epi32(q);
  s.put(k, off, _mm512_cvtepi32_ps(w) * d + m);
#else
  const __m128i hi = _mm_srli_si128(q, 8);
  const vf f0 = _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(q) : _mm256_cvtepu8_epi32(q));
  const vf f1 = _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(hi) : _mm256_cvtepu8_epi32(hi));
  s.put(k, off, f0 * d + m);
  s.put(k, off + 8, f1 * d + m);
#endif
}
#else
struct Bytes {
  uint8_t v[16];
};
INLINE Bytes load16(const uint8_t* p) {
  Bytes b;
  std::memcpy(b.v, p, 16);
  return b;
}
template <typename Op>
INLINE Bytes map(Bytes b, Op op) {
  for (int i = 0; i < 16; ++i) b.v[i] = static_cast<uint8_t>(op(b.v[i]));
  return b;
}
INLINE Bytes low4(Bytes b) { return map(b, [](uint8_t x) { return x & 0x0f; }); }
INLINE Bytes high4(Bytes b) { return map(b, [](uint8_t x) { return x >> 4; }); }
INLINE Bytes low2(Bytes b, int shift) {
  return map(b, [shift](uint8_t x) { return ((x >> shift) & 3) << 4; });
}
INLINE Bytes either(Bytes a, Bytes b) {
  for (int i = 0; i < 16; ++i) a.v[i] |= b.v[i];
  return a;
}
template <bool Signed, typename Sink>
INLINE void emit(Bytes q, Sink& s, int64_t k, int off, float d, float m) {
  float y[16];
  for (int i = 0; i < 16; ++i)
    y[i] = d * (Signed ? static_cast<float>(static_cast<int8_t>(q.v[i]))
                       : static_cast<float>(q.v[i])) + m;
  for (int i = 0; i < 16; i += VW) s.put(k, off + i, load<vf>(y + i));
}
#endif

// 16 int8 weights at p, times d.
template <typename Sink>
INLINE void int8s(const uint8_t* p, Sink& s, int64_t k, int off, float d) {
#if defined(__AVX2__) && !defined(__AVX512F__)
#pragma GCC unroll 2
  for (int j = 0; j < 16; j += 8) {  // widened straight from memory, 8 at a time
    const __m256i q = _mm256_cvtepi8_epi32(load8(p + j));
    s.put(k, off + j, _mm256_cvtepi32_ps(q) * d);
  }
#else
  emit<true>(load16(p), s, k, off, d, 0.f);
#endif
}

// 16 bytes of nibbles at p: the low ones are 16 weights d0 * q + m0 at off0, the high ones 16
// weights d1 * q + m1 at off1. With AVX-512 the 16 possible values are a table in one register,
// and vpermps, which reads only the low 4 bits of each index, looks them up: no masking and no
// int-to-float conversion per weight. With AVX2 the bytes are widened to 32-bit lanes straight
// from memory and split there, one mask or shift per 8 weights.
template <typename Sink>
INLINE void nibbles(const uint8_t* p, Sink& s, int64_t k, int off0, float d0, float m0, int off1,
                    float d1, float m1) {
#if defined(__AVX512F__)
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 t0 = _mm512_fmadd_ps(iota, _mm512_set1_ps(d0), _mm512_set1_ps(m0));
  const __m512 t1 = _mm512_fmadd_ps(iota, _mm512_set1_ps(d1), _mm512_set1_ps(m1));
  const __m512i idx = _mm512_cvtepu8_epi32(load16(p));
  s.put(k, off0, _mm512_permutexvar_ps(idx, t0));
  s.put(k, off1, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t1));
#elif defined(__AVX2__)
  const __m256i mask = _mm256_set1_epi32(0x0f);
#pragma GCC unroll 2
  for (int j = 0; j < 16; j += 8) {
    const __m256i q = _mm256_cvtepu8_epi32(load8(p + j));
    s.put(k, off0 + j, _mm256_cvtepi32_ps(_mm256_and_si256(q, mask)) * d0 + m0);
    s.put(k, off1 + j, _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)) * d1 + m1);
  }
#else
  const Bytes q = load16(p);
  emit<false>(low4(q), s, k, off0, d0, m0);
  emit<false>(high4(q), s, k, off1, d1, m1);
#endif
}

// Each format decodes one row of `cols` weights, 16 at a time, handing each vector to a sink
// as (block start, offset in the block): offsets are constants once the block is unrolled, so
// a sink can spread them over independent accumulators. Blocks are 32 or 256 weights; only
// int8 rows (any length) have a scalar tail.

struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  template <typename Sink>
  static INLINE void block(const uint8_t* b, Sink& s, int64_t k) {
    const float d = fp16(b);
    int8s(b + 2, s, k, 0, d);
    int8s(b + 18, s, k, 16, d);
  }
};

struct Q4_0 {  // low nibbles are weights 0-15, high nibbles 16-31
  static constexpr int kElems = 32, kBytes = 18;
  template <typename Sink>
  static INLINE void block(const uint8_t* b, Sink& s, int64_t k) {
    const float d = fp16(b);
    nibbles(b + 2, s, k, 0, d, -8.f * d, 16, d, -8.f * d);
  }
};

struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20;
  template <typename Sink>
  static INLINE void block(const uint8_t* b, Sink& s, int64_t k) {
    const float d = fp16(b), m = fp16(b + 2);
    nibbles(b + 4, s, k, 0, d, m, 16, d, m);
  }
};

struct Q4_K {  // 8 groups of 32, each with a 6-bit scale and minimum packed into 12 bytes
  static constexpr int kElems = 256, kBytes = 144;
  static INLINE void scale_min(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
  }
  template <typename Sink>
  static INLINE void block(const uint8_t* b, Sink& s, int64_t k) {
    const float d = fp16(b), dmin = fp16(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qs = b + 16;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g, qs += 32) {  // 64 weights: low nibbles, then high
      int sc0, mn0, sc1, mn1;
      scale_min(scales, 2 * g, sc0, mn0);
      scale_min(scales, 2 * g + 1, sc1, mn1);
      const float d0 = d * sc0, m0 = -(dmin * mn0), d1 = d * sc1, m1 = -(dmin * mn1);
      nibbles(qs, s, k, 64 * g, d0, m0, 64 * g + 32, d1, m1);
      nibbles(qs + 16, s, k, 64 * g + 16, d0, m0, 64 * g + 48, d1, m1);
    }
  }
};

struct Q6_K {  // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, float16 d
  static constexpr int kElems = 256, kBytes = 210;
  template <typename Sink>
  static INLINE void block(const uint8_t* b, Sink& s, int64_t k) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = fp16(b + 208);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8) {
#pragma GCC unroll 2
      for (int l = 0; l < 32; l += 16) {  // 16 weights share each scale
        const int is = l / 16;
        const Bytes a = load16(ql + l), c = load16(ql + 32 + l), hi = load16(qh + l);
        const float s0 = d * sc[is], s1 = d * sc[is + 2], s2 = d * sc[is + 4],
                    s3 = d * sc[is + 6];
        const int o = 128 * h + l;
        emit<false>(either(low4(a), low2(hi, 0)), s, k, o, s0, -32.f * s0);
        emit<false>(either(low4(c), low2(hi, 2)), s, k, o + 32, s1, -32.f * s1);
        emit<false>(either(high4(a), low2(hi, 4)), s, k, o + 64, s2, -32.f * s2);
        emit<false>(either(high4(c), low2(hi, 6)), s, k, o + 96, s3, -32.f * s3);
      }
    }
  }
};

template <typename F>
struct Blocks {
  template <typename Sink>
  static INLINE void row(const uint8_t* r, int64_t cols, Sink& s) {
    for (int64_t k = 0; k < cols; k += F::kElems, r += F::kBytes) F::block(r, s, k);
  }
};

struct Int8 {
  template <typename Sink>
  static INLINE void row(const uint8_t* r, int64_t cols, Sink& s) {
    float scale;
    std::memcpy(&scale, r, 4);
    const uint8_t* q = r + 4;
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
      int8s(q + k, s, k, 0, scale);
      int8s(q + k + 16, s, k, 16, scale);
    }
    for (; k + 16 <= cols; k += 16) int8s(q + k, s, k, 0, scale);
    for (; k < cols; ++k) s.one(k, scale * static_cast<float>(static_cast<int8_t>(q[k])));
  }
};

// Sinks. Store writes the weights out (dequantize, and the decode-then-dot path).
struct Store {
  float* y;
  INLINE void put(int64_t k, int off, vf w) { std::memcpy(y + k + off, &w, sizeof(vf)); }
  INLINE void one(int64_t k, float w) { y[k] = w; }
};

// Dot multiplies each decoded vector straight into MX activation rows: no round trip through
// memory. Below 4 rows, two accumulators per row, picked by the vector's offset, keep enough
// FMA chains in flight.
template <int MX>
struct Dot {
  static constexpr int kSlots = MX >= 4 ? 1 : 2;
  const float* x;
  int64_t K;
  vf acc[kSlots][MX] = {};
  float tail[MX] = {};
  INLINE void put(int64_t k, int off, vf w) {
    const int slot = (off / VW) % kSlots;
#pragma GCC unroll 16
    for (int m = 0; m < MX; ++m) acc[slot][m] += w * load<vf>(x + m * K + k + off);
  }
  INLINE void one(int64_t k, float w) {
    for (int m = 0; m < MX; ++m) tail[m] += w * x[m * K + k];
  }
  INLINE float result(int m) const {
    vf a = acc[0][m];
    for (int i = 1; i < kSlots; ++i) a += acc[i][m];
    return hsum(a) + tail[m];
  }
};

enum Format : int64_t { kQ8_0 = 0, kQ4_0, kQ4_1, kQ4_K, kQ6_K, kInt8 };

template <typename Fn>
void with_format(int64_t fmt, Fn&& fn) {
  switch (fmt) {
    case kQ8_0: return fn(Blocks<Q8_0>{});
    case kQ4_0: return fn(Blocks<Q4_0>{});
    case kQ4_1: return fn(Blocks<Q4_1>{});
    case kQ4_K: return fn(Blocks<Q4_K>{});
    case kQ6_K: return fn(Blocks<Q6_K>{});
    case kInt8: return fn(Int8{});
  }
  TORCH_CHECK(false, "unknown quantized format id ", fmt);
}

int64_t row_bytes(int64_t fmt, int64_t cols) {
  struct Layout { int64_t elems, bytes, extra; };
  static constexpr Layout layouts[] = {{32, 34, 0}, {32, 18, 0}, {32, 20, 0},
                                       {256, 144, 0}, {256, 210, 0}, {1, 1, 4}};
  TORCH_CHECK(fmt >= 0 && fmt <= kInt8, "unknown quantized format id ", fmt);
  const Layout& l = layouts[fmt];
  TORCH_CHECK(cols % l.elems == 0, "a row of ", cols, " is not whole blocks of ", l.elems);
  return l.extra + cols / l.elems * l.bytes;
}

// out[m, r] for R decoded weight rows w (stride K) and MX activation rows x (stride K):
// R * MX accumulators stay in registers; U-fold unrolling gives a single row several
// independent FMA chains.
template <int R, int MX, int U>
INLINE void dot_tile(const float* w, const float* x, int64_t K, float* out, int64_t N) {
  vf acc[U][R][MX] = {};
  int64_t k = 0;
  for (; k + U * VW <= K; k += U * VW) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      vf wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        wv[r] = load<vf>(w + r * K + k + u * VW);
        if (MX > 1) in_register(wv[r]);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MX; ++m) {
        vf xv = load<vf>(x + m * K + k + u * VW);
        if (R > 1) in_register(xv);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[u][r][m] += wv[r] * xv;
      }
    }
  }
  for (; k + VW <= K; k += VW)
    for (int m = 0; m < MX; ++m) {
      const vf xv = load<vf>(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[0][r][m] += load<vf>(w + r * K + k) * xv;
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      vf a = acc[0][r][m];
      for (int u = 1; u < U; ++u) a += acc[u][r][m];
      float s = hsum(a);
      for (int64_t t = k; t < K; ++t) s += w[r * K + t] * x[m * K + t];
      out[m * N + r] = s;
    }
}

template <int R>
void dot_rows(const float* w, const float* x, int64_t M, int64_t K, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + XROWS <= M; m += XROWS) dot_tile<R, XROWS, 1>(w, x + m * K, K, out + m * N, N);
  switch (M - m) {
    case 1: return dot_tile<R, 1, (R >= 4 ? 2 : 4)>(w, x + m * K, K, out + m * N, N);
    case 2: return dot_tile<R, 2, (R >= 4 ? 1 : 2)>(w, x + m * K, K, out + m * N, N);
    case 3: return dot_tile<R, 3, 1>(w, x + m * K, K, out + m * N, N);
    default: return;
  }
}

void dot_any(int rows, const float* w, const float* x, int64_t M, int64_t K, float* out,
             int64_t N) {
  switch (rows) {
    case 4: return dot_rows<4>(w, x, M, K, out, N);
    case 3: return dot_rows<3>(w, x, M, K, out, N);
    case 2: return dot_rows<2>(w, x, M, K, out, N);
    default: return dot_rows<1>(w, x, M, K, out, N);
  }
}

template <typename Fn>
void with_rows(int64_t m, Fn&& fn) {
  switch (m) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
#if defined(__AVX512F__)
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 8: return fn(std::integral_constant<int, 8>{});
#endif
  }
  TORCH_CHECK(false, "no direct kernel for ", m, " rows");
}

// A thread's decode buffer, 64-byte aligned so that no vector load straddles cache lines.
struct Buffer {
  std::vector<float> storage;
  float* p;
  explicit Buffer(int64_t n) : storage(n + 16) {
    const auto addr = reinterpret_cast<uintptr_t>(storage.data());
    p = storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

int threads_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work)));
}

void check_weights(const at::Tensor& data, int64_t fmt, int64_t cols) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 2,
              "expected uint8 [rows, bytes]");
  TORCH_CHECK(data.size(1) == row_bytes(fmt, cols), "rows are ", data.size(1),
              " bytes, the format needs ", row_bytes(fmt, cols));
  TORCH_CHECK(data.stride(1) == 1 && (data.size(0) <= 1 || data.stride(0) >= data.size(1)),
              "each row's bytes must be contiguous");
  TORCH_CHECK(data.device().is_cpu(), "CPU tensors only");
}

int64_t row_stride(const at::Tensor& data) {
  return data.size(0) <= 1 ? data.size(1) : data.stride(0);
}

}  // namespace

// data: uint8 [rows, row_bytes]; out: float32 [rows, cols], contiguous, written in place.
void dequantize(at::Tensor data, int64_t fmt, int64_t cols, at::Tensor out) {
  check_weights(data, fmt, cols);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == data.size(0) && out.size(1) == cols,
              "out must be contiguous float32 [rows, cols]");
  const uint8_t* src = data.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t rows = data.size(0), stride = row_stride(data);
  with_format(fmt, [&](auto f) {
    using F = decltype(f);
#pragma omp parallel for schedule(static) num_threads(threads_for(rows))
    for (int64_t r = 0; r < rows; ++r) {
      Store sink{dst + r * cols};
      F::row(src + r * stride, cols, sink);
    }
  });
}

// x: float32 [M, K] contiguous; data: uint8 [N, row_bytes(K)]; out: float32 [M, N], written.
void quant_linear(at::Tensor x, at::Tensor data, int64_t fmt, at::Tensor out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = data.size(0);
  check_weights(data, fmt, K);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == M && out.size(1) == N,
              "out must be contiguous float32 [M, N]");
  const uint8_t* src = data.data_ptr<uint8_t>();
  const float* xs = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t stride = row_stride(data), tiles = (N + ROWS - 1) / ROWS;
  if (M <= DIRECT_MAX) {
    with_format(fmt, [&](auto f) {
      with_rows(M, [&](auto mx) {
        using F = decltype(f);
        constexpr int MX = decltype(mx)::value;
#pragma omp parallel for schedule(static) num_threads(threads_for(N / 8))
        for (int64_t n = 0; n < N; ++n) {
          Dot<MX> dot{xs, K};
          F::row(src + n * stride, K, dot);
          for (int m = 0; m < MX; ++m) dst[m * N + n] = dot.result(m);
        }
      });
    });
    return;
  }
  with_format(fmt, [&](auto f) {
    using F = decltype(f);
#pragma omp parallel num_threads(threads_for(tiles))
    {
      Buffer buf(ROWS * K);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * ROWS;
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, N - n0));
        for (int r = 0; r < rows; ++r) {
          Store sink{buf.p + r * K};
          F::row(src + (n0 + r) * stride, K, sink);
        }
        dot_any(rows, buf.p, xs, M, K, dst + n0, N);
      }
    }
  });
}

std::string isa() { return kIsa; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released: other Python threads (the server's) run while a thread multiplies.
  m.def("dequantize", &dequantize, "dequantize rows of a quantized weight into float32",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("quant_linear", &quant_linear, "x @ dequantize(W).T from the quantized bytes",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("isa", &isa, "the vector instruction set this build uses");
  m.attr("formats") = pybind11::dict(
      pybind11::arg("q8_0") = static_cast<int64_t>(kQ8_0),
      pybind11::arg("q4_0") = static_cast<int64_t>(kQ4_0),
      pybind11::arg("q4_1") = static_cast<int64_t>(kQ4_1),
      pybind11::arg("q4_k") = static_cast<int64_t>(kQ4_K),
      pybind11::arg("q6_k") = static_cast<int64_t>(kQ6_K),
      pybind11::arg("int8") = static_cast<int64_t>(kInt8));
}
