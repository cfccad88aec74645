-- Shared helpers for the specs.
local helpers = {}
local unpack = table.unpack or unpack -- luacheck: ignore 143

--- Runs coroutines round-robin until all are dead or `limit` rounds pass.
-- Each entry of `fns` becomes a coroutine; errors are collected.
-- Returns the number of rounds and a table of errors by index.
function helpers.run_all(fns, limit)
  limit = limit or 100000
  local cos, errs = {}, {}
  for i, f in ipairs(fns) do
    cos[i] = coroutine.create(f)
  end
  local rounds = 0
  repeat
    local alive = false
    rounds = rounds + 1
    for i, co in ipairs(cos) do
      if coroutine.status(co) == "suspended" then
        local ok, e = coroutine.resume(co)
        if not ok then
          errs[i] = e
        end
        if coroutine.status(co) ~= "dead" then
          alive = true
        end
      end
    end
  until not alive or rounds >= limit
  assert(rounds < limit, "coroutines still alive after " .. limit .. " rounds")
  return rounds, errs
end

--- A scheduler helper: a table of coroutines you add to while running.
function helpers.scheduler()
  local s = { cos = {}, errs = {} }
  function s.spawn(f, ...)
    local args = { n = select("#", ...), ... }
    local co = coroutine.create(function() return f(unpack(args, 1, args.n)) end)
    s.cos[#s.cos + 1] = co
    return co
  end
  function s.run(limit)
    limit = limit or 100000
    local rounds = 0
    repeat
      local alive = false
      rounds = rounds + 1
      for i = 1, #s.cos do
        local co = s.cos[i]
        if co and coroutine.status(co) == "suspended" then
          local ok, e = coroutine.resume(co)
          if not ok then
            s.errs[#s.errs + 1] = e
          end
          if coroutine.status(co) ~= "dead" then
            alive = true
          end
        end
      end
    until not alive or rounds >= limit
    assert(rounds < limit, "coroutines still alive after " .. limit .. " rounds")
    return rounds
  end
  return s
end

helpers.unpack = unpack
helpers.lua51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")
helpers.lua54 = _VERSION == "Lua 5.4"

return helpers
