-- Options are checked whole at new and group: an option that can't work
-- here is an error naming it, raised in the caller, and makes nothing.
-- Rows: { name, opts, ok, expected }: ok rows make a group; the others
-- raise "bad option '<expected[1]>' to 'new' (<expected[2]>...".
-- The OpenResty-only rows (redis) run inside nginx: spec/ngx_options.lua.
local singleflight = require "singleflight"

local function f() end

local function loads(name)
  return (pcall(require, name))
end

local in_openresty = rawget(_G, "ngx") ~= nil
local has_cqueues, has_copas = loads("cqueues"), loads("copas")

local rows = {
  -- backend by name: the scheduler it names must be there
  { "backend ngx outside OpenResty", { backend = "ngx" }, in_openresty,
    { "backend", "\"ngx\" needs OpenResty (ngx_lua)" } },
  { "backend cqueues", { backend = "cqueues" }, has_cqueues,
    { "backend", "\"cqueues\" needs the cqueues library: module 'cqueues' not found" } },
  { "backend copas", { backend = "copas" }, has_copas,
    { "backend", "\"copas\" needs the copas library: module 'copas' not found" } },
  { "backend coroutine", { backend = "coroutine" }, true },
  { "backend none", { backend = "none" }, true },
  { "backend auto", { backend = "auto" }, true },

  -- backend tables: the documented fields only, each of its type
  { "backend table, the least", { backend = { wait = f, wake = f } }, true },
  { "backend table, every field",
    { backend = { name = "mine", new = f, wait = f, wake = f, can_wait = f, spawn = f,
                  never_fails = false, loop = true, sleep = f } }, true },
  { "backend table, a misspelt field",
    { backend = { wait = f, wake = f, can_wiat = f } },
    false, { "backend", "unknown field \"can_wiat\"" } },
  { "backend table, a field of another scheduler",
    { backend = { wait = f, wake = f, signal = f } },
    false, { "backend", "unknown field \"signal\"" } },
  { "backend table, an array item", { backend = { f, wait = f, wake = f } },
    false, { "backend", "unknown field 1" } },
  { "backend table without wait", { backend = { wake = f } },
    false, { "backend", "field 'wait': function expected, got nil" } },
  { "backend table without wake", { backend = { wait = f } },
    false, { "backend", "field 'wake': function expected, got nil" } },
  { "backend table, wake a string", { backend = { wait = f, wake = "wake" } },
    false, { "backend", "field 'wake': function expected, got string" } },
  { "backend table, spawn a table", { backend = { wait = f, wake = f, spawn = {} } },
    false, { "backend", "field 'spawn': function expected, got table" } },
  { "backend table, name a number", { backend = { wait = f, wake = f, name = 1 } },
    false, { "backend", "field 'name': string expected, got number" } },
  { "backend table, never_fails a string",
    { backend = { wait = f, wake = f, never_fails = "yes" } },
    false, { "backend", "field 'never_fails': boolean expected, got string" } },
  { "backend table, loop a number", { backend = { wait = f, wake = f, loop = 1, sleep = f } },
    false, { "backend", "field 'loop': boolean expected, got number" } },
  { "backend table, loop without sleep", { backend = { wait = f, wake = f, loop = true } },
    false, { "backend", "field 'sleep': function expected, got nil (needed with 'loop')" } },

  -- on_timeout is about the timeout: without one it would never apply
  { "on_timeout run without timeout", { on_timeout = "run" },
    false, { "on_timeout", "needs the timeout option" } },
  { "on_timeout error without timeout", { backend = "coroutine", on_timeout = "error" },
    false, { "on_timeout", "needs the timeout option" } },
  { "on_timeout run with timeout", { timeout = 0.5, on_timeout = "run" }, true },
  { "on_timeout run with timeout 0", { timeout = 0, on_timeout = "run" }, true },
  { "on_timeout error with timeout", { timeout = 1, on_timeout = "error" }, true },
}

local function where(e)
  return (e:match("^([^\n]-:%d+): "))
end

describe("options checked at new", function()
  for _, row in ipairs(rows) do
    local name, opts, ok, expected = row[1], row[2], row[3], row[4]
    if ok then
      it(name .. ": accepted", function()
        local g = singleflight.new(opts)
        assert.is_userdata(g)
        assert.equal(true, (g:call("k", function() return true end)))
        g:close()
      end)
    else
      it(name .. ": an error naming the option, raised in the caller", function()
        local line = debug.getinfo(1, "l").currentline + 2
        local okn, e = pcall(function()
          local g = singleflight.new(opts) -- not a tail call: this line is blamed
          return g
        end)
        assert.is_false(okn)
        assert.is_string(e)
        assert.equal("16-options_spec.lua:" .. line, where(e):match("[^/]*$"))
        local want = "bad option '" .. expected[1] .. "' to 'new' (" .. expected[2]
        assert.equal(want, e:sub(#where(e) + 3, #where(e) + 2 + #want))
      end)
      it(name .. ": the same at group, which opens nothing", function()
        local gname = "16-options " .. name
        local okn, e = pcall(singleflight.group, gname, opts)
        assert.is_false(okn)
        assert.matches("bad option '" .. expected[1] .. "' to 'group' (" .. expected[2],
                       e, 1, true)
        -- nothing made: the name opens a fresh group, no call in flight
        local g = singleflight.group(gname, { backend = "none" })
        assert.same(0, g:stats().calls)
        g:close()
      end)
    end
  end

  it("a backend that failed to load is not left half-loaded", function()
    if has_copas then
      return -- nothing fails to load here
    end
    assert.has_error(function() singleflight.new { backend = "copas" } end)
    assert.is_nil(package.loaded["singleflight.backend.copas"])
    assert.is_nil(package.loaded.copas)
    -- and asking again gives the same answer, not a stale one
    local ok, e = pcall(singleflight.new, { backend = "copas" })
    assert.is_false(ok)
    assert.matches("\"copas\" needs the copas library", e, 1, true)
  end)
end)

describe("options inside OpenResty", function()
  local server = require "nginx_server"
  local found, why = server.find()
  local srv

  if not found then
    pending("a real nginx (" .. why .. ")")
    return
  end

  setup(function()
    srv = assert(server.start(60, {
      http = "lua_shared_dict sf16 1m;",
      servers = [[
        server {
          listen 127.0.0.1:@PORT2@;
          location / { content_by_lua_block { require("ngx_options").content() } }
        }]],
    }))
  end)

  teardown(function()
    if srv then
      srv.stop()
    end
  end)

  it("the shm tier refuses NaN keys and writes ±inf as every group does", function()
    local a = server.get(srv.ports[2], "/?keys=1")
    assert.equal(200, a.status)
    for _, method in ipairs { "call", "start", "forget" } do
      assert.matches("bad argument #1 to '" .. method .. "' (key is NaN)",
                     a.fields[method .. "_nan"], 1, true)
    end
    assert.matches("ngx_options%.lua:%d+: bad argument", a.fields.call_nan)
    assert.equal("1e9999", a.fields.inf)
    assert.equal("-1e9999", a.fields.ninf)
  end)

  for i, row in ipairs(require("ngx_options").rows) do
    local name, ok, expected = row[1], row[3], row[4]
    it(name, function()
      local a = server.get(srv.ports[2], "/?row=" .. i)
      assert.equal(200, a.status)
      if ok then
        assert.equal("true", a.fields.ok, a.body)
      else
        assert.equal("false", a.fields.ok, a.body)
        local want = "bad option '" .. expected[1] .. "' to 'new' (" .. expected[2]
        assert.truthy(a.fields.err:find(want, 1, true), a.fields.err)
        assert.matches("ngx_options%.lua:%d+: bad option", a.fields.err)
      end
    end)
  end
end)
