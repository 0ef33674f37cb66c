# A plugin that is not parallel (eval, thread_model serialize_*) is never
# called concurrently, although background batches run while clients read
# and send cache requests (NBD_CMD_CACHE, which the plugin does natively).
import os
import random
import threading
import time

import faultlib
import sdctest
from sdctest import Model, Server, check
from faultlib import check_same, eval_file_plugin, read_file, stats

SIZE = 1 << 20


def run(thread_model, connections, seed, ops=40):
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    marker = os.path.join(tmp, "OVERLAP")
    calls = os.path.join(tmp, "calls.log")
    ctl = os.path.join(tmp, "ctl.sock")
    plugin = eval_file_plugin(img, thread_model=thread_model,
                              lock_dir=os.path.join(tmp, "plugin.lock"), marker=marker,
                              call_log=calls, hold="0.005", cache=True)
    srv = Server(plugin, ["threshold=2", "max-age=50ms", "control=" + ctl], tmpdir=tmp)
    with srv:
        model = Model(SIZE)
        # Each connection owns one slice of the disk, so the model is exact
        # while the connections run side by side.
        slice_len = SIZE // connections
        errors = []
        counts = [0] * connections

        def client(i):
            try:
                rng = random.Random(seed * 10 + i)
                h = srv.connect()
                base = i * slice_len
                # A number of requests, not a time: the plugin's calls
                # (shell commands) slow down with the machine's load, and
                # the checks below need some of each kind to reach the
                # plugin (a cache request for buffered bytes does not).
                for _ in range(ops):
                    off = base + rng.randrange(0, slice_len - 8192)
                    n = rng.randint(1, 8192)
                    r = rng.random()
                    if r < 0.1:
                        h.cache(n, off)
                    elif r < 0.55:
                        data = rng.randbytes(n)
                        h.pwrite(data, off)
                        model.write(off, data)
                    else:
                        # Reads reach the plugin while batches are written.
                        got = h.pread(n, off)
                        if got != model.read(off, n):
                            raise AssertionError("read [%d,+%d) differs from model" % (off, n))
                    counts[i] += 1
                h.flush()
                h.shutdown()
            except Exception as e:
                errors.append("connection %d: %r" % (i, e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
        for t in threads:
            t.start()
        end = time.monotonic() + 28  # a hang guard, within meson's 60 s for both runs
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        check(not any(t.is_alive() for t in threads), "a client is still running")
        check(not errors, "; ".join(errors))
        st = stats(ctl)
        check(srv.stop() == 0, "nbdkit exit status")
        log = read_file(calls).decode().splitlines()
        methods = [line.split()[0] for line in log]
        print("%s, %d connections: %d requests; plugin saw %d pread, %d pwrite, %d flush, "
              "%d cache; batches=%s" % (thread_model, connections, sum(counts),
                                        methods.count("pread"), methods.count("pwrite"),
                                        methods.count("flush"), methods.count("cache"),
                                        st["batches_flushed"]))
        check(not os.path.exists(marker),
              "plugin calls overlapped:\n" + (read_file(marker).decode()
                                              if os.path.exists(marker) else ""))
        check(int(st["batches_flushed"]) >= 5, "too few background batches to mean anything")
        check(methods.count("pwrite") >= 5 and methods.count("pread") >= 5
              and methods.count("cache") >= 5,
              "the plugin saw too few writes, reads or cache requests")
        check_same(read_file(img), model.read(0, SIZE), "disk after shutdown")


def main():
    seed = int(os.environ.get("SEED", "3"))
    run("serialize_all_requests", 3, seed)
    run("serialize_connections", 1, seed + 1, ops=80)
    # One connection's requests in turn: the flusher's calls beside the
    # client's would be concurrent ones on that connection.
    run("serialize_requests", 1, seed + 2, ops=120)


if __name__ == "__main__":
    main()
