// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320): the checksum of zlib.crc32, so a
// value the builder records can be recomputed in Python with the standard library.
#pragma once

#include <cstddef>
#include <cstdint>

namespace megatron_ext {

// The CRC of data[0..size) continued from `crc` (0 to start), as zlib.crc32(data, crc).
std::uint32_t crc32_update(std::uint32_t crc, const void* data, std::size_t size);

}  // namespace megatron_ext
