#!/bin/sh
# rockspec-check.sh: `luarocks make` installs the rock offline into a
# scratch tree, for Lua 5.4 and for LuaJIT, and the installed module works.
set -e
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
rock=rockspec/singleflight-scm-1.rockspec
check() { # lua-binary lua-version
  eval "$(luarocks --lua-version "$2" --tree "$tree/$2" path)"
  "$1" -e 'local sf = require "singleflight"
    local v = sf.new():call("k", function() return 42 end)
    assert(v == 42)
    assert(package.searchpath("singleflight.core", package.cpath):find(os.getenv("TREE"), 1, true))
    print("rockspec: installed and loaded on " .. (rawget(_G, "jit") and jit.version or _VERSION))'
}
luarocks --lua-version 5.4 --tree "$tree/5.4" make "$rock" >"$tree/log54" 2>&1 ||
  { cat "$tree/log54"; exit 1; }
TREE="$tree/5.4" check lua5.4 5.4
luarocks --lua-version 5.1 --tree "$tree/5.1" make "$rock" \
  LUA_INCDIR=/usr/include/luajit-2.1 >"$tree/log51" 2>&1 ||
  { cat "$tree/log51"; exit 1; }
TREE="$tree/5.1" check luajit 5.1
