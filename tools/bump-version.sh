#!/bin/sh
# bump-version.sh VERSION: sets the version the checkout reports.
#
#   sh tools/bump-version.sh 0.3.0       prepares release 0.3.0
#   sh tools/bump-version.sh 0.3.1-dev   the checkout after it: no release
#
# Both write VERSION into lua/singleflight/init.lua and csrc/lsf.h (the Lua
# module checks that the C module it loads says the same). A release also
# gets rockspec/singleflight-VERSION-1.rockspec, the scm rockspec with its
# version and source.tag "vVERSION" (so that luarocks builds exactly the
# tagged commit), and CHANGELOG.md's Unreleased section becomes
# "## [VERSION] - <today>" under a new, empty Unreleased. Nothing is
# committed or tagged: see README.md, "Versions".
set -e
cd "$(dirname "$0")/.."

v=$1
if ! printf '%s\n' "$v" | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+(-dev)?$'; then
  echo "usage: sh tools/bump-version.sh X.Y.Z (a release) or X.Y.Z-dev (after one)" >&2
  exit 2
fi
release=$(printf '%s\n' "$v" | sed 's/-dev$//')

# The newest release with a rockspec: a new version goes past it.
last=$(for f in rockspec/singleflight-[0-9]*-[0-9]*.rockspec; do
  [ -e "$f" ] && basename "$f" .rockspec | sed -e 's/^singleflight-//' -e 's/-[0-9]*$//'
done | sort -V | tail -1)
if [ -n "$last" ]; then
  newest=$(printf '%s\n%s\n' "$last" "$release" | sort -V | tail -1)
  if [ "$release" = "$last" ] || [ "$newest" != "$release" ]; then
    echo "bump-version: $v does not come after release $last" >&2
    exit 1
  fi
fi

if [ "$release" = "$v" ]; then
  rs=rockspec/singleflight-$v-1.rockspec
  if ! grep -q '^## \[Unreleased\]' CHANGELOG.md; then
    echo "bump-version: CHANGELOG.md has no '## [Unreleased]' section" >&2
    exit 1
  fi
  sed -e "s/^version = \"scm-1\"$/version = \"$v-1\"/" \
      -e "s/^\(  url = \".*\",\)$/\1\n  tag = \"v$v\",/" \
      rockspec/singleflight-scm-1.rockspec >"$rs"
  if ! grep -q "^version = \"$v-1\"$" "$rs" || ! grep -q "^  tag = \"v$v\",$" "$rs"; then
    rm -f "$rs"
    echo "bump-version: rockspec/singleflight-scm-1.rockspec lacks the lines" \
         "'version = \"scm-1\"' and '  url = \"...\",' to make $rs from" >&2
    exit 1
  fi
  today=$(date -u +%Y-%m-%d)
  sed -i "s/^## \[Unreleased\]$/## [Unreleased]\n\n## [$v] - $today/" CHANGELOG.md
  echo "bump-version: wrote $rs; CHANGELOG.md: [$v] - $today"
fi

sed -i "s/^local VERSION = \".*\"$/local VERSION = \"$v\"/" lua/singleflight/init.lua
sed -i "s/^#define LSF_VERSION \".*\"$/#define LSF_VERSION \"$v\"/" csrc/lsf.h
grep -q "^local VERSION = \"$v\"$" lua/singleflight/init.lua
grep -q "^#define LSF_VERSION \"$v\"$" csrc/lsf.h
echo "bump-version: lua/singleflight/init.lua and csrc/lsf.h say $v"
