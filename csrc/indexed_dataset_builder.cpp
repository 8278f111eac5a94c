#include "indexed_dataset_builder.h"

#include <fcntl.h>
#include <pybind11/numpy.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <system_error>
#include <type_traits>
#include <utility>

#include "crc32.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the .bin/.idx format is little-endian; this builder writes host byte order"
#endif

namespace megatron_ext {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr std::uint64_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;
constexpr std::size_t kDataBuffer = std::size_t(4) << 20;
constexpr std::size_t kSideBuffer = std::size_t(1) << 20;
constexpr std::size_t kChunkItems = std::size_t(64) << 10;
constexpr std::size_t kQuickTokens = std::size_t(64) << 10;  // converted in well under a millisecond
constexpr std::int64_t kMaxLength = std::numeric_limits<std::int32_t>::max();

std::string errno_text(int code) { return std::generic_category().message(code); }

[[noreturn]] void throw_io(int code, const std::string& action, const std::string& path) {
  throw IoError(code, errno_text(code) + " (" + action + ")", path);
}

std::string directory_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void sync_directory(const std::string& path) {
  std::string dir = directory_of(path);
  int fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_io(errno, "opening the directory to sync it", dir);
  int rc = ::fsync(fd);
  int code = errno;
  ::close(fd);
  if (rc != 0) throw_io(code, "syncing the directory", dir);
}

std::string random_suffix() {
  std::random_device rd;
  std::uint64_t r = (std::uint64_t(rd()) << 32) ^ rd();
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(r));
  return buf;
}

// Calls f(T{}) with T the integer type of (kind, itemsize).
template <class F>
void visit_int_type(char kind, std::size_t itemsize, F&& f) {
  if (kind == 'i') {
    switch (itemsize) {
      case 1: return f(std::int8_t{});
      case 2: return f(std::int16_t{});
      case 4: return f(std::int32_t{});
      case 8: return f(std::int64_t{});
    }
  } else if (kind == 'u') {
    switch (itemsize) {
      case 1: return f(std::uint8_t{});
      case 2: return f(std::uint16_t{});
      case 4: return f(std::uint32_t{});
      case 8: return f(std::uint64_t{});
    }
  }
  throw std::invalid_argument("unsupported integer type (kind '" + std::string(1, kind) + "', " +
                              std::to_string(itemsize) + " bytes)");
}

template <class F>
void visit_code_type(int code, F&& f) {
  switch (static_cast<DTypeCode>(code)) {
    case DTypeCode::kUInt8: return f(std::uint8_t{});
    case DTypeCode::kInt8: return f(std::int8_t{});
    case DTypeCode::kInt16: return f(std::int16_t{});
    case DTypeCode::kUInt16: return f(std::uint16_t{});
    case DTypeCode::kInt32: return f(std::int32_t{});
    case DTypeCode::kInt64: return f(std::int64_t{});
    default: break;
  }
  throw std::invalid_argument(std::string("dtype ") + dtype_code_name(code) +
                              " is not an integer token dtype (use uint8, int8, int16, uint16, "
                              "int32 or int64)");
}

template <class T>
const char* type_name() {
  if (std::is_same_v<T, std::int8_t>) return "int8";
  if (std::is_same_v<T, std::uint8_t>) return "uint8";
  if (std::is_same_v<T, std::int16_t>) return "int16";
  if (std::is_same_v<T, std::uint16_t>) return "uint16";
  if (std::is_same_v<T, std::int32_t>) return "int32";
  if (std::is_same_v<T, std::uint32_t>) return "uint32";
  if (std::is_same_v<T, std::int64_t>) return "int64";
  return "uint64";
}

template <class T>
constexpr bool is_negative(T v) {
  if constexpr (std::is_signed_v<T>) {
    return v < 0;
  } else {
    (void)v;
    return false;
  }
}

// Whether v is a value of Dst.
template <class Dst, class Src>
constexpr bool fits(Src v) {
  using D = std::numeric_limits<Dst>;
  if (is_negative(v)) return D::is_signed && static_cast<std::int64_t>(v) >= static_cast<std::int64_t>(D::min());
  return static_cast<std::uint64_t>(v) <= static_cast<std::uint64_t>(D::max());
}

// Whether every value of Src is a value of Dst.
template <class Dst, class Src>
constexpr bool always_fits() {
  return fits<Dst>(std::numeric_limits<Src>::min()) && fits<Dst>(std::numeric_limits<Src>::max());
}

// out[i] = in[i] for i < n (n > 0); returns whether every value fit in Dst.
template <class Src, class Dst>
bool convert_checked(const Src* in, std::size_t n, Dst* out) {
  if constexpr (always_fits<Dst, Src>()) {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Dst>(in[i]);
    return true;
  } else {
    Src lo = in[0], hi = in[0];
    for (std::size_t i = 0; i < n; ++i) {
      const Src v = in[i];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      out[i] = static_cast<Dst>(v);
    }
    return fits<Dst>(lo) && fits<Dst>(hi);
  }
}

template <class T>
std::string to_text(T v) {
  return std::to_string(v);
}

// Throws std::invalid_argument naming the first value of in[0..n) outside [lo, hi] of Dst.
template <class Dst, class Src>
void check_range(const Src* in, std::size_t n, const char* what) {
  if constexpr (!always_fits<Dst, Src>()) {
    if (n == 0) return;
    Src lo = in[0], hi = in[0];
    for (std::size_t i = 0; i < n; ++i) {
      lo = std::min(lo, in[i]);
      hi = std::max(hi, in[i]);
    }
    if (fits<Dst>(lo) && fits<Dst>(hi)) return;
    for (std::size_t i = 0; i < n; ++i) {
      if (!fits<Dst>(in[i])) {
        throw std::invalid_argument(std::string(what) + " " + to_text(in[i]) + " at position " +
                                    std::to_string(i) + " does not fit in " + type_name<Dst>() + " (" +
                                    to_text(std::numeric_limits<Dst>::min()) + ".." +
                                    to_text(std::numeric_limits<Dst>::max()) + ")");
      }
    }
  }
}

}  // namespace

// ----------------------------------------------------------------------------- File

File::File(int fd, std::string path, std::size_t buffer_bytes) : fd_(fd), path_(std::move(path)) {
  buffer_.resize(buffer_bytes);
}

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)),
      buffer_(std::move(other.buffer_)),
      used_(std::exchange(other.used_, 0)),
      checksum_(std::exchange(other.checksum_, false)),
      crc_(std::exchange(other.crc_, 0)) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    buffer_ = std::move(other.buffer_);
    used_ = std::exchange(other.used_, 0);
    checksum_ = std::exchange(other.checksum_, false);
    crc_ = std::exchange(other.crc_, 0);
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File File::create_new(const std::string& path, std::size_t buffer_bytes) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw_io(errno, "creating the file", path);
  return File(fd, path, buffer_bytes);
}

File File::create_temporary(const std::string& stem, std::size_t buffer_bytes, std::string* created) {
  for (int attempt = 0; attempt < 64; ++attempt) {
    std::string name = stem + ".tmp-" + random_suffix();
    int fd = ::open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
      if (errno != EEXIST) throw_io(errno, "creating a temporary file next to it", stem);
      continue;
    }
    // A cleaner of stale temporaries may have locked (and then unlinked) the new file
    // before we locked it: then it is not ours any more, and we try another name.
    // (A file system without flock leaves the file unlocked: it still works, and a cleaner
    // cannot lock it either.)
    struct stat st;
    const bool taken = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    if (!taken && ::fstat(fd, &st) == 0 && st.st_nlink > 0) {
      *created = name;
      return File(fd, name, buffer_bytes);
    }
    ::close(fd);
  }
  throw_io(EEXIST, "creating a temporary file next to it", stem);
}

File File::open_read(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_io(errno, "opening for reading", path);
  return File(fd, path, 0);
}

int File::duplicate_descriptor() const {
  int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw_io(errno, "duplicating the descriptor", path_);
  return fd;
}

void File::write_all(const char* data, std::size_t size) {
  if (checksum_) crc_ = crc32_update(crc_, data, size);
  while (size > 0) {
    ssize_t n = ::write(fd_, data, std::min<std::size_t>(size, std::size_t(1) << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(errno, "writing", path_);
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

void File::write(const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  if (used_ + size <= buffer_.size()) {
    std::memcpy(buffer_.data() + used_, p, size);
    used_ += size;
    return;
  }
  flush();
  if (size >= buffer_.size()) {
    write_all(p, size);
  } else {
    std::memcpy(buffer_.data(), p, size);
    used_ = size;
  }
}

char* File::reserve(std::size_t size) {
  if (used_ + size > buffer_.size()) flush();
  return buffer_.data() + used_;
}

void File::flush() {
  if (used_ > 0) {
    std::size_t n = used_;
    used_ = 0;
    write_all(buffer_.data(), n);
  }
}

void File::pread_exact(void* data, std::size_t size, std::uint64_t offset) const {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = ::pread(fd_, p, std::min<std::size_t>(size, std::size_t(1) << 30), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(errno, "reading", path_);
    }
    if (n == 0) throw FormatError(path_ + ": unexpected end of file at byte " + std::to_string(offset));
    p += n;
    size -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
}

std::uint64_t File::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw_io(errno, "querying the size", path_);
  return static_cast<std::uint64_t>(st.st_size);
}

void File::sync() {
  flush();
  if (::fsync(fd_) != 0) throw_io(errno, "syncing", path_);
}

void File::close() {
  if (fd_ < 0) return;
  try {
    flush();
  } catch (...) {
    ::close(std::exchange(fd_, -1));
    throw;
  }
  if (::close(std::exchange(fd_, -1)) != 0) throw_io(errno, "closing", path_);
}

// ----------------------------------------------------------------------------- dtypes

std::size_t dtype_code_size(int code) {
  switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: case 7: return 4;
    case 5: case 6: return 8;
    default: return 0;
  }
}

const char* dtype_code_name(int code) {
  switch (code) {
    case 1: return "uint8";
    case 2: return "int8";
    case 3: return "int16";
    case 4: return "int32";
    case 5: return "int64";
    case 6: return "float64";
    case 7: return "float32";
    case 8: return "uint16";
    default: return "unknown";
  }
}

// ----------------------------------------------------------------------------- builder

IndexedDatasetBuilder::IndexedDatasetBuilder(const std::string& bin_path, int dtype_code, bool durable)
    : bin_path_(bin_path), dtype_code_(dtype_code), itemsize_(dtype_code_size(dtype_code)), durable_(durable) {
  visit_code_type(dtype_code, [](auto) {});  // rejects float and unknown codes
  try {
    bin_ = File::create_temporary(bin_path_, kDataBuffer, &bin_tmp_path_);
    bin_.enable_checksum();
    std::string side;
    lengths_ = File::create_temporary(bin_path_ + ".lengths", kSideBuffer, &side);
    if (::unlink(side.c_str()) != 0) throw_io(errno, "unlinking a side file", side);
    documents_ = File::create_temporary(bin_path_ + ".documents", kSideBuffer, &side);
    if (::unlink(side.c_str()) != 0) throw_io(errno, "unlinking a side file", side);
    append_document_index(0);
  } catch (...) {
    remove_temporaries();
    throw;
  }
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (state_ != State::kFinalized) remove_temporaries();
}

void IndexedDatasetBuilder::remove_temporaries() noexcept {
  bin_ = File();
  lengths_ = File();
  documents_ = File();
  if (!bin_tmp_path_.empty()) ::unlink(bin_tmp_path_.c_str());
  if (!idx_tmp_path_.empty()) ::unlink(idx_tmp_path_.c_str());
  bin_tmp_path_.clear();
  idx_tmp_path_.clear();
}

void IndexedDatasetBuilder::check_open() const {
  switch (state_) {
    case State::kOpen: return;
    case State::kFinalized: throw std::runtime_error(bin_path_ + ": the builder was already finalized");
    case State::kDiscarded: throw std::runtime_error(bin_path_ + ": the builder was discarded");
    case State::kBroken:
      throw std::runtime_error(bin_path_ + ": the builder is unusable after an earlier write error");
  }
}

bool IndexedDatasetBuilder::fits_in_buffers(std::size_t tokens, std::size_t sequences) const {
  if (state_ != State::kOpen) return false;
  return tokens <= kQuickTokens && tokens * itemsize_ <= bin_.spare() &&
         sequences * sizeof(std::int32_t) <= lengths_.spare() && sizeof(std::int64_t) <= documents_.spare();
}

void IndexedDatasetBuilder::append_length(std::uint64_t length) {
  std::int32_t v = static_cast<std::int32_t>(length);
  lengths_.write(&v, sizeof v);
  ++sequences_;
}

void IndexedDatasetBuilder::append_document_index(std::uint64_t index) {
  std::int64_t v = static_cast<std::int64_t>(index);
  documents_.write(&v, sizeof v);
  ++document_indices_;
  last_document_end_ = index;
}

// Validates every token against the builder's dtype, then converts and appends them. Nothing
// is written when a token does not fit. Tokens are converted straight into the write buffer;
// a call that fits in it is checked in the same pass and committed only when valid.
void IndexedDatasetBuilder::note_token_range(std::int64_t lo, std::int64_t hi) {
  if (bin_bytes_ == 0) {
    min_token_ = lo;
    max_token_ = hi;
  } else {
    min_token_ = std::min(min_token_, lo);
    max_token_ = std::max(max_token_, hi);
  }
}

void IndexedDatasetBuilder::write_tokens(const IntSpan& tokens) {
  if (tokens.count == 0) return;
  std::int64_t lo = 0, hi = 0;
  visit_code_type(dtype_code_, [&](auto dst_tag) {
    using Dst = decltype(dst_tag);
    visit_int_type(tokens.kind, tokens.itemsize, [&](auto src_tag) {
      using Src = decltype(src_tag);
      const Src* in = static_cast<const Src*>(tokens.data);
      const auto [mn, mx] = std::minmax_element(in, in + tokens.count);
      // Values outside Dst are refused below, before anything is recorded.
      lo = static_cast<std::int64_t>(*mn);
      hi = fits<Dst>(*mx) ? static_cast<std::int64_t>(*mx) : 0;
      const std::size_t bytes = tokens.count * sizeof(Dst);
      if constexpr (std::is_same_v<Src, Dst>) {
        bin_.write(in, bytes);
      } else if (bytes <= bin_.capacity()) {
        Dst* out = reinterpret_cast<Dst*>(bin_.reserve(bytes));
        if (!convert_checked(in, tokens.count, out)) check_range<Dst>(in, tokens.count, "token id");  // throws
        bin_.commit(bytes);
      } else {
        check_range<Dst>(in, tokens.count, "token id");
        const std::size_t chunk = bin_.capacity() / sizeof(Dst);
        for (std::size_t start = 0; start < tokens.count; start += chunk) {
          const std::size_t m = std::min(chunk, tokens.count - start);
          Dst* out = reinterpret_cast<Dst*>(bin_.reserve(m * sizeof(Dst)));
          convert_checked(in + start, m, out);
          bin_.commit(m * sizeof(Dst));
        }
      }
    });
  });
  note_token_range(lo, hi);
  bin_bytes_ += tokens.count * itemsize_;
}

void IndexedDatasetBuilder::add_item(const IntSpan& tokens) {
  check_open();
  if (tokens.count > static_cast<std::uint64_t>(kMaxLength)) {
    throw std::invalid_argument("sequence of " + std::to_string(tokens.count) +
                                " tokens is longer than the format allows (int32 lengths)");
  }
  try {
    write_tokens(tokens);
    append_length(tokens.count);
  } catch (const IoError&) {
    state_ = State::kBroken;
    throw;
  }
}

void IndexedDatasetBuilder::add_document(const IntSpan& tokens, const IntSpan& lengths) {
  check_open();
  std::uint64_t total = 0;
  if (lengths.count > 0) {
    visit_int_type(lengths.kind, lengths.itemsize, [&](auto tag) {
      using Src = decltype(tag);
      const Src* in = static_cast<const Src*>(lengths.data);
      for (std::size_t i = 0; i < lengths.count; ++i) {
        if (is_negative(in[i]) || !fits<std::int32_t>(in[i])) {
          throw std::invalid_argument("sequence length " + to_text(in[i]) + " at position " + std::to_string(i) +
                                      (is_negative(in[i]) ? " is negative" : " does not fit in int32"));
        }
        total += static_cast<std::uint64_t>(in[i]);
      }
    });
  }
  if (total != tokens.count) {
    throw std::invalid_argument("the sequence lengths sum to " + std::to_string(total) + " but the document has " +
                                std::to_string(tokens.count) + " tokens");
  }
  try {
    write_tokens(tokens);
    if (lengths.count > 0) {
      visit_int_type(lengths.kind, lengths.itemsize, [&](auto tag) {
        using Src = decltype(tag);
        const Src* in = static_cast<const Src*>(lengths.data);
        if constexpr (std::is_same_v<Src, std::int32_t>) {
          lengths_.write(in, lengths.count * sizeof(std::int32_t));
        } else {
          std::int32_t block[256];
          for (std::size_t start = 0; start < lengths.count; start += 256) {
            const std::size_t m = std::min<std::size_t>(256, lengths.count - start);
            for (std::size_t i = 0; i < m; ++i) block[i] = static_cast<std::int32_t>(in[start + i]);
            lengths_.write(block, m * sizeof(std::int32_t));
          }
        }
      });
    }
    sequences_ += lengths.count;
    append_document_index(sequences_);
  } catch (const IoError&) {
    state_ = State::kBroken;
    throw;
  }
}

void IndexedDatasetBuilder::end_document() {
  check_open();
  try {
    append_document_index(sequences_);
  } catch (const IoError&) {
    state_ = State::kBroken;
    throw;
  }
}

namespace {

// The header of an .idx file, checked against its size.
struct IndexHeader {
  int dtype_code;
  std::uint64_t sequences;
  std::uint64_t document_indices;
};

IndexHeader read_index_header(const File& idx) {
  const std::string& path = idx.path();
  const std::uint64_t size = idx.size();
  if (size < kHeaderBytes) {
    throw FormatError(path + ": " + std::to_string(size) + " bytes is too short for the " +
                      std::to_string(kHeaderBytes) + "-byte header");
  }
  unsigned char h[kHeaderBytes];
  idx.pread_exact(h, kHeaderBytes, 0);
  if (std::memcmp(h, kMagic, sizeof kMagic) != 0) throw FormatError(path + ": bad magic (not an MMIDIDX index)");
  std::uint64_t version, sequences, documents;
  std::memcpy(&version, h + 9, 8);
  std::memcpy(&sequences, h + 18, 8);
  std::memcpy(&documents, h + 26, 8);
  if (version != kVersion) throw FormatError(path + ": unsupported version " + std::to_string(version) + " (expected 1)");
  IndexHeader out{h[17], sequences, documents};
  if (dtype_code_size(out.dtype_code) == 0) throw FormatError(path + ": unknown dtype code " + std::to_string(out.dtype_code));
  const std::uint64_t limit = std::uint64_t(1) << 58;  // keeps the expected size below 2^63
  if (sequences > limit || documents > limit || kHeaderBytes + sequences * 12 + documents * 8 != size) {
    throw FormatError(path + ": size " + std::to_string(size) + " bytes does not match its header (" +
                      std::to_string(sequences) + " sequences, " + std::to_string(documents) + " document indices)");
  }
  if (documents == 0) throw FormatError(path + ": the document index is empty (it must start with 0)");
  return out;
}

}  // namespace

void IndexedDatasetBuilder::add_index(const std::string& prefix) {
  check_open();
  const std::string idx_path = prefix + ".idx";
  const std::string bin_path = prefix + ".bin";
  File idx = File::open_read(idx_path);
  File bin = File::open_read(bin_path);
  const IndexHeader header = read_index_header(idx);
  if (header.dtype_code != dtype_code_) {
    throw FormatError(idx_path + ": dtype " + dtype_code_name(header.dtype_code) + " does not match the builder's dtype " +
                      dtype_code_name(dtype_code_));
  }
  const std::uint64_t n = header.sequences;
  const std::uint64_t d = header.document_indices;
  const std::uint64_t lengths_at = kHeaderBytes;
  const std::uint64_t pointers_at = lengths_at + 4 * n;
  const std::uint64_t documents_at = pointers_at + 8 * n;

  // Pass 1: validate everything before changing the builder.
  std::vector<std::int32_t> lens(kChunkItems);
  std::vector<std::int64_t> words(kChunkItems);
  std::uint64_t expected_pointer = 0;
  for (std::uint64_t start = 0; start < n; start += kChunkItems) {
    const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, n - start));
    idx.pread_exact(lens.data(), m * 4, lengths_at + 4 * start);
    idx.pread_exact(words.data(), m * 8, pointers_at + 8 * start);
    for (std::size_t i = 0; i < m; ++i) {
      if (lens[i] < 0) {
        throw FormatError(idx_path + ": sequence " + std::to_string(start + i) + " has negative length " +
                          std::to_string(lens[i]));
      }
      if (static_cast<std::uint64_t>(words[i]) != expected_pointer) {
        throw FormatError(idx_path + ": sequence " + std::to_string(start + i) + " points at byte " +
                          std::to_string(words[i]) + " but the lengths before it end at byte " +
                          std::to_string(expected_pointer));
      }
      expected_pointer += static_cast<std::uint64_t>(lens[i]) * itemsize_;
    }
  }
  std::int64_t previous = 0;
  for (std::uint64_t start = 0; start < d; start += kChunkItems) {
    const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, d - start));
    idx.pread_exact(words.data(), m * 8, documents_at + 8 * start);
    for (std::size_t i = 0; i < m; ++i) {
      const std::uint64_t k = start + i;
      if (k == 0 && words[i] != 0) {
        throw FormatError(idx_path + ": the document index starts at " + std::to_string(words[i]) + ", not 0");
      }
      if (words[i] < previous || static_cast<std::uint64_t>(words[i]) > n) {
        throw FormatError(idx_path + ": document index entry " + std::to_string(k) + " is " + std::to_string(words[i]) +
                          " (previous " + std::to_string(previous) + ", " + std::to_string(n) + " sequences)");
      }
      previous = words[i];
    }
  }
  if (static_cast<std::uint64_t>(previous) != n) {
    throw FormatError(idx_path + ": the document index ends at " + std::to_string(previous) + " but there are " +
                      std::to_string(n) + " sequences");
  }
  const std::uint64_t bin_size = bin.size();
  if (bin_size != expected_pointer) {
    throw FormatError(bin_path + ": size " + std::to_string(bin_size) + " bytes does not match its index " + idx_path +
                      " (" + std::to_string(expected_pointer) + " bytes of tokens)");
  }

  // Pass 2: append lengths, shifted document indices and the tokens.
  try {
    for (std::uint64_t start = 0; start < n; start += kChunkItems) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, n - start));
      idx.pread_exact(lens.data(), m * 4, lengths_at + 4 * start);
      lengths_.write(lens.data(), m * 4);
    }
    const std::int64_t offset = static_cast<std::int64_t>(sequences_);
    for (std::uint64_t start = 1; start < d; start += kChunkItems) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, d - start));
      idx.pread_exact(words.data(), m * 8, documents_at + 8 * start);
      for (std::size_t i = 0; i < m; ++i) words[i] += offset;
      documents_.write(words.data(), m * 8);
    }
    sequences_ += n;
    document_indices_ += d - 1;
    if (d > 1) last_document_end_ = sequences_;
    std::vector<char> block(std::min<std::uint64_t>(bin_size, kDataBuffer));
    for (std::uint64_t at = 0; at < bin_size; at += block.size()) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(block.size(), bin_size - at));
      bin.pread_exact(block.data(), m, at);
      bin_.write(block.data(), m);
      visit_code_type(dtype_code_, [&](auto tag) {
        using T = decltype(tag);
        std::vector<T> items(m / sizeof(T));  // aligned copy for the scan
        std::memcpy(items.data(), block.data(), items.size() * sizeof(T));
        if (items.empty()) return;
        const auto [mn, mx] = std::minmax_element(items.begin(), items.end());
        note_token_range(static_cast<std::int64_t>(*mn), static_cast<std::int64_t>(*mx));
      });
      bin_bytes_ += m;
    }
  } catch (...) {
    state_ = State::kBroken;
    throw;
  }
}

void IndexedDatasetBuilder::finalize(const std::string& idx_path) {
  check_open();
  if (last_document_end_ != sequences_) {
    // megatron-core would write an index its own reader rejects.
    throw std::runtime_error(bin_path_ + ": " + std::to_string(sequences_ - last_document_end_) +
                             " sequences were added after the last document ended; call end_document() "
                             "before finalize()");
  }
  // A bad idx path fails here, before anything changes.
  File idx = File::create_temporary(idx_path, kSideBuffer, &idx_tmp_path_);
  idx.enable_checksum();
  // Duplicates keep the temporaries locked from their close to their rename.
  struct Held {
    int fd = -1;
    ~Held() {
      if (fd >= 0) ::close(fd);
    }
  } bin_lock, idx_lock;
  try {
    if (durable_) bin_.sync();
    bin_lock.fd = bin_.duplicate_descriptor();
    idx_lock.fd = idx.duplicate_descriptor();
    bin_.flush();
    bin_crc_ = bin_.crc();
    bin_.close();
    lengths_.flush();
    documents_.flush();

    unsigned char h[kHeaderBytes];
    std::memcpy(h, kMagic, sizeof kMagic);
    std::memcpy(h + 9, &kVersion, 8);
    h[17] = static_cast<unsigned char>(dtype_code_);
    std::memcpy(h + 18, &sequences_, 8);
    std::memcpy(h + 26, &document_indices_, 8);
    idx.write(h, sizeof h);

    std::vector<std::int32_t> lens(kChunkItems);
    std::vector<std::int64_t> words(kChunkItems);
    for (std::uint64_t start = 0; start < sequences_; start += kChunkItems) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, sequences_ - start));
      lengths_.pread_exact(lens.data(), m * 4, 4 * start);
      idx.write(lens.data(), m * 4);
    }
    std::int64_t pointer = 0;
    const std::int64_t itemsize = static_cast<std::int64_t>(itemsize_);
    for (std::uint64_t start = 0; start < sequences_; start += kChunkItems) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, sequences_ - start));
      lengths_.pread_exact(lens.data(), m * 4, 4 * start);
      for (std::size_t i = 0; i < m; ++i) {
        words[i] = pointer;
        pointer += static_cast<std::int64_t>(lens[i]) * itemsize;
      }
      idx.write(words.data(), m * 8);
    }
    if (static_cast<std::uint64_t>(pointer) != bin_bytes_) {
      throw std::logic_error(bin_path_ + ": internal error: lengths cover " + std::to_string(pointer) +
                             " bytes but " + std::to_string(bin_bytes_) + " were written");
    }
    for (std::uint64_t start = 0; start < document_indices_; start += kChunkItems) {
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkItems, document_indices_ - start));
      documents_.pread_exact(words.data(), m * 8, 8 * start);
      idx.write(words.data(), m * 8);
    }
    if (durable_) idx.sync();
    idx.flush();
    idx_crc_ = idx.crc();
    idx.close();

    if (::rename(bin_tmp_path_.c_str(), bin_path_.c_str()) != 0) throw_io(errno, "renaming the finished data file into place", bin_path_);
    bin_tmp_path_.clear();
    if (::rename(idx_tmp_path_.c_str(), idx_path.c_str()) != 0) throw_io(errno, "renaming the finished index file into place", idx_path);
    idx_tmp_path_.clear();
    if (durable_) {
      sync_directory(bin_path_);
      sync_directory(idx_path);
    }
    lengths_ = File();
    documents_ = File();
    state_ = State::kFinalized;
  } catch (...) {
    idx = File();
    state_ = State::kBroken;
    remove_temporaries();
    throw;
  }
}

void IndexedDatasetBuilder::discard() {
  if (state_ == State::kFinalized) return;
  remove_temporaries();
  state_ = State::kDiscarded;
}

// ----------------------------------------------------------------------------- bindings

namespace py = pybind11;

namespace {

// A C-contiguous one-dimensional integer array over obj (no copy when obj already is one).
py::array int_array(py::handle obj, const char* what) {
  py::array arr = py::array::ensure(obj, py::array::c_style);
  if (!arr) throw py::type_error(std::string(what) + " must be an array or a sequence of integers");
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(what) + " must be one-dimensional, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  if (arr.size() == 0) return arr;
  py::dtype dt = arr.dtype();
  if (dt.kind() != 'i' && dt.kind() != 'u') {
    throw py::type_error(std::string(what) + " must be integers, got dtype " + py::str(dt).cast<std::string>());
  }
  if (dt.byteorder() == '>') {
    arr = py::array::ensure(arr.attr("astype")(dt.attr("newbyteorder")("=")), py::array::c_style);
  }
  return arr;
}

IntSpan span_of(const py::array& arr) {
  IntSpan s;
  s.count = static_cast<std::size_t>(arr.size());
  if (s.count == 0) return s;
  s.data = arr.data();
  s.kind = arr.dtype().kind();
  s.itemsize = static_cast<std::size_t>(arr.itemsize());
  return s;
}

// The integers of obj. A one-dimensional, C-contiguous, native-order integer ndarray is read
// in place (obj is kept alive by the caller); anything else is converted into `keep`.
IntSpan int_span(py::handle obj, const char* what, py::object& keep) {
  if (py::isinstance<py::array>(obj)) {
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() == 1 && (arr.flags() & py::array::c_style)) {
      py::dtype dt = arr.dtype();
      const char kind = dt.kind();
      if ((kind == 'i' || kind == 'u') && dt.byteorder() != '>') return span_of(arr);
    }
  }
  py::array arr = int_array(obj, what);
  keep = arr;
  return span_of(arr);
}

// Sequence lengths: a list or tuple of Python ints is read directly (the common
// `[len(tokens)]`), anything else goes through int_span.
template <std::size_t N>
IntSpan length_span(py::handle obj, std::int64_t (&inline_storage)[N], std::vector<std::int64_t>& storage,
                    py::object& keep) {
  PyObject* seq = obj.ptr();
  if (PyList_Check(seq) || PyTuple_Check(seq)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    std::int64_t* out = inline_storage;
    if (static_cast<std::size_t>(n) > N) {
      storage.resize(static_cast<std::size_t>(n));
      out = storage.data();
    }
    bool plain = true;
    for (Py_ssize_t i = 0; i < n && plain; ++i) {
      int overflow = 0;
      if (!PyLong_CheckExact(items[i])) {
        plain = false;
        break;
      }
      out[i] = PyLong_AsLongLongAndOverflow(items[i], &overflow);
      plain = overflow == 0;
    }
    if (plain) return IntSpan{out, static_cast<std::size_t>(n), 'i', sizeof(std::int64_t)};
  }
  return int_span(obj, "lengths", keep);
}

// The Python object: the builder, and a flag that turns away a second Python thread while
// one is inside a call that released the GIL. The flag is only touched with the GIL held.
struct PyBuilder {
  PyBuilder(const std::string& bin_path, int dtype_code, bool durable) : core(bin_path, dtype_code, durable) {}
  IndexedDatasetBuilder core;
  bool busy = false;
};

// Runs f(core): with the GIL held when `quick` (the call cannot wait on the disk), else without.
template <class F>
void run(PyBuilder& b, bool quick, F&& f) {
  if (b.busy) throw std::runtime_error(b.core.bin_path() + ": the builder is in use by another thread");
  if (quick) return f(b.core);
  b.busy = true;
  struct Clear {
    bool& flag;
    ~Clear() { flag = false; }
  } clear{b.busy};
  py::gil_scoped_release nogil;  // released before `clear` runs, so the flag is cleared with the GIL
  f(b.core);
}

void set_os_error(const IoError& e) {
  PyObject* args = Py_BuildValue("(isO&)", e.code(), e.what(), PyUnicode_DecodeFSDefault, e.path().c_str());
  if (args == nullptr) return;
  PyObject* exc = PyObject_Call(PyExc_OSError, args, nullptr);
  Py_DECREF(args);
  if (exc == nullptr) return;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
  Py_DECREF(exc);
}

// The per-document calls, shared by the methods and the fast entry points below.
void do_add_item(PyBuilder& b, py::handle tokens) {
  py::object keep;
  const IntSpan s = int_span(tokens, "tokens", keep);
  run(b, b.core.fits_in_buffers(s.count, 1), [&](IndexedDatasetBuilder& core) { core.add_item(s); });
}

void do_add_document(PyBuilder& b, py::handle tokens, py::handle lengths) {
  py::object keep_tokens, keep_lengths;
  std::int64_t inline_storage[16];
  std::vector<std::int64_t> storage;
  const IntSpan s = int_span(tokens, "tokens", keep_tokens);
  const IntSpan l = length_span(lengths, inline_storage, storage, keep_lengths);
  run(b, b.core.fits_in_buffers(s.count, l.count), [&](IndexedDatasetBuilder& core) { core.add_document(s, l); });
}

void do_end_document(PyBuilder& b) {
  run(b, b.core.fits_in_buffers(0, 0), [](IndexedDatasetBuilder& core) { core.end_document(); });
}

// Fast entry points: positional-only METH_FASTCALL builtins bound to one builder. They skip
// pybind11's generic dispatch, which costs about as much as adding a short document.
constexpr const char* kBoundName = "megatron_ext.IndexedDatasetBuilder.bound";

struct Bound {
  PyObject* owner;  // strong reference to the Python builder object
  PyBuilder* builder;
};

// Sets the Python error for the exception being handled (the same mapping as the methods).
void set_python_error() noexcept {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const IoError& e) {
    set_os_error(e);
  } catch (const FormatError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception");
  }
}

template <class F>
PyObject* call_bound(PyObject* capsule, Py_ssize_t nargs, Py_ssize_t expected, const char* signature, F&& f) {
  try {
    if (nargs != expected) {
      throw py::type_error(std::string(signature) + " takes " + std::to_string(expected) +
                           " positional arguments, got " + std::to_string(nargs));
    }
    f(*static_cast<Bound*>(PyCapsule_GetPointer(capsule, kBoundName))->builder);
  } catch (...) {
    set_python_error();
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* fast_add_item(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  return call_bound(capsule, nargs, 1, "add_item(tokens)", [&](PyBuilder& b) { do_add_item(b, args[0]); });
}

PyObject* fast_add_document(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  return call_bound(capsule, nargs, 2, "add_document(tokens, lengths)",
                    [&](PyBuilder& b) { do_add_document(b, args[0], args[1]); });
}

PyObject* fast_end_document(PyObject* capsule, PyObject* const* /*args*/, Py_ssize_t nargs) {
  return call_bound(capsule, nargs, 0, "end_document()", [](PyBuilder& b) { do_end_document(b); });
}

// CPython keeps a pointer to each definition for the life of the functions made from it.
PyMethodDef kFastCalls[] = {
    {"add_item", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fast_add_item)), METH_FASTCALL,
     "add_item(tokens): append one sequence."},
    {"add_document", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fast_add_document)),
     METH_FASTCALL, "add_document(tokens, lengths): append one document of len(lengths) sequences."},
    {"end_document", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fast_end_document)),
     METH_FASTCALL, "end_document(): close the current document."},
};

py::tuple fast_calls(py::object owner) {
  auto* bound = new Bound{owner.inc_ref().ptr(), &owner.cast<PyBuilder&>()};
  PyObject* capsule = PyCapsule_New(bound, kBoundName, [](PyObject* c) {
    auto* b = static_cast<Bound*>(PyCapsule_GetPointer(c, kBoundName));
    Py_DECREF(b->owner);
    delete b;
  });
  if (capsule == nullptr) {
    Py_DECREF(bound->owner);
    delete bound;
    throw py::error_already_set();
  }
  py::object self = py::reinterpret_steal<py::object>(capsule);
  py::tuple out(3);
  for (std::size_t i = 0; i < 3; ++i) {
    PyObject* f = PyCFunction_New(&kFastCalls[i], self.ptr());
    if (f == nullptr) throw py::error_already_set();
    out[i] = py::reinterpret_steal<py::object>(f);
  }
  return out;
}

}  // namespace

void register_indexed_dataset_builder(py::module_& m) {
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      set_os_error(e);
    } catch (const FormatError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  py::class_<PyBuilder>(m, "IndexedDatasetBuilder",
                        "Streaming writer of Megatron .bin/.idx datasets (byte-identical to "
                        "megatron-core's IndexedDatasetBuilder). One thread at a time.")
      .def(py::init<const std::string&, int, bool>(), py::arg("bin_path"), py::arg("dtype_code"),
           py::arg("durable") = false)
      .def("add_item", &do_add_item, py::arg("tokens"), "Append one sequence.")
      .def("add_document", &do_add_document, py::arg("tokens"), py::arg("lengths"),
           "Append one document made of sequences of the given lengths.")
      .def("end_document", &do_end_document, "Close the current document (after add_item calls).")
      .def("fast_calls", &fast_calls,
           "(add_item, add_document, end_document) as positional-only functions bound to this builder, "
           "for per-document loops.")
      .def(
          "add_index",
          [](PyBuilder& b, const std::string& prefix) {
            run(b, false, [&](IndexedDatasetBuilder& core) { core.add_index(prefix); });
          },
          py::arg("path_prefix"), "Append a whole dataset of the same dtype.")
      .def(
          "finalize",
          [](PyBuilder& b, const std::string& idx_path) {
            run(b, false, [&](IndexedDatasetBuilder& core) { core.finalize(idx_path); });
          },
          py::arg("idx_path"), "Write the index and move both files into place (.idx last).")
      .def(
          "discard", [](PyBuilder& b) { run(b, true, [](IndexedDatasetBuilder& core) { core.discard(); }); },
          "Remove the temporaries; the builder is unusable afterwards.")
      .def_property_readonly("dtype_code", [](const PyBuilder& b) { return b.core.dtype_code(); })
      .def_property_readonly("bin_path", [](const PyBuilder& b) { return b.core.bin_path(); })
      .def_property_readonly("sequence_count", [](const PyBuilder& b) { return b.core.sequence_count(); })
      .def_property_readonly("document_count", [](const PyBuilder& b) { return b.core.document_count(); })
      .def_property_readonly("token_count", [](const PyBuilder& b) { return b.core.token_count(); })
      .def_property_readonly("finalized", [](const PyBuilder& b) { return b.core.finalized(); })
      .def_property_readonly(
          "token_range",
          [](const PyBuilder& b) -> py::object {
            if (b.core.token_count() == 0) return py::none();
            return py::make_tuple(b.core.min_token_id(), b.core.max_token_id());
          },
          "(smallest, largest) token id written, or None when there are no tokens.")
      .def_property_readonly(
          "checksums",
          [](const PyBuilder& b) -> py::object {
            if (!b.core.finalized()) return py::none();
            return py::make_tuple(b.core.bin_crc32(), b.core.idx_crc32());
          },
          "(CRC-32 of the .bin, CRC-32 of the .idx) as zlib.crc32 computes them; None before finalize.");
}

}  // namespace megatron_ext
