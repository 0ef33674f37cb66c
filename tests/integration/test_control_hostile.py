# Control socket and stats paths against careless or hostile use: a second
# instance on a live socket, a control client that never reads its replies
# or never sends anything, export names that look like counter lines, and
# relative paths when nbdkit runs as a daemon (it changes directory to /).
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time

import sdctest

IDLE_S = 10  # ControlSocket::kClientIdleMs


def read_to_eof(c):
    """What socket c reads until EOF, and whether it was reset instead."""
    got = b""
    try:
        while True:
            chunk = c.recv(4096)
            if not chunk:
                return got, False
            got += chunk
    except ConnectionResetError:
        return got, True


def live_socket_kept(tmp):
    """A second nbdkit naming a live control socket is refused, and the
    first keeps its socket, also after the second has exited."""
    ctl = os.path.join(tmp, "live.sock")
    with sdctest.start_server(["memory", "1M"], ["threshold=11", "control=" + ctl],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        p = sdctest.run_nbdkit(["memory", "1M", "threshold=22", "control=" + ctl],
                               foreground=True)
        err = p.stderr.decode(errors="replace")
        sdctest.check(p.returncode != 0 and "in use" in err,
                      "second instance on a live control socket: exit %d: %r" % (p.returncode, err))
        st = sdctest.control_stats(ctl)
        sdctest.check(st["threshold"] == "11", "control socket answered for another instance: %s" % st)
        sdctest.check(srv.stop() == 0, "nbdkit exit status")
    sdctest.check(not os.path.exists(ctl), "control socket left behind after exit")
    print("live socket: second instance refused: %s" % err.strip().splitlines()[-1])


def stale_socket_replaced(tmp):
    """A socket file nobody listens on (left by an nbdkit that was killed)
    is replaced by the new control socket."""
    ctl = os.path.join(tmp, "stale.sock")
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(ctl)  # bound, never listening, then closed: the file stays
    left.close()
    sdctest.check(os.path.exists(ctl), "the stale socket file was not made")
    with sdctest.start_server(["memory", "1M"], ["threshold=33", "control=" + ctl],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        st = sdctest.control_stats(ctl)
        sdctest.check(st["threshold"] == "33", "control socket answered %s" % st)
        sdctest.check(srv.stop() == 0, "nbdkit exit status")
    sdctest.check(not os.path.exists(ctl), "control socket left behind after exit")
    print("stale socket: replaced, and removed at exit")


def others_sockets_kept(tmp):
    """A socket that is not a stale stream socket is no control socket to
    replace: another process's datagram socket (say /dev/log) is refused
    and keeps working; a listener whose backlog is full is in use, and
    nbdkit says so at once instead of hanging in connect."""
    # Under ASan (the sanitizer run sets SDCCACHE_ASAN_RT), an nbdkit that
    # has logged an errno message deadlocks at exit in libp11-kit's
    # destructor (tests/sanitizer/nbdkit): the refusal names the errno.
    if not os.environ.get("SDCCACHE_ASAN_RT"):
        datagram_socket_kept(tmp)
    busy_listener(tmp)


def datagram_socket_kept(tmp):
    dgram = os.path.join(tmp, "dgram.sock")
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    owner.bind(dgram)
    p = sdctest.run_nbdkit(["memory", "1M", "control=" + dgram])
    err = p.stderr.decode(errors="replace")
    sdctest.check(p.returncode != 0 and "may be in use" in err,
                  "control= on a live datagram socket: exit %d: %r" % (p.returncode, err))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(b"still mine", dgram)  # FileNotFoundError if it was removed
    owner.settimeout(5)
    sdctest.check(owner.recv(64) == b"still mine", "the datagram socket's owner lost it")
    owner.close()
    print("datagram socket: refused: %s" % err.strip().splitlines()[-1])


def busy_listener(tmp):
    busy = os.path.join(tmp, "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(busy)
    listener.listen(0)
    queued = []
    while True:  # fill the backlog: the next connect would block
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        queued.append(c)
        try:
            c.connect(busy)
        except BlockingIOError:
            break
        sdctest.check(len(queued) < 100, "the backlog never filled")
    p = sdctest.run_nbdkit(["memory", "1M", "control=" + busy], timeout=10)
    err = p.stderr.decode(errors="replace")
    sdctest.check(p.returncode != 0 and "in use" in err,
                  "control= on a busy listener: exit %d: %r" % (p.returncode, err))
    sdctest.check(os.path.exists(busy), "the busy listener's socket was removed")
    for c in queued + [listener]:
        c.close()
    print("busy listener: refused: %s" % err.strip().splitlines()[-1])


def stuck_client(ctl):
    """A control client that sends commands and never reads the replies,
    until the server's send is stuck on it (its sends time out for 0.5 s)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ctl)
    s.setblocking(False)
    deadline = time.monotonic() + 20
    blocked_since = None
    while True:
        try:
            s.send(b"stats\n" * 64)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 0.5:
                return s
        if time.monotonic() > deadline:
            sdctest.fail("the control server kept reading a client that never reads")
        time.sleep(0.01)


def unread_replies(tmp):
    """A client that never reads holds neither the other clients (dropped
    after IDLE_S) nor shutdown (nbdkit exits at once on SIGTERM)."""
    ctl = os.path.join(tmp, "stuck.sock")
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        stuck = stuck_client(ctl)
        t0 = time.monotonic()
        lines, status = sdctest.control_command(ctl, "help", timeout=IDLE_S + 10)
        took = time.monotonic() - t0
        sdctest.check(status == "ok", "help after a stuck client: %r" % status)
        print("a client stuck for good: the next one answered after %.1fs" % took)
        stuck.close()
        stuck = stuck_client(ctl)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=IDLE_S / 2)
        except subprocess.TimeoutExpired:
            sdctest.fail("nbdkit still running %.0fs after SIGTERM, a control client stuck"
                         % (IDLE_S / 2))
        print("SIGTERM with a stuck control client: exited in %.2fs" % (time.monotonic() - t0))
        stuck.close()
        sdctest.check(srv.stop() == 0, "nbdkit exit status")


MAX_CLIENTS = 16  # ControlSocket::kMaxClients


def idle_client(tmp):
    """Clients that connect and send nothing hold up no other client (they
    were served one at a time: 10 s each), and are dropped after IDLE_S.
    Past MAX_CLIENTS at once, a client is told so and disconnected."""
    ctl = os.path.join(tmp, "idle.sock")
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        idle = []
        for _ in range(4):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(ctl)
            idle.append(c)
        t0 = time.monotonic()
        lines, status = sdctest.control_command(ctl, "help", timeout=IDLE_S + 10)
        took = time.monotonic() - t0
        sdctest.check(status == "ok", "help beside idle clients: %r" % status)
        sdctest.check(took < IDLE_S / 2, "help waited %.1fs behind 4 idle clients" % took)
        print("help beside 4 idle control clients: answered in %.3fs" % took)
        while len(idle) < MAX_CLIENTS:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(ctl)
            idle.append(c)
        # The server counts a client once it has accepted it: wait for the
        # refusal, which comes only once all MAX_CLIENTS are counted.
        answers = []

        def top_up():
            # On a very loaded machine the first clients may reach their
            # idle limit before the last is accepted; the count then never
            # reaches MAX_CLIENTS.  Replace any the server has dropped.
            for k, c in enumerate(idle):
                c.setblocking(False)
                try:  # EOF, or a refusal (a probe held a slot): closed
                    c.recv(4096)
                    gone = True
                except BlockingIOError:
                    gone = False
                except ConnectionResetError:
                    gone = True
                c.setblocking(True)
                if gone:
                    c.close()
                    idle[k] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    idle[k].connect(ctl)

        def refused():
            top_up()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                try:
                    c.connect(ctl)
                except BlockingIOError:  # the listen backlog is full: not accepted yet
                    return False
                try:
                    c.sendall(b"help\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused at once: the answer is already there to read
                answers.append(c.recv(4096))
            return answers[-1].startswith(b"error too many control clients")
        # 20 s: on a loaded 2-core machine the 16 accepts can take seconds.
        sdctest.wait_until(refused, 20, "a client past %d to be refused" % MAX_CLIENTS)
        print("client %d: %r" % (MAX_CLIENTS + 1, answers[-1]))
        # A refused client that sent its command at once reads the whole
        # refusal, then EOF: no reset for its unread command.
        told = 0
        for _ in range(20):
            with sdctest.connect_unix(ctl, 5) as c:
                got = b""
                try:
                    c.sendall(b"help\n")
                    while True:
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                        if got.endswith(b"ok\n"):  # served: an idle one was dropped
                            break
                except (BrokenPipeError, ConnectionResetError) as e:
                    sdctest.fail("a refused control client lost its answer (%r, got %r)" % (e, got))
                if got.startswith(b"error"):
                    sdctest.check(got == b"error too many control clients\n",
                                  "refusal read as %r" % got)
                    told += 1
        sdctest.check(told >= 10, "only %d of 20 clients were refused: the test tests little"
                      % told)
        print("%d refused clients read the whole refusal" % told)
        for c in idle:
            # Dropped: EOF.  A replacement top_up made while the server
            # still counted the client it replaced was refused instead (CI
            # run 89): the refusal, then EOF.
            c.settimeout(IDLE_S + 5)
            got, _ = read_to_eof(c)
            sdctest.check(got in (b"", b"error too many control clients\n"),
                          "an idle client was not dropped: %r" % got)
            c.close()
        lines, status = sdctest.control_command(ctl, "help", timeout=10)
        sdctest.check(status == "ok", "help once the idle clients were dropped: %r" % status)
        sdctest.check(srv.stop() == 0, "nbdkit exit status")


def export_names_in_counters(tmp):
    """Counter keys carry the export name, which the client chose: it must
    not be able to forge lines in `stats` or break the JSON stats file."""
    ctl = os.path.join(tmp, "names.sock")
    statsfile = os.path.join(tmp, "names.json")
    weird = 'b"\\\nok\nqueued_bytes: 0'
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl, "sdccache-statsfile=" + statsfile,
                                                 "sdccache-statsformat=json"],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        for name in ("a", weird):
            h = srv.connect(name)
            h.pwrite(b"x" * 512, 0)
            h.shutdown()
        lines, status = sdctest.control_command(ctl, "stats")
        sdctest.check(status == "ok", "stats status %r" % status)
        bad = [l for l in lines if not re.fullmatch(r"[^\s:]+: [^\n]*", l)]
        sdctest.check(not bad, "stats lines that are not 'key: value': %r" % bad)
        sdctest.check(any(l.startswith("a.queued_bytes: ") for l in lines) and
                      any(l.startswith("b%22%5C%0Aok%0Aqueued_bytes%3A%200.queued_bytes: ")
                          for l in lines), "export names not escaped as expected: %r" % lines)
        sdctest.check(sum(l.startswith("a.") for l in lines) * 2 == len(lines),
                      "a forged line (the reply ended early?): %r" % lines)

        def parses():
            try:
                with open(statsfile) as f:
                    d = json.load(f)
            except (OSError, ValueError):
                return False
            return any(k.startswith("b%22") for k in d)
        sdctest.wait_until(parses, 10, "a JSON stats file that parses, with both exports")
        sdctest.check(srv.stop() == 0, "nbdkit exit status")


def relative_paths_as_daemon(tmp):
    """Without -f nbdkit changes directory to / when it forks, before the
    filter creates its control socket and stats file: relative control=
    and sdccache-statsfile= still mean the directory nbdkit was started in,
    also for rewriting the file and removing the socket at exit."""
    work = sdctest.scratch_dir(dir=tmp)
    pidfile = os.path.join(work, "nbdkit.pid")
    sock = os.path.join(work, "nbd.sock")
    name = "sdc-rel-%d" % os.getpid()
    cmd = [sdctest.NBDKIT, "-U", sock, "-P", pidfile, "--filter=" + sdctest.FILTER, "memory", "1M",
           "control=%s.ctl" % name, "sdccache-statsfile=%s.stats" % name]
    p = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
    sdctest.check(p.returncode == 0, "nbdkit (daemon) exited %d: %s" % (p.returncode, p.stdout))
    pid = None
    try:
        pid = sdctest.daemon_from_pidfile(pidfile)
        ctl = os.path.join(work, name + ".ctl")
        stats = os.path.join(work, name + ".stats")
        sdctest.wait_until(lambda: sdctest.control_accepts(ctl) and os.path.exists(stats), 10,
                           "the control socket and stats file in the starting directory")
        sdctest.check(sdctest.control_command(ctl, "threshold 7")[1] == "ok",
                      "the control socket does not answer")
        # The stats file is rewritten where it was created.
        sdctest.wait_stats(stats, lambda st: st.get("threshold") == "7", 10,
                           "threshold 7 in the stats file")
        sdctest.stop_daemon(pid)
        pid = None
        sdctest.check(not os.path.exists(ctl), "the control socket was left behind at exit")
        for suffix in (".ctl", ".stats", ".stats.tmp"):
            sdctest.check(not os.path.exists("/" + name + suffix), "/%s%s created" % (name, suffix))
    finally:
        if pid is not None:
            sdctest.stop_daemon(pid)
        for suffix in (".ctl", ".stats", ".stats.tmp"):  # in case a broken build put them there
            if os.path.exists("/" + name + suffix):
                os.unlink("/" + name + suffix)


def ctl_cpu_ticks(pid):
    """User + system clock ticks of nbdkit's control threads (the accept
    thread is named sdccache-ctl; its client threads inherit the name)."""
    ticks = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                if f.read().strip() != "sdccache-ctl":
                    continue
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return ticks


def out_of_descriptors(tmp):
    """With nbdkit out of file descriptors, a control client waiting to be
    accepted made the accept thread spin at 100% of a core (accept4 failed
    with EMFILE, poll reported the client again at once) until descriptors
    came back.  Now it waits a little between tries; the client is served
    once descriptors are back."""
    ctl = os.path.join(tmp, "fds.sock")
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        pid = srv.proc.pid
        held = []
        for _ in range(2):  # accepted once answered
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(ctl)
            c.sendall(b"help\n")
            sdctest.check(c.recv(4096).startswith(b"commands"), "help not answered")
            held.append(c)
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # A new descriptor must be numbered below the limit: with 3, only
        # stdin, stdout and stderr fit, all open.  (A limit of the count in
        # use let a client through when a descriptor closing just then, a
        # readiness probe's, freed a lower number.)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            waiting.settimeout(10)
            waiting.connect(ctl)  # in the backlog: nbdkit cannot accept it
            waiting.sendall(b"help\n")
            t0 = time.monotonic()
            ticks0 = ctl_cpu_ticks(pid)
            time.sleep(1.0)  # the interval measured, not a wait for an event
            spent = (ctl_cpu_ticks(pid) - ticks0) / os.sysconf("SC_CLK_TCK")
            took = time.monotonic() - t0
            print("out of descriptors: control threads used %.2fs of CPU in %.2fs" %
                  (spent, took))
            sdctest.check(spent < 0.25 * took,
                          "the control thread spins out of descriptors: %.2fs of CPU in %.2fs" %
                          (spent, took))
            waiting.setblocking(False)
            try:
                early = waiting.recv(4096)
            except BlockingIOError:
                early = None
            sdctest.check(early is None, "served with no descriptor left (the test tests "
                          "nothing): %r" % early)
            waiting.settimeout(10)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        answer = waiting.recv(4096)
        sdctest.check(answer.startswith(b"commands"),
                      "the waiting client was not served once descriptors came back: %r" % answer)
        waiting.close()
        for c in held:
            c.close()
        sdctest.check(srv.stop() == 0, "nbdkit exit status")


def long_line_answered(tmp):
    """A client whose line is too long reads the error, then EOF: it was
    closed with its further input unread, which reset the connection."""
    ctl = os.path.join(tmp, "long.sock")
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl], tmpdir=tmp) as srv:
        for i in range(5):
            with sdctest.connect_unix(ctl, 5) as c:
                c.sendall(b"x" * 4000)  # no newline; far more than one read
                got, reset = read_to_eof(c)
                sdctest.check(not reset, "a client with a too long line was reset (got %r)" % got)
                sdctest.check(got == b"error line too long\n", "answer %r" % got)
        sdctest.check(srv.stop() == 0, "nbdkit exit status")
    print("a too long line: the error, then EOF")


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-ctl-hostile-")
    live_socket_kept(tmp)
    stale_socket_replaced(tmp)
    others_sockets_kept(tmp)
    export_names_in_counters(tmp)
    relative_paths_as_daemon(tmp)
    unread_replies(tmp)
    long_line_answered(tmp)
    idle_client(tmp)
    out_of_descriptors(tmp)


if __name__ == "__main__":
    main()
