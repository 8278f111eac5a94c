// Streaming writer for Megatron's MMapIndexedDataset (.bin/.idx) format.
//
// The .idx layout (all little-endian), identical to megatron-core's IndexedDatasetBuilder:
//   "MMIDIDX\0\0" | u64 version=1 | u8 dtype code | u64 sequence count N |
//   u64 document-index count D | i32 lengths[N] | i64 byte pointers[N] | i64 document index[D]
// The .bin holds the tokens of every sequence back to back in the dataset's dtype.
//
// Unlike megatron-core, which keeps every list in RAM until finalize, the builder spills
// sequence lengths and document indices to unlinked side files as they are added and
// derives the pointers from the lengths while it streams the .idx out, so its memory use
// is a few fixed buffers whatever the corpus size. The .bin and the .idx are written
// under temporary names and renamed into place only by finalize (.idx last); a builder
// destroyed without finalize removes its temporaries.
//
// Each temporary ("<name>.tmp-<random>") is held under an exclusive flock(2) from its
// creation to its rename, so a later run can tell a stale one (left by a killed process:
// the lock died with it) from a live one and remove only the former. While it writes, the
// builder records the smallest and largest token id and the CRC-32 of both files, which
// the Python layer keeps in a manifest beside the dataset.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace megatron_ext {

// An operating-system error on a named file (mapped to Python's OSError family).
class IoError : public std::runtime_error {
 public:
  IoError(int code, const std::string& what, const std::string& path)
      : std::runtime_error(what), code_(code), path_(path) {}
  int code() const { return code_; }
  const std::string& path() const { return path_; }

 private:
  int code_;
  std::string path_;
};

// A file whose contents break the format (mapped to IndexedDatasetError, a ValueError).
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One open file descriptor (RAII) with an optional write buffer. Errors name the file.
class File {
 public:
  // Creates a new file that must not exist yet (O_EXCL), mode 0666 minus the umask.
  static File create_new(const std::string& path, std::size_t buffer_bytes);
  // Creates "<stem>.tmp-<random>" next to stem, locked (flock, exclusive) for as long as
  // the descriptor (or a duplicate of it) is open; *created gets the name.
  static File create_temporary(const std::string& stem, std::size_t buffer_bytes, std::string* created);
  static File open_read(const std::string& path);

  File() = default;
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  bool is_open() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }

  // Buffered append; writes larger than the buffer go straight to the descriptor.
  void write(const void* data, std::size_t size);
  // Bytes that write() can take without a system call.
  std::size_t spare() const { return buffer_.size() - used_; }
  std::size_t capacity() const { return buffer_.size(); }
  // Room for `size` <= capacity() bytes at the end of the buffer (flushing it first when
  // needed); commit(size) appends what was put there.
  char* reserve(std::size_t size);
  void commit(std::size_t size) { used_ += size; }
  void flush();
  // Keeps a CRC-32 of every byte written from now on (see crc()).
  void enable_checksum() { checksum_ = true; }
  std::uint32_t crc() const { return crc_; }
  // A duplicate of the descriptor (the caller closes it): it keeps the file's lock after close().
  int duplicate_descriptor() const;
  // Reads exactly `size` bytes at `offset` (no buffering); throws FormatError when the
  // file ends first.
  void pread_exact(void* data, std::size_t size, std::uint64_t offset) const;
  std::uint64_t size() const;
  void sync();
  // Flushes and closes, reporting errors (the destructor closes silently).
  void close();

 private:
  File(int fd, std::string path, std::size_t buffer_bytes);
  void write_all(const char* data, std::size_t size);

  int fd_ = -1;
  std::string path_;
  std::vector<char> buffer_;
  std::size_t used_ = 0;
  bool checksum_ = false;
  std::uint32_t crc_ = 0;
};

// Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType).
enum class DTypeCode : std::uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUInt16 = 8,
};

// Item size of a code, or 0 for an unknown code.
std::size_t dtype_code_size(int code);
const char* dtype_code_name(int code);

// A read-only run of integers in caller memory: `kind` is 'i' (signed) or 'u'
// (unsigned), `itemsize` 1, 2, 4 or 8 bytes.
struct IntSpan {
  const void* data = nullptr;
  std::size_t count = 0;
  char kind = 'i';
  std::size_t itemsize = 8;
};

// Not thread-safe: one caller at a time (the Python binding enforces it).
class IndexedDatasetBuilder {
 public:
  // dtype_code: an integer Megatron code (uint8, int8, int16, uint16, int32, int64).
  // durable: fsync the files (and their directories) before and after the renames.
  IndexedDatasetBuilder(const std::string& bin_path, int dtype_code, bool durable);
  ~IndexedDatasetBuilder();
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // One sequence (megatron-core add_item).
  void add_item(const IntSpan& tokens);
  // One document of several sequences whose lengths sum to the token count.
  void add_document(const IntSpan& tokens, const IntSpan& lengths);
  void end_document();
  // Appends a whole dataset (prefix.bin / prefix.idx) of the same dtype.
  void add_index(const std::string& prefix);
  // Writes the .idx and renames both files into place (.idx last).
  void finalize(const std::string& idx_path);
  // Drops all temporaries; the builder cannot be used afterwards.
  void discard();

  // Whether appending `tokens` tokens in `sequences` sequences (and one document index)
  // fits in the write buffers, i.e. cannot block on the disk. Lets a caller keep a lock
  // (such as Python's GIL) over short calls.
  bool fits_in_buffers(std::size_t tokens, std::size_t sequences) const;

  int dtype_code() const { return dtype_code_; }
  const std::string& bin_path() const { return bin_path_; }
  std::uint64_t sequence_count() const { return sequences_; }
  std::uint64_t document_count() const { return document_indices_ - 1; }  // documents ended so far
  std::uint64_t token_count() const { return bin_bytes_ / itemsize_; }
  bool finalized() const { return state_ == State::kFinalized; }
  // Smallest and largest token id written (meaningful when token_count() > 0).
  std::int64_t min_token_id() const { return min_token_; }
  std::int64_t max_token_id() const { return max_token_; }
  // CRC-32 (zlib.crc32) of the .bin and of the .idx, once finalized.
  std::uint32_t bin_crc32() const { return bin_crc_; }
  std::uint32_t idx_crc32() const { return idx_crc_; }

 private:
  void check_open() const;
  void write_tokens(const IntSpan& tokens);
  void append_length(std::uint64_t length);
  void append_document_index(std::uint64_t index);
  void remove_temporaries() noexcept;
  void note_token_range(std::int64_t lo, std::int64_t hi);

  std::string bin_path_;
  int dtype_code_;
  std::size_t itemsize_;
  bool durable_;
  enum class State { kOpen, kFinalized, kDiscarded, kBroken } state_ = State::kOpen;

  std::string bin_tmp_path_;
  std::string idx_tmp_path_;
  File bin_;
  File lengths_;    // int32 per sequence, unlinked
  File documents_;  // int64 per document boundary (starting with 0), unlinked
  std::uint64_t sequences_ = 0;
  std::uint64_t document_indices_ = 0;  // entries written to documents_
  std::uint64_t last_document_end_ = 0;  // the last entry written to documents_
  std::uint64_t bin_bytes_ = 0;
  std::int64_t min_token_ = 0;
  std::int64_t max_token_ = 0;
  std::uint32_t bin_crc_ = 0;
  std::uint32_t idx_crc_ = 0;
};

void register_indexed_dataset_builder(pybind11::module_& m);

}  // namespace megatron_ext
