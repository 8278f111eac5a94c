#pragma once
// Sample and blending indices for GPT-style datasets.
//
// The sample index maps every sample of a flattened, shuffled document stream to
// (position in the document index, token offset in that document). The blending
// indices map every sample of a blend to (dataset, sample within that dataset).
// All functions reproduce megatron-core's dataset helpers exactly (same outputs
// for the same inputs, including their floating-point arithmetic).
#include <pybind11/pybind11.h>

#include <cstdint>

namespace megatron_ext {

// Number of samples build_sample_idx produces (its output has this many rows + 1).
// drop_last: floor division; otherwise a ceiling computed in single precision, as
// megatron-core does.
int64_t sample_idx_num_samples(int32_t num_epochs, int64_t tokens_per_epoch, int32_t seq_length,
                               bool drop_last_partial_sequence, int32_t add_extra_token);

// Greedy blend: sample s goes to the first dataset d maximising
// weights[d] * max(s, 1) - (samples already drawn from d). Runs on up to
// num_threads threads (0: hardware concurrency) with identical results.
void blending_indices(int16_t* dataset_index, int64_t* dataset_sample_index,
                      const double* weights, int32_t num_datasets, int64_t size,
                      int num_threads);

// Exhaustive blend: draws exactly sizes[d] samples from every dataset d, in the
// greedy order of weights sizes[d] / sum(sizes). Writes sum(sizes) entries.
void exhaustive_blending_indices(int16_t* dataset_index, int64_t* dataset_sample_index,
                                 const int64_t* sizes, int32_t num_datasets);

void register_sample_index(pybind11::module_& m);

}  // namespace megatron_ext
