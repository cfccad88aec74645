--- The content handler of the test and bench nginx apps: a path that
-- `pattern` (default "^/(%w+)$") maps to a name goes to handlers[name],
-- with the request's arguments; any other path answers 404.
local ngx = rawget(_G, "ngx")

return function(handlers, pattern)
  pattern = pattern or "^/(%w+)$"
  return function()
    local name = ngx.var.uri:match(pattern)
    local h = name and handlers[name]
    if not h then
      return ngx.exit(404)
    end
    h(ngx.req.get_uri_args())
  end
end
