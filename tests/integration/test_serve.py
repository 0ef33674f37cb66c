# scripts/serve, the README's main job, minus its install steps (it skips
# them when SDCCACHE_FILTER names a built filter): it serves the image it
# creates through one nbdkit process, so every connection sees the same
# cache, and Ctrl-C (SIGINT) writes everything back before nbdkit exits.
import os
import signal
import subprocess
import urllib.parse

import nbd

import sdctest

MiB = 1 << 20
SERVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "serve")


def children_of(pid):
    """PIDs whose parent is `pid` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def main():
    # A space and a non-ASCII letter in every path (the URI it prints
    # percent-encodes them).
    tmp = sdctest.scratch_dir(prefix="sdc-serve \u00fc-")
    img = os.path.join(tmp, "disk.img")
    sock, ctl, stats = (os.path.join(tmp, n) for n in ("nbd.sock", "ctl.sock", "stats"))
    # Paths relative to the directory it is started in, as a user types
    # them (the script itself changes to the source tree).
    env = dict(os.environ, SDCCACHE_SOCKET="nbd.sock", SDCCACHE_CONTROL="ctl.sock",
               SDCCACHE_STATS="stats")
    log = os.path.join(tmp, "serve.log")
    with open(log, "wb") as logf:
        proc = sdctest.track(subprocess.Popen([SERVE, "disk.img", "64M"], env=env, cwd=tmp,
                                              stdout=logf, stderr=subprocess.STDOUT), log)

    def out():
        with open(log, errors="replace") as f:
            return f.read()

    # The stats file is first written once nbdkit serves.
    sdctest.wait_until(lambda: os.path.exists(stats) or proc.poll() is not None, 30,
                       "scripts/serve to start nbdkit")
    sdctest.check(proc.poll() is None, "scripts/serve exited (%s):\n%s" % (proc.returncode, out()))
    sdctest.check(os.path.exists(img) and os.path.getsize(img) == 64 * MiB,
                  "./disk.img was not created with 64M:\n" + out())
    with open("/proc/%d/comm" % proc.pid) as f:
        comm = f.read().strip()
    sdctest.check(comm == "nbdkit", "scripts/serve's process is %r, not nbdkit itself" % comm)
    sdctest.check(children_of(proc.pid) == [], "scripts/serve runs more than one nbdkit:\n" + out())
    uri = "nbd+unix:///?socket=" + urllib.parse.quote(sock, safe="/._~-")
    sdctest.check("nbdinfo '%s'" % uri in out(), "serve did not print how to connect:\n" + out())

    writer, reader = nbd.NBD(), nbd.NBD()
    writer.connect_uri(uri)
    reader.connect_uri(uri)
    data = os.urandom(64 * 1024 - 4096)  # below bypass-min: buffered
    writer.pwrite(data, MiB)
    sdctest.check(reader.pread(len(data), MiB) == data,
                  "a second connection does not see the first one's buffered write")
    st = sdctest.control_stats(ctl)
    sdctest.check(st["queued_requests"] == "1", "the write is not buffered: %r" % st)
    writer.shutdown()
    reader.shutdown()

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    rc = proc.wait(timeout=30)
    sdctest.check(rc == 0, "nbdkit exited %d after Ctrl-C:\n%s" % (rc, out()))
    sdctest.check(sdctest.disk_read(img, MiB, len(data)) == data,
                  "the write is not in the image after Ctrl-C")
    print("scripts/serve: one nbdkit, one cache; Ctrl-C wrote everything back: ok")


if __name__ == "__main__":
    main()
