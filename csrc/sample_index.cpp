#include "sample_index.h"

namespace megatron_ext {
void register_sample_index(pybind11::module_& m) { (void)m; }
}  // namespace megatron_ext
