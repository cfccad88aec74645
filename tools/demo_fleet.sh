#!/bin/sh
# demo_fleet.sh: the stampede across a fleet of nginx instances, with a
# group per instance (shm) and with the fleet's group (shm + redis).
#
# Starts a throwaway redis-server (no persistence) and INSTANCES nginx
# instances of WORKERS workers each, standing for as many machines, all on
# 127.0.0.1 and free ports, from a directory of their own (removed at the
# end, even on Ctrl-C). Each instance serves tools/demo_fleet_app.lua, whose
# origin takes ORIGIN_MS a call and counts its executions in Redis. Then
# STAMPEDES rounds of STAMPEDE requests at once on a fresh key, spread over
# the instances, run once through a group per instance and once through
# the fleet's group; the executions per stampede and the callers' latency
# are printed side by side (tools/demo_fleet_stampede.lua).
#
#   make demo-fleet STAMPEDE=200 STAMPEDES=3 ORIGIN_MS=100 INSTANCES=3 WORKERS=2
set -u

INSTANCES=${INSTANCES:-3}
WORKERS=${WORKERS:-2}
STAMPEDE=${STAMPEDE:-200}
STAMPEDES=${STAMPEDES:-3}
ORIGIN_MS=${ORIGIN_MS:-100}
NGINX=${NGINX:-/usr/sbin/nginx}
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}
ROOT=$(pwd)
BUILD=${BUILD:-build}
# the demo ends itself past this many seconds, whatever happens
LIFETIME=${LIFETIME:-300}

die() { echo "demo-fleet: $*" >&2; exit 1; }

moddir=""
for d in /usr/share/nginx/modules /usr/lib/nginx/modules; do
  [ -f "$d/ngx_http_lua_module.so" ] && [ -f "$d/ndk_http_module.so" ] && {
    moddir=$d; break; }
done
[ -x "$NGINX" ] || die "no nginx at $NGINX"
[ -n "$moddir" ] || die "libnginx-mod-http-lua is not installed"
[ -f /usr/share/lua/5.1/resty/core.lua ] || die "lua-resty-core is not installed"
[ -x "$REDIS_SERVER" ] || die "no redis-server at $REDIS_SERVER"
[ -f /usr/share/lua/5.1/nginx/redis.lua ] || [ -f /usr/share/lua/5.1/resty/redis.lua ] ||
  die "lua-resty-redis is not installed (Debian's lua-nginx-redis)"
[ -f "$BUILD/jit/singleflight/core.so" ] || die "$BUILD/jit/singleflight/core.so is missing"
client=""
for l in lua5.4 luajit lua5.3 lua5.1; do
  if $l -e 'require "socket"' >/dev/null 2>&1; then client=$l; break; fi
done
[ -n "$client" ] || die "no Lua with LuaSocket (lua-socket) is installed"
for v in "$INSTANCES" "$WORKERS" "$STAMPEDE" "$STAMPEDES" "$ORIGIN_MS" "$LIFETIME"; do
  case "$v" in
    "" | *[!0-9]*) die "INSTANCES, WORKERS, STAMPEDE, STAMPEDES, ORIGIN_MS and LIFETIME" \
                       "are whole numbers" ;;
  esac
done
[ "$INSTANCES" -ge 1 ] && [ "$INSTANCES" -le 16 ] || die "INSTANCES: 1 to 16"

dir=$(mktemp -d /tmp/singleflight-demo-fleet.XXXXXX) || exit 1

# alive PID: the process runs (a zombie that nobody reaps does not count)
alive() {
  kill -0 "$1" 2>/dev/null && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null
}

# stop_all: SIGTERM to the client, redis-server and every nginx master,
# then SIGKILL to what is left after 5 s; removes the directory.
stop_all() {
  pids=""
  for f in "$dir"/client.pid "$dir"/redis.pid "$dir"/i*/logs/nginx.pid; do
    [ -f "$f" ] && pids="$pids $(cat "$f" 2>/dev/null)"
  done
  for p in $pids; do kill -TERM "$p" 2>/dev/null; done
  i=0
  for p in $pids; do
    while alive "$p" && [ $i -lt 50 ]; do
      sleep 0.1; i=$((i + 1))
    done
  done
  for p in $pids; do
    if alive "$p"; then
      pkill -KILL -P "$p" 2>/dev/null # an nginx master's workers
      kill -KILL "$p" 2>/dev/null
    fi
  done
  rm -rf "$dir"
}

watchdog=""
cleanup() {
  [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
  stop_all
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# A watchdog: should this script die without its trap (SIGKILL), or run
# past LIFETIME seconds, it stops what the demo started.
(
  trap '' INT
  i=0
  while kill -0 $$ 2>/dev/null && [ $i -lt "$LIFETIME" ]; do
    sleep 1; i=$((i + 1))
  done
  if kill -0 $$ 2>/dev/null; then
    echo "demo-fleet: still running after $LIFETIME s, stopping it" >&2
    stop_all
    kill -TERM $$ 2>/dev/null
  else
    stop_all
  fi
) </dev/null >/dev/null &
watchdog=$!

free_port() {
  $client -e 'local s = assert(require("socket").bind("127.0.0.1", 0))
              local _, p = s:getsockname() print(p) s:close()'
}

# ---- redis-server

redis_port=$(free_port) || die "no free port"
"$REDIS_SERVER" --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
  --daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" \
  --logfile "$dir/redis.log" >/dev/null || die "redis-server did not start"
i=0
until [ -f "$dir/redis.pid" ] &&
      $client -e "local c = require('socket').connect('127.0.0.1', $redis_port)
                  if not c then os.exit(1) end
                  c:send('PING\r\n') c:settimeout(1)
                  os.exit(c:receive('*l') == '+PONG' and 0 or 1)" 2>/dev/null; do
  i=$((i + 1))
  [ $i -lt 100 ] || { cat "$dir/redis.log" >&2; die "redis-server does not answer"; }
  sleep 0.05
done

# ---- the nginx instances

ports=""
n=1
while [ $n -le "$INSTANCES" ]; do
  prefix="$dir/i$n"
  port=$(free_port) || die "no free port"
  mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp"
  cat >"$prefix/conf/nginx.conf" <<EOF
daemon on;
master_process on;
worker_processes $WORKERS;
pid logs/nginx.pid;
error_log logs/error.log warn;
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
  lua_shared_dict demo_instance 10m;
  lua_shared_dict demo_fleet 10m;

  init_by_lua_block {
    app = require "demo_fleet_app"
    app.init { name = "i$n", redis_port = $redis_port, origin_ms = $ORIGIN_MS }
  }
  init_worker_by_lua_block { app.init_worker() }

  server {
    listen 127.0.0.1:$port reuseport;
    location = /stampede   { content_by_lua_block { app.stampede() } }
    location = /executions { content_by_lua_block { app.executions() } }
  }
}
EOF
  "$NGINX" -p "$prefix/" -c conf/nginx.conf -e logs/error.log || {
    cat "$prefix/logs/error.log" >&2; die "nginx instance i$n did not start"; }
  i=0
  until curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$port/executions"; do
    i=$((i + 1))
    [ $i -lt 50 ] || die "nginx instance i$n does not answer"
    sleep 0.1
  done
  ports="$ports $port"
  n=$((n + 1))
done

echo "singleflight demo: a stampede across a fleet, OpenResty $("$NGINX" -v 2>&1 | sed 's/.*: //')," \
     "$("$REDIS_SERVER" --version | sed 's/^Redis server v=\([^ ]*\).*/Redis \1/')"
echo "  $INSTANCES nginx instances of $WORKERS workers (one per machine, say), one redis-server"
echo "  origin: ${ORIGIN_MS} ms a call, its executions counted in Redis (INCR)"
echo "  stampedes: $STAMPEDE requests at once on a fresh key, spread over the instances," \
     "$STAMPEDES rounds each"
echo

# in the background, so that Ctrl-C or the watchdog stop it at once
$client tools/demo_fleet_stampede.lua "$STAMPEDE" "$STAMPEDES" "$ORIGIN_MS" $ports &
echo $! >"$dir/client.pid"
wait $!
status=$?
rm -f "$dir/client.pid"
[ $status -lt 128 ] || exit $status

if [ $status = 0 ]; then
  echo
  echo "  a group per instance runs the origin once per instance (per machine);"
  echo "  with redis beside shm, once for the fleet: the other instances wait on"
  echo "  Redis's message and answer within a few milliseconds of the origin's end"
  echo "  (requests: the whole latency as the client saw it; those that arrive"
  echo "  while the origin already runs wait less than its ${ORIGIN_MS} ms)."
fi
for f in "$dir"/i*/logs/error.log; do
  if grep -q "\[error\]" "$f"; then
    echo "demo-fleet: nginx logged errors ($f):" >&2
    grep "\[error\]" "$f" | head -5 >&2
  fi
done
exit $status
