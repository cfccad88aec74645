-- singleflight backend "ngx": not available yet.
return {
  name = "ngx",
  wait = function() end,
  wake = function() end,
  can_wait = function()
    return false, "the ngx backend is not available"
  end,
}
