--- The bench apps' content handler: /<name>?args goes to handlers[name],
-- with the request's arguments; any other path answers 404.
local ngx = rawget(_G, "ngx")

return function(handlers)
  return function()
    local name = ngx.var.uri:match("^/(%w+)$")
    local h = name and handlers[name]
    if not h then
      return ngx.exit(404)
    end
    h(ngx.req.get_uri_args())
  end
end
