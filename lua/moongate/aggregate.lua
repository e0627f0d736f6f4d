-- moongate.aggregate: `mg.aggregate`, the helpers that turn the answers of several backends
-- into one JSON document, so that an aggregation endpoint is a handful of lines:
--
--   route "GET /me/summary" {
--     handler = function(req)
--       local id = req.consumer.id
--       return mg.aggregate {
--         { "users",   "/users/" .. id,             key = "user" },
--         { "orders",  "/orders?user=" .. id,       key = "orders", timeout = 0.5,
--           transform = function(orders) return mg.aggregate.pick(orders, { "id", "total" }) end },
--         { "reviews", "/reviews?user=" .. id,      key = "reviews", required = true },
--         timeout = 1,
--       }
--     end,
--   }
--
-- This file is trusted code, embedded in the binary (src/mg_lua_aggregate.c), but it runs in
-- the sandboxed VM like a user's script: only base, string, table, math and mg.json. It keeps
-- no state between calls.
--
-- Conventions shared by every helper:
--   * Inputs are never modified: every helper returns new tables. Values that are copied
--     whole (a nested object kept as it is) are shared with the input, not deep-copied.
--   * An "array" is a table that carries mg.json.array_mt (every array mg.json.decode makes)
--     or has a first element t[1]; any other table is an "object". Every array a helper
--     builds carries mg.json.array_mt, so an empty one still encodes as [] (not {}).
--   * nil and mg.json.null stand for missing data (a failed backend's slot): merge and
--     concat skip them, group and index give {}, flatten gives [], pick and drop return
--     them unchanged. A wrong argument otherwise (a number where a list of fields belongs,
--     an array given to merge) is a programming error and raises error() naming the helper.
--   * A field is a name or a dotted path ("profile.email") that walks nested objects. A path
--     does not walk into arrays (pick the array itself instead), and a name that contains a
--     dot cannot be addressed.
--
-- Helpers:
--
--   merge(a, b, ...) -> object
--     Shallow merge into a new object; later arguments win, key by key (a key set to
--     mg.json.null in a later argument overwrites: null is a value). nil / null arguments
--     are skipped; an array argument raises.
--       merge({ id = 7, name = "Ada" }, { name = "Ada L." }, nil)  --> { id = 7, name = "Ada L." }
--
--   merge_deep(a, b, ...) -> object
--     Like merge, but where both sides hold an object under the same key, the two objects
--     are merged recursively. Arrays (and every other value) are replaced, never merged.
--       merge_deep({ p = { a = 1, l = { 1, 2 } } }, { p = { b = 2, l = { 3 } } })
--         --> { p = { a = 1, b = 2, l = { 3 } } }
--
--   pick(value, fields) -> value
--     Keeps only FIELDS (a list of names or dotted paths) of an object; on an array, does
--     so for each element (elements that are not objects stay as they are). Fields that are
--     missing are left out (not set to null); a field whose value is null is kept.
--       pick(user, { "id", "profile.email" })  --> { id = 7, profile = { email = "a@x" } }
--       pick(orders, { "id", "total" })        --> { { id = 101, total = 25.5 }, ... }
--
--   drop(value, fields) -> value
--     The reverse: a copy without FIELDS; on an array, for each element.
--       drop(user, { "profile.city", "roles" })
--
--   group(array, field[, missing]) -> object of arrays
--     Groups the elements by the value of FIELD, in their order. The key is the value as a
--     string: strings as they are, booleans "true"/"false", integers without a decimal
--     point (up to 2^53, so ids print exactly), other numbers as tostring does. Elements
--     whose field is missing, null, an object or an array (and elements that are not
--     objects) go under the key MISSING, "_none" by default; pass false to leave them out.
--       group(orders, "status")  --> { shipped = { {...}, {...} }, pending = { {...} } }
--
--   index(array, field) -> object
--     The elements keyed by FIELD (the key as in group); when two share a key the last wins.
--     Elements without a usable key are left out.
--       index(users, "id")  --> { ["7"] = { id = 7, ... }, ["8"] = { id = 8, ... } }
--
--   flatten(array_of_arrays) -> array
--     One level: the elements of each element that is an array, in order. null elements are
--     skipped; any other element is kept as one element.
--       flatten({ { 1, 2 }, mg.json.null, { 3 }, 4 })  --> { 1, 2, 3, 4 }
--
--   concat(a, b, ...) -> array
--     The elements of the array arguments in order; nil / null arguments are skipped and any
--     other argument raises.
--
--   run(spec) -> status, document, headers      (also mg.aggregate(spec))
--     Calls the backends in parallel through mg.fetch_all and combines their JSON bodies.
--     SPEC is a list of calls plus options:
--       { target, path_or_opts,             -- as for mg.fetch: an upstream name or a URL,
--                                           -- then a path or a table of options
--         key = "users",                    -- where the result goes (default: the target,
--                                           -- when that is a plain upstream name); unique
--         timeout = 0.5,                    -- seconds, this call (optional)
--         required = true,                  -- no answer without it (see below)
--         transform = function(json, res) return ... end },  -- reshapes a success; what
--                                           -- it returns replaces the JSON (nil -> null)
--       timeout = 2,                        -- seconds, the whole fetch (optional)
--       merge = "nest" | "merge",           -- nest (default): document[key] = the JSON;
--                                           -- merge: the JSON objects shallow-merged in call
--                                           -- order (later keys win)
--     In nest mode a call without transform puts mg.json.raw(res.body) under its key: the
--     backend's document, checked, is written out as it came, never turned into tables.
--     A backend fails when the call failed (its error: "timeout", "connection refused", ...),
--     when its status is not 2xx ("status 503"), when its body is not JSON
--     ("invalid JSON: " .. res.json_error), or, with merge = "merge", when its JSON (after
--     transform) is not an object ("not a JSON object"). Its key then holds mg.json.null
--     (nest) and the document gets an array `_errors`, in call order, of
--       { backend = key, target = target, error = "timeout" }
--     `_errors` is there only when something failed. The status and headers:
--       * every backend succeeded: 200, X-Moongate-Completed: true.
--       * some backends failed, none of them required, and at least one succeeded: 200, the
--         document with what there is, X-Moongate-Completed: false (a partial answer).
--       * a required backend failed, or every backend failed: 502 with the
--         gateway's error shape plus the list, X-Moongate-Completed: false:
--           { error = 'backend "users" failed' | "every backend failed", status = 502,
--             request_id = the request's id (as in X-Request-Id),
--             _errors = { ... } }
--     So an answer is partial by default: mark required what the page cannot live without. A spec with no calls answers 200 and an empty object. A mistake in SPEC (a
--     missing target, a duplicate key, an unknown merge mode) raises before anything is
--     fetched; an error raised by a transform propagates (it is a bug in the script).
--
-- There is no `nest` helper: run's default mode nests, and for values already in hand a
-- table constructor ({ user = u, orders = o }) says it best.

local M = {}

local type, pairs, ipairs, next, select, tostring = type, pairs, ipairs, next, select, tostring
local getmetatable = getmetatable
local error, getmetatable, setmetatable, rawget = error, getmetatable, setmetatable, rawget
local floor = math.floor
local format, find, sub = string.format, string.find, string.sub

local json = mg.json
local null, array_mt, raw = json.null, json.array_mt, json.raw

local MAX_EXACT = 2 ^ 53

---------------------------------------------------------------------------------------------
-- Shapes
---------------------------------------------------------------------------------------------

-- Whether V stands for missing data.
local function is_missing(v)
  return v == nil or v == null
end

-- Whether T (a table) is an array: marked by mg.json, or with a first element.
local function is_array(t)
  return getmetatable(t) == array_mt or rawget(t, 1) ~= nil
end

local function is_object(v)
  return type(v) == "table" and not is_array(v)
end

-- A new empty array, marked so that it encodes as [] while empty.
local function new_array()
  return setmetatable({}, array_mt)
end

-- A shallow copy of T that keeps its array mark, if any.
local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  if getmetatable(t) == array_mt then setmetatable(out, array_mt) end
  return out
end

-- What V is, for error messages.
local function kind(v)
  if v == null then return "null" end
  if type(v) == "table" then return is_array(v) and "array" or "object" end
  return type(v)
end

---------------------------------------------------------------------------------------------
-- Fields and keys
---------------------------------------------------------------------------------------------

-- Splits "a.b.c" into { "a", "b", "c" }.
local function split(path)
  local segs, start = {}, 1
  while true do
    local dot = find(path, ".", start, true)
    if not dot then
      segs[#segs + 1] = sub(path, start)
      return segs
    end
    segs[#segs + 1] = sub(path, start, dot - 1)
    start = dot + 1
  end
end

-- Checks FIELDS (a list of names or dotted paths) for helper FN and splits each once.
local function split_all(fn, fields)
  if type(fields) ~= "table" then
    error(format("%s: fields must be a list of names, got %s", fn, kind(fields)), 3)
  end
  local out = {}
  for i, f in ipairs(fields) do
    if type(f) ~= "string" or f == "" then
      error(format("%s: field #%d must be a non-empty string, got %s", fn, i, kind(f)), 3)
    end
    out[i] = split(f)
  end
  return out
end

-- The value at the path SEGS in OBJ, or nil. Only tables are walked, so a string's methods
-- are never mistaken for fields.
local function get(obj, segs)
  local v = obj
  for i = 1, #segs do
    if type(v) ~= "table" then return nil end
    v = v[segs[i]]
  end
  return v
end

-- The key a field value is grouped and indexed under, or nil when it has none.
local function key_of(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    if v == floor(v) and v >= -MAX_EXACT and v <= MAX_EXACT then return format("%d", v) end
    return tostring(v)
  end
  if t == "userdata" and getmetatable(v) == "bigint" then return tostring(v) end  -- mg.json
  return nil
end

-- Checks the array argument of helper FN: nil / null count as empty, objects raise.
local function check_array(fn, t)
  if is_missing(t) then return {} end
  if type(t) ~= "table" or (not is_array(t) and next(t) ~= nil) then
    error(format("%s: bad argument #1 (array expected, got %s)", fn, kind(t)), 3)
  end
  return t
end

---------------------------------------------------------------------------------------------
-- Merging
---------------------------------------------------------------------------------------------

-- Checks the object arguments of helper FN (all of ..., N of them).
local function check_objects(fn, n, ...)
  for i = 1, n do
    local v = select(i, ...)
    if not is_missing(v) and not is_object(v) then
      error(format("%s: bad argument #%d (object expected, got %s)", fn, i, kind(v)), 3)
    end
  end
end

function M.merge(...)
  local n = select("#", ...)
  check_objects("merge", n, ...)
  local out = {}
  for i = 1, n do
    local src = select(i, ...)
    if not is_missing(src) then
      for k, v in pairs(src) do out[k] = v end
    end
  end
  return out
end

-- Merges SRC into DST (a table this call made, so it may be written), recursing where both
-- hold an object. MADE holds the tables this call made; any other nested object is the
-- input's and is copied before it is written to.
local function merge_into(dst, src, made)
  for k, v in pairs(src) do
    local cur = dst[k]
    if is_object(cur) and is_object(v) then
      if not made[cur] then
        cur = copy(cur)
        made[cur] = true
        dst[k] = cur
      end
      merge_into(cur, v, made)
    else
      dst[k] = v
    end
  end
end

function M.merge_deep(...)
  local n = select("#", ...)
  check_objects("merge_deep", n, ...)
  local out, made = {}, {}
  for i = 1, n do
    local src = select(i, ...)
    if not is_missing(src) then merge_into(out, src, made) end
  end
  return out
end

---------------------------------------------------------------------------------------------
-- Picking and dropping fields
---------------------------------------------------------------------------------------------

-- Applies FN(element, paths) to OBJ, or to each element when OBJ is an array.
local function each(obj, paths, fn)
  if type(obj) ~= "table" then return obj end
  if not is_array(obj) then return fn(obj, paths) end
  local out = new_array()
  for i = 1, #obj do out[i] = fn(obj[i], paths) end
  return out
end

local function pick_one(obj, paths)
  if not is_object(obj) then return obj end
  local out = {}
  -- The tables made here; any other table in OUT is the input's, kept whole.
  local made = {}
  for _, segs in ipairs(paths) do
    local v = get(obj, segs)
    if v ~= nil then
      local dst, n = out, #segs
      for i = 1, n - 1 do
        local d = dst[segs[i]]
        if d == nil then
          d = {}
          made[d] = true
          dst[segs[i]] = d
        elseif not made[d] then
          dst = nil -- an ancestor was picked whole: it holds this field already
          break
        end
        dst = d
      end
      if dst then dst[segs[n]] = v end
    end
  end
  return out
end

local function drop_one(obj, paths)
  if not is_object(obj) then return obj end
  local out = copy(obj)
  local made = { [out] = true }
  for _, segs in ipairs(paths) do
    local dst, n = out, #segs
    for i = 1, n - 1 do
      local d = dst[segs[i]]
      if type(d) ~= "table" or is_array(d) then
        dst = nil -- the path ends before its last name: nothing to drop
        break
      end
      if not made[d] then
        d = copy(d) -- copy on write, so the input keeps its field
        made[d] = true
        dst[segs[i]] = d
      end
      dst = d
    end
    if dst then dst[segs[n]] = nil end
  end
  return out
end

function M.pick(obj, fields)
  return each(obj, split_all("pick", fields), pick_one)
end

function M.drop(obj, fields)
  return each(obj, split_all("drop", fields), drop_one)
end

---------------------------------------------------------------------------------------------
-- Grouping, indexing, flattening
---------------------------------------------------------------------------------------------

-- Checks the FIELD argument of helper FN and splits it.
local function check_field(fn, field)
  if type(field) ~= "string" or field == "" then
    error(format("%s: bad argument #2 (field name expected, got %s)", fn, kind(field)), 3)
  end
  return split(field)
end

function M.group(array, field, missing)
  local t = check_array("group", array)
  local segs = check_field("group", field)
  if missing == nil then missing = "_none" end
  if missing ~= false and type(missing) ~= "string" then
    error(format("group: bad argument #3 (string or false expected, got %s)", kind(missing)), 2)
  end
  local out = {}
  for i = 1, #t do
    local el = t[i]
    local k = key_of(get(el, segs)) or missing
    if k then
      local g = out[k]
      if g == nil then
        g = new_array()
        out[k] = g
      end
      g[#g + 1] = el
    end
  end
  return out
end

function M.index(array, field)
  local t = check_array("index", array)
  local segs = check_field("index", field)
  local out = {}
  for i = 1, #t do
    local el = t[i]
    local k = key_of(get(el, segs))
    if k then out[k] = el end
  end
  return out
end

-- Appends the elements of array SRC to array OUT (whose length is N); returns the new length.
local function append(out, n, src)
  for i = 1, #src do out[n + i] = src[i] end
  return n + #src
end

function M.flatten(array)
  local t = check_array("flatten", array)
  local out, n = new_array(), 0
  for i = 1, #t do
    local el = t[i]
    if type(el) == "table" and is_array(el) then
      n = append(out, n, el)
    elseif el ~= null then
      n = n + 1
      out[n] = el
    end
  end
  return out
end

function M.concat(...)
  local count = select("#", ...)
  local out, n = new_array(), 0
  for i = 1, count do
    local a = select(i, ...)
    if not is_missing(a) then
      if type(a) ~= "table" or (not is_array(a) and next(a) ~= nil) then
        error(format("concat: bad argument #%d (array expected, got %s)", i, kind(a)), 2)
      end
      n = append(out, n, a)
    end
  end
  return out
end

---------------------------------------------------------------------------------------------
-- run: fetch in parallel, combine, report what failed
---------------------------------------------------------------------------------------------

local SPEC_FIELDS = { timeout = true, merge = true }
local CALL_FIELDS = { key = true, timeout = true, required = true, transform = true }

-- A mistake in the spec. check_spec raises it as a table, wherever it is found, and run
-- raises it again as a message at the position of the script's call.
local spec_mistake = {}

local function spec_error(fmt, ...)
  error(setmetatable({ "mg.aggregate: " .. format(fmt, ...) }, spec_mistake), 0)
end

-- "call #I: ", the start of a mistake's message (made only when there is one).
local function at(i)
  return format("call #%d: ", i)
end

-- Checks a timeout: the spec's (I nil) or call #I's.
local function check_timeout(v, i)
  if v ~= nil and (type(v) ~= "number" or not (v > 0)) then
    spec_error("%stimeout must be a positive number of seconds, got %s", i and at(i) or "", kind(v))
  end
end

-- Checks SPEC whole before anything is fetched; returns the calls' keys.
local function check_spec(spec)
  if type(spec) ~= "table" then spec_error("the spec must be a table, got %s", kind(spec)) end
  local ncalls = #spec
  for k in pairs(spec) do
    if not (SPEC_FIELDS[k] or (type(k) == "number" and k >= 1 and k <= ncalls and k == floor(k))) then
      spec_error("unknown field %s in the spec", tostring(k))
    end
  end
  check_timeout(spec.timeout)
  local mode = spec.merge
  if mode ~= nil and mode ~= "nest" and mode ~= "merge" then
    spec_error('merge must be "nest" or "merge", got %s', type(mode) == "string"
      and format("%q", mode) or kind(mode))
  end
  local keys, seen = {}, {}
  for i = 1, ncalls do
    local c = spec[i]
    if type(c) ~= "table" then spec_error("call #%d must be a table, got %s", i, kind(c)) end
    local target = c[1]
    if type(target) ~= "string" or target == "" then
      spec_error("%sthe target (first element) must be a non-empty string, got %s",
                 at(i), kind(target))
    end
    local p = c[2]
    if p ~= nil and type(p) ~= "string" and type(p) ~= "table" then
      spec_error("%sthe path (second element) must be a string or a table, got %s",
                 at(i), kind(p))
    end
    for k in pairs(c) do
      if not (k == 1 or k == 2 or CALL_FIELDS[k]) then
        spec_error("%sunknown field %s", at(i), type(k) == "string" and k or tostring(k))
      end
    end
    local key = c.key
    if key == nil then
      -- A URL (or anything with a slash or colon) makes a poor key: ask for one.
      if find(target, "[/:]") then
        spec_error("%sa key is needed (the target is not an upstream name)", at(i))
      end
      key = target
    elseif type(key) ~= "string" or key == "" then
      spec_error("%skey must be a non-empty string, got %s", at(i), kind(key))
    end
    if key == "_errors" then spec_error("%sthe key \"_errors\" is reserved", at(i)) end
    if seen[key] then spec_error('%sthe key "%s" is used twice', at(i), key) end
    seen[key] = true
    keys[i] = key
    check_timeout(c.timeout, i)
    if c.required ~= nil and type(c.required) ~= "boolean" then
      spec_error("%srequired must be a boolean, got %s", at(i), kind(c.required))
    end
    if c.transform ~= nil and type(c.transform) ~= "function" then
      spec_error("%stransform must be a function, got %s", at(i), kind(c.transform))
    end
  end
  return keys
end

-- The values fetch_all returned, with their count (trailing nils included).
local function pack(...)
  return { n = select("#", ...), ... }
end

-- The outcome of one call: the JSON value, or nil and why the backend counts as failed.
local function outcome(res, err, c, nest)
  if res == nil then return nil, type(err) == "string" and err or "failed" end
  local status = res.status
  if type(status) ~= "number" or status < 200 or status > 299 then
    return nil, "status " .. tostring(status)
  end
  if nest and not c.transform then
    -- Passed through as it came: checked like decode would, never turned into tables.
    local value, why = raw(res.body)
    if value == nil then return nil, "invalid JSON: " .. tostring(why) end
    return value
  end
  local value = res.json
  if value == nil then return nil, "invalid JSON: " .. tostring(res.json_error) end
  if c.transform then
    value = c.transform(value, res)
    if value == nil then value = null end
  end
  if not nest and not is_object(value) then return nil, "not a JSON object" end
  return value
end

-- The outcome of one call from mg_lua_fetch_raw_all's values (its status, then the raw value
-- or why the body is not JSON; ERR from the errors table): the same values and reasons as
-- outcome() gives in nest mode without transform.
local function raw_outcome(status, value, err)
  if status == nil then return nil, type(err) == "string" and err or "failed" end
  if status < 200 or status > 299 then return nil, "status " .. tostring(status) end
  if type(value) == "string" then return nil, "invalid JSON: " .. value end
  return value
end

local function completed(yes)
  return { ["X-Moongate-Completed"] = yes and "true" or "false" }
end

-- Called from M.run or the __call metamethod, which are called by the script: error level 3.
local function run(spec)
  local ok, keys = pcall(check_spec, spec)
  if not ok then
    if getmetatable(keys) == spec_mistake then error(keys[1], 3) end
    error(keys, 0) -- not ours (out of memory, the CPU budget): as it came
  end
  local nest = spec.merge ~= "merge"
  local ncalls = #spec
  if ncalls == 0 then return 200, {}, completed(true) end

  local fetch_all = mg.fetch_all
  if type(fetch_all) ~= "function" then error("mg.aggregate: mg.fetch_all is not available", 3) end
  local calls = { timeout = spec.timeout }
  for i = 1, ncalls do
    local c = spec[i]
    calls[i] = { c[1], c[2], timeout = c.timeout }
  end
  -- Nest mode without transforms passes every body through as checked JSON text: then
  -- mg_lua_fetch_raw_all (src/mg_lua_fetch.c) checks the bodies in C and makes no result
  -- tables. fetch_raw_for, put in this module's environment by src/mg_lua_aggregate.c,
  -- gives it only when mg.fetch_all is the gateway's own (not a stand-in, as in tests).
  local raw_fetch = nest and fetch_raw_for and fetch_raw_for(fetch_all)
  for i = 1, ncalls do
    if raw_fetch and spec[i].transform then raw_fetch = nil end
  end
  local results = pack((raw_fetch or fetch_all)(calls))
  local errs = results[raw_fetch and 2 * ncalls + 1 or ncalls + 1]
  if type(errs) ~= "table" then errs = {} end

  local doc, failures, nfailed, required_failed = {}, nil, 0, nil
  for i = 1, ncalls do
    local c, key = spec[i], keys[i]
    local value, why
    if raw_fetch then
      value, why = raw_outcome(results[2 * i - 1], results[2 * i], errs[i])
    else
      value, why = outcome(results[i], errs[i], c, nest)
    end
    if value == nil then
      nfailed = nfailed + 1
      failures = failures or new_array()
      failures[nfailed] = { backend = key, target = c[1], error = why }
      if c.required and not required_failed then required_failed = key end
      if nest then doc[key] = null end
    elseif nest then
      doc[key] = value
    else
      for k, v in pairs(value) do doc[k] = v end
    end
  end

  if nfailed == 0 then return 200, doc, completed(true) end
  if nfailed == ncalls or required_failed then
    local msg = nfailed == ncalls and "every backend failed"
      or format('backend "%s" failed', required_failed)
    -- The gateway's error shape; current_request_id is put in this module's environment by
    -- src/mg_lua_aggregate.c (absent where the module runs outside the gateway).
    local rid = current_request_id and current_request_id() or nil
    return 502, { error = msg, status = 502, request_id = rid, _errors = failures },
      completed(false)
  end
  doc._errors = failures
  return 200, doc, completed(false)
end

-- Not tail calls, so that the script's call stays at error level 3 from run.
function M.run(spec)
  local status, doc, headers = run(spec)
  return status, doc, headers
end

return setmetatable(M, {
  __call = function(_, spec)
    local status, doc, headers = run(spec)
    return status, doc, headers
  end,
})
