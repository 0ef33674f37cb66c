// libFuzzer target: operation sequences against the engine, checked
// against a shadow model (reads, and the plugin after every flush).
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../unit/fake_sink.h"
#include "writeback.h"

namespace {

constexpr size_t kDisk = 8192;

struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t Byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  uint16_t Word() { return static_cast<uint16_t>(Byte() | (Byte() << 8)); }
};

[[noreturn]] void Die(const char* what, size_t op) {
  std::fprintf(stderr, "engine_fuzz: %s at op %zu\n", what, op);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sdccache;
  Input in{data, size};
  FakeSink sink(kDisk);
  WriteBackOptions o;
  o.threshold = 1 + in.Byte() % 16;
  o.queue_max_bytes = 4096 + in.Word() % 8192;
  o.max_age = std::chrono::milliseconds(0);
  o.max_plugin_write = 1 + in.Word() % 4096;
  o.write_threads = 1 + o.threshold % 4;  // parallel write-back, cheaply
  o.retry_min = std::chrono::milliseconds(1);
  o.retry_max = std::chrono::milliseconds(1);
  WriteBack wb(&sink, o);
  std::vector<uint8_t> model(kDisk, 0), buf(kDisk), payload(kDisk);
  for (size_t op = 0; in.n > 0 && op < 512; ++op) {
    const uint8_t code = in.Byte();
    const uint64_t off = in.Word() % kDisk;
    const uint64_t len = 1 + in.Word() % (kDisk - off);
    switch (code % 7) {
      case 0:
      case 1: {
        const uint8_t v = in.Byte();
        for (uint64_t i = 0; i < len; ++i) payload[i] = static_cast<uint8_t>(v + i);
        const bool fua = code & 0x80;
        int err = wb.Write(payload.data(), static_cast<uint32_t>(len), off, fua);
        // What does not fit in the bound with its chunk header is written
        // through, and may fail; a buffered write cannot.
        const bool through = WriteBack::WriteCharge(len) > o.queue_max_bytes;
        if (err && err != EIO) Die("write failed, not by injection", op);
        if (err && !fua && !through) Die("buffered write failed", op);
        std::copy(payload.begin(), payload.begin() + static_cast<long>(len),
                  model.begin() + static_cast<long>(off));
        if (err && through) {
          // A failed write-through leaves its range undefined (as NBD says
          // of any failed write): take what the engine now returns.
          Overlay ov = wb.Lookup(off, len);
          sink.Read(model.data() + off, len, off);
          ov.ApplyTo(model.data() + off);
        }
        break;
      }
      case 2: {
        Overlay ov = wb.Lookup(off, len);
        sink.Read(buf.data(), len, off);
        ov.ApplyTo(buf.data());
        if (!std::equal(buf.begin(), buf.begin() + static_cast<long>(len),
                        model.begin() + static_cast<long>(off)))
          Die("read differs from the model", op);
        break;
      }
      case 3:
      case 4: {
        int err = code % 7 == 3 ? wb.Zero(static_cast<uint32_t>(len), off, code & 0x80, false)
                                : wb.Trim(static_cast<uint32_t>(len), off, false);
        if (err) Die("zero/trim failed", op);
        std::fill(model.begin() + static_cast<long>(off),
                  model.begin() + static_cast<long>(off + len), 0);
        break;
      }
      case 5: {
        int err = wb.Flush(Trigger::kClient);
        if (err == 0 && sink.Disk() != model) Die("plugin differs after flush", op);
        if (err && err != EIO) Die("flush failed, not by injection", op);
        break;
      }
      case 6:
        sink.FailNext(code >> 4, EIO);
        break;
    }
  }
  sink.FailNext(0, 0);
  if (wb.Flush(Trigger::kClient) != 0) Die("final flush failed", 0);
  if (sink.Disk() != model) Die("plugin differs at the end", 0);
  return 0;
}
