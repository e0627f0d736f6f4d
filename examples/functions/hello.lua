-- A serverless-style function: the config names this file as a route's handler
-- (handler = "functions/hello.lua", relative to the config's directory), and the file returns
-- the function that answers. It is loaded with the config, so `moongate reload` (or --watch)
-- picks up an edit; if the edit does not load, the old version keeps serving.
--
-- Top-level locals are set once per load and shared by every request of a worker; a hook
-- cannot create globals (they are locked once the file has loaded). Per-request state goes
-- in locals or req.ctx.

local greeting = "hello"

return function(req)
  local name = req.args.name                 -- ?name=Ada; a bare ?name gives true
  if name == nil or name == true then name = "world" end
  return 200, { message = greeting .. ", " .. name, request_id = req.id }
end
