-- wrk script for the "API key + counter" scenario of `make bench`: GET /a, cycling through the
-- 100 valid keys in X-Api-Key. The requests are formatted once in init(), so request() only
-- picks the next one. The key list (KEYS_LIST between @ signs) is filled in by
-- scripts/bench.sh.
local keys = { @KEYS_LIST@ }
local reqs = {}
local n = 0

function init(args)
  for i, k in ipairs(keys) do
    reqs[i] = wrk.format("GET", "/a", { ["X-Api-Key"] = k })
  end
end

function request()
  n = n % #reqs + 1
  return reqs[n]
end
