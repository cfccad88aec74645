#!/bin/sh
# run.sh: the benchmarks of the performance targets, and one table of the
# results.
#
#   sh bench/run.sh            every benchmark, BENCH_RUNS (3) runs, medians
#   BENCH_SMOKE=1 sh bench/run.sh
#                              tiny counts, one run: checks that every
#                              program runs and the table has every row
#
# Environment: BENCH_RUNS, BENCH_SCALE (multiplies the counts),
# LUA_VERSIONS, BUILD, CC, OPT, WARN (as in the Makefile). Lua modules must
# be built already (make build). Programs, raw results (results.txt) and
# the table (table.md) go to $BUILD/bench, or $BUILD/bench-smoke for a
# smoke run, so that a smoke run (in `make check`) never clobbers a
# benchmark running at the same time.
set -e
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
CC=${CC:-cc}
OPT=${OPT:-"-O2 -g"}
WARN=${WARN:-"-std=c11 -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes -Wpointer-arith -Wcast-qual"}
LUA_VERSIONS=${LUA_VERSIONS:-"5.4 jit 5.1 5.2 5.3"}
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  RUNS=${BENCH_RUNS:-1}
  SCALE=${BENCH_SCALE:-0.001}
  report_flag=--smoke
  out=$BUILD/bench-smoke
else
  RUNS=${BENCH_RUNS:-3}
  SCALE=${BENCH_SCALE:-1}
  report_flag=
  out=$BUILD/bench
fi

mkdir -p "$out"
case $out in /*) absout=$out ;; *) absout=$(pwd)/$out ;; esac
results=$out/results.txt
: >"$results"

note() { echo "bench: $*" >&2; }
meta() { echo "meta $1 $2" >>"$results"; }

# collect PREFIX COMMAND...: runs the command and adds its lines to the
# results, each after PREFIX; stops everything if the command fails.
collect() {
  prefix=$1
  shift
  if ! "$@" >"$out/last.txt"; then
    note "failed: $*"
    exit 1
  fi
  sed "s/^/$prefix /" "$out/last.txt" >>"$results"
}

lua_bin() { case $1 in jit) echo luajit ;; *) echo "lua$1" ;; esac; }

# ---- the programs ----

# shellcheck disable=SC2086 # OPT and WARN are lists of flags
$CC $WARN $OPT -Icsrc bench/core_bench.c csrc/sf_core.c \
  -o "$out/core_bench" -lpthread

xsync=/usr/share/gocode/src/golang.org/x/sync/singleflight
gobench=
if command -v go >/dev/null 2>&1 && [ -d "$xsync" ]; then
  # GOPATH mode with Debian's copy of x/sync: no module, no network.
  (cd bench/go &&
    GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS='' GOPROXY=off \
      GOCACHE="$absout/../gocache" go build -o "$absout/gobench" .) &&
    gobench=$out/gobench
  [ -n "$gobench" ] || note "the Go benchmark did not build: skipped"
else
  note "go or golang-golang-x-sync-dev missing: the Go comparison is skipped"
fi

luas=
for v in $LUA_VERSIONS; do
  if command -v "$(lua_bin "$v")" >/dev/null 2>&1 &&
    [ -f "$BUILD/$v/singleflight/core.so" ]; then
    luas="$luas $v"
  else
    note "Lua $v or $BUILD/$v/singleflight/core.so missing: skipped"
  fi
done

# bench/floor.c, for Lua 5.4: the floor under a C g:call, step by step
floor=
case " $luas " in *" 5.4 "*)
  mkdir -p "$out/floor"
  # shellcheck disable=SC2086
  $CC $WARN $OPT -fPIC -shared -I/usr/include/lua5.4 -Icsrc bench/floor.c \
    csrc/sf_core.c -o "$out/floor/floor.so" -lpthread && floor=$out/floor
  ;;
esac

# shellcheck disable=SC2317 # called through collect
run_lua() { # version mode [extra cpath dir]
  $(lua_bin "$1") -e "package.path = 'lua/?.lua;lua/?/init.lua;bench/?.lua;' .. package.path
    package.cpath = '$BUILD/$1/?.so;${3:+$3/?.so;}' .. package.cpath" \
    bench/lua_bench.lua "$2" "$SCALE"
}

# bench/codec_bench.lua: the codecs a result crosses nginx workers by
# shellcheck disable=SC2317 # called through collect
run_codec() { # version
  $(lua_bin "$1") -e "package.path = 'lua/?.lua;lua/?/init.lua;' .. package.path
    package.cpath = '$BUILD/$1/?.so;' .. package.cpath" \
    bench/codec_bench.lua "$SCALE"
}

# bench/nginx_bench.lua, for the row across nginx workers, and
# bench/nginx_heap_bench.lua, nginx_watch_bench.lua, nginx_keys_bench.lua and
# nginx_redis_bench.lua (a big heap, the CPU of watching, 1000 keys x 4
# workers, a Redis fleet's connections per stampede), and
# nginx_zipf_bench.lua (a loader's cache misses under wrk: the CPU per
# request and the tail of shm against a group per worker): LuaJIT and
# LuaSocket drive a throwaway nginx (each says why on stderr when it can't)
nginx_bench=
if command -v luajit >/dev/null 2>&1 && luajit -e 'require "socket"' 2>/dev/null; then
  nginx_bench=yes
else
  note "luajit or LuaSocket missing: the nginx rows are skipped"
fi

# ---- the machine ----

meta date "$(date -u +%Y-%m-%d)"
cpu_field() { sed -n "s/^$1[[:space:]]*: //p" /proc/cpuinfo | head -1; }
meta cpu "$(cpu_field 'model name') (family $(cpu_field 'cpu family'), model $(cpu_field model))"
meta cores "$(nproc)"
meta os "$(uname -sr)"
meta cc "$($CC --version | head -1)"
meta runs "$RUNS"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
meta nginx "$( (${NGINX:-/usr/sbin/nginx} -v 2>&1 || echo none) | sed 's/^nginx version: //')"
meta scale "$SCALE"
for v in $luas; do
  meta "lua-$v" "$($(lua_bin "$v") -v 2>&1 | head -1 | sed 's/ *\(-- \)*Copyright.*//')"
done
if [ -n "$gobench" ]; then
  meta go "$(go version | sed 's/^go version //')"
  meta xsync "$(dpkg-query -W -f='${Version}' golang-golang-x-sync-dev 2>/dev/null || echo '?')"
else
  meta go none
fi

# ---- the runs: every program once per run, side by side ----

run=1
while [ "$run" -le "$RUNS" ]; do
  note "run $run of $RUNS: C core"
  collect "$run" "$out/core_bench" "$SCALE"
  if [ -n "$gobench" ]; then
    note "run $run of $RUNS: Go"
    collect "$run" "$gobench" "$SCALE"
  fi
  for v in $luas; do
    note "run $run of $RUNS: Lua $v"
    collect "$run lua-$v" run_lua "$v" speed
  done
  for v in $luas; do
    case $v in jit | 5.4)
      note "run $run of $RUNS: Lua $v, codecs"
      collect "$run lua-$v" run_codec "$v"
      ;;
    esac
  done
  if [ -n "$floor" ]; then
    note "run $run of $RUNS: Lua 5.4, floor"
    collect "$run lua-5.4" run_lua 5.4 floor "$floor"
  fi
  if [ -n "$nginx_bench" ]; then
    note "run $run of $RUNS: across nginx workers"
    collect "$run nginx" luajit bench/nginx_bench.lua "$SCALE"
    note "run $run of $RUNS: nginx, a big heap beside plain Lua"
    collect "$run nginx" luajit bench/nginx_heap_bench.lua "$SCALE"
    note "run $run of $RUNS: nginx, the CPU of watching workers"
    collect "$run nginx" luajit bench/nginx_watch_bench.lua "$SCALE"
    note "run $run of $RUNS: nginx, 1000 keys x 4 workers"
    collect "$run nginx" luajit bench/nginx_keys_bench.lua "$SCALE"
    note "run $run of $RUNS: nginx, a Redis fleet: connections and commands per stampede"
    collect "$run nginx" luajit bench/nginx_redis_bench.lua "$SCALE"
    note "run $run of $RUNS: nginx, a loader's cache misses under wrk, shm vs a group per worker"
    collect "$run nginx" luajit bench/nginx_zipf_bench.lua "$SCALE"
  fi
  run=$((run + 1))
done

for v in $luas; do
  note "memory: Lua $v"
  collect "1 lua-$v" run_lua "$v" memory
done

meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- the table ----

report_lua=
for l in lua5.4 lua5.3 lua5.2 luajit lua5.1 lua; do
  if command -v "$l" >/dev/null 2>&1; then
    report_lua=$l
    break
  fi
done
status=0
$report_lua bench/report.lua "$results" $report_flag >"$out/table.md" || status=$?
cat "$out/table.md"
exit $status
