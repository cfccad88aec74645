#!/bin/sh
# demo.sh: the OpenResty stampede, with singleflight and without it.
#
# Starts a throwaway nginx on 127.0.0.1 (its own prefix directory, removed
# at the end, even on Ctrl-C) with WORKERS workers, whose slow fake upstream
# takes UPSTREAM_MS a call and serves UPSTREAM_SLOTS calls at a time (per
# worker). CLIENTS connections (wrk) then ask for one key for DURATION
# seconds, straight to the upstream, through a singleflight group per
# worker, and through one group over a lua_shared_dict (shm) for the whole
# instance; the three runs are printed side by side. Then STAMPEDES rounds
# of STAMPEDE requests at once on a fresh key show the executions per
# stampede and the waiters' latency over the upstream call, per-worker
# groups against shm. Without wrk the first part is skipped; without nginx
# it falls back to tools/demo.lua.
#
#   make demo CLIENTS=100 DURATION=5 UPSTREAM_MS=100 UPSTREAM_SLOTS=10 WORKERS=4
set -u

CLIENTS=${CLIENTS:-50}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-4}
STAMPEDE=${STAMPEDE:-200}
STAMPEDES=${STAMPEDES:-5}
UPSTREAM_MS=${UPSTREAM_MS:-100}
UPSTREAM_SLOTS=${UPSTREAM_SLOTS:-10}
NGINX=${NGINX:-/usr/sbin/nginx}
ROOT=$(pwd)
BUILD=${BUILD:-build}
export UPSTREAM_MS UPSTREAM_SLOTS

fallback() {
  echo "demo: $1; running the coroutine stampede instead" >&2
  exec lua5.4 -e "package.path='lua/?.lua;lua/?/init.lua;'..package.path
                  package.cpath='$BUILD/5.4/?.so;'..package.cpath" tools/demo.lua
}

moddir=""
for d in /usr/share/nginx/modules /usr/lib/nginx/modules; do
  [ -f "$d/ngx_http_lua_module.so" ] && [ -f "$d/ndk_http_module.so" ] && {
    moddir=$d; break; }
done
[ -x "$NGINX" ] || fallback "no nginx at $NGINX"
[ -n "$moddir" ] || fallback "libnginx-mod-http-lua is not installed"
[ -f /usr/share/lua/5.1/resty/core.lua ] || fallback "lua-resty-core is not installed"
[ -f "$BUILD/jit/singleflight/core.so" ] || fallback "$BUILD/jit/singleflight/core.so is missing"
have_wrk=yes
command -v wrk >/dev/null 2>&1 || have_wrk=
# the stampede client: a Lua with LuaSocket
client=""
for l in lua5.4 luajit lua5.3 lua5.1; do
  if $l -e 'require "socket"' >/dev/null 2>&1; then client=$l; break; fi
done
[ -n "$have_wrk" ] || [ -n "$client" ] || fallback "neither wrk nor a Lua with LuaSocket is installed"

prefix=$(mktemp -d /tmp/singleflight-demo.XXXXXX) || exit 1
cleanup() {
  if [ -f "$prefix/logs/nginx.pid" ]; then
    pid=$(cat "$prefix/logs/nginx.pid")
    kill -QUIT "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
      sleep 0.1; i=$((i + 1))
    done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -rf "$prefix"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(lua5.4 -e 'local s = require("socket").bind("127.0.0.1", 0)
                  local _, p = s:getsockname() print(p) s:close()' 2>/dev/null ||
       echo $((20000 + $$ % 20000)))

mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp"
cat >"$prefix/conf/nginx.conf" <<EOF
daemon on;
master_process on;
worker_processes $WORKERS;
pid logs/nginx.pid;
error_log logs/error.log warn;
env UPSTREAM_MS;
env UPSTREAM_SLOTS;
load_module $moddir/ndk_http_module.so;
load_module $moddir/ngx_http_lua_module.so;

events { worker_connections 4096; }

http {
  access_log off;
  client_body_temp_path tmp/body;
  proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi;
  uwsgi_temp_path tmp/uwsgi;
  scgi_temp_path tmp/scgi;
  lua_package_path "$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/tools/?.lua;/usr/share/lua/5.1/?.lua;;";
  lua_package_cpath "$ROOT/$BUILD/jit/?.so;;";
  lua_shared_dict demo 1m;
  lua_shared_dict demo_sf 10m;

  init_by_lua_block { app = require "demo_app" }
  init_worker_by_lua_block { app.init_worker() }

  server {
    listen 127.0.0.1:$port reuseport;
    location = /upstream { content_by_lua_block { app.upstream() } }
    location = /without  { content_by_lua_block { app.without() } }
    location = /with     { content_by_lua_block { app.with() } }
    location = /with_shm { content_by_lua_block { app.with_shm() } }
    location = /stampede { content_by_lua_block { app.stampede() } }
    location = /stats    { content_by_lua_block { app.stats() } }
    location = /reset    { content_by_lua_block { app.reset() } }
  }
}
EOF

"$NGINX" -p "$prefix/" -c conf/nginx.conf -e logs/error.log || {
  cat "$prefix/logs/error.log" >&2; exit 1; }

get() { curl -s --max-time 5 "http://127.0.0.1:$port$1"; }

i=0
until get /stats >/dev/null; do
  i=$((i + 1))
  [ $i -lt 50 ] || { echo "demo: nginx does not answer" >&2; exit 1; }
  sleep 0.1
done

# idle: waits (10 s at most) until the upstream has no call left, so that
# one run's queue doesn't slow the next
idle() {
  i=0
  while [ "$(get /stats | sed -n 's/^upstream_busy=//p')" != 0 ] && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
  done
}

# run PATH: wrk against PATH; leaves wrk's report in $prefix/PATH.wrk and
# the upstream calls in $prefix/PATH.calls
run() {
  get /reset >/dev/null
  wrk -t2 -c"$CLIENTS" -d"${DURATION}s" --timeout 10s --latency \
    "http://127.0.0.1:$port$1?key=hot" >"$prefix/$1.wrk" 2>&1
  idle
  get /stats | sed -n 's/^upstream_calls=//p' >"$prefix/$1.calls"
}

echo "singleflight demo: a stampede on one key, OpenResty $("$NGINX" -v 2>&1 | sed 's/.*: //'), $WORKERS nginx worker(s)"
echo "  upstream: ${UPSTREAM_MS} ms a call, ${UPSTREAM_SLOTS} calls at a time per worker (0: no limit)"
echo

if [ -n "$have_wrk" ]; then
echo "  load: $CLIENTS connections (wrk) for ${DURATION} s on one key"
echo "  running without singleflight..."
run /without
echo "  running with a singleflight group per worker..."
run /with
echo "  running with a singleflight group over a lua_shared_dict (shm)..."
run /with_shm
echo

# field FILE WHAT: one number out of a wrk report, latencies in ms
field() {
  awk -v what="$2" '
    function ms(s) {
      if (s ~ /us$/) return s / 1000
      if (s ~ /ms$/) return s + 0
      if (s ~ /m$/) return s * 60000
      if (s ~ /s$/) return s * 1000
      return s
    }
    what == "requests" && / requests in / { print $1 }
    what == "rps" && /^Requests\/sec:/ { printf "%d\n", $2 }
    what == "errors" && /Non-2xx or 3xx responses:/ { n += $5 }
    what == "errors" && /Socket errors:/ {
      gsub(",", ""); n += $4 + $6 + $8 + $10 }
    what ~ /%$/ && $1 == what { printf "%.1f ms\n", ms($2) }
    END { if (what == "errors") print n + 0 }
  ' "$1"
}

row() {
  printf "  %-16s %16s %16s %16s\n" "$1" "$2" "$3" "$4"
}
w="$prefix//without.wrk"; s="$prefix//with.wrk"; h="$prefix//with_shm.wrk"
row "" "without" "group per worker" "shm"
row "requests" "$(field "$w" requests)" "$(field "$s" requests)" "$(field "$h" requests)"
row "requests/s" "$(field "$w" rps)" "$(field "$s" rps)" "$(field "$h" rps)"
row "upstream calls" "$(cat "$prefix//without.calls")" "$(cat "$prefix//with.calls")" \
  "$(cat "$prefix//with_shm.calls")"
row "latency p50" "$(field "$w" 50%)" "$(field "$s" 50%)" "$(field "$h" 50%)"
row "latency p90" "$(field "$w" 90%)" "$(field "$s" 90%)" "$(field "$h" 90%)"
row "latency p99" "$(field "$w" 99%)" "$(field "$s" 99%)" "$(field "$h" 99%)"
row "errors" "$(field "$w" errors)" "$(field "$s" errors)" "$(field "$h" errors)"
echo
echo "  with singleflight, the requests that arrive while the upstream works on"
echo "  the key wait for that one call and share its answer: one call per worker"
echo "  with a group per worker, one for the whole instance with shm."
echo
else
  echo "  (wrk is not installed: the load runs are skipped)"
  echo
fi

if [ -n "$client" ]; then
  echo "  stampedes: $STAMPEDE requests at once on a fresh key, $STAMPEDES rounds each"
  $client tools/demo_stampede.lua "$port" "$STAMPEDE" "$STAMPEDES"
  echo
  echo "  per-worker groups run the upstream once per worker that got requests;"
  echo "  shm once for the instance, its waiters in the other workers answering"
  echo "  a few milliseconds after the upstream's answer."
fi
if grep -q "\[error\]" "$prefix/logs/error.log"; then
  echo "demo: nginx logged errors:" >&2
  grep "\[error\]" "$prefix/logs/error.log" | head -5 >&2
fi
