// The native module megatron_ext._native: each concept registers its own bindings.
#include <pybind11/pybind11.h>

#include "indexed_dataset_builder.h"
#include "sample_index.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "megatron_ext native core: .bin/.idx builder and sample/blending indices";
  megatron_ext::register_indexed_dataset_builder(m);
  megatron_ext::register_sample_index(m);
}
