"""check-man-coverage.py: checks that the man page documents every parameter, counter and
control command that the built filter actually has.

Starts nbdkit (by PID, on a private socket) with the filter, opens one
writable connection so that the full counter list exists, asks the control
socket for `stats` and `help`, and reads `nbdkit --filter=... null --help`
for the parameters; each name must appear in the POD.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

POD = sys.argv[1]
FILTER = os.environ["SDCCACHE_FILTER"]


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            fail("timed out waiting for " + what)
        time.sleep(0.02)


def control(path, command):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not re.search(rb"(^|\n)(ok|error[^\n]*)\n$", data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def main():
    with open(POD) as f:
        pod = f.read()
    tmp = tempfile.mkdtemp(prefix="sdc-mancheck-")
    sock = os.path.join(tmp, "nbd.sock")
    ctl = os.path.join(tmp, "ctl.sock")
    pidfile = os.path.join(tmp, "nbdkit.pid")

    helptext = subprocess.run(["nbdkit", "--filter=" + FILTER, "null", "--help"],
                              capture_output=True, text=True, timeout=30).stdout
    # The filter's help comes first; the plugin's starts at "plugin: null".
    filter_help = helptext.split("\nplugin:")[0]
    params = re.findall(r"^([a-z][a-z-]*)=\S*\s", filter_help, re.M)
    if len(params) < 5:
        fail("could not find the filter's parameters in --help:\n" + helptext)

    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "-P", pidfile,
                             "--filter=" + FILTER, "memory", "1M", "control=" + ctl],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(pidfile) and os.path.exists(ctl) or
                 proc.poll() is not None, 10, "nbdkit to start")
        if proc.poll() is not None:
            fail("nbdkit exited early with status %d" % proc.returncode)
        # A writable connection creates the export's cache: all counters.
        import nbd  # python3-libnbd, /usr/bin/python3
        h = nbd.NBD()
        h.connect_unix(sock)
        stats = control(ctl, "stats")
        helpreply = control(ctl, "help")
        h.shutdown()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    shutil.rmtree(tmp, ignore_errors=True)
    counters = [line.split(":", 1)[0] for line in stats.splitlines() if ": " in line]
    if len(counters) < 20:
        fail("expected the full counter list, got:\n" + stats)
    m = re.search(r"commands: (.*)\n", helpreply)
    if not m:
        fail("no command list in 'help' reply: " + helpreply)
    commands = [c.strip().split(" ")[0] for c in m.group(1).split(",")]

    missing = []
    for p in params:
        if "B<%s=" % p not in pod:
            missing.append("parameter " + p)
    for c in counters:
        if "C<%s>" % c not in pod:
            missing.append("counter " + c)
    for c in commands:
        if "C<%s>" % c not in pod:
            missing.append("control command " + c)
    if missing:
        fail("%s does not document: %s" % (POD, ", ".join(missing)))
    print("PASS: %d parameters, %d counters, %d control commands documented" %
          (len(params), len(counters), len(commands)))


if __name__ == "__main__":
    main()
