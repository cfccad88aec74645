#!/bin/sh
# rockspec-check.sh: the release rockspec (the newest rockspec/singleflight-
# X.Y.Z-N.rockspec) has the scm rockspec's build table; `luarocks make` of
# each installs the rock offline into a scratch tree, for Lua 5.4 and for
# LuaJIT; the installed modules work, and the release's report its version.
#
# luarocks' builtin type builds in the directory it runs from (csrc/*.o,
# singleflight/core.so): each install runs in a scratch copy of the checkout,
# so that nothing is left in the tree for another Lua to pick up.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

scm=rockspec/singleflight-scm-1.rockspec
release=$(for f in rockspec/singleflight-[0-9]*-[0-9]*.rockspec; do
  [ -e "$f" ] && echo "$f"; done | sort -V | tail -1)
if [ -z "$release" ]; then
  echo "rockspec: no release rockspec (rockspec/singleflight-X.Y.Z-N.rockspec)" >&2
  exit 1
fi
# rockspec/singleflight-0.2.0-1.rockspec -> 0.2.0
version=$(basename "$release" .rockspec | sed -e 's/^singleflight-//' -e 's/-[0-9]*$//')

for rs in "$scm" "$release"; do
  luarocks lint "$rs" || { echo "rockspec: luarocks lint $rs failed" >&2; exit 1; }
done
lua5.4 tools/rockspec-compare.lua "$scm" "$release"

copy() { # dir: the checkout without .git and without build products
  mkdir -p "$1"
  tar -cf - --exclude=./.git --exclude=./build --exclude=./singleflight \
    --exclude='*.o' --exclude='*.so' . | tar -xf - -C "$1"
}

install() { # name rockspec lua-version [luarocks arguments]
  name=$1 rs=$2 lv=$3; shift 3
  copy "$scratch/src-$name"
  (cd "$scratch/src-$name" &&
    luarocks --lua-version "$lv" --tree "$scratch/$name" make "$rs" "$@") \
    >"$scratch/$name.log" 2>&1 || {
    cat "$scratch/$name.log"
    echo "rockspec: luarocks make $rs failed for Lua $lv" >&2
    exit 1
  }
}

check() { # name lua-binary lua-version rockspec [version the modules must report]
  (
    cd "$scratch"
    eval "$(luarocks --lua-version "$3" --tree "$scratch/$1" path)"
    TREE="$scratch/$1" ROCKSPEC="$4" WANT_VERSION="$5" "$2" -e '
      local tree, want = os.getenv("TREE"), os.getenv("WANT_VERSION")
      local sf = require "singleflight"
      local v = sf.new():call("k", function() return 42 end)
      assert(v == 42)
      for name, path in pairs { singleflight = package.path,
                                ["singleflight.core"] = package.cpath } do
        local file = package.searchpath(name, path)
        assert(file and file:find(tree, 1, true), name .. " is not from the tree: " ..
          tostring(file))
      end
      local what = (rawget(_G, "jit") and jit.version or _VERSION)
      if want ~= "" then
        local core, bad = require "singleflight.core", {}
        local function expect(name, got, wanted)
          if got ~= wanted then
            bad[#bad + 1] = string.format("require(%q)._VERSION is %s, want %q", name,
              type(got) == "string" and string.format("%q", got) or tostring(got), wanted)
          end
        end
        expect("singleflight", sf._VERSION, "singleflight " .. want)
        expect("singleflight.core", type(core) == "table" and core._VERSION, want)
        if #bad > 0 then
          io.stderr:write("rockspec: ", os.getenv("ROCKSPEC"), " on ", what, ":\n  ",
            table.concat(bad, "\n  "), "\n")
          os.exit(1)
        end
        what = what .. ", version " .. want
      end
      print("rockspec: " .. os.getenv("ROCKSPEC") .. " installed and loaded on " .. what)'
  )
}

status=0
for spec in "$scm" "$release"; do
  want=""
  [ "$spec" = "$release" ] && want=$version
  tag=$(basename "$spec" .rockspec)
  install "5.4-$tag" "$spec" 5.4
  check "5.4-$tag" lua5.4 5.4 "$spec" "$want" || status=1
  install "jit-$tag" "$spec" 5.1 LUA_INCDIR=/usr/include/luajit-2.1
  check "jit-$tag" luajit 5.1 "$spec" "$want" || status=1
done
exit $status
