# Bad parameters: nbdkit refuses to start, fast, naming the parameter.
import os
import re

import sdctest

CASES = [
    ("threshold", "0"),
    ("threshold", "-1"),
    ("threshold", "abc"),
    ("threshold", "99999999999"),
    ("threshold", "1048577"),
    ("threshold", ""),
    ("queue-max-size", "bogus"),
    ("queue-max-size", "100"),
    ("bypass-min", "1k"),
    ("bypass-min", "4G"),
    ("bypass-min", "lots"),
    ("max-age", "xyz"),
    ("shutdown-timeout", "soon"),
    # Past ~292 years, steady_clock deadlines overflowed: "never" became "at once".
    ("max-age", "3000000h"),
    ("shutdown-timeout", "3000000h"),
    ("max-age", "99999999999999999999"),
    ("shutdown-timeout", "99999999999999999999999999ms"),
    # A path it cannot write: refused at startup, not an error every second.
    ("sdccache-statsfile", "/nonexistent-dir/x.stats"),
    ("sdccache-statsformat", "xml"),
    # A format with no stats file to format (a mistyped sdccache-statsfile=).
    ("sdccache-statsformat", "json"),
]

# Good values, so that the refusals above are about the value, not the setup.
GOOD = [
    ("threshold", "1"),
    ("threshold", "1048576"),
    ("threshold", "00000000005"),  # leading zeros do not make it large
    ("queue-max-size", "256K"),
    ("bypass-min", "0"),
    ("bypass-min", "1M"),
    ("bypass-min", "2G"),
    ("max-age", "500ms"),
    ("max-age", "0"),
    ("shutdown-timeout", "2m"),
    ("shutdown-timeout", "876000h"),
]


def run(param):
    # Refused in .after_fork (sdccache-statsfile, control): run in the
    # foreground, where they must exit by themselves, non-zero.
    after_fork = param.startswith(("sdccache-statsfile=", "control="))
    return sdctest.run_nbdkit(["null", "1M", param], timeout=5, foreground=after_fork)


def refused_and_kept(key, path, why):
    """key=path over a regular file: refused, saying why, the file kept."""
    with open(path, "rb") as f:
        before = f.read()
    p = run("%s=%s" % (key, path))
    err = p.stderr.decode(errors="replace")
    sdctest.check(p.returncode != 0 and why in err,
                  "%s= over a regular file: exit %d: %r" % (key, p.returncode, err))
    with open(path, "rb") as f:
        sdctest.check(f.read() == before, "%s= replaced a regular file" % key)


def run_stats(path, fmt):
    return sdctest.run_nbdkit(["null", "1M", "sdccache-statsfile=" + path,
                               "sdccache-statsformat=" + fmt], timeout=5)


# Under ASan (the sanitizer run sets SDCCACHE_ASAN_RT), an nbdkit that has
# logged an errno message deadlocks at exit in libp11-kit's destructor
# (tests/sanitizer/nbdkit): skip the refusals made in .after_fork there.
ASAN = bool(os.environ.get("SDCCACHE_ASAN_RT"))


def version_in_help():
    """--help names the filter's version (--version can only show nbdkit's)."""
    with open(os.path.join(os.environ["SDCCACHE_SOURCE_ROOT"], "meson.build")) as f:
        version = re.search(r"version\s*:\s*'([^']+)'", f.read()).group(1)
    p = sdctest.run_command([sdctest.NBDKIT, "--filter=" + sdctest.FILTER, "null", "--help"],
                            timeout=5)
    line = "(nbdkit sdccache write-back filter %s)" % version
    sdctest.check(line in p.stdout.decode(errors="replace"), "--help lacks %r" % line)
    print("--help: %s" % line)


def main():
    version_in_help()
    for key, value in CASES:
        if ASAN and key == "sdccache-statsfile":
            continue
        p = run("%s=%s" % (key, value))
        err = p.stderr.decode(errors="replace")
        sdctest.check(p.returncode != 0, "%s=%s accepted (exit 0)" % (key, value))
        sdctest.check(key in err, "%s=%s: stderr does not name the parameter: %r" %
                      (key, value, err))
        if key in ("max-age", "shutdown-timeout") and value.startswith(("3000000", "9999999")):
            sdctest.check("too long" in err, "%s=%s: not said to be too long: %r" %
                          (key, value, err))
        print("%s=%s -> exit %d: %s" % (key, value, p.returncode, err.strip().splitlines()[-1]))
    for key, value in GOOD:
        p = run("%s=%s" % (key, value))
        sdctest.check(p.returncode == 0, "%s=%s refused (exit %d): %s" %
                      (key, value, p.returncode, p.stderr.decode(errors="replace")))
    # A parameter given twice: which value was meant cannot be told.
    for key, first, second in (("threshold", "5", "7"), ("max-age", "1s", "2s"),
                               ("control", "/tmp/a.sock", "/tmp/b.sock")):
        p = sdctest.run_nbdkit(["null", "1M", "%s=%s" % (key, first), "%s=%s" % (key, second)],
                               timeout=5)
        err = p.stderr.decode(errors="replace")
        sdctest.check(p.returncode != 0 and "%s: given twice" % key in err,
                      "%s given twice: exit %d: %r" % (key, p.returncode, err))

    # The filter given twice: both layers would share one queue, and the
    # first client flush would wait for ever (it waited for itself).
    p = sdctest.run_nbdkit(["null", "1M"], timeout=5, extra=["--filter=" + sdctest.FILTER])
    err = p.stderr.decode(errors="replace")
    sdctest.check(p.returncode != 0 and "may appear only once in a stack" in err,
                  "the filter given twice: exit %d: %r" % (p.returncode, err))

    # control= naming a file that is not a socket (a mistyped disk image):
    # refused, and the file left as it was.
    if ASAN:
        return
    tmp = sdctest.scratch_dir(prefix="sdc-badparams-")
    notes = os.path.join(tmp, "notes.txt")
    with open(notes, "wb") as f:
        f.write(b"keep me")
    refused_and_kept("control", notes, "not a socket")
    # sdccache-statsfile= naming a file that is not an earlier stats file
    # (the disk image, by mistake): the same.  So is the control socket's
    # path, made first.
    refused_and_kept("sdccache-statsfile", notes, "not a stats file")
    # An earlier stats file, in either format, or an empty file, is replaced.
    stats = os.path.join(tmp, "st")
    open(stats, "wb").close()
    for fmt in ("text", "json", "text"):
        p = run_stats(stats, fmt)
        sdctest.check(p.returncode == 0, "an earlier stats file (now %s) refused: %r" %
                      (fmt, p.stderr.decode(errors="replace")))
        with open(stats, "rb") as f:
            head = f.read(20)
        sdctest.check(head.startswith(b"{" if fmt == "json" else b"threshold: "),
                      "the stats file was not written as %s: %r" % (fmt, head))
    # A symlink planted at PATH.tmp (in a shared directory) is replaced, not
    # written through.
    victim = os.path.join(tmp, "victim")
    with open(victim, "wb") as f:
        f.write(b"precious")
    os.symlink(victim, stats + ".tmp")
    p = run_stats(stats, "text")
    sdctest.check(p.returncode == 0, "a symlink at PATH.tmp: exit %d: %r" %
                  (p.returncode, p.stderr.decode(errors="replace")))
    with open(victim, "rb") as f:
        sdctest.check(f.read() == b"precious", "the stats file was written through a symlink")
    # A stats file whose first key is long: several exports, the first
    # named with 4096 bytes (NBD's most) that the file writes as %XX.
    long_stats = os.path.join(tmp, "long.stats")
    for fmt in ("text", "json"):
        with sdctest.start_server(["memory", "1M"], ["sdccache-statsfile=" + long_stats,
                                                     "sdccache-statsformat=" + fmt],
                                  tmpdir=sdctest.scratch_dir(prefix="sdc-badparams-")) as srv:
            for name in (" " * 4096, "b"):
                h = srv.connect(name)
                h.pwrite(b"x" * 512, 0)
                h.flush()
                h.shutdown()
            sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
        with open(long_stats, "rb") as f:
            sdctest.check(f.read(10 * 1024).count(b"%20") > 3000,
                          "the first key is not the long name's")
        p = run_stats(long_stats, fmt)
        sdctest.check(p.returncode == 0, "an earlier %s stats file with a long first key "
                      "refused: %r" % (fmt, p.stderr.decode(errors="replace")))
    print("stats file: a regular file and the control socket's path refused, an earlier "
          "stats file replaced (one with a 4096-byte export name too), a symlink at "
          "PATH.tmp not followed")

    # In the background (no -f, no --run) the usual path mistakes are still
    # reported on stderr with a failing exit status: they are checked
    # before nbdkit forks (an error in .after_fork would reach only syslog,
    # after the starting process had exited 0).
    # The control socket on the stats file's path, or on its PATH.tmp
    # (which the stats writer removes), each path fine by itself; also
    # spelt differently (through "..").
    same = os.path.join(tmp, "both")
    dotdot = os.path.join(tmp, "..", os.path.basename(tmp), "both")
    for params in (["control=" + notes], ["sdccache-statsfile=/nonexistent-dir/x.stats"],
                   ["control=/nonexistent-dir/ctl.sock"], ["sdccache-statsfile=" + tmp],
                   # A directory where no file can be made.
                   ["sdccache-statsfile=/proc/sdccache.stats"],
                   ["control=/proc/sdccache.sock"],
                   ["control=" + same, "sdccache-statsfile=" + same],
                   ["control=" + same + ".tmp", "sdccache-statsfile=" + dotdot]):
        run_dir = sdctest.scratch_dir(prefix="sdc-badparams-")
        pidfile = os.path.join(run_dir, "nbdkit.pid")
        cmd = [sdctest.NBDKIT, "-U", os.path.join(run_dir, "nbd.sock"), "-P", pidfile,
               "--filter=" + sdctest.FILTER, "null", "1M"] + params
        p = sdctest.run_command(cmd, timeout=5, check_rc=False)
        # A daemon started after all: stop it.  Its pidfile may come just
        # after the parent exits 0 (nbdkit writes it in the child).
        if p.returncode == 0 or os.path.exists(pidfile):
            sdctest.stop_daemon(sdctest.daemon_from_pidfile(pidfile, 5))
        err = p.stderr.decode(errors="replace")
        keys = [param.split("=", 1)[0] for param in params]
        sdctest.check(p.returncode != 0 and all(key in err for key in keys),
                      "%s in the background: exit %d, stderr %r" % (params, p.returncode, err))
        if len(params) > 1:
            sdctest.check("give them different paths" in err,
                          "%s: not said to clash: %r" % (params, err))
            sdctest.check(not os.path.exists(same) and not os.path.exists(same + ".tmp"),
                          "%s: a file was left at the clashing path" % params)
        print("%s in the background -> exit %d: %s" %
              (" ".join(params), p.returncode, err.strip().splitlines()[-1]))

    # nbdkit -u: the stats file is written as the user nbdkit changes to; a
    # user that cannot write it fails startup (rather than an error every
    # second later).
    # The control socket, created first (where nobody may), is removed.
    if os.geteuid() == 0:
        stats = os.path.join(sdctest.scratch_dir(prefix="sdc-badparams-"), "stats")  # 0700 root
        open_dir = sdctest.scratch_dir(prefix="sdc-badparams-")
        os.chmod(open_dir, 0o777)
        ctl = os.path.join(open_dir, "ctl.sock")
        p = sdctest.run_nbdkit(["null", "1M", "sdccache-statsfile=" + stats, "control=" + ctl],
                               timeout=5, foreground=True, extra=["-u", "nobody"])
        err = p.stderr.decode(errors="replace")
        sdctest.check(p.returncode != 0 and "sdccache-statsfile" in err,
                      "a stats file that user nobody cannot write: exit %d: %r" %
                      (p.returncode, err))
        sdctest.check(not os.path.exists(ctl), "the control socket was left behind")
        print("-u nobody, stats file in a root-only directory -> exit %d: %s" %
              (p.returncode, err.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
