-- Aggregation endpoints and a serverless-style function (README "Aggregation tutorial").
--
--   build/moongate -c examples/aggregate.lua
--   curl -i localhost:8090/me/42/summary            three backends, one JSON answer
--   curl -i localhost:8090/me/7/summary             one backend too slow: a partial answer
--   curl -i localhost:8090/me/0/summary             a required backend failed: 502
--   curl -i localhost:8090/me/42/summary-by-hand    the same with mg.fetch_all
--   curl -i 'localhost:8090/hello?name=Ada'         the handler in functions/hello.lua
--   curl -s localhost:9180/status                   the admin API
--   build/moongate reload -c examples/aggregate.lua after editing functions/hello.lua
--
-- It is self-contained: the "backends" listener on 127.0.0.1:9002 plays three JSON services
-- (users, orders, recommendations) with small Lua handlers.

gateway {
  workers = 2,
  pid_file = "/tmp/moongate-aggregate.pid",   -- its own, so it can run beside gateway.lua
}

listen { port = 8090 }                                    -- the public listener
listen "backends" { port = 9002, host = "127.0.0.1" }     -- the fake services
admin { port = 9180 }                                     -- GET /status, POST /reload

upstream "users"  { "127.0.0.1:9002" }
upstream "orders" { "127.0.0.1:9002", timeout = "2s" }
upstream "recs"   { "127.0.0.1:9002" }

---------------------------------------------------------------------------------------------
-- The aggregation endpoint with mg.aggregate: the three calls run in parallel; each answer's
-- JSON goes under its key. A backend that fails (error, timeout, non-2xx, not JSON) becomes
-- null and an entry in `_errors`, and the answer carries X-Moongate-Completed: false; when a
-- `required` backend fails (or all of them do), the answer is a 502.
---------------------------------------------------------------------------------------------

route "GET /me/:id/summary" {
  handler = function(req)
    local id = req.params.id
    return mg.aggregate {
      { "users",  "/users/" .. id, key = "user", required = true },
      { "orders", { path = "/orders", query = { user = id } }, key = "orders",
        transform = function(orders) return mg.aggregate.pick(orders, { "id", "total" }) end },
      { "recs",   "/recommendations/" .. id, key = "recommendations", timeout = 0.5 },
      timeout = 1,                                  -- the whole fetch
    }
  end,
}

---------------------------------------------------------------------------------------------
-- The same by hand with mg.fetch_all: one result per call (nil when the call failed), then a
-- table { [index] = "error" } of the calls that failed. A non-2xx answer is a result, not an
-- error: check res.status.
---------------------------------------------------------------------------------------------

local function json_of(res)
  if res and res.status == 200 and res.json ~= nil then return res.json end
  return mg.json.null
end

route "GET /me/:id/summary-by-hand" {
  handler = function(req)
    local id = req.params.id
    local user, orders, recs, errs = mg.fetch_all {
      { "users",  "/users/" .. id },
      { "orders", "/orders?user=" .. id },
      { "recs",   "/recommendations/" .. id, timeout = 0.5 },
      timeout = 1,
    }
    if not user or user.status ~= 200 then
      return 502, { error = "users failed", detail = errs[1] or ("status " .. user.status) }
    end
    local doc = {
      user = user.json,
      orders = json_of(orders),
      recommendations = json_of(recs),
    }
    local complete = doc.orders ~= mg.json.null and doc.recommendations ~= mg.json.null
    return 200, doc, { ["X-Moongate-Completed"] = tostring(complete) }
  end,
}

---------------------------------------------------------------------------------------------
-- A serverless-style function: the handler is a file next to this config.
---------------------------------------------------------------------------------------------

route "GET /hello" { handler = "functions/hello.lua" }

---------------------------------------------------------------------------------------------
-- The fake backends (served only on the "backends" listener).
---------------------------------------------------------------------------------------------

route "GET /users/:id" {
  listen = "backends",
  handler = function(req)
    if req.params.id == "0" then return 404, { error = "no such user" } end
    return 200, { id = tonumber(req.params.id), name = "Ada Lovelace", plan = "gold" }
  end,
}

route "GET /orders" {
  listen = "backends",
  handler = function(req)
    return 200, {
      { id = 101, user = tonumber(req.args.user), total = 25.5, status = "shipped" },
      { id = 102, user = tonumber(req.args.user), total = 9.99, status = "pending" },
    }
  end,
}

route "GET /recommendations/:id" {
  listen = "backends",
  handler = function(req)
    if req.params.id == "7" then mg.sleep(2) end    -- user 7's recommendations are slow
    return 200, { "The Analytical Engine", "Notes on the Bernoulli numbers" }
  end,
}
