#!/bin/sh
# deps.sh PKG...: installs the Debian packages that are missing, as root.
missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "singleflight: missing Debian packages:$missing" >&2
  echo "  install them as root:  apt-get install$missing" >&2
  exit 1
fi
echo "singleflight: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends $missing >/dev/null || {
  echo "singleflight: apt-get install failed for:$missing" >&2
  exit 1
}
