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
  // Also: flush_before_release, bypass writes, pause/resume, threshold
  // changes, FUA zero/trim, a range refused, lost writes, and block status
  // over the overlay.
  const uint8_t flags = in.Byte();
  o.flush_before_release = flags & 1;
  o.bypass_min = (flags & 2) ? 1024 + 16u * (flags >> 2) : 0;
  WriteBack wb(&sink, o);
  static const bool trace = std::getenv("FUZZ_TRACE") != nullptr;  // one line per op
  if (trace)
    std::fprintf(stderr, "threshold %u qmax %llu mpw %u threads %u fbr %d bypass %u\n", o.threshold,
                 (unsigned long long)o.queue_max_bytes, o.max_plugin_write, o.write_threads,
                 (int)o.flush_before_release, o.bypass_min);
  std::vector<uint8_t> model(kDisk, 0), buf(kDisk), payload(kDisk);
  for (size_t op = 0; in.n > 0 && op < 512; ++op) {
    const uint8_t code = in.Byte();
    const uint64_t off = in.Word() % kDisk;
    const uint64_t len = 1 + in.Word() % (kDisk - off);
    if (trace)
      std::fprintf(stderr, "op %zu: code %u (%u) off %llu len %llu  | %s\n", op, code, code % 12,
                   (unsigned long long)off, (unsigned long long)len, wb.DebugString().c_str());
    // A range refused (FailAt) lasts only until the next request that may
    // wait for room: refused for good, it would fill the queue, and a
    // writer past the bound waits (by design) until the plugin takes it.
    if (code % 12 != 2 && code % 12 != 5 && code % 12 != 8 && code % 12 != 10) sink.FailAt(0, 0);
    switch (code % 12) {
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
        const bool fua = code & 0x40;
        int err = code % 12 == 3 ? wb.Zero(static_cast<uint32_t>(len), off, code & 0x80, fua)
                                 : wb.Trim(static_cast<uint32_t>(len), off, fua);
        if (err && !(fua && err == EIO)) Die("zero/trim failed", op);
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
      case 7:
        switch ((code >> 4) % 4) {
          case 0:
            wb.Pause();
            break;
          case 1:
            wb.Resume();
            break;
          default:
            wb.SetThreshold(1 + (code >> 5));
            break;
        }
        break;
      case 8:
        sink.FailAt(off, (code & 0x80) ? EIO : 0);
        break;
      case 9:
        sink.Lose();
        break;
      case 10: {  // block status: every byte called zero must be zero
        Overlay ov = wb.Lookup(off, len);
        std::vector<Extent> plugin{{off, len, 0}};
        uint64_t at = off;
        for (const Extent& e : ov.MergeExtents(plugin)) {
          if (e.offset != at) Die("extents not contiguous", op);
          at += e.length;
          if (e.type & kExtentZero)
            for (uint64_t i = e.offset; i < e.offset + e.length; ++i)
              if (model[i] != 0) Die("extent says zero over data", op);
        }
        if (at != off + len) Die("extents do not cover the request", op);
        break;
      }
      case 11: {  // the same write again, unaligned by one byte
        if (len < 2) break;
        const uint8_t v = in.Byte();
        for (uint64_t i = 0; i < len - 1; ++i) payload[i] = static_cast<uint8_t>(v ^ i);
        if (wb.Write(payload.data(), static_cast<uint32_t>(len - 1), off + 1, false) != 0 &&
            WriteBack::WriteCharge(len - 1) <= o.queue_max_bytes)
          Die("buffered write failed", op);
        std::copy(payload.begin(), payload.begin() + static_cast<long>(len - 1),
                  model.begin() + static_cast<long>(off + 1));
        if (WriteBack::WriteCharge(len - 1) > o.queue_max_bytes) {
          Overlay ov = wb.Lookup(off + 1, len - 1);
          sink.Read(model.data() + off + 1, len - 1, off + 1);
          ov.ApplyTo(model.data() + off + 1);
        }
        break;
      }
    }
  }
  sink.FailNext(0, 0);
  sink.FailAt(0, 0);
  wb.Resume();
  // A loss (sink.Lose) that no client request has failed for yet fails the
  // next client flush once, with multi-conn (WriteBack::TellLoss).
  int err = wb.Flush(Trigger::kClient);
  if (err == EIO && !o.flush_before_release) err = wb.Flush(Trigger::kClient);
  if (err != 0) Die("final flush failed", 0);
  if (sink.Disk() != model) Die("plugin differs at the end", 0);
  return 0;
}
