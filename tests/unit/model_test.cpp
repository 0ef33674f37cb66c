// Randomized model check of the engine: 1,000,000 operations against a
// shadow buffer, with plugin failures switched on and off.
#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <random>
#include <vector>

#include "fake_sink.h"
#include "writeback.h"

namespace sdccache {
namespace {

constexpr size_t kDisk = 64 * 1024;

struct ModelRun {
  uint64_t ops = 0, reads = 0, flush_errors = 0, bypass_writes = 0;
};

// Every read must equal the model; after a successful flush the plugin
// itself must equal the model.
ModelRun RunModel(uint64_t seed, uint64_t ops) {
  std::mt19937_64 rng(seed);
  FakeSink sink(kDisk);
  WriteBackOptions o;
  o.threshold = 1 + static_cast<uint32_t>(rng() % 64);
  o.queue_max_bytes = 16 * 1024 + rng() % (64 * 1024);
  o.max_age = std::chrono::milliseconds(0);
  o.max_plugin_write = 512 + static_cast<uint32_t>(rng() % 8192);
  o.write_threads = 1 + static_cast<unsigned>(rng() % 4);  // parallel write-back, cheaply
  o.retry_min = std::chrono::milliseconds(1);
  o.retry_max = std::chrono::milliseconds(2);
  // Writes this large go straight to the (CPU-bound) FakeSink when nothing
  // buffered overlaps them; in half the runs, none does.
  o.bypass_min = rng() % 2 ? 0 : 256 + static_cast<uint32_t>(rng() % 2048);
  WriteBack wb(&sink, o);
  std::vector<uint8_t> model(kDisk, 0), buf(kDisk), data(kDisk);
  ModelRun run;
  for (uint64_t i = 0; i < ops; ++i, ++run.ops) {
    const uint64_t off = rng() % kDisk;
    const uint64_t len = 1 + rng() % std::min<uint64_t>(kDisk - off, 3000);
    const unsigned op = static_cast<unsigned>(rng() % 100);
    if (op < 40) {
      const uint8_t v = static_cast<uint8_t>(rng());
      std::fill(data.begin(), data.begin() + static_cast<long>(len), v);
      data[0] = static_cast<uint8_t>(i);
      const bool fua = rng() % 50 == 0;
      int err = wb.Write(data.data(), static_cast<uint32_t>(len), off, fua);
      // Only a FUA write or a write-through (not fitting in the queue with
      // its header) may fail, with the injected errno.  A buffered write
      // stays buffered.
      const bool through = WriteBack::WriteCharge(len) > o.queue_max_bytes;
      if (err != 0 && !((fua || through) && err == EIO)) ADD_FAILURE() << "write failed: " << err;
      std::copy(data.begin(), data.begin() + static_cast<long>(len), model.begin() + static_cast<long>(off));
      if (err != 0 && through) {
        // A failed write-through leaves its range undefined, as NBD says of
        // any failed write: adopt what the engine now returns.
        Overlay ov = wb.Lookup(off, len);
        sink.Read(model.data() + off, len, off);
        ov.ApplyTo(model.data() + off);
      }
    } else if (op < 80) {
      Overlay ov = wb.Lookup(off, len);
      sink.Read(buf.data(), len, off);
      ov.ApplyTo(buf.data());
      ++run.reads;
      if (!std::equal(buf.begin(), buf.begin() + static_cast<long>(len), model.begin() + static_cast<long>(off))) {
        ADD_FAILURE() << "seed " << seed << " op " << i << ": read [" << off << ",+" << len
                      << ") differs from the model";
        return run;
      }
    } else if (op < 88) {
      EXPECT_EQ(wb.Zero(static_cast<uint32_t>(len), off, rng() % 2, false), 0);
      std::fill(model.begin() + static_cast<long>(off), model.begin() + static_cast<long>(off + len), 0);
    } else if (op < 93) {
      EXPECT_EQ(wb.Trim(static_cast<uint32_t>(len), off, false), 0);
      std::fill(model.begin() + static_cast<long>(off), model.begin() + static_cast<long>(off + len), 0);
    } else if (op < 97) {
      int err = wb.Flush(Trigger::kClient);
      if (err) {
        EXPECT_EQ(err, EIO) << "flush failed, not by injection";
        ++run.flush_errors;
      } else if (sink.Disk() != model) {
        // Writes made after the flush started may have landed too, but
        // this thread made none: the plugin must equal the model.
        ADD_FAILURE() << "seed " << seed << " op " << i << ": plugin differs after flush";
        return run;
      }
    } else {
      // The plugin fails for a few calls, then recovers by itself, so a
      // writer waiting for room is never stuck.
      if (rng() % 4 == 0) sink.FailNext(1 + rng() % 4, EIO);
    }
  }
  sink.FailNext(0, 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.Disk(), model) << "seed " << seed;
  run.bypass_writes = wb.counters().bypass_writes.load();
  return run;
}

TEST(ModelTest, MillionRandomOperationsMatchTheModel) {
  const auto start = std::chrono::steady_clock::now();
  const char* env = std::getenv("SDCCACHE_MODEL_OPS");
  const uint64_t total = env ? std::strtoull(env, nullptr, 10) : 1'000'000;
  uint64_t done = 0, seed = 1, reads = 0, errors = 0, bypass = 0;
  while (done < total && !HasFailure()) {
    ModelRun r = RunModel(seed++, std::min<uint64_t>(50'000, total - done));
    done += r.ops;
    reads += r.reads;
    errors += r.flush_errors;
    bypass += r.bypass_writes;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("model: %llu ops (%llu reads checked, %llu flushes failed by injection, "
              "%llu bypass writes) in %.1f s\n",
              static_cast<unsigned long long>(done), static_cast<unsigned long long>(reads),
              static_cast<unsigned long long>(errors), static_cast<unsigned long long>(bypass),
              secs);
  EXPECT_EQ(done, total);
  EXPECT_GT(errors, 0u) << "failure injection never triggered";
  EXPECT_GT(bypass, 0u) << "no write went straight to the plugin";
}

}  // namespace
}  // namespace sdccache
