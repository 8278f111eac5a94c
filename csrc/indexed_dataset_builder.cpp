#include "indexed_dataset_builder.h"

namespace megatron_ext {
void register_indexed_dataset_builder(pybind11::module_& m) { (void)m; }
}  // namespace megatron_ext
