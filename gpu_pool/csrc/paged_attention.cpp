// Decode attention straight from the paged KV cache, for CPUs.
//
// One query token per sequence attends over its context by walking its block table, so keys
// and values are read once, in place: no gather into a padded copy and no padding to the
// longest context in the batch. A token's K (or V) row for all kv heads is contiguous in the
// page, so each sequence streams its rows once and every query head reuses them. Sequences
// are spread over threads dynamically because their lengths differ.
//
// Block tables hold element offsets of pages from the cache base, not page numbers: pages live
// in slabs shared by models of different page shapes (memory/slabs.py), so where a page sits
// is not a multiple of one page size.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Shape {
  int64_t heads, kv_heads, dim, block;
  int64_t groups() const { return heads / kv_heads; }
  int64_t row() const { return kv_heads * dim; }  // elements of one token's K (or V)
};

template <typename T>
inline float as_float(T x) { return static_cast<float>(x); }

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * as_float(b[i]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * as_float(x[i]);
}

// Calls fn(t - start, row) for each token start <= t < len, row pointing at its K or V for
// all kv heads.
template <typename T, typename Fn>
inline void for_each_row(const T* cache, const int64_t* table, int64_t start, int64_t len,
                         const Shape& s, Fn fn) {
  for (int64_t t = start; t < len;) {
    const T* page = cache + table[t / s.block];
    const int64_t end = std::min(len, (t / s.block + 1) * s.block);
    for (; t < end; ++t) fn(t - start, page + (t % s.block) * s.row());
  }
}

void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t h = 0; h < rows; ++h) {
    float* sh = scores + h * len;
    const float peak = *std::max_element(sh, sh + len);
    float total = 0.f;
    // Vectorised through libmvec's expf: built with -ffast-math, safe here because every
    // score is finite (no masking) and reassociating the sums only reorders rounding.
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < len; ++t) {
      sh[t] = std::exp(sh[t] - peak);
      total += sh[t];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
  }
}

template <typename T>
void decode_sequence(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                     int64_t context, T* out, const Shape& s, float scale, int64_t window,
                     float softcap, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t heads = s.heads, dim = s.dim, groups = s.groups();
  // A sliding-window layer sees the last `window` tokens, the query's own included.
  const int64_t start = window > 0 ? std::max<int64_t>(0, context - window) : 0;
  const int64_t len = context - start;
  scores.resize(heads * len);
  acc.assign(heads * dim + heads * dim, 0.f);
  float* qf = acc.data() + heads * dim;  // scaled query, second half of the scratch
  for (int64_t i = 0; i < heads * dim; ++i) qf[i] = as_float(q[i]) * scale;

  for_each_row(k_cache, table, start, context, s, [&](int64_t t, const T* k) {
    for (int64_t h = 0; h < heads; ++h)
      scores[h * len + t] = dot(qf + h * dim, k + (h / groups) * dim, dim);
  });
  if (softcap > 0.f)  // Gemma 2: scores squashed into (-softcap, softcap) before softmax
    for (int64_t i = 0; i < heads * len; ++i) scores[i] = std::tanh(scores[i] / softcap) * softcap;
  softmax_rows(scores.data(), heads, len);
  for_each_row(v_cache, table, start, context, s, [&](int64_t t, const T* v) {
    for (int64_t h = 0; h < heads; ++h)
      axpy(scores[h * len + t], v + (h / groups) * dim, acc.data() + h * dim, dim);
  });
  for (int64_t i = 0; i < heads * dim; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T>
void decode_batch(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                  const int64_t* lens, T* out, int64_t batch, int64_t max_pages, const Shape& s,
                  float scale, int64_t window, float softcap) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), batch));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, acc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t offset = b * s.heads * s.dim;
      decode_sequence(q + offset, k_cache, v_cache, tables + b * max_pages, lens[b],
                      out + offset, s, scale, window, softcap, scores, acc);
    }
  }
}

}  // namespace

// q: [B, H, D]; k_base, v_base: [block, KVH, D], the first page of this layer's K and V;
// page_offsets: [B, max_pages] int64 element offsets of each page from the base;
// context_lens: [B] int64; window: attend to the last `window` tokens (0: all); softcap:
// tanh soft-capping of the scaled scores (0: none). Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_base,
                                     torch::Tensor v_base, torch::Tensor page_offsets,
                                     torch::Tensor context_lens, double scale, int64_t window,
                                     double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_base.dim() == 3, "expected q [B,H,D], base page [BS,KVH,D]");
  TORCH_CHECK(k_base.is_contiguous() && v_base.is_contiguous(), "pages must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_base.scalar_type(), "q and cache dtypes differ");
  q = q.contiguous();
  page_offsets = page_offsets.contiguous();
  context_lens = context_lens.contiguous();
  const Shape s{q.size(1), k_base.size(1), q.size(2), k_base.size(0)};
  const int64_t batch = q.size(0), max_pages = page_offsets.size(1);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_batch(q.data_ptr<scalar_t>(), k_base.data_ptr<scalar_t>(),
                 v_base.data_ptr<scalar_t>(), page_offsets.data_ptr<int64_t>(),
                 context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch, max_pages,
                 s, static_cast<float>(scale), window, static_cast<float>(softcap));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
}
