-- swr.lua: stale-while-revalidate over lua-resty-lrucache (the README's
-- recipe, as written there). A fresh entry is served from the worker's
-- cache; an expired one is served stale while one refresh per key runs in
-- the background, detached from the request; a miss waits for one load
-- shared by every caller of the key.
local lrucache = require "resty.lrucache"
local singleflight = require "singleflight"

local M = {}

local cache = assert(lrucache.new(10000))
local group = singleflight.new()

--- The value of key: load(key) gives it (or nil, err), fresh for ttl s.
function M.get(key, load, ttl)
  local value, stale = cache:get(key)
  if value ~= nil then
    return value
  end
  local function refresh()
    local fresh, err = load(key)
    if fresh ~= nil then
      cache:set(key, fresh, ttl)
    end
    return fresh, err
  end
  if stale ~= nil then
    group:start_detached(key, refresh) -- joins a refresh already running
    return stale
  end
  return group:call(key, refresh)
end

return M
