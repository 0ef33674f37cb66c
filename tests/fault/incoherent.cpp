// A plugin whose connections do not see each other's writes until they are
// flushed, as a network block device with a write cache per connection
// (it says so: no multi-conn).  For test_incoherent_plugin.py.  Each
// connection's writes sit in its own copy until its flush publishes them.
// flush-delay=MS: a flush publishes the writes made before it began, then
// takes that long to return.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {
constexpr uint64_t kSize = 4 << 20;
int flush_delay_ms = 0;
std::mutex mu;
std::vector<uint8_t> published(kSize);  // what every connection sees

struct Write {
  uint64_t offset;
  std::vector<uint8_t> data;
};
struct Connection {
  std::vector<Write> unflushed;  // this connection's writes, oldest first
};

void* Open(int) {
  return new (std::nothrow) Connection;
}
void Close(void* h) {
  delete static_cast<Connection*>(h);
}
int64_t GetSize(void*) {
  return kSize;
}
int No(void*) {
  return 0;
}
int Yes(void*) {
  return 1;
}
int FuaEmulate(void*) {
  return NBDKIT_FUA_EMULATE;
}

// Copies what of `w` lies in [offset, offset + count) to out.
void Overlay(const Write& w, uint8_t* out, uint32_t count, uint64_t offset) {
  const uint64_t from = std::max(offset, w.offset);
  const uint64_t to = std::min(offset + count, w.offset + w.data.size());
  if (from < to) std::memcpy(out + (from - offset), w.data.data() + (from - w.offset), to - from);
}

int Pread(void* h, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  auto* c = static_cast<Connection*>(h);
  std::lock_guard<std::mutex> l(mu);
  auto* out = static_cast<uint8_t*>(buf);
  std::memcpy(out, published.data() + offset, count);
  for (const Write& w : c->unflushed) Overlay(w, out, count, offset);
  return 0;
}

int Pwrite(void* h, const void* buf, uint32_t count, uint64_t offset, uint32_t) {
  auto* c = static_cast<Connection*>(h);
  const auto* in = static_cast<const uint8_t*>(buf);
  std::lock_guard<std::mutex> l(mu);
  c->unflushed.push_back({offset, std::vector<uint8_t>(in, in + count)});
  return 0;
}

int Flush(void* h, uint32_t) {
  auto* c = static_cast<Connection*>(h);
  {
    std::lock_guard<std::mutex> l(mu);
    for (const Write& w : c->unflushed)
      std::memcpy(published.data() + w.offset, w.data.data(), w.data.size());
    c->unflushed.clear();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(flush_delay_ms));
  return 0;
}

int Config(const char* key, const char* value) {
  if (std::string(key) != "flush-delay") {
    nbdkit_error("unknown parameter '%s'", key);
    return -1;
  }
  try {
    flush_delay_ms = std::stoi(value);
  } catch (const std::exception&) {
    nbdkit_error("flush-delay: not a number of milliseconds: %s", value);
    return -1;
  }
  return 0;
}

nbdkit_plugin Make() {
  nbdkit_plugin p{};
  p.name = "incoherent";
  p.config = Config;
  p.open = Open;
  p.close = Close;
  p.get_size = GetSize;
  p.can_multi_conn = No;
  p.can_flush = Yes;
  p.can_fua = FuaEmulate;
  p.pread = Pread;
  p.pwrite = Pwrite;
  p.flush = Flush;
  return p;
}
nbdkit_plugin plugin = Make();
}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
