# Bad parameters: nbdkit refuses to start, fast, naming the parameter.
import subprocess

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
    ("sdccache-statsformat", "xml"),
]

# Good values, so that the refusals above are about the value, not the setup.
GOOD = [
    ("threshold", "1"),
    ("threshold", "1048576"),
    ("queue-max-size", "256K"),
    ("bypass-min", "0"),
    ("bypass-min", "1M"),
    ("bypass-min", "2G"),
    ("max-age", "500ms"),
    ("max-age", "0"),
    ("shutdown-timeout", "2m"),
    ("sdccache-statsformat", "json"),
]


def run(param):
    cmd = [sdctest.NBDKIT, "-U", "-", "--filter=" + sdctest.FILTER, "null", "1M",
           param, "--run", "true"]
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=5)
    except subprocess.TimeoutExpired:
        sdctest.fail("%s did not exit within 5 s" % " ".join(cmd))


def main():
    for key, value in CASES:
        p = run("%s=%s" % (key, value))
        err = p.stderr.decode(errors="replace")
        sdctest.check(p.returncode != 0, "%s=%s accepted (exit 0)" % (key, value))
        sdctest.check(key in err, "%s=%s: stderr does not name the parameter: %r" %
                      (key, value, err))
        print("%s=%s -> exit %d: %s" % (key, value, p.returncode, err.strip().splitlines()[-1]))
    for key, value in GOOD:
        p = run("%s=%s" % (key, value))
        sdctest.check(p.returncode == 0, "%s=%s refused (exit %d): %s" %
                      (key, value, p.returncode, p.stderr.decode(errors="replace")))


if __name__ == "__main__":
    main()
