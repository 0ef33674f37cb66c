# fio --ioengine=nbd randwrite, 4k/64k bssplit, crc32c verify; then verify_only on the backing file.
import json
import os
import sys

import clientlib
from clientlib import check, run
import sdctest

SIZE = 64 << 20
JOBS = 2  # two connections, each on its own half


def fio_args(name, engine_args, extra):
    return ["fio", "--name=" + name] + engine_args + [
        "--rw=randwrite", "--bssplit=4k/50:64k/50",
        "--numjobs=%d" % JOBS, "--size=%d" % (SIZE // JOBS),
        "--offset_increment=%d" % (SIZE // JOBS),
        "--verify=crc32c", "--verify_fatal=1", "--randseed=4242",
    ] + extra


def jobs_of(path):
    # fio may print warnings ahead of the JSON object.
    with open(path) as f:
        text = f.read()
    check("{" in text, "no JSON in fio output %s:\n%s" % (path, text))
    return json.loads(text[text.index("{"):])["jobs"]


def check_jobs(jobs, what, want_write):
    check(len(jobs) == JOBS, "%s: %d fio jobs reported" % (what, len(jobs)))
    for j in jobs:
        check(j["error"] == 0, "%s: fio job error %d" % (what, j["error"]))
        if want_write:  # verify_only still reports the writes it skipped
            check(j["write"]["io_bytes"] == SIZE // JOBS,
                  "%s: wrote %d bytes" % (what, j["write"]["io_bytes"]))
        # fio reads every block back to verify it.
        check(j["read"]["io_bytes"] == SIZE // JOBS,
              "%s: verified %d bytes" % (what, j["read"]["io_bytes"]))


def main():
    clientlib.require("fio")
    tmp = sdctest.scratch_dir(prefix="sdc-fio-")
    disk = sdctest.make_image(tmp, SIZE)
    stats = os.path.join(tmp, "stats.txt")
    params = ["threshold=16", "queue-max-size=4M", "sdccache-statsfile=" + stats]
    srv = clientlib.start_server(["file", disk], params, tmpdir=tmp)
    with srv:
        out_json = os.path.join(tmp, "fio-nbd.json")
        out, _ = run(fio_args("sdc", ["--ioengine=nbd", "--uri=" + srv.uri, "--iodepth=16"],
                              ["--output-format=json", "--output=" + out_json]), timeout=90,
                     cwd=tmp)  # fio leaves verify state files in its cwd
        check("verify failed" not in out, "fio: " + out)
        check_jobs(jobs_of(out_json), "fio nbd randwrite+verify", want_write=True)
        # Whether writers ever wait for room depends on timing; threshold
        # batches must happen (3000+ requests, threshold 16).
        sdctest.wait_until(lambda: clientlib.stat_int(stats, "flushes_threshold") > 0, 5,
                           "threshold batches in " + stats)
        st = clientlib.read_stats(stats)
        print("stats:", {k: st[k] for k in ("batches_flushed", "plugin_writes",
              "peak_queued_bytes", "backpressure_waits", "read_overlay_hits")})
        check(int(st["peak_queued_bytes"]) <= 4 << 20, "peak above queue-max-size: %s" % st)
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))

    # What fio wrote is on disk: verify it from the backing file directly.
    file_args = ["--ioengine=psync", "--filename=" + disk]
    out_json = os.path.join(tmp, "fio-verify.json")
    run(fio_args("sdc", file_args, ["--verify_only", "--output-format=json",
                                    "--output=" + out_json]), timeout=60, cwd=tmp)
    check_jobs(jobs_of(out_json), "fio verify_only on the backing file", want_write=False)

    # Negative control: the same check notices one corrupted block.
    with open(disk, "r+b") as f:
        f.seek(SIZE // 3 + 100)
        f.write(b"corrupt!")
    out, rc = run(fio_args("sdc", file_args, ["--verify_only"]), timeout=60, expect_rc=None,
                  cwd=tmp)
    check(rc != 0 and "verify failed" in out,
          "fio verify_only missed a corrupted block (rc %d):\n%s" % (rc, out))
    print("PASS: fio randwrite 4k/64k with crc32c verify, through sdccache and on disk")


if __name__ == "__main__":
    main()
    sys.exit(0)
