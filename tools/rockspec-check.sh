#!/bin/sh
# rockspec-check.sh: every rockspec installs what it says it does.
#
# The checkout's version (lua/singleflight/init.lua, csrc/lsf.h) is either a
# release X.Y.Z, whose rockspec rockspec/singleflight-X.Y.Z-N.rockspec is
# there, or X.Y.Z-dev, past every release. The scm rockspec builds every Lua
# module and C source of the tree; `luarocks make` of it installs the rock
# offline into a scratch tree, for Lua 5.4 and for LuaJIT, and the installed
# modules work and report the checkout's version.
#
# A release rockspec's source.tag is "vX.Y.Z" (luarocks fetches that commit),
# and it is installed from exactly that release: from the checkout when the
# checkout is that release (about to be tagged), else from the tag's tree
# (git archive) where this clone has the tag, its build table then checked
# against the tag's scm rockspec. Where neither is at hand (a clone without
# tags) the release's install is not checked, and this says so.
#
# luarocks' builtin type builds in the directory it runs from (csrc/*.o,
# singleflight/core.so): each install runs in a scratch copy of the sources,
# so that nothing is left in the tree for another Lua to pick up.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

scm=rockspec/singleflight-scm-1.rockspec
current=$(sed -n 's/^local VERSION = "\(.*\)"$/\1/p' lua/singleflight/init.lua)
c_version=$(sed -n 's/^#define LSF_VERSION "\(.*\)"$/\1/p' csrc/lsf.h)
if [ -z "$current" ] || [ "$current" != "$c_version" ]; then
  echo "rockspec: lua/singleflight/init.lua says version '$current'," \
       "csrc/lsf.h '$c_version' (sh tools/bump-version.sh sets both)" >&2
  exit 1
fi
releases=$(for f in rockspec/singleflight-[0-9]*-[0-9]*.rockspec; do
  [ -e "$f" ] && echo "$f"; done | sort -V)
# rockspec/singleflight-0.2.0-1.rockspec -> 0.2.0
version_of() { basename "$1" .rockspec | sed -e 's/^singleflight-//' -e 's/-[0-9]*$//'; }
newest=""
for rs in $releases; do newest=$(version_of "$rs"); done
case $current in
  *-dev)
    base=${current%-dev}
    if [ -n "$newest" ] && { [ "$base" = "$newest" ] ||
         [ "$(printf '%s\n%s\n' "$newest" "$base" | sort -V | tail -1)" != "$base" ]; }; then
      echo "rockspec: the checkout is $current, not past release $newest" >&2
      exit 1
    fi ;;
  *)
    if [ ! -e "rockspec/singleflight-$current-1.rockspec" ]; then
      echo "rockspec: the checkout is release $current, without" \
           "rockspec/singleflight-$current-1.rockspec (sh tools/bump-version.sh makes it)" >&2
      exit 1
    fi ;;
esac

for rs in "$scm" $releases; do
  luarocks lint "$rs" || { echo "rockspec: luarocks lint $rs failed" >&2; exit 1; }
done
lua5.4 tools/rockspec-compare.lua --covers "$scm" \
  $(find lua csrc -name '*.lua' -o -name '*.c' | sort)

copy() { # dir [tag]: the checkout (or the tag's tree) without build products
  mkdir -p "$1"
  if [ -n "$2" ]; then
    git archive "$2" | tar -xf - -C "$1"
  else
    tar -cf - --exclude=./.git --exclude=./build --exclude=./singleflight \
      --exclude='*.o' --exclude='*.so' . | tar -xf - -C "$1"
  fi
}

install() { # name rockspec lua-version tag-or-"" [luarocks arguments]
  name=$1 rs=$2 lv=$3 from=$4; shift 4
  copy "$scratch/src-$name" "$from"
  cp "$rs" "$scratch/src-$name/$rs"
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
run() { # rockspec version tag-or-"": installs and checks on 5.4 and LuaJIT
  tag=$(basename "$1" .rockspec)
  install "5.4-$tag" "$1" 5.4 "$3"
  check "5.4-$tag" lua5.4 5.4 "$1" "$2" || status=1
  install "jit-$tag" "$1" 5.1 "$3" LUA_INCDIR=/usr/include/luajit-2.1
  check "jit-$tag" luajit 5.1 "$1" "$2" || status=1
}

run "$scm" "$current" ""
for rs in $releases; do
  v=$(version_of "$rs")
  if [ "$v" = "$current" ]; then
    lua5.4 tools/rockspec-compare.lua "$scm" "$rs"
    run "$rs" "$v" ""
  elif git rev-parse -q --verify "refs/tags/v$v" >/dev/null 2>&1; then
    mkdir -p "$scratch/tag-$v"
    git archive "v$v" rockspec | tar -xf - -C "$scratch/tag-$v"
    lua5.4 tools/rockspec-compare.lua "$scratch/tag-$v/$scm" "$rs"
    run "$rs" "$v" "v$v"
  else
    lua5.4 tools/rockspec-compare.lua --tag-only "$rs"
    echo "rockspec: $rs: this clone has no tag v$v; its install is checked where it has"
  fi
done
exit $status
