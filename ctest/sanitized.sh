#!/bin/sh
# sanitized.sh LABEL COMMAND...: runs COMMAND (specs or a C test under a
# sanitizer or valgrind). Prints a short summary when it is clean; prints
# everything and fails when it exits non-zero or any sanitizer reported.
label=$1; shift
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "== $label"
"$@" >"$out" 2>&1
rc=$?
reports=$(grep -cE 'ERROR: [A-Za-z]+Sanitizer|WARNING: [A-Za-z]+Sanitizer|SUMMARY: [A-Za-z]+Sanitizer|runtime error:' "$out")
if [ "$rc" -ne 0 ] || [ "$reports" -ne 0 ]; then
  sed 's/\x1b\[[0-9;]*m//g' "$out" | tail -n 300
  echo "$label: FAILED (exit $rc, $reports sanitizer report lines)" >&2
  exit 1
fi
sed 's/\x1b\[[0-9;]*m//g' "$out" |
  grep -E '^[0-9]+ success|^stress: |^model: |^lifetime: [0-9]|^lifetime: known|ERROR SUMMARY' || true
echo "$label: clean"
