#pragma once
#include <pybind11/pybind11.h>

namespace megatron_ext {
void register_sample_index(pybind11::module_& m);
}  // namespace megatron_ext
