#!/bin/sh
# check-pod.sh: fails if podchecker reports any error or warning in a POD file.
set -u
pod=$1
podchecker=${2:-podchecker}
out=$("$podchecker" -warnings -warnings "$pod" 2>&1)
status=$?
printf '%s\n' "$out"
if [ "$status" -ne 0 ]; then
  echo "FAIL: podchecker exited with status $status" >&2
  exit 1
fi
if printf '%s\n' "$out" | grep -E -q '\*\*\* (WARNING|ERROR)'; then
  echo "FAIL: podchecker reported warnings or errors" >&2
  exit 1
fi
if ! printf '%s\n' "$out" | grep -q 'pod syntax OK'; then
  echo "FAIL: podchecker did not say 'pod syntax OK'" >&2
  exit 1
fi
