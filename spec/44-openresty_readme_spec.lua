-- The README's OpenResty quick start, as written: its conf/nginx.conf and
-- lua/users.lua saved in a directory of their own, with only the lines the
-- README says to edit changed (the listen port: a free one; the rock's
-- paths: this checkout's lua/ and build/jit/), then its shell session run
-- command by command (the directory and port changed alike), each printing
-- what the README shows. A real nginx with two workers, started and
-- stopped by the README's own commands.
local ns = require "nginx_server"
local readme = require "readme_blocks"
local socket = require "socket"

local README_DIR = "/tmp/sf-quickstart"
local README_PORT = "127.0.0.1:8080"

--- s as a pattern that matches s alone.
local function literal(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local sh, quote, free_port = ns.sh, ns.quote, ns.free_port

--- text with every `old` replaced by `new`, which must occur `n` times.
local function edit(text, old, new, n, what)
  local out, count = text:gsub(literal(old), (new:gsub("%%", "%%%%")))
  assert(count == n, ("README.md's %s: %d times %q, not %d"):format(what, count, old, n))
  return out
end

--- Why the quick start can't run here, or nil.
local function unusable()
  local found, why = ns.find()
  if not found then
    return why
  end
  local conf = readme.block("nginx", "load_module")
  for path in conf:gmatch("load_module%s+([^;]+);") do
    local f = io.open(path, "rb")
    if not f then
      return "the README's load_module paths are Debian's; " .. path .. " is not here"
    end
    f:close()
  end
  if not sh("command -v curl >/dev/null && command -v timeout >/dev/null") then
    return "the curl and timeout commands are needed"
  end
  local _, uid = sh("id -u")
  if tonumber(uid) == 0 then
    -- started as root, nginx runs its workers as nobody
    local ok = sh("su -s /bin/sh nobody -c " .. quote(
      "test -r " .. quote(found.root .. "/lua/singleflight/init.lua")
      .. " && test -r " .. quote(found.root .. "/build/jit/singleflight/core.so")))
    if not ok then
      return "nginx's workers would run as nobody, who cannot read this checkout"
    end
  end
  return nil
end

local why = unusable()
if why then
  describe("the README's OpenResty quick start", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("the README's OpenResty quick start", function()
  local dir, port, root

  --- The README's shell line, in this spec's directory and on its port.
  local function here(line)
    return (line:gsub(literal(README_DIR), dir)
                :gsub(literal(README_PORT), "127.0.0.1:" .. port))
  end

  local function pid()
    local f = io.open(dir .. "/logs/nginx.pid", "r")
    local p = f and tonumber(f:read("*l"))
    if f then
      f:close()
    end
    return p
  end

  setup(function()
    root = ns.find().root
    port = free_port()
    local ok, out = sh("mktemp -d /tmp/singleflight-readme.XXXXXX")
    dir = ok and out:match("(/tmp/singleflight%-readme%.%w+)")
    assert(dir, "mktemp failed: " .. out)
    assert(sh("chmod 755 " .. quote(dir))) -- for workers that run as nobody
  end)

  teardown(function()
    local p = pid()
    if p and sh("kill -0 " .. p) then -- the spec failed before nginx quit
      sh("kill -TERM " .. p)
      local deadline = socket.gettime() + 5
      while sh("kill -0 " .. p) and socket.gettime() < deadline do
        socket.sleep(0.05)
      end
    end
    if dir then
      sh("rm -rf " .. quote(dir))
    end
  end)

  it("answers as the README shows, with one execution for five requests", function()
    -- the README's mkdir line makes the directories
    local text = readme.read("README.md")
    local mkdir = text:match("\n    (mkdir %-p " .. literal(README_DIR) .. "[^\n]*)\n")
    assert(mkdir, "README.md: no mkdir line for " .. README_DIR)
    assert(sh(here(mkdir)))

    -- the two files, at the paths their first lines name, with the lines
    -- the README says to edit changed
    local conf = readme.block("nginx", "load_module")
    conf = edit(conf, README_PORT, "127.0.0.1:" .. port, 1, "listen line")
    conf = edit(conf, "/usr/local/share/lua/5.1/", root .. "/lua/", 2, "lua_package_path")
    conf = edit(conf, "/usr/local/lib/lua/5.1/", root .. "/build/jit/", 1, "lua_package_cpath")
    local users = readme.block("lua", "-- lua/users.lua")
    for _, file in ipairs { conf, users } do
      local path = assert(file:match("^[#-]+ (%S+)\n"), "a file that names its path first")
      local f = assert(io.open(dir .. "/" .. path, "w"))
      f:write(file)
      f:close()
    end

    -- a hang guard: nginx goes away by itself if this run dies
    sh("(sleep 120; kill -QUIT $(cat " .. quote(dir .. "/logs/nginx.pid")
       .. " 2>/dev/null) 2>/dev/null) >/dev/null 2>&1 &")

    -- the session: each "$ command", then the lines it prints
    local session = readme.block("console", "$ nginx -p " .. README_DIR)
    local steps = {}
    for line in session:gmatch("([^\n]*)\n") do
      local cmd = line:match("^%$ (.*)$")
      if cmd then
        steps[#steps + 1] = { cmd = cmd, out = {} }
      elseif line ~= "" then
        assert(#steps > 0, "output before any command: " .. line)
        table.insert(steps[#steps].out, line)
      end
    end
    assert.is_true(#steps >= 4)
    local answered = 0
    for _, step in ipairs(steps) do
      -- stdout only: nginx says on stderr that it signalled itself
      local err = dir .. "/step.stderr"
      local ok, out = sh("(timeout 30 sh -c " .. quote(here(step.cmd))
                         .. " 2>" .. quote(err) .. ")")
      assert(ok, step.cmd .. " failed:\n" .. out .. readme.read(err))
      local got = {}
      for l in out:gmatch("[^\n]+") do
        got[#got + 1] = l
      end
      -- background requests answer in any order
      table.sort(got)
      table.sort(step.out)
      assert.same(step.out, got, step.cmd)
      answered = answered + #got
    end
    assert.is_true(answered >= 6)

    -- the last command stopped nginx
    local p = pid()
    local deadline = socket.gettime() + 10
    while p and sh("kill -0 " .. p) do
      assert(socket.gettime() < deadline, "nginx did not quit")
      socket.sleep(0.05)
    end
    local log = readme.read(dir .. "/logs/error.log")
    assert.is_nil(log:find("%[error%]") or log:find("%[alert%]") or log:find("%[emerg%]"), log)
  end)
end)
