// Sample and blending indices (see sample_index.h).
//
// The outputs match megatron-core's dataset helpers element for element. Two
// things make them faster without changing a single value:
//  * build_sample_idx uses a closed form of megatron's walk: sample k starts at
//    token k * seq_length of the document stream, so the index is one merge of the
//    sample boundaries with the running document ends. Large inputs are split over
//    threads: each gathers and sums the lengths of its share, then merges it.
//  * build_blending_indices evaluates exactly megatron's double-precision error
//    terms, weights[d] * max(s, 1) - drawn[d], with AVX-512 or AVX2 where available,
//    and runs several stretches of the blend at once, interleaved in one thread
//    (independent dependency chains) and over threads. Every stretch after the first
//    starts from a guessed state; a serial repair pass then reruns each stretch from
//    the true state until it reaches a checkpoint where the guessed run agrees (the
//    greedy rule is deterministic, so equal states give equal futures).
//    Exact integer/rational arithmetic is not used for the error terms: rounding in
//    weights[d] * s creates and breaks ties that exact arithmetic orders otherwise.
//    E.g. weights {0.1, 0.2, 0.7}: at sample 10 every double error term is exactly 0
//    (a tie, dataset 0 wins), while the exact values of those doubles give dataset 1
//    a margin of 1.1e-15. megatron's double expression is kept as is.
#include "sample_index.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <iostream>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MEGATRON_EXT_X86 1
#endif

// The blending error terms must be a rounded product followed by a rounded
// difference, never a fused multiply-subtract.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

namespace megatron_ext {
namespace {

constexpr int kPrefetchDistance = 16;

// CPUs this process may run on (its affinity mask where the OS has one), at most 64.
int hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
#if defined(__linux__)
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) n = CPU_COUNT(&allowed);
#endif
  return n == 0 ? 1 : static_cast<int>(std::min(n, 64u));
}

// Runs fn(i) for i in [0, n) on n threads (fn(0) on the calling thread) and
// rethrows the first exception.
template <typename Fn>
void run_parallel(int64_t n, Fn&& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int i) {
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(n - 1);
  for (int64_t i = 1; i < n; ++i) workers.emplace_back(guarded, static_cast<int>(i));
  guarded(0);
  for (auto& w : workers) w.join();
  if (error) std::rethrow_exception(error);
}

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// ---------------------------------------------------------------------------
// Sample index

template <typename Size, typename Doc>
struct SampleIdxInput {
  const Size* sizes;
  int64_t num_sizes;
  const Doc* document_idx;
  int64_t num_documents;
};

template <typename Size, typename Doc>
int64_t document_length(const SampleIdxInput<Size, Doc>& in, int64_t position) {
  const int64_t doc = static_cast<int64_t>(in.document_idx[position]);
  if (doc < 0 || doc >= in.num_sizes) {
    throw std::out_of_range("document_indices[" + std::to_string(position) + "] = " +
                            std::to_string(doc) + " is outside sizes (length " +
                            std::to_string(in.num_sizes) + ")");
  }
  const int64_t len = static_cast<int64_t>(in.sizes[doc]);
  if (len < 0) {
    throw std::invalid_argument("sizes[" + std::to_string(doc) + "] = " + std::to_string(len) +
                                " is negative");
  }
  return len;
}

template <typename Size, typename Doc>
void prefetch_length(const SampleIdxInput<Size, Doc>& in, int64_t position) {
#if defined(__GNUC__)
  if (position < in.num_documents) {
    const int64_t doc = static_cast<int64_t>(in.document_idx[position]);
    if (doc >= 0 && doc < in.num_sizes) __builtin_prefetch(in.sizes + doc);
  }
#else
  (void)in;
  (void)position;
#endif
}

template <typename Out>
void store_entry(Out* out, int64_t k, int64_t position, int64_t offset) {
  if constexpr (sizeof(Out) < sizeof(int64_t)) {
    if (offset > std::numeric_limits<Out>::max() || offset < std::numeric_limits<Out>::min()) {
      throw std::overflow_error("sample offset " + std::to_string(offset) +
                                " does not fit the int32 sample index; use build_sample_idx_int64");
    }
  }
  out[2 * k] = static_cast<Out>(position);
  out[2 * k + 1] = static_cast<Out>(offset);
}

// Document lengths read through the document index (random access, prefetched).
template <typename Size, typename Doc>
struct GatheredLengths {
  const SampleIdxInput<Size, Doc>& in;
  int64_t operator()(int64_t i) const {
    prefetch_length(in, i + kPrefetchDistance);
    return document_length(in, i);
  }
};

// Document lengths gathered beforehand, in document index order.
template <typename Size>
struct BufferedLengths {
  const Size* lengths;
  int64_t operator()(int64_t i) const { return static_cast<int64_t>(lengths[i]); }
};

// Merges document positions [begin, end), whose stream starts at token `start`,
// with the sample boundaries; records samples k in [k, num_samples] that end in
// this range. Returns the next unrecorded k. Works in blocks: first read the
// block's document ends (independent loads the CPU overlaps), then walk them.
template <typename Out, typename Lengths>
int64_t merge_samples(const Lengths& length_of, int64_t begin, int64_t end, int64_t start,
                      int64_t k, int64_t num_samples, int32_t seq_length, int32_t extra,
                      Out* out) {
  constexpr int64_t kBlock = 2048;
  int64_t ends[kBlock + 1];
  int64_t boundary = k * seq_length + extra;  // stream end of sample k, extra token included
  for (int64_t block = begin; block < end && k <= num_samples; block += kBlock) {
    const int64_t m = std::min(kBlock, end - block);
    ends[0] = start;
    for (int64_t j = 0; j < m; ++j) ends[j + 1] = ends[j] + length_of(block + j);
    // ends[j + 1] is the stream end of document position block + j.
    int64_t j = 1;
    while (k <= num_samples && boundary <= ends[m]) {
      while (ends[j] < boundary) ++j;
      store_entry(out, k, block + j - 1, boundary - extra - ends[j - 1]);
      ++k;
      boundary += seq_length;
    }
    start = ends[m];
  }
  return k;
}

// Single thread: one pass, reading lengths through the document index.
// Threads: each gathers the lengths of its share of the document index into a buffer
// and sums them; the sums give every share its starting token; then each merges its
// share from the buffer. Every length is read at random once either way.
template <typename Out, typename Size, typename Doc>
void fill_sample_idx(const SampleIdxInput<Size, Doc>& in, int32_t seq_length, int64_t num_samples,
                     int32_t extra, int num_threads, Out* out) {
  const int64_t n = in.num_documents;
  if constexpr (sizeof(Out) < sizeof(int64_t)) {
    if (n - 1 > std::numeric_limits<Out>::max()) {
      throw std::overflow_error("document_indices has " + std::to_string(n) +
                                " entries, too many for the int32 sample index");
    }
  }
  store_entry(out, 0, 0, 0);
  int64_t next = 1;
  // The gather is bound by memory latency; threads pay for their buffer from about
  // four cores up. Automatic: 4+ hardware threads, one per 2^20 documents at most.
  const int hw = hardware_threads();
  const int64_t threads = num_threads > 0 ? std::min<int64_t>(num_threads, n)
                          : hw >= 4       ? std::min<int64_t>(hw, n >> 20)
                                          : 1;
  if (threads <= 1) {
    next = merge_samples(GatheredLengths<Size, Doc>{in}, 0, n, 0, 1, num_samples, seq_length,
                         extra, out);
  } else {
    std::unique_ptr<Size[]> lengths(new Size[n]);  // filled by the gather below
    std::vector<int64_t> bounds(threads + 1), starts(threads + 1, 0);
    for (int64_t t = 0; t <= threads; ++t) bounds[t] = n * t / threads;
    run_parallel(threads, [&](int t) {
      const GatheredLengths<Size, Doc> gather{in};
      int64_t total = 0;
      for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i) {
        const int64_t len = gather(i);
        lengths[i] = static_cast<Size>(len);
        total += len;
      }
      starts[t + 1] = total;
    });
    for (int64_t t = 0; t < threads; ++t) starts[t + 1] += starts[t];
    run_parallel(threads, [&](int t) {
      const int64_t k = std::max<int64_t>(1, floor_div(starts[t] - extra, seq_length) + 1);
      merge_samples(BufferedLengths<Size>{lengths.get()}, bounds[t], bounds[t + 1], starts[t], k,
                    num_samples, seq_length, extra, out);
    });
    next = std::max<int64_t>(1, floor_div(starts[threads] - extra, seq_length) + 1);
  }
  // Samples past the end of the stream: megatron stops at the last document.
  if (next <= num_samples) {
    const int64_t tail = document_length(in, n - 1) - extra;
    for (int64_t k = next; k <= num_samples; ++k) store_entry(out, k, n - 1, tail);
  }
}

// An integer 1-D array viewed as int32 or int64 (other integer types are copied).
struct IntArray {
  py::array array;
  bool is32 = false;
};

IntArray as_int_array(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) throw py::type_error(std::string(name) + " must be an integer numpy array");
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(name) + " must have an integer dtype, got " +
                         std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  IntArray out;
  const bool contiguous = (arr.flags() & py::array::c_style) != 0;
  if (contiguous && kind == 'i' && arr.itemsize() == 4) {
    out.array = arr;
    out.is32 = true;
  } else if (contiguous && kind == 'i' && arr.itemsize() == 8) {
    out.array = arr;
  } else {
    out.array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  }
  return out;
}

int64_t max_value(const IntArray& a) {
  int64_t best = std::numeric_limits<int64_t>::min();
  const int64_t n = a.array.shape(0);
  if (a.is32) {
    const auto* p = static_cast<const int32_t*>(a.array.data());
    for (int64_t i = 0; i < n; ++i) best = std::max<int64_t>(best, p[i]);
  } else {
    const auto* p = static_cast<const int64_t*>(a.array.data());
    for (int64_t i = 0; i < n; ++i) best = std::max<int64_t>(best, p[i]);
  }
  return best;
}

template <typename Out, typename Size, typename Doc>
void fill_typed(const IntArray& sizes, const IntArray& docs, int32_t seq_length,
                int64_t num_samples, int32_t extra, int num_threads, Out* out) {
  SampleIdxInput<Size, Doc> in{static_cast<const Size*>(sizes.array.data()), sizes.array.shape(0),
                               static_cast<const Doc*>(docs.array.data()), docs.array.shape(0)};
  fill_sample_idx<Out>(in, seq_length, num_samples, extra, num_threads, out);
}

template <typename Out>
py::array_t<Out> build_sample_idx_typed(const py::handle& sizes_obj, const py::handle& docs_obj,
                                        int32_t seq_length, int32_t num_epochs,
                                        int64_t tokens_per_epoch, bool drop_last,
                                        int32_t add_extra_token, int num_threads) {
  const IntArray sizes = as_int_array(sizes_obj, "sizes");
  const IntArray docs = as_int_array(docs_obj, "document_indices");
  if (docs.array.shape(0) == 0) throw py::value_error("document_indices is empty");
  const int64_t num_samples = sample_idx_num_samples(num_epochs, tokens_per_epoch, seq_length,
                                                     drop_last, add_extra_token);
  py::array_t<Out> result({num_samples + 1, int64_t{2}});
  Out* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    if (sizes.is32 && docs.is32) {
      fill_typed<Out, int32_t, int32_t>(sizes, docs, seq_length, num_samples, add_extra_token,
                                        num_threads, out);
    } else if (sizes.is32) {
      fill_typed<Out, int32_t, int64_t>(sizes, docs, seq_length, num_samples, add_extra_token,
                                        num_threads, out);
    } else if (docs.is32) {
      fill_typed<Out, int64_t, int32_t>(sizes, docs, seq_length, num_samples, add_extra_token,
                                        num_threads, out);
    } else {
      fill_typed<Out, int64_t, int64_t>(sizes, docs, seq_length, num_samples, add_extra_token,
                                        num_threads, out);
    }
  }
  return result;
}

py::array build_sample_idx_auto(const py::handle& sizes_obj, const py::handle& docs_obj,
                                int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                bool drop_last, int32_t add_extra_token, int num_threads) {
  // megatron-core's rule: int32 when max(len(document_indices), max(sizes)) fits.
  const IntArray sizes = as_int_array(sizes_obj, "sizes");
  const IntArray docs = as_int_array(docs_obj, "document_indices");
  if (sizes.array.shape(0) == 0) throw py::value_error("sizes is empty");
  int64_t largest;
  {
    py::gil_scoped_release release;
    largest = std::max<int64_t>(docs.array.shape(0), max_value(sizes));
  }
  if (largest <= std::numeric_limits<int32_t>::max()) {
    return build_sample_idx_typed<int32_t>(sizes.array, docs.array, seq_length, num_epochs,
                                           tokens_per_epoch, drop_last, add_extra_token,
                                           num_threads);
  }
  return build_sample_idx_typed<int64_t>(sizes.array, docs.array, seq_length, num_epochs,
                                         tokens_per_epoch, drop_last, add_extra_token,
                                         num_threads);
}

// ---------------------------------------------------------------------------
// Blending indices
//
// A greedy state is the number of samples drawn per dataset, stored as doubles
// (exact below 2^53) so the error terms read them directly, padded to the vector
// width with +inf: a padded lane's error is 0 * x - inf = -inf and never wins.

using Counts = std::vector<double>;

// Runs `steps` greedy steps on each of several lanes in lockstep; lane l starts at
// sample begins[l] from state states[l] (updated in place). Lanes are independent
// runs over disjoint sample ranges, interleaved so the CPU overlaps their
// dependency chains.
using LaneKernel = void (*)(const double* w, int32_t np, double* const* states,
                            const int64_t* begins, int64_t steps, int16_t* dataset_index,
                            int64_t* dataset_sample_index);

// Portable single-lane steps, megatron's loop as is.
void blend_scalar(const double* w, int32_t np, double* const* states, const int64_t* begins,
                  int64_t steps, int16_t* dataset_index, int64_t* dataset_sample_index) {
  double* c = states[0];
  for (int64_t s = begins[0], end = begins[0] + steps; s < end; ++s) {
    const double x = std::max(static_cast<double>(s), 1.0);
    int32_t best = 0;
    double best_error = w[0] * x - c[0];
    for (int32_t d = 1; d < np; ++d) {
      const double error = w[d] * x - c[d];
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[s] = static_cast<int16_t>(best);
    dataset_sample_index[s] = static_cast<int64_t>(c[best]);
    c[best] += 1.0;
  }
}

#if defined(MEGATRON_EXT_X86) && defined(__GNUC__)
// The vector kernels find the maximum error with vector max, then the first dataset
// whose error compares equal to it. Comparing with == makes -0.0 and 0.0 tie, as
// megatron's strict '>' scan does, and the first such dataset is the one it keeps.

// AVX2, any number of datasets (np a multiple of 4), one lane.
__attribute__((target("avx2"))) void blend_avx2_any(const double* w, int32_t np,
                                                    double* const* states,
                                                    const int64_t* begins, int64_t steps,
                                                    int16_t* dataset_index,
                                                    int64_t* dataset_sample_index) {
  double* c = states[0];
  const int nv = np / 4;
  std::vector<double> errors(np);
  for (int64_t s = begins[0], end = begins[0] + steps; s < end; ++s) {
    const __m256d x = _mm256_set1_pd(std::max(static_cast<double>(s), 1.0));
    __m256d top = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
    for (int v = 0; v < nv; ++v) {
      const __m256d product = _mm256_mul_pd(_mm256_loadu_pd(w + 4 * v), x);
      const __m256d error = _mm256_sub_pd(product, _mm256_loadu_pd(c + 4 * v));
      _mm256_storeu_pd(errors.data() + 4 * v, error);
      top = _mm256_max_pd(top, error);
    }
    top = _mm256_max_pd(top, _mm256_permute4x64_pd(top, 0x4E));
    top = _mm256_max_pd(top, _mm256_permute_pd(top, 0x5));
    int32_t best = 0;
    for (int v = 0; v < nv; ++v) {
      const int mask = _mm256_movemask_pd(
          _mm256_cmp_pd(_mm256_loadu_pd(errors.data() + 4 * v), top, _CMP_EQ_OQ));
      if (mask != 0) {
        best = 4 * v + __builtin_ctz(static_cast<unsigned>(mask));
        break;
      }
    }
    dataset_index[s] = static_cast<int16_t>(best);
    dataset_sample_index[s] = static_cast<int64_t>(c[best]);
    c[best] += 1.0;
  }
}

// AVX2, np == 4 * NV datasets, L lanes; the states live in registers.
template <int NV, int L>
__attribute__((target("avx2"))) void blend_avx2(const double* w, int32_t np, double* const* states,
                                                const int64_t* begins, int64_t steps,
                                                int16_t* dataset_index,
                                                int64_t* dataset_sample_index) {
  (void)np;
  __m256d c[L][NV];
  int64_t drawn[L][4 * NV];
  for (int l = 0; l < L; ++l) {
    for (int v = 0; v < NV; ++v) c[l][v] = _mm256_loadu_pd(states[l] + 4 * v);
    for (int d = 0; d < 4 * NV; ++d) drawn[l][d] = static_cast<int64_t>(states[l][d]);
  }
  const __m256d one = _mm256_set1_pd(1.0);
  for (int64_t k = 0; k < steps; ++k) {
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) {
      const int64_t s = begins[l] + k;
      const __m256d x = _mm256_set1_pd(std::max(static_cast<double>(s), 1.0));
      __m256d error[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        error[v] = _mm256_sub_pd(_mm256_mul_pd(_mm256_loadu_pd(w + 4 * v), x), c[l][v]);
      }
      __m256d top = error[0];
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) top = _mm256_max_pd(top, error[v]);
      top = _mm256_max_pd(top, _mm256_permute4x64_pd(top, 0x4E));
      top = _mm256_max_pd(top, _mm256_permute_pd(top, 0x5));
      int best = 0;
#pragma GCC unroll 8
      for (int v = NV - 1; v >= 0; --v) {
        const int mask = _mm256_movemask_pd(_mm256_cmp_pd(error[v], top, _CMP_EQ_OQ));
        best = mask != 0 ? 4 * v + __builtin_ctz(static_cast<unsigned>(mask)) : best;
      }
      const __m256i chosen = _mm256_set1_epi64x(best);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256i lane = _mm256_setr_epi64x(4 * v, 4 * v + 1, 4 * v + 2, 4 * v + 3);
        const __m256d hit = _mm256_castsi256_pd(_mm256_cmpeq_epi64(lane, chosen));
        c[l][v] = _mm256_add_pd(c[l][v], _mm256_and_pd(hit, one));
      }
      dataset_index[s] = static_cast<int16_t>(best);
      dataset_sample_index[s] = drawn[l][best]++;
    }
  }
  for (int l = 0; l < L; ++l) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_pd(states[l] + 4 * v, c[l][v]);
  }
}

// AVX-512, np == 8 * NV datasets, L lanes. (GCC's AVX-512 headers trip
// -Wmaybe-uninitialized on their own placeholder operands.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int NV, int L>
__attribute__((target("avx512f"))) void blend_avx512(const double* w, int32_t np,
                                                     double* const* states, const int64_t* begins,
                                                     int64_t steps, int16_t* dataset_index,
                                                     int64_t* dataset_sample_index) {
  (void)np;
  __m512d c[L][NV];
  int64_t drawn[L][8 * NV];
  for (int l = 0; l < L; ++l) {
    for (int v = 0; v < NV; ++v) c[l][v] = _mm512_loadu_pd(states[l] + 8 * v);
    for (int d = 0; d < 8 * NV; ++d) drawn[l][d] = static_cast<int64_t>(states[l][d]);
  }
  const __m512d one = _mm512_set1_pd(1.0);
  for (int64_t k = 0; k < steps; ++k) {
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) {
      const int64_t s = begins[l] + k;
      const __m512d x = _mm512_set1_pd(std::max(static_cast<double>(s), 1.0));
      __m512d error[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        error[v] = _mm512_sub_pd(_mm512_mul_pd(_mm512_loadu_pd(w + 8 * v), x), c[l][v]);
      }
      __m512d top = error[0];
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) top = _mm512_max_pd(top, error[v]);
      top = _mm512_max_pd(top, _mm512_shuffle_f64x2(top, top, 0x4E));
      top = _mm512_max_pd(top, _mm512_permutex_pd(top, 0x4E));
      top = _mm512_max_pd(top, _mm512_permute_pd(top, 0x55));
      int best = 0;
#pragma GCC unroll 8
      for (int v = NV - 1; v >= 0; --v) {
        const unsigned mask = _mm512_cmp_pd_mask(error[v], top, _CMP_EQ_OQ);
        best = mask != 0 ? 8 * v + __builtin_ctz(mask) : best;
      }
      const __m512i chosen = _mm512_set1_epi64(best);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m512i lane = _mm512_setr_epi64(8 * v, 8 * v + 1, 8 * v + 2, 8 * v + 3, 8 * v + 4,
                                               8 * v + 5, 8 * v + 6, 8 * v + 7);
        c[l][v] = _mm512_mask_add_pd(c[l][v], _mm512_cmpeq_epi64_mask(lane, chosen), c[l][v], one);
      }
      dataset_index[s] = static_cast<int16_t>(best);
      dataset_sample_index[s] = drawn[l][best]++;
    }
  }
  for (int l = 0; l < L; ++l) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_pd(states[l] + 8 * v, c[l][v]);
  }
}
#pragma GCC diagnostic pop
#endif

// The kernels chosen for a number of datasets on this CPU.
struct BlendKernels {
  int32_t np;          // padded number of datasets
  int lanes;           // lanes of `multi`
  LaneKernel single;   // one lane
  LaneKernel multi;    // `lanes` lanes
};

bool cpu_has(const std::string& isa) {
#if defined(MEGATRON_EXT_X86) && defined(__GNUC__)
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2");
#endif
  return isa == "scalar";
}

// isa: "auto" (the best this CPU has), "avx512", "avx2" or "scalar".
BlendKernels choose_kernels(int32_t n, const std::string& isa) {
  if (isa != "auto" && isa != "avx512" && isa != "avx2" && isa != "scalar") {
    throw std::invalid_argument("isa must be auto, avx512, avx2 or scalar, got " + isa);
  }
  if (isa != "auto" && !cpu_has(isa)) {
    throw std::invalid_argument("this CPU does not support isa = " + isa);
  }
#if defined(MEGATRON_EXT_X86) && defined(__GNUC__)
  const bool avx512 = isa == "avx512" || (isa == "auto" && cpu_has("avx512"));
  const bool avx2 = isa == "avx2" || (isa == "auto" && cpu_has("avx2"));
  if (n <= 32 && avx512) {
    switch ((n + 7) / 8) {
      case 1: return {8, 8, blend_avx512<1, 1>, blend_avx512<1, 8>};
      case 2: return {16, 8, blend_avx512<2, 1>, blend_avx512<2, 8>};
      case 3: return {24, 8, blend_avx512<3, 1>, blend_avx512<3, 8>};
      default: return {32, 6, blend_avx512<4, 1>, blend_avx512<4, 6>};
    }
  }
  if (n <= 32 && avx2) {
    switch ((n + 3) / 4) {
      case 1: return {4, 4, blend_avx2<1, 1>, blend_avx2<1, 4>};
      case 2: return {8, 4, blend_avx2<2, 1>, blend_avx2<2, 4>};
      case 3: return {12, 4, blend_avx2<3, 1>, blend_avx2<3, 4>};
      case 4: return {16, 4, blend_avx2<4, 1>, blend_avx2<4, 4>};
      case 5: return {20, 4, blend_avx2<5, 1>, blend_avx2<5, 4>};
      case 6: return {24, 2, blend_avx2<6, 1>, blend_avx2<6, 2>};
      case 7: return {28, 2, blend_avx2<7, 1>, blend_avx2<7, 2>};
      default: return {32, 2, blend_avx2<8, 1>, blend_avx2<8, 2>};
    }
  }
  if (avx2 || avx512) {  // wide blends: one lane, any width
    return {(n + 3) / 4 * 4, 1, blend_avx2_any, blend_avx2_any};
  }
#endif
  return {n, 1, blend_scalar, blend_scalar};
}

Counts zero_counts(int32_t n, int32_t np) {
  Counts c(np, std::numeric_limits<double>::infinity());
  std::fill(c.begin(), c.begin() + n, 0.0);
  return c;
}

// A plausible greedy state after `s` samples: largest-remainder apportionment of s
// by the normalised weights. Only a starting guess; the repair pass fixes it.
Counts guess_counts(const double* w, int32_t n, int32_t np, int64_t s) {
  Counts c = zero_counts(n, np);
  double total = 0.0;
  for (int32_t d = 0; d < n; ++d) total += std::max(w[d], 0.0);
  if (!(total > 0.0)) total = 1.0;
  std::vector<std::pair<double, int32_t>> remainders(n);
  int64_t assigned = 0;
  for (int32_t d = 0; d < n; ++d) {
    const double share = std::max(w[d], 0.0) / total * static_cast<double>(s);
    const double whole = std::floor(share);
    c[d] = whole;
    assigned += static_cast<int64_t>(whole);
    remainders[d] = {share - whole, d};
  }
  std::stable_sort(remainders.begin(), remainders.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int64_t i = 0; assigned < s && i < n; ++i, ++assigned) c[remainders[i].second] += 1.0;
  return c;
}

// Checkpoints are taken kFirstCheckpoint, 2x, 4x, ... steps into a chunk.
constexpr int64_t kFirstCheckpoint = 64;
constexpr int64_t kMinChunk = 4096;

// One speculative chunk: where it starts, the state it started from, its states at
// the checkpoints and at its end.
struct Chunk {
  int64_t begin = 0, end = 0;
  Counts start, state;
  std::vector<Counts> checkpoints;
};

// Runs chunks [first, first + count) of equal length (the last chunk of the blend
// may be longer; its tail runs alone), `lanes` at a time.
void run_chunks(const BlendKernels& k, const double* w, std::vector<Chunk>& chunks, size_t first,
                size_t count, int16_t* di, int64_t* dsi) {
  for (size_t g = first; g < first + count; g += k.lanes) {
    const size_t m = std::min<size_t>(k.lanes, first + count - g);
    const int64_t len = chunks[g].end - chunks[g].begin;  // the shortest in the group
    std::vector<double*> states(m);
    std::vector<int64_t> begins(m);
    for (size_t i = 0; i < m; ++i) states[i] = chunks[g + i].state.data();
    int64_t done = 0;
    for (int64_t mark = kFirstCheckpoint; done < len; mark *= 2) {
      const int64_t stop = std::min(mark, len);
      if (m == static_cast<size_t>(k.lanes)) {
        for (size_t i = 0; i < m; ++i) begins[i] = chunks[g + i].begin + done;
        k.multi(w, k.np, states.data(), begins.data(), stop - done, di, dsi);
      } else {
        for (size_t i = 0; i < m; ++i) {
          const int64_t b = chunks[g + i].begin + done;
          k.single(w, k.np, &states[i], &b, stop - done, di, dsi);
        }
      }
      done = stop;
      if (done < len) {
        for (size_t i = 0; i < m; ++i) chunks[g + i].checkpoints.push_back(chunks[g + i].state);
      }
    }
    for (size_t i = 0; i < m; ++i) {  // a longer last chunk finishes alone
      const int64_t b = chunks[g + i].begin + len;
      if (b < chunks[g + i].end) k.single(w, k.np, &states[i], &b, chunks[g + i].end - b, di, dsi);
    }
  }
}

void blending_indices_impl(int16_t* dataset_index, int64_t* dataset_sample_index,
                           const double* weights, int32_t n, int64_t size, int num_threads,
                           const BlendKernels& k) {
  std::vector<double> w(k.np, 0.0);
  std::copy(weights, weights + n, w.begin());
  if (size == 0) return;
  // Automatic: one thread per 2^16 samples at most; explicit: as asked.
  const int64_t threads = std::max<int64_t>(
      1, num_threads > 0 ? std::min<int64_t>(num_threads, size)
                         : std::min<int64_t>(hardware_threads(), size >> 16));
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(threads * k.lanes, size / kMinChunk));
  std::vector<Chunk> chunks(num_chunks);
  const int64_t len = size / num_chunks;
  for (int64_t i = 0; i < num_chunks; ++i) {
    chunks[i].begin = i * len;
    chunks[i].end = i + 1 == num_chunks ? size : (i + 1) * len;
    chunks[i].start = i == 0 ? zero_counts(n, k.np) : guess_counts(w.data(), n, k.np, i * len);
    chunks[i].state = chunks[i].start;
  }
  // Spread the chunks over the threads in whole groups of lanes.
  const int64_t groups = (num_chunks + k.lanes - 1) / k.lanes;
  const int64_t workers = std::min<int64_t>(threads, groups);
  run_parallel(workers, [&](int t) {
    const int64_t g0 = groups * t / workers, g1 = groups * (t + 1) / workers;
    const size_t first = static_cast<size_t>(g0 * k.lanes);
    const size_t last = static_cast<size_t>(std::min<int64_t>(g1 * k.lanes, num_chunks));
    run_chunks(k, w.data(), chunks, first, last - first, dataset_index, dataset_sample_index);
  });
  // Repair: rerun each chunk from the true state until it meets the speculative run
  // at a checkpoint; from there on the speculative output is the true output.
  Counts truth = std::move(chunks[0].state);
  for (int64_t i = 1; i < num_chunks; ++i) {
    Chunk& chunk = chunks[i];
    if (truth == chunk.start) {
      truth = std::move(chunk.state);
      continue;
    }
    double* state = truth.data();
    int64_t done = 0;
    size_t next = 0;
    bool met = false;
    const int64_t chunk_len = chunk.end - chunk.begin;
    for (int64_t mark = kFirstCheckpoint; done < chunk_len && !met; mark *= 2) {
      const int64_t stop = next < chunk.checkpoints.size() ? std::min(mark, chunk_len) : chunk_len;
      const int64_t b = chunk.begin + done;
      k.single(w.data(), k.np, &state, &b, stop - done, dataset_index, dataset_sample_index);
      done = stop;
      met = done < chunk_len && truth == chunk.checkpoints[next++];
    }
    if (met) truth = std::move(chunk.state);
  }
}

void check_output(const py::array& a, const char* name, char kind, int itemsize, int64_t size) {
  if (a.dtype().kind() != kind || a.itemsize() != itemsize) {
    throw py::type_error(std::string(name) + " must be a numpy " +
                         (kind == 'i' && itemsize == 2 ? "int16" : "int64") + " array, got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 1 || !(a.flags() & py::array::c_style) || !a.writeable()) {
    throw py::value_error(std::string(name) + " must be a writable, contiguous 1-D array");
  }
  if (a.shape(0) < size) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.shape(0)) +
                          " entries, fewer than the " + std::to_string(size) + " to write");
  }
}

void build_blending_indices_py(py::array dataset_index, py::array dataset_sample_index,
                               const py::handle& weights_obj, int32_t num_datasets, int64_t size,
                               bool verbose, int num_threads, const std::string& isa) {
  if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max()) {
    throw py::value_error("num_datasets must be in [1, 32767], got " +
                          std::to_string(num_datasets));
  }
  if (size < 0) throw py::value_error("size must be non-negative, got " + std::to_string(size));
  auto weights = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(weights_obj);
  if (!weights || weights.ndim() != 1) throw py::type_error("weights must be a 1-D float array");
  if (weights.shape(0) < num_datasets) {
    throw py::value_error("weights has " + std::to_string(weights.shape(0)) +
                          " entries for num_datasets = " + std::to_string(num_datasets));
  }
  const double* w = weights.data();
  for (int32_t d = 0; d < num_datasets; ++d) {
    if (!std::isfinite(w[d])) {
      throw py::value_error("weights[" + std::to_string(d) + "] is not finite");
    }
  }
  check_output(dataset_index, "dataset_index", 'i', 2, size);
  check_output(dataset_sample_index, "dataset_sample_index", 'i', 8, size);
  auto* di = static_cast<int16_t*>(dataset_index.mutable_data());
  auto* dsi = static_cast<int64_t*>(dataset_sample_index.mutable_data());
  const BlendKernels kernels = choose_kernels(num_datasets, isa);
  py::gil_scoped_release release;
  if (verbose) std::cout << "> building indices for blended datasets ..." << std::endl;
  blending_indices_impl(di, dsi, w, num_datasets, size, num_threads, kernels);
  if (verbose) {
    std::vector<int64_t> drawn(num_datasets, 0);
    for (int64_t s = 0; s < size; ++s) ++drawn[di[s]];
    std::cout << " > sample ratios:" << std::endl;
    for (int32_t d = 0; d < num_datasets; ++d) {
      std::cout << "   dataset " << d << ", input: " << w[d] << ", achieved: "
                << static_cast<double>(drawn[d]) / static_cast<double>(size) << std::endl;
    }
  }
}

void build_exhaustive_blending_indices_py(py::array dataset_index, py::array dataset_sample_index,
                                          const py::handle& sizes_obj, int32_t num_datasets) {
  if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max()) {
    throw py::value_error("num_datasets must be in [1, 32767], got " +
                          std::to_string(num_datasets));
  }
  auto sizes = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(sizes_obj);
  if (!sizes || sizes.ndim() != 1) throw py::type_error("sizes must be a 1-D integer array");
  if (sizes.shape(0) < num_datasets) {
    throw py::value_error("sizes has " + std::to_string(sizes.shape(0)) +
                          " entries for num_datasets = " + std::to_string(num_datasets));
  }
  int64_t total = 0;
  for (int32_t d = 0; d < num_datasets; ++d) {
    if (sizes.data()[d] <= 0) {
      throw py::value_error("sizes[" + std::to_string(d) + "] = " +
                            std::to_string(sizes.data()[d]) + " must be positive");
    }
    total += sizes.data()[d];
  }
  check_output(dataset_index, "dataset_index", 'i', 2, total);
  check_output(dataset_sample_index, "dataset_sample_index", 'i', 8, total);
  auto* di = static_cast<int16_t*>(dataset_index.mutable_data());
  auto* dsi = static_cast<int64_t*>(dataset_sample_index.mutable_data());
  const int64_t* sz = sizes.data();
  py::gil_scoped_release release;
  exhaustive_blending_indices(di, dsi, sz, num_datasets);
}

}  // namespace

int64_t sample_idx_num_samples(int32_t num_epochs, int64_t tokens_per_epoch, int32_t seq_length,
                               bool drop_last_partial_sequence, int32_t add_extra_token) {
  if (seq_length <= 1) {
    throw std::invalid_argument("seq_length must be > 1, got " + std::to_string(seq_length));
  }
  if (num_epochs <= 0) {
    throw std::invalid_argument("num_epochs must be > 0, got " + std::to_string(num_epochs));
  }
  if (tokens_per_epoch <= 1) {
    throw std::invalid_argument("tokens_per_epoch must be > 1, got " +
                                std::to_string(tokens_per_epoch));
  }
  if (add_extra_token != 0 && add_extra_token != 1) {
    throw std::invalid_argument("add_extra_token must be 0 or 1, got " +
                                std::to_string(add_extra_token));
  }
  const int64_t tokens = static_cast<int64_t>(num_epochs) * tokens_per_epoch - add_extra_token;
  if (drop_last_partial_sequence) return tokens / seq_length;
  // megatron-core computes this ceiling in single precision; keep its rounding.
  const float quotient = static_cast<float>(tokens) / static_cast<float>(seq_length);
  return static_cast<int64_t>(std::ceil(quotient));
}

void blending_indices(int16_t* dataset_index, int64_t* dataset_sample_index,
                      const double* weights, int32_t num_datasets, int64_t size,
                      int num_threads) {
  if (num_datasets < 1) throw std::invalid_argument("num_datasets must be >= 1");
  blending_indices_impl(dataset_index, dataset_sample_index, weights, num_datasets, size,
                        num_threads, choose_kernels(num_datasets, "auto"));
}

void exhaustive_blending_indices(int16_t* dataset_index, int64_t* dataset_sample_index,
                                 const int64_t* sizes, int32_t num_datasets) {
  int64_t total = 0;
  for (int32_t d = 0; d < num_datasets; ++d) total += sizes[d];
  std::vector<double> weights(num_datasets);
  for (int32_t d = 0; d < num_datasets; ++d) {
    weights[d] = static_cast<double>(sizes[d]) / static_cast<double>(total);
  }
  std::vector<int64_t> drawn(num_datasets, 0);
  std::vector<int32_t> unspent(num_datasets);  // ascending, like megatron's std::set
  for (int32_t d = 0; d < num_datasets; ++d) unspent[d] = d;
  for (int64_t s = 0; !unspent.empty(); ++s) {
    const double x = std::max(static_cast<double>(s), 1.0);
    size_t best_slot = 0;
    double best_error = std::numeric_limits<double>::lowest();
    for (size_t i = 0; i < unspent.size(); ++i) {
      const int32_t d = unspent[i];
      const double error = weights[d] * x - static_cast<double>(drawn[d]);
      if (error > best_error) {
        best_error = error;
        best_slot = i;
      }
    }
    const int32_t best = unspent[best_slot];
    dataset_index[s] = static_cast<int16_t>(best);
    dataset_sample_index[s] = drawn[best];
    if (++drawn[best] == sizes[best]) unspent.erase(unspent.begin() + best_slot);
  }
}

void register_sample_index(py::module_& m) {
  m.def(
      "build_sample_idx",
      [](const py::handle& sizes, const py::handle& document_indices, int32_t seq_length,
         int32_t num_epochs, int64_t tokens_per_epoch, bool drop_last, int32_t add_extra_token,
         int num_threads) {
        return build_sample_idx_auto(sizes, document_indices, seq_length, num_epochs,
                                     tokens_per_epoch, drop_last, add_extra_token, num_threads);
      },
      py::arg("sizes"), py::arg("document_indices"), py::arg("seq_length"),
      py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last") = true,
      py::arg("add_extra_token") = 1, py::arg("num_threads") = 0,
      "Sample index of shape (num_samples + 1, 2): (position in document_indices, offset).\n"
      "int32 when max(len(document_indices), max(sizes)) fits in int32, else int64.");
  m.def("build_sample_idx_int32", &build_sample_idx_typed<int32_t>, py::arg("sizes"),
        py::arg("document_indices"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last") = true, py::arg("add_extra_token") = 1,
        py::arg("num_threads") = 0, "build_sample_idx with an int32 result.");
  m.def("build_sample_idx_int64", &build_sample_idx_typed<int64_t>, py::arg("sizes"),
        py::arg("document_indices"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last") = true, py::arg("add_extra_token") = 1,
        py::arg("num_threads") = 0, "build_sample_idx with an int64 result.");
  m.def("build_blending_indices", &build_blending_indices_py, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"),
        py::arg("size"), py::arg("verbose") = false, py::arg("num_threads") = 0,
        py::arg("isa") = "auto",
        "Fill dataset_index (int16) and dataset_sample_index (int64) for `size` blended samples.\n"
        "num_threads: 0 = automatic; isa: auto, avx512, avx2 or scalar (same results).");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices_py,
        py::arg("dataset_index"), py::arg("dataset_sample_index"), py::arg("sizes"),
        py::arg("num_datasets"),
        "Fill the blending indices drawing exactly sizes[d] samples from each dataset d.");
}

}  // namespace megatron_ext
