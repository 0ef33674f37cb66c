#!/bin/sh
# One command for the whole bench: builds the filter and microbenchmarks, runs bench/run.py.
#   bench/run.sh            full run (writes bench/RESULTS.md, results.png, results.json)
#   bench/run.sh --quick    2 s runs, 1 repetition, results in /var/tmp/sdcbench-quick
# Set SDCCACHE_BUILD to use another meson build directory (default build-bench).
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh" --bench   # fio, nbdkit, python3-libnbd, matplotlib...
build=${SDCCACHE_BUILD:-$root/build-bench}
[ -d "$build" ] || meson setup "$build" "$root" >/dev/null
ninja -C "$build" filter/nbdkit-sdccache-filter.so bench/engine-bench >/dev/null
export SDCCACHE_BENCH_CMD="bench/run.sh${*:+ $*}"
/usr/bin/python3 "$root/bench/run.py" --build "$build" "$@"
# The side benches (outlets, folios, thresholds, sizing, floor, fuawrites), appended to the full run's RESULTS.md.
case " $* " in
  *" --quick "*|*" --out "*) ;;
  *) /usr/bin/python3 "$root/bench/outlets.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --out "$root/bench/RESULTS.md"
     # Target 1 on a second state of the image (small page-cache folios).
     /usr/bin/python3 "$root/bench/folios.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --out "$root/bench/RESULTS.md"
     # The default threshold against the old one (32).
     /usr/bin/python3 "$root/bench/thresholds.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --out "$root/bench/RESULTS.md"
     # Target 2 with a queue that holds the working set, against the defaults.
     /usr/bin/python3 "$root/bench/sizing.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --out "$root/bench/RESULTS.md"
     # Target 1's 64 KiB check against filters that do nothing.
     /usr/bin/python3 "$root/bench/floor.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --out "$root/bench/RESULTS.md"
     # FUA writes one at a time (a client that writes through).
     /usr/bin/python3 "$root/bench/fuawrites.py" --filter "$build/filter/nbdkit-sdccache-filter.so" \
       --runtime 3 --out "$root/bench/RESULTS.md" ;;
esac
