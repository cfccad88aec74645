#!/bin/sh
# run-specs.sh BUSTED VERSION...: the busted specs on each Lua version,
# then one closing line with the totals.
busted=$1; shift
passed=0; failed=0; status=0
for v in "$@"; do
  case $v in jit) lua=luajit ;; *) lua=lua$v ;; esac
  echo "== specs on $($lua -v 2>&1 | head -1)"
  out=$(mktemp)
  SINGLEFLIGHT_LUA=$lua SINGLEFLIGHT_LUA_VERSION=$v \
    $lua "$busted" --cpath="build/$v/?.so" -o utfTerminal spec >"$out" 2>&1
  rc=$?
  cat "$out"
  # "12 successes / 0 failures / 0 errors / 0 pending : 0.1 seconds"
  counts=$(sed 's/\x1b\[[0-9;]*m//g' "$out" |
    sed -nE 's/^([0-9]+) success[a-z]* \/ ([0-9]+) failures? \/ ([0-9]+) errors?.*/\1 \2 \3/p' |
    tail -1)
  if [ -z "$counts" ]; then
    echo "specs on Lua $v did not report (exit $rc)" >&2
    failed=$((failed + 1)); status=1
  else
    read -r s f e <<END
$counts
END
    passed=$((passed + s)); failed=$((failed + f + e))
    [ "$rc" -ne 0 ] || [ $((f + e)) -ne 0 ] && status=1
  fi
  rm -f "$out"
done
echo "specs: $passed passed, $failed failed"
if [ -n "$SPECS_SUMMARY" ]; then
  echo "$passed passed, $failed failed" >"$SPECS_SUMMARY"
fi
exit $status
