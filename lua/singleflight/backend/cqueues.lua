-- singleflight backend "cqueues": not available yet.
return {
  name = "cqueues",
  wait = function() end,
  wake = function() end,
  can_wait = function()
    return false, "the cqueues backend is not available"
  end,
}
