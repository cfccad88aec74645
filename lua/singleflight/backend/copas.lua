-- singleflight backend "copas": not available yet.
return {
  name = "copas",
  wait = function() end,
  wake = function() end,
  can_wait = function()
    return false, "the copas backend is not available"
  end,
}
