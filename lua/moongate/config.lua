-- moongate.config: evaluates a gateway config file and checks all of it.
--
-- The user's file runs in a minimal environment: the directives (gateway, limits, listen,
-- upstream, route), env() and a few safe basics. Nothing in it can open files, start
-- processes, load modules or bytecode. While the file runs, each directive only records what
-- it was given (a deep copy) and the line it was written on; once the file has run, every
-- declaration is checked against its schema and against the others (names, references,
-- duplicates, address clashes). Every problem is reported, one "file:line: message" each,
-- sorted by line, so that `moongate check` shows a user the whole list at once.
--
-- Hooks. Routes and the global `hooks { ... }` take Lua functions (or "file.lua" paths of
-- scripts that return one, relative to the config's directory; each such file gets its own
-- globals). They come back in the normalised config as lists of functions, the global ones
-- first, so the worker that evaluated the file can run them. After the file has run, its
-- globals are locked: a hook that assigns a global raises an error instead of sharing state
-- by accident.
--
-- This file runs inside moongate's Lua VM as trusted code (src/mg_lua_vm.c): HOST gives it
-- read_file (the only way in to the filesystem), the sandbox base (what user code sees as
-- its globals: mg, pcall, coroutine, ...), and the VM's CPU budget replaces a count hook.
--
-- load(display, abs, host) returns the normalised config (every default filled in, every value in
-- its final unit: bytes, seconds, plain names) that src/mg_config.c copies into the structs of
-- src/mg_config.h, or nil and the text of the errors. `display` is the path as the user wrote
-- it (used in messages), `abs` the absolute path (read, and recorded in the config).

local M = {}

local debug, jit, os, io, bit = debug, jit, os, io, bit
local type, pairs, ipairs, next, tostring, tonumber = type, pairs, ipairs, next, tostring, tonumber
local setmetatable, error, xpcall, load = setmetatable, error, xpcall, load
local floor, huge = math.floor, math.huge
local format, concat, sort = string.format, table.concat, table.sort

-- The user's file is loaded under the path the user typed (st.chunk = "=" .. st.short), so
-- hooks defined in it report errors with that name. Lua cuts chunk names at 60 bytes in
-- messages: a longer path is loaded as "..." and its tail, and load-time messages put the
-- whole path back.
local function chunk_name(display)
  if #display <= 55 then return display end
  return "..." .. display:sub(-52)
end

local INT_MAX = 2147483647
local MAX_SIZE = 2 ^ 53            -- sizes stay exact in a double and fit any size_t we meet
local MAX_DURATION = 1e9           -- about 31 years: anything larger is a typo
local MAX_STEPS = 100000           -- x STEP_EVERY VM instructions for the whole file
local STEP_EVERY = 1000
local MAX_PARAMS = 16              -- MG_ROUTER_MAX_PARAMS in src/mg_router.h

local DIRECTIVES = { "gateway", "limits", "listen", "upstream", "route", "env", "hooks",
                     "shared", "admin", "lua" }
local HOOKS = { "request", "access", "handler", "response", "log" }
local LOG_LEVELS = { "debug", "info", "warn", "error", "off" }
local METHODS = { "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT" }
local DEFAULT_REDACT = { "apikey", "token", "access_token" }

---------------------------------------------------------------------------------------------
-- Describing values in messages
---------------------------------------------------------------------------------------------

local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

-- A string as a user would write it in Lua, shortened when long.
local function quote(s)
  if #s > 60 then s = s:sub(1, 57) .. "..." end
  local q = s:gsub('[%c"\\]', function(c) return ESCAPES[c] or format("\\%d", c:byte()) end)
  return '"' .. q .. '"'
end

-- What a value is, for "got ..." in messages.
local function describe(v)
  local t = type(v)
  if t == "string" then return quote(v) end
  if t == "number" then
    if v ~= v then return "nan" end
    if v == floor(v) and v > -MAX_SIZE and v < MAX_SIZE then return format("%d", v) end
    return tostring(v)
  end
  if t == "boolean" then return tostring(v) end
  if t == "nil" then return "nothing" end
  return "a " .. t
end

-- A table key as it appears in messages: 'name' for identifiers, quoted or numbered otherwise.
local function keyname(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return "'" .. k .. "'" end
  if type(k) == "number" then return "[" .. describe(k) .. "]" end
  return describe(k)
end

-- Levenshtein distance, cut off above 2 (only near misses are worth suggesting).
local function distance(a, b)
  if #a - #b > 2 or #b - #a > 2 then return 3 end
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur, ca = { [0] = i }, a:byte(i)
    for j = 1, #b do
      local cost = ca == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

-- " (did you mean X?)" when WORD is a near miss of one of CANDIDATES, else "".
local function suggest(word, candidates, show)
  if type(word) ~= "string" or #word < 3 then return "" end
  local best, bestd
  for _, c in ipairs(candidates) do
    local d = distance(word:lower(), c:lower())
    if d <= 2 and (not bestd or d < bestd) then best, bestd = c, d end
  end
  if not best then return "" end
  return " (did you mean " .. (show or keyname)(best) .. "?)"
end

-- Replaces every plain occurrence of FROM in S by TO (no pattern characters involved).
local function replace_plain(s, from, to)
  local out, pos = {}, 1
  while true do
    local i, j = s:find(from, pos, true)
    if not i then break end
    out[#out + 1] = s:sub(pos, i - 1)
    out[#out + 1] = to
    pos = j + 1
  end
  out[#out + 1] = s:sub(pos)
  return concat(out)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, function(a, b)
    if type(a) == type(b) and (type(a) == "string" or type(a) == "number") then return a < b end
    return type(a) < type(b)
  end)
  return keys
end

---------------------------------------------------------------------------------------------
-- Units
---------------------------------------------------------------------------------------------

local SIZE_UNITS = { [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3 }
local DURATION_UNITS = { [""] = 1, ms = 0.001, s = 1, m = 60, h = 3600 }

-- Bytes from a number or a string "512", "16k", "1m", "1g" (k = 1024); nil when malformed.
function M.parse_size(v)
  local n
  if type(v) == "number" then
    n = v
  elseif type(v) == "string" then
    local digits, unit = v:match("^(%d+)([kKmMgG]?)$")
    if not digits then return nil end
    n = tonumber(digits) * SIZE_UNITS[unit:lower()]
  else
    return nil
  end
  if n ~= n or n < 0 or n ~= floor(n) or n > MAX_SIZE then return nil end
  return n
end

-- Seconds from a number or a string "250ms", "1.5s", "2m", "1h" ("10" = 10 s); nil when
-- malformed or negative.
function M.parse_duration(v)
  local n
  if type(v) == "number" then
    n = v
  elseif type(v) == "string" then
    local num, unit = v:match("^(%d+%.?%d*)(%a*)$")
    local mul = num and DURATION_UNITS[unit]
    if not mul then return nil end
    n = tonumber(num) * mul
  else
    return nil
  end
  if n ~= n or n < 0 or n > MAX_DURATION then return nil end
  return n
end

---------------------------------------------------------------------------------------------
-- JSON (for `respond` bodies given as tables)
---------------------------------------------------------------------------------------------

-- True when S is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
local function utf8_valid(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    if c < 0x80 then
      i = i + 1
    else
      local len, lo, hi
      if c >= 0xC2 and c <= 0xDF then len, lo, hi = 2, 0x80, 0xBF
      elseif c == 0xE0 then len, lo, hi = 3, 0xA0, 0xBF
      elseif c == 0xED then len, lo, hi = 3, 0x80, 0x9F
      elseif c >= 0xE1 and c <= 0xEF then len, lo, hi = 3, 0x80, 0xBF
      elseif c == 0xF0 then len, lo, hi = 4, 0x90, 0xBF
      elseif c >= 0xF1 and c <= 0xF3 then len, lo, hi = 4, 0x80, 0xBF
      elseif c == 0xF4 then len, lo, hi = 4, 0x80, 0x8F
      else return false end
      local c2 = s:byte(i + 1)
      if not c2 or c2 < lo or c2 > hi then return false end
      for k = i + 2, i + len - 1 do
        local ck = s:byte(k)
        if not ck or ck < 0x80 or ck > 0xBF then return false end
      end
      i = i + len
    end
  end
  return true
end

local JSON_ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                       ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

local function json_string(s)
  if not utf8_valid(s) then error("string " .. quote(s) .. " is not valid UTF-8", 0) end
  local q = s:gsub('[%c"\\]', function(c) return JSON_ESCAPES[c] or format("\\u%04x", c:byte()) end)
  return '"' .. q .. '"'
end

local function json_value(v, out, open, depth)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = json_string(v)
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then error("cannot encode " .. tostring(v) .. " as JSON", 0) end
    if v == floor(v) and v > -MAX_SIZE and v < MAX_SIZE then out[#out + 1] = format("%d", v)
    else
      -- The shortest form that reads back as the same double: 9.99, not 9.9900000000000002.
      local short = format("%.15g", v)
      out[#out + 1] = tonumber(short) == v and short or format("%.17g", v)
    end
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if open[v] then error("a table contains itself and cannot be encoded as JSON", 0) end
    if depth > 100 then error("tables are nested too deeply to encode as JSON", 0) end
    open[v] = true
    local count, maxn, strings = 0, 0, 0
    for k in pairs(v) do
      count = count + 1
      if type(k) == "string" then
        strings = strings + 1
      elseif type(k) == "number" and k >= 1 and k == floor(k) then
        if k > maxn then maxn = k end
      else
        error("a table key " .. describe(k) .. " cannot be encoded as JSON", 0)
      end
    end
    if count == 0 then
      out[#out + 1] = "{}"
    elseif strings == 0 then
      if maxn ~= count then error("an array with holes cannot be encoded as JSON", 0) end
      out[#out + 1] = "["
      for i = 1, maxn do
        if i > 1 then out[#out + 1] = "," end
        json_value(v[i], out, open, depth + 1)
      end
      out[#out + 1] = "]"
    elseif strings == count then
      out[#out + 1] = "{"
      for i, k in ipairs(sorted_keys(v)) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = json_string(k)
        out[#out + 1] = ":"
        json_value(v[k], out, open, depth + 1)
      end
      out[#out + 1] = "}"
    else
      error("a table with both array items and named keys cannot be encoded as JSON", 0)
    end
    open[v] = nil
  else
    error("cannot encode " .. describe(v) .. " as JSON", 0)
  end
end

-- Encodes V as compact JSON: tables with keys 1..n are arrays, tables with string keys are
-- objects (keys sorted, so the output is stable), {} is an empty object. Returns the text, or
-- nil and why it cannot be encoded.
function M.json_encode(v)
  local out = {}
  local ok, err = pcall(json_value, v, out, {}, 0)
  if not ok then return nil, err end
  return concat(out)
end

---------------------------------------------------------------------------------------------
-- Value checkers: each takes a value and returns the normalised value, or nil and the end
-- of a sentence that starts with the key ("port must be ...").
---------------------------------------------------------------------------------------------

local function integer(min, max)
  max = max or INT_MAX
  local want = max == INT_MAX and format("must be an integer >= %d", min)
                               or format("must be an integer in %d..%d", min, max)
  return function(v)
    if type(v) == "number" and v == floor(v) and v >= min and v <= max then return v end
    return nil, want
  end
end

local function size(min)
  min = min or 0
  return function(v)
    local n = M.parse_size(v)
    if not n then
      return nil, 'must be a size in bytes (a number, or a string like "512", "16k", "1m", "1g")'
    end
    if n < min then return nil, format("must be at least %d byte%s", min, min == 1 and "" or "s") end
    return n
  end
end

local function duration(positive)
  return function(v)
    local n = M.parse_duration(v)
    if not n then
      return nil, 'must be a duration (seconds, or a string like "250ms", "10s", "2m", "1h")'
    end
    if positive and n <= 0 then return nil, "must be longer than 0" end
    return n
  end
end

local function text(v)
  if type(v) ~= "string" or v == "" then return nil, "must be a non-empty string" end
  if v:find("%c") then return nil, "must not contain control characters" end
  return v
end

local function one_of(list)
  local set = {}
  for _, s in ipairs(list) do set[s] = true end
  local want = "must be one of " .. concat(list, ", ")
  return function(v)
    if set[v] then return v end
    return nil, want
  end
end

-- Names of listeners and upstreams: they appear in logs, metrics and the admin API.
local function name_ok(v)
  return type(v) == "string" and v:match("^[%w_.%-]+$") ~= nil and #v <= 128
end
local NAME_RULE = 'must be 1 to 128 letters, digits, "_", "-" or "."'

local function workers(v)
  if v == "auto" then return 0 end
  if type(v) == "number" and v == floor(v) and v >= 1 and v <= 1024 then return v end
  return nil, 'must be "auto" or an integer in 1..1024'
end

local function token_list(v)
  if type(v) ~= "table" then return nil, "must be a list of names" end
  local out, n = {}, 0
  for _ in pairs(v) do n = n + 1 end
  for i = 1, n do
    local s = v[i]
    if type(s) ~= "string" or not s:match("^[%w_.%-%[%]]+$") then
      return nil, "must be a list of names (letters, digits, _ - . [ ])"
    end
    out[i] = s
  end
  return out
end

local function ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, p in ipairs({ a, b, c, d }) do
    if #p > 3 or tonumber(p) > 255 then return false end
  end
  return true
end

local function ipv6(s)
  if #s > 45 or not s:find(":", 1, true) or not s:match("^[%x:.]+$") then return false end
  local head, tail = s, nil
  local i = s:find("::", 1, true)
  if i then
    if s:find("::", i + 1, true) then return false end
    head, tail = s:sub(1, i - 1), s:sub(i + 2)
  end
  local groups = 0
  local function count(part, last)
    if part == "" then return true end
    local pieces = {}
    for p in (part .. ":"):gmatch("([^:]*):") do pieces[#pieces + 1] = p end
    for k, p in ipairs(pieces) do
      if last and k == #pieces and p:find(".", 1, true) then
        if not ipv4(p) then return false end
        groups = groups + 2
      elseif p:match("^%x%x?%x?%x?$") then
        groups = groups + 1
      else
        return false
      end
    end
    return true
  end
  if not count(head, tail == nil) or (tail and not count(tail, true)) then return false end
  if tail then return groups <= 7 end
  return groups == 8
end

local function hostname(s)
  if #s == 0 or #s > 253 then return false end
  if s:match("^[%d.]+$") then return ipv4(s) end
  for label in (s .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 or not label:match("^[%w_%-]+$")
       or label:sub(1, 1) == "-" or label:sub(-1) == "-" then
      return false
    end
  end
  return true
end

-- A bind address: an IPv4 or IPv6 literal; "localhost" means 127.0.0.1.
local function bind_host(v)
  if v == "localhost" then return "127.0.0.1" end
  if type(v) == "string" then
    local inner = v:match("^%[(.*)%]$") or v
    if ipv4(inner) then return inner end
    if ipv6(inner) then return inner:lower() end
  end
  return nil, 'must be an IPv4 or IPv6 address, such as "0.0.0.0", "127.0.0.1" or "::"'
end

local function port_of(s)
  if not s:match("^%d+$") or #s > 5 then return nil end
  local p = tonumber(s)
  if p < 1 or p > 65535 then return nil end
  return p
end

-- "host:port" with host an IPv4 address, a DNS name or a [bracketed] IPv6 address.
local function parse_target(s)
  if s:find("://", 1, true) then return nil, "must be host:port, without a scheme" end
  local host, port = s:match("^%[([^%]]*)%]:([^:]*)$")
  if host then
    if not ipv6(host) then return nil, "must be host:port, with an IPv6 host in [brackets]" end
    host = host:lower()
  else
    host, port = s:match("^([^:]*):([^:]*)$")
    if not host then return nil, "must be host:port" end
    if not hostname(host) then return nil, "must be host:port, with a valid host name or address" end
  end
  local p = port_of(port)
  if not p then return nil, "must be host:port, with a port in 1..65535" end
  return { host = host, port = p }
end

local function show_addr(host, port)
  if host:find(":", 1, true) then return format("[%s]:%d", host, port) end
  return format("%s:%d", host, port)
end

---------------------------------------------------------------------------------------------
-- Error collection
---------------------------------------------------------------------------------------------

local State = {}
State.__index = State

local function new_state(display, abs)
  return setmetatable({ display = display, abs = abs, errors = {}, seq = 0, decls = {},
                        pending = {} }, State)
end

-- Records a problem at LINE (nil: the file as a whole). FMT never contains user text.
function State:error(line, fmt, ...)
  self.seq = self.seq + 1
  self.errors[#self.errors + 1] = { line = line, seq = self.seq, msg = format(fmt, ...) }
end

-- The current line in the user's file: the innermost frame that runs its code.
function State:user_line()
  for level = 2, 250 do
    local info = debug.getinfo(level, "Sl")
    if not info then return nil end
    if info.source == self.chunk then return info.currentline end
  end
  return nil
end

function State:text()
  sort(self.errors, function(a, b)
    local la, lb = a.line or 0, b.line or 0
    if la ~= lb then return la < lb end
    return a.seq < b.seq
  end)
  local lines = {}
  for i, e in ipairs(self.errors) do
    local msg = self.short == self.display and e.msg or replace_plain(e.msg, self.short, self.display)
    if e.line then
      lines[i] = format("%s:%d: %s", self.display, e.line, msg)
    else
      lines[i] = format("%s: %s", self.display, msg)
    end
  end
  return concat(lines, "\n") .. "\n"
end

---------------------------------------------------------------------------------------------
-- The environment the config file runs in
---------------------------------------------------------------------------------------------

-- A value that swallows calls and indexing, returned after a misuse has been reported so
-- that the rest of the file still runs and its problems are found too.
local absorber = setmetatable({}, {
  __call = function(self) return self end,
  __index = function(self) return self end,
})

-- A deep copy without metatables, so a table changed after its directive ran (or one that
-- plays tricks with __index) cannot change what was declared. Shared and cyclic sub-tables
-- stay shared and cyclic.
local function copy(v, seen)
  if type(v) ~= "table" then return v end
  if seen[v] then return seen[v] end
  local c = {}
  seen[v] = c
  local k, x = next(v)
  while k ~= nil do
    c[copy(k, seen)] = copy(x, seen)
    k, x = next(v, k)
  end
  return c
end

local function copy_lib(lib, skip)
  local c = {}
  for k, v in pairs(lib) do
    if not (skip and skip[k]) then c[k] = v end
  end
  return c
end

local BOOLEANS = { ["true"] = true, ["1"] = true, yes = true, on = true,
                   ["false"] = false, ["0"] = false, no = false, off = false }

local function make_env(st)
  local env = {}
  -- What hooks use at run time: mg, pcall, coroutine, ... (the sandbox's base).
  for k, v in pairs(st.host.sandbox) do env[k] = v end

  local function declare(kind, name, t, line)
    st.decls[#st.decls + 1] = { kind = kind, name = name, line = line, t = copy(t, {}) }
  end

  -- gateway { ... } and limits { ... }: a table, no name.
  local function plain(kind)
    return function(t)
      local line = st:user_line()
      if type(t) ~= "table" then
        st:error(line, "%s takes a table: %s { ... }, got %s", kind, kind, describe(t))
        return absorber
      end
      declare(kind, nil, t, line)
    end
  end

  -- listen / upstream / route: `kind "name" { ... }`; listen also takes a bare table.
  local function named(kind, usage, bare_ok)
    return function(a)
      local line = st:user_line()
      if type(a) == "table" and bare_ok then
        declare(kind, nil, a, line)
        return
      end
      if type(a) ~= "string" then
        st:error(line, "%s needs a name: %s, got %s", kind, usage, describe(a))
        return absorber
      end
      local pending = { kind = kind, name = a, line = line }
      st.pending[#st.pending + 1] = pending
      return function(t)
        pending.done = true
        if type(t) ~= "table" then
          st:error(line, "%s %s: expected a table after the name: %s, got %s",
                   kind, quote(a), usage, describe(t))
          return absorber
        end
        declare(kind, a, t, line)
      end
    end
  end

  env.gateway = plain("gateway")
  env.limits = plain("limits")
  env.listen = named("listen", 'listen { port = 8080 } or listen "name" { port = 8080 }', true)
  env.upstream = named("upstream", 'upstream "name" { "host:port", ... }')
  env.route = named("route", 'route "GET /path" { upstream = "name" }')
  env.hooks = plain("hooks")
  env.admin = plain("admin")
  env.lua = plain("lua")
  env.shared = named("shared", 'shared "name" { size = "1m" }')

  -- env("NAME", default): an environment variable; a number or boolean default converts it.
  env.env = function(name, default)
    local line = st:user_line()
    if type(name) ~= "string" or name == "" then
      st:error(line, "env: the variable name must be a non-empty string, got %s", describe(name))
      return default
    end
    local v = os.getenv(name)
    if v == nil then return default end
    if type(default) == "number" then
      local n = tonumber(v)
      if n == nil then
        st:error(line, "env: %s is %s, which is not a number", name, quote(v))
        return default
      end
      return n
    elseif type(default) == "boolean" then
      local b = BOOLEANS[v:lower()]
      if b == nil then
        st:error(line, "env: %s is %s, which is not true or false", name, quote(v))
        return default
      end
      return b
    end
    return v
  end

  env.os = copy_lib(st.host.sandbox.os or {})
  env.os.getenv = os.getenv

  local names = {}
  for _, d in ipairs(DIRECTIVES) do names[#names + 1] = d end
  setmetatable(env, {
    __index = function(_, k)
      st:error(st:user_line(), "unknown directive or variable %s%s", keyname(k), suggest(k, names))
      return absorber
    end,
  })
  return env
end

---------------------------------------------------------------------------------------------
-- Reading a declaration's settings
---------------------------------------------------------------------------------------------

-- Reports the keys of T that FIELDS does not list (integer keys too, unless POSITIONAL).
local function unknown_keys(st, d, t, fields, positional)
  local known, list = {}, {}
  for _, f in ipairs(fields) do known[f[1]] = true; list[#list + 1] = f[1] end
  for _, k in ipairs(sorted_keys(t)) do
    if type(k) == "number" then
      if not positional then
        st:error(d.line, "%s: unexpected value %s (settings are written name = value)",
                 d.ctx, describe(t[k]))
      end
    elseif not known[k] then
      st:error(d.line, "%s: unknown key %s%s", d.ctx, keyname(k), suggest(k, list))
    end
  end
end

-- Reads the settings FIELDS ({ key, checker, default = v, required = bool }) from T into a
-- new table, defaults filled in. A bad or missing value is reported and its key put in the
-- second table returned, so later checks can skip what is already known to be wrong.
local function read_fields(st, d, t, fields, positional)
  local out, bad = {}, {}
  for _, f in ipairs(fields) do
    local key, v = f[1], t[f[1]]
    if v == nil then
      if f.required then
        st:error(d.line, "%s: %s is required", d.ctx, key)
        bad[key] = true
      else
        out[key] = f.default
      end
    else
      local val, why = f[2](v)
      if val == nil then
        st:error(d.line, "%s: %s %s, got %s", d.ctx, key, why, describe(v))
        bad[key] = true
      else
        out[key] = val
      end
    end
  end
  unknown_keys(st, d, t, fields, positional)
  return out, bad
end

---------------------------------------------------------------------------------------------
-- Schemas
---------------------------------------------------------------------------------------------

local GATEWAY = {
  { "workers", workers, default = 0 },
  { "pid_file", text, default = "/tmp/moongate.pid" },
  { "drain_timeout", duration(false), default = 10 },
  { "error_log", text, default = "stderr" },
  { "log_level", one_of(LOG_LEVELS), default = "info" },
  { "access_log", text, default = "stdout" },
  { "redact_query", token_list, default = DEFAULT_REDACT },
}

local LIMITS = {
  { "header_bytes", size(1), default = 16 * 1024 },
  { "header_count", integer(1), default = 100 },
  { "uri_bytes", size(1), default = 8 * 1024 },
  { "body_bytes", size(0), default = 1024 * 1024 },
  { "chunk_ext_bytes", size(0), default = 4 * 1024 },
  { "header_timeout", duration(true), default = 10 },
  { "body_timeout", duration(true), default = 30 },
  { "keepalive_timeout", duration(false), default = 60 },
  { "keepalive_requests", integer(1), default = 1000 },
  { "send_timeout", duration(true), default = 60 },
  { "max_connections", integer(1), default = 10000 },
}

local LISTEN = {
  { "port", integer(1, 65535), required = true },
  { "host", bind_host, default = "0.0.0.0" },
  { "backlog", integer(1, 65535), default = 511 },
}

local UPSTREAM = {
  { "timeout", duration(true) },
  { "connect_timeout", duration(true), default = 5 },
  { "send_timeout", duration(true), default = 60 },
  { "read_timeout", duration(true), default = 60 },
  { "keepalive", integer(0), default = 32 },
  { "keepalive_timeout", duration(false), default = 60 },
  { "keepalive_requests", integer(1), default = 1000 },
  { "max_fails", integer(0), default = 3 },
  { "fail_timeout", duration(false), default = 10 },
  { "dns_ttl", duration(false), default = 30 },
}

local TARGET = { { "weight", integer(1) } }

-- Route settings are checked by hand (they depend on each other); this list names them for
-- unknown-key reports.
local ROUTE = {
  { "upstream" }, { "respond" }, { "listen" }, { "strip_prefix" }, { "rewrite" }, { "host" },
  { "host_header" }, { "name" }, { "max_body" }, { "access" }, { "handler" }, { "response" },
  { "log" },
}

local SHARED = { { "size", size(16 * 1024), required = true } }

local ADMIN = {
  { "port", integer(1, 65535), default = 9180 },
  { "host", bind_host, default = "127.0.0.1" },
  { "token", text },
}

local ALLOWABLE = { "os", "io", "debug", "ffi", "string.dump", "bytecode" }

local function allow_list(v)
  if type(v) ~= "table" then return nil, 'must be a list like { "os" }' end
  local known = {}
  for _, n in ipairs(ALLOWABLE) do known[n] = true end
  for k, x in pairs(v) do
    if type(k) ~= "number" or not known[x] then
      return nil, "may only name " .. concat(ALLOWABLE, ", ")
    end
  end
  return v
end

local LUA = {
  { "memory", size(4 * 1024 * 1024), default = 128 * 1024 * 1024 },
  { "budget", duration(true), default = 0.1 },
  { "allow", allow_list, default = {} },
}

local GLOBAL_HOOKS = { { "request" }, { "access" }, { "response" }, { "log" } }

local RESPOND = { { "status" }, { "body" }, { "headers" } }

---------------------------------------------------------------------------------------------
-- Checking declarations
---------------------------------------------------------------------------------------------

local function singleton(st, decls, kind, fields)
  local first
  for _, d in ipairs(decls) do
    if d.kind == kind then
      d.ctx = kind
      if first then
        st:error(d.line, "%s is declared twice (first at line %s)", kind, tostring(first.line))
      else
        first = d
      end
    end
  end
  if not first then return read_fields(st, { ctx = kind }, {}, fields) end
  return read_fields(st, first, first.t, fields)
end

local function check_gateway(st, decls)
  local g = singleton(st, decls, "gateway", GATEWAY)
  if g.access_log == "off" then g.access_log = nil end
  return g
end

local function overlap(a, b)
  if a.port ~= b.port then return false end
  if a.host == b.host or a.host == "::" or b.host == "::" then return true end
  local a6, b6 = a.host:find(":", 1, true) ~= nil, b.host:find(":", 1, true) ~= nil
  return a6 == b6 and (a.host == "0.0.0.0" or b.host == "0.0.0.0")
end

local function check_listens(st, decls)
  local out, by_name, default = {}, {}, nil
  for _, d in ipairs(decls) do
    if d.kind == "listen" then
      d.ctx = d.name and "listen " .. quote(d.name) or "listen"
      local l, bad = read_fields(st, d, d.t, LISTEN)
      l.name, l.line = d.name, d.line
      if d.name == nil then
        if default then
          st:error(d.line, "listen: a default listener is already declared at line %s " ..
                   '(name this one: listen "name" { ... })', tostring(default.line))
        else
          default = l
        end
      elseif by_name[d.name] then
        st:error(d.line, "%s: a listener of that name is already declared at line %s",
                 d.ctx, tostring(by_name[d.name].line))
      else
        if not name_ok(d.name) then st:error(d.line, "%s: the name %s", d.ctx, NAME_RULE) end
        -- Registered even when malformed, so routes that use it report nothing more.
        by_name[d.name] = l
      end
      if not (bad.port or bad.host) then
        for _, o in ipairs(out) do
          if overlap(l, o) then
            local here, there = show_addr(l.host, l.port), show_addr(o.host, o.port)
            if here == there then
              st:error(d.line, "%s: %s is already used by the listener at line %s",
                       d.ctx, here, tostring(o.line))
            else
              st:error(d.line, "%s: %s overlaps %s of the listener at line %s",
                       d.ctx, here, there, tostring(o.line))
            end
            break
          end
        end
        out[#out + 1] = l
      end
    end
  end
  return out, by_name, default
end

local function check_targets(st, d, t)
  local targets, seen = {}, {}
  for _, k in ipairs(sorted_keys(t)) do
    if type(k) == "number" then
      local v, spec = t[k], nil
      if type(v) == "string" then
        spec = v
      elseif type(v) == "table" then
        spec = v[1]
        local td = { line = d.line, ctx = d.ctx .. ": target " .. describe(spec) }
        local w = read_fields(st, td, v, TARGET, true)
        for _, i in ipairs(sorted_keys(v)) do
          if type(i) == "number" and i ~= 1 then
            st:error(d.line, "%s: unexpected value %s", td.ctx, describe(v[i]))
          end
        end
        if type(spec) ~= "string" then
          st:error(d.line, '%s: a target table must start with "host:port", got %s',
                   d.ctx, describe(spec))
          spec = nil
        end
        v = w
      else
        st:error(d.line, '%s: a target must be "host:port" or { "host:port", weight = N }, got %s',
                 d.ctx, describe(v))
      end
      if spec then
        local target, why = parse_target(spec)
        if not target then
          st:error(d.line, "%s: target %s %s", d.ctx, quote(spec), why)
        else
          target.weight = type(v) == "table" and v.weight or 1
          local key = show_addr(target.host, target.port)
          if seen[key] then
            st:error(d.line, "%s: target %s is listed twice (use weight = N instead)",
                     d.ctx, quote(spec))
          else
            seen[key] = true
            targets[#targets + 1] = target
          end
        end
      end
    end
  end
  return targets
end

local function check_upstreams(st, decls)
  local out, by_name = {}, {}
  for _, d in ipairs(decls) do
    if d.kind == "upstream" then
      d.ctx = "upstream " .. quote(d.name)
      if by_name[d.name] then
        st:error(d.line, "%s: an upstream of that name is already declared at line %s",
                 d.ctx, tostring(by_name[d.name].line))
      elseif not name_ok(d.name) then
        st:error(d.line, "%s: the name %s", d.ctx, NAME_RULE)
      end
      local u = read_fields(st, d, d.t, UPSTREAM, true)
      local ntargets = 0
      for k in pairs(d.t) do if type(k) == "number" then ntargets = ntargets + 1 end end
      u.targets = check_targets(st, d, d.t)
      if ntargets == 0 then
        st:error(d.line, '%s: no targets (list them: upstream "name" { "host:port", ... })', d.ctx)
      end
      if d.t.timeout ~= nil and d.t.read_timeout ~= nil then
        st:error(d.line, "%s: timeout and read_timeout are the same setting; keep one", d.ctx)
      elseif u.timeout then
        u.read_timeout = u.timeout
      end
      u.timeout = nil
      u.name, u.line, u.file = d.name, d.line or 0, st.abs
      by_name[d.name] = by_name[d.name] or u
      out[#out + 1] = u
    end
  end
  return out, by_name
end

---------------------------------------------------------------------------------------------
-- Routes
---------------------------------------------------------------------------------------------

local band, bor, lshift = bit.band, bit.bor, bit.lshift
local METHOD_BIT = {}
for i, m in ipairs(METHODS) do METHOD_BIT[m] = lshift(1, i - 1) end
local OTHER_BIT = lshift(1, #METHODS)
local ANY_BITS = lshift(1, #METHODS + 1) - 1

-- Splits "GET,POST /path" into methods and path; reports every problem it finds. Returns a
-- table { methods = {...} or nil, bits, path, params = {name = true}, star, literal } or nil.
local function parse_route(st, d, spec)
  local words = {}
  for w in spec:gmatch("%S+") do words[#words + 1] = w end
  local mstr, path
  if #words == 1 and words[1]:sub(1, 1) == "/" then
    path = words[1]
  elseif #words == 2 then
    mstr, path = words[1], words[2]
  else
    st:error(d.line, '%s: must be "METHOD /path", "GET,POST /path" or "/path"', d.ctx)
    return nil
  end
  local ok = true
  local r = { bits = ANY_BITS, params = {}, nparams = 0 }
  if mstr then
    r.methods, r.bits = {}, 0
    local seen = {}
    for m in (mstr .. ","):gmatch("([^,]*),") do
      if m == "" then
        st:error(d.line, "%s: empty method name in %s", d.ctx, quote(mstr))
        ok = false
      elseif not m:match("^[%w!#$%%&'*+.^_`|~-]+$") then
        st:error(d.line, "%s: %s is not a valid method name", d.ctx, quote(m))
        ok = false
      elseif m:find("%l") then
        st:error(d.line, "%s: method %s must be upper-case (%s)", d.ctx, quote(m), m:upper())
        ok = false
      elseif not seen[m] then
        seen[m] = true
        r.methods[#r.methods + 1] = m
        r.bits = bor(r.bits, METHOD_BIT[m] or OTHER_BIT)
      end
    end
  end
  if path:sub(1, 1) ~= "/" then
    st:error(d.line, "%s: the path %s must start with /", d.ctx, quote(path))
    return nil
  end
  if path:find("[?#]") then
    st:error(d.line, "%s: the path must not contain a query or fragment (? or #)", d.ctx)
    ok = false
  end
  if path:find("%c") then
    st:error(d.line, "%s: the path must not contain control characters", d.ctx)
    ok = false
  end
  local segs = {}
  for s in (path:sub(2) .. "/"):gmatch("([^/]*)/") do segs[#segs + 1] = s end
  local literal, in_literal = {}, true
  for i, s in ipairs(segs) do
    if s == "" and i < #segs then
      st:error(d.line, "%s: empty path segment (//)", d.ctx)
      ok = false
    elseif s == "." or s == ".." then
      st:error(d.line, '%s: "." and ".." segments never match (request paths are normalised)',
               d.ctx)
      ok = false
    elseif s:find("*", 1, true) then
      if s ~= "*" then
        st:error(d.line, "%s: * must be a whole segment (/prefix/*)", d.ctx)
        ok = false
      elseif i < #segs then
        st:error(d.line, "%s: * must be the last segment", d.ctx)
        ok = false
      end
      r.star = true
      in_literal = false
    elseif s:sub(1, 1) == ":" then
      local name = s:sub(2)
      if name == "" then
        st:error(d.line, "%s: a parameter needs a name (:name)", d.ctx)
        ok = false
      elseif not name:match("^[%a_][%w_]*$") then
        st:error(d.line, "%s: parameter %s must be a name of letters, digits and _",
                 d.ctx, quote(s))
        ok = false
      elseif r.params[name] then
        st:error(d.line, "%s: parameter :%s appears twice", d.ctx, name)
        ok = false
      else
        r.params[name] = true
        r.nparams = r.nparams + 1
      end
      in_literal = false
    end
    if in_literal then literal[#literal + 1] = s end
  end
  if r.nparams + (r.star and 1 or 0) > MAX_PARAMS then
    st:error(d.line, "%s: too many parameters (at most %d)", d.ctx, MAX_PARAMS)
    ok = false
  end
  if not ok then return nil end
  r.path = path
  -- The literal part before the first parameter, without its trailing slash: what
  -- strip_prefix = true removes ("/static/*" -> "/static").
  r.literal = ("/" .. concat(literal, "/")):gsub("/$", "")
  -- The pattern with parameter names erased, for duplicate detection.
  r.shape = path:gsub("/:[%w_]+", "/:")
  return r
end

local function host_pattern(v)
  if type(v) ~= "string" then return nil end
  local h = v:lower()
  local rest = h:match("^%*%.(.+)$")
  if rest then
    if hostname(rest) and not rest:match("^[%d.]+$") then return h end
    return nil
  end
  if hostname(h) then return h end
  return nil
end

local function check_respond(st, d, v, out)
  if type(v) ~= "table" then
    st:error(d.line, "%s: respond must be a table { status, body [, headers] }, got %s",
             d.ctx, describe(v))
    return
  end
  for _, k in ipairs(sorted_keys(v)) do
    if not (k == 1 or k == 2 or k == 3) then
      st:error(d.line, "%s: respond: unexpected %s (respond = { status, body [, headers] })",
               d.ctx, type(k) == "number" and "value " .. describe(v[k]) or "key " .. keyname(k))
    end
  end
  local status, body, headers = v[1], v[2], v[3]
  local status_ok = type(status) == "number" and status == floor(status)
                    and status >= 200 and status <= 599
  if not status_ok then
    st:error(d.line, "%s: respond status must be an integer in 200..599, got %s",
             d.ctx, describe(status))
  end
  local ctype
  if body == nil then
    out.respond_body = ""
  elseif type(body) == "string" then
    out.respond_body = body
    ctype = "text/plain"
  elseif type(body) == "table" then
    local json, err = M.json_encode(body)
    if json then
      out.respond_body = json
    else
      st:error(d.line, "%s: respond body: %s", d.ctx, err)
    end
    ctype = "application/json"
  else
    st:error(d.line, "%s: respond body must be a string or a table, got %s", d.ctx, describe(body))
  end
  if status_ok and (status == 204 or status == 304) and body ~= nil and body ~= "" then
    st:error(d.line, "%s: a %d response cannot have a body", d.ctx, status)
  end
  local list = {}
  if headers ~= nil and type(headers) ~= "table" then
    st:error(d.line, "%s: respond headers must be a table of name = value, got %s",
             d.ctx, describe(headers))
    headers = nil
  end
  local has_ctype = false
  for _, name in ipairs(sorted_keys(headers or {})) do
    local value = headers[name]
    if type(name) ~= "string" or not name:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      st:error(d.line, "%s: respond header name %s is not a valid header name",
               d.ctx, describe(name))
    elseif ({ ["content-length"] = true, ["transfer-encoding"] = true,
              connection = true })[name:lower()] then
      st:error(d.line, "%s: respond header %s is set by the gateway", d.ctx, name)
    elseif type(value) ~= "string" and type(value) ~= "number" then
      st:error(d.line, "%s: respond header %s must be a string, got %s",
               d.ctx, name, describe(value))
    else
      value = type(value) == "number" and describe(value) or value
      if value:find("[%z\r\n]") then
        st:error(d.line, "%s: respond header %s must not contain CR, LF or NUL", d.ctx, name)
      else
        if name:lower() == "content-type" then has_ctype = true end
        list[#list + 1] = { name = name, value = value }
      end
    end
  end
  if ctype and not has_ctype then
    table.insert(list, 1, { name = "Content-Type", value = ctype })
  end
  out.respond_status = status_ok and status or nil
  out.respond_headers = list
end

-- Reads a Lua source file; returns its text, or nil, why and whether it could not be read.
local function read_lua(st, path)
  local src, err = st.host.read_file(path)
  if not src then return nil, tostring(err), true end
  if src:byte(1) == 27 then return nil, "is a precompiled Lua file; only source text is accepted" end
  if src:sub(1, 3) == "\239\187\191" then src = src:sub(4) end
  -- A "#!" first line is skipped as lua(1) does; its newline stays, so lines keep numbers.
  if src:sub(1, 1) == "#" then src = src:gsub("^[^\n]*", "", 1) end
  return src
end

---------------------------------------------------------------------------------------------
-- Hooks: functions, or scripts that return one
---------------------------------------------------------------------------------------------

-- Globals assigned by a hook at run time would be shared by every request of the worker:
-- once loading is over, an environment refuses new globals.
local function lock_env(env)
  local mt = getmetatable(env)
  local base = mt and type(mt.__index) == "table" and mt.__index or nil
  setmetatable(env, {
    __index = base,                       -- a script's globals still read through to the sandbox
    __newindex = function(_, k)
      error(format("assignment to undeclared global %s (hooks share their file's globals: " ..
                   "use a local, or req.ctx for per-request state)", keyname(k)), 2)
    end,
  })
end

-- Loads a "file.lua" script (relative to the config's directory) that returns a function.
-- Each script gets its own globals; one loaded twice is shared.
local function load_script(st, d, what, path)
  local key = path
  if st.scripts[key] ~= nil then return st.scripts[key] or nil end
  st.scripts[key] = false
  local full = path:sub(1, 1) == "/" and path or st.dir .. "/" .. path
  local src, err = read_lua(st, full)
  if not src then
    st:error(d.line, "%s: %s script %s: %s", d.ctx, what, quote(path), err)
    return nil
  end
  st.files[#st.files + 1] = full
  local name = #path <= 55 and path or "..." .. path:sub(-52)
  local env = setmetatable({}, { __index = st.host.sandbox })
  local fn, perr = load(src, "=" .. name, "t", env)
  if not fn then
    st:error(d.line, "%s: %s script %s", d.ctx, what, perr)
    return nil
  end
  local ok, res = xpcall(fn, function(e) return tostring(e) end)
  if not ok then
    st:error(d.line, "%s: %s script %s failed while loading: %s", d.ctx, what, quote(path), res)
    return nil
  end
  if type(res) ~= "function" then
    st:error(d.line, "%s: %s script %s must return a function, got %s", d.ctx, what,
             quote(path), describe(res))
    return nil
  end
  st.envs[#st.envs + 1] = env
  st.scripts[key] = res
  return res
end

-- A hook setting: a function, a "file.lua" path, or (unless SINGLE) a list of them.
-- Returns the list of functions.
local function hook_list(st, d, what, v, single)
  local list = {}
  local usage = single and 'a function or a "file.lua" path'
                       or 'a function, a "file.lua" path or a list of them'
  local function one(x)
    if type(x) == "function" then
      list[#list + 1] = x
    elseif type(x) == "string" and x:match("%.lua$") then
      list[#list + 1] = load_script(st, d, what, x)
    else
      st:error(d.line, "%s: %s must be %s, got %s", d.ctx, what, usage, describe(x))
    end
  end
  if type(v) == "table" and not single then
    for k in pairs(v) do
      if type(k) ~= "number" or k < 1 or k > #v or k % 1 ~= 0 then
        st:error(d.line, "%s: %s must be a list of hooks, got a table with key %s", d.ctx,
                 what, keyname(k))
        return list
      end
    end
    for i = 1, #v do one(v[i]) end
  else
    one(v)
  end
  return list
end

local function check_global_hooks(st, decls)
  local out = { request = {}, access = {}, response = {}, log = {} }
  local first
  for _, d in ipairs(decls) do
    if d.kind == "hooks" then
      d.ctx = "hooks"
      if first then
        st:error(d.line, "hooks is declared twice (first at line %s)", tostring(first.line))
      else
        first = d
        unknown_keys(st, d, d.t, GLOBAL_HOOKS, false)
        for _, f in ipairs(GLOBAL_HOOKS) do
          if d.t[f[1]] ~= nil then out[f[1]] = hook_list(st, d, f[1], d.t[f[1]]) end
        end
      end
    end
  end
  return out
end

-- A list of the global hooks followed by the route's own.
local function joined(a, b)
  local out = {}
  for i = 1, #a do out[#out + 1] = a[i] end
  for i = 1, #b do out[#out + 1] = b[i] end
  return out
end

local function check_shared(st, decls)
  local out, seen = {}, {}
  for _, d in ipairs(decls) do
    if d.kind == "shared" then
      d.ctx = "shared " .. quote(d.name)
      local sh = read_fields(st, d, d.t, SHARED)
      if not name_ok(d.name) then st:error(d.line, "%s: the name %s", d.ctx, NAME_RULE) end
      if seen[d.name] then
        st:error(d.line, "%s: a dictionary of that name is already declared at line %s",
                 d.ctx, tostring(seen[d.name]))
      else
        seen[d.name] = d.line
        sh.name = d.name
        out[#out + 1] = sh
      end
    end
  end
  return out
end

local function loopback(host)
  return host == "::1" or host:match("^127%.") ~= nil
end

local function check_admin(st, decls, listens)
  local a
  for _, d in ipairs(decls) do
    if d.kind == "admin" then
      d.ctx = "admin"
      if a then
        st:error(d.line, "admin is declared twice (first at line %s)", tostring(a.line))
      else
        local bad
        a, bad = read_fields(st, d, d.t, ADMIN)
        a.line = d.line
        if not bad.host and not loopback(a.host) and not a.token then
          st:error(d.line, "admin: host %s is not a loopback address, so a token is required " ..
                   '(token = env("MOONGATE_ADMIN_TOKEN"))', a.host)
        end
        if not (bad.port or bad.host) then
          for _, o in ipairs(listens) do
            if overlap(a, o) then
              st:error(d.line, "admin: %s is already used by the listener at line %s",
                       show_addr(a.host, a.port), tostring(o.line))
              break
            end
          end
        end
      end
    end
  end
  if a then a.line = nil end
  return a
end

local function check_route(st, d, upstreams, listens, default_listen)
  d.ctx = "route " .. quote(d.name)
  local t = d.t
  unknown_keys(st, d, t, ROUTE, false)
  local r = parse_route(st, d, d.name)
  local out = { file = st.abs, line = d.line or 0, spec = d.name, hosts = {} }
  if r then
    out.methods, out.path = r.methods, r.path
  end

  -- Where the route is served.
  if t.listen ~= nil then
    if type(t.listen) ~= "string" then
      st:error(d.line, "%s: listen must be a listener name, got %s", d.ctx, describe(t.listen))
    elseif not listens[t.listen] and not st.partial then
      local names = sorted_keys(listens)
      st:error(d.line, "%s: unknown listener %s%s", d.ctx, quote(t.listen),
               suggest(t.listen, names, quote))
    end
    out.listen = t.listen
  elseif not default_listen and st.nlistens > 0 and not st.partial then
    st:error(d.line, "%s: names no listener, and there is no default listener " ..
             "(add listen { port = ... }, or listen = \"name\" here)", d.ctx)
  end

  -- Which hosts it answers.
  local hosts = t.host
  if type(hosts) == "string" then hosts = { hosts } end
  if hosts ~= nil then
    local list_ok = type(hosts) == "table"
    if list_ok then
      for k in pairs(hosts) do
        if type(k) ~= "number" or k < 1 or k > #hosts then list_ok = false end
      end
    end
    if list_ok and #hosts == 0 then
      st:error(d.line, "%s: host is an empty list (leave host out to match any host)", d.ctx)
    elseif not list_ok then
      st:error(d.line, '%s: host must be a host name or a list of them, got %s',
               d.ctx, describe(t.host))
    else
      local seen = {}
      for _, h in ipairs(hosts) do
        local p = host_pattern(h)
        if not p then
          st:error(d.line, '%s: host %s must be a host name without port, like ' ..
                   '"api.example.com" or "*.example.com"', d.ctx, describe(h))
        elseif not seen[p] then
          seen[p] = true
          out.hosts[#out.hosts + 1] = p
        end
      end
    end
  end

  -- What it does: proxy, respond, or run a handler.
  local proxies = t.upstream ~= nil
  local actions = (t.upstream ~= nil and 1 or 0) + (t.respond ~= nil and 1 or 0) +
                  (t.handler ~= nil and 1 or 0)
  if actions > 1 then
    st:error(d.line, "%s: has more than one of upstream, respond and handler; keep one", d.ctx)
  elseif actions == 0 then
    st:error(d.line, '%s: needs upstream = "name", respond = { status, body } or ' ..
             'handler = function(req) ... end', d.ctx)
  end
  local g = st.global_hooks
  out.hooks = {
    access = joined(g.access, t.access ~= nil and hook_list(st, d, "access", t.access) or {}),
    response = joined(g.response,
                      t.response ~= nil and hook_list(st, d, "response", t.response) or {}),
    log = joined(g.log, t.log ~= nil and hook_list(st, d, "log", t.log) or {}),
  }
  if t.handler ~= nil then
    out.hooks.handler = hook_list(st, d, "handler", t.handler, true)[1]
    out.has_handler = true
  end
  if t.upstream ~= nil then
    if type(t.upstream) ~= "string" then
      st:error(d.line, "%s: upstream must be an upstream name, got %s", d.ctx, describe(t.upstream))
    elseif not upstreams[t.upstream] and not st.partial then
      st:error(d.line, "%s: unknown upstream %s%s", d.ctx, quote(t.upstream),
               suggest(t.upstream, sorted_keys(upstreams), quote))
    end
    out.upstream = t.upstream
  end
  if t.respond ~= nil then check_respond(st, d, t.respond, out) end

  for _, key in ipairs({ "strip_prefix", "rewrite", "host_header" }) do
    if t[key] ~= nil and t.respond ~= nil and not proxies then
      st:error(d.line, "%s: %s only applies to routes with an upstream", d.ctx, key)
    end
  end

  if t.strip_prefix ~= nil and t.strip_prefix ~= false then
    local sp = t.strip_prefix
    if sp == true then
      if r and r.literal == "" then
        st:error(d.line, "%s: strip_prefix = true, but the path has no literal prefix to strip",
                 d.ctx)
      elseif r then
        out.strip_prefix = r.literal
      end
    elseif type(sp) ~= "string" or sp:sub(1, 1) ~= "/" or sp:find("%c") then
      st:error(d.line, '%s: strip_prefix must be true or a path prefix like "/api", got %s',
               d.ctx, describe(sp))
    else
      if r then
        local raw = r.path:match("^[^:*]*")
        local n = math.min(#raw, #sp)
        if raw:sub(1, n) ~= sp:sub(1, n) then
          st:error(d.line, "%s: strip_prefix %s can never match the path %s",
                   d.ctx, quote(sp), quote(r.path))
        end
      end
      out.strip_prefix = sp
    end
  end

  if t.rewrite ~= nil then
    local rw = t.rewrite
    if type(rw) ~= "string" or rw:sub(1, 1) ~= "/" or rw:find("%s") or rw:find("%c") then
      st:error(d.line, '%s: rewrite must be a path starting with /, got %s', d.ctx, describe(rw))
    else
      if r then
        for name in rw:gmatch(":([%a_][%w_]*)") do
          if not r.params[name] then
            st:error(d.line, "%s: rewrite uses :%s, which the path does not capture", d.ctx, name)
          end
        end
        if rw:find("*", 1, true) and not r.star then
          st:error(d.line, "%s: rewrite uses *, but the path does not end with /*", d.ctx)
        end
      end
      out.rewrite = rw
    end
    if out.strip_prefix then
      st:error(d.line, "%s: strip_prefix and rewrite cannot both be set", d.ctx)
    end
  end

  out.host_policy = "pass"
  local hh = t.host_header
  if hh ~= nil then
    if type(hh) ~= "string" or hh == "" or hh:find("[%s%c]") then
      st:error(d.line, '%s: host_header must be "pass", "upstream" or a host name, got %s',
               d.ctx, describe(hh))
    elseif hh == "upstream" then
      out.host_policy = "upstream"
    elseif hh ~= "pass" then
      out.host_policy, out.host_value = "fixed", hh
    end
  end

  out.name = d.name
  if t.name ~= nil then
    local n, why = text(t.name)
    if not n then
      st:error(d.line, "%s: name %s, got %s", d.ctx, why, describe(t.name))
    else
      out.name = n
      out.explicit_name = true
    end
  end

  if t.max_body ~= nil then
    local n, why = size(0)(t.max_body)
    if not n then
      st:error(d.line, "%s: max_body %s, got %s", d.ctx, why, describe(t.max_body))
    end
    out.max_body = n
  end

  if r then
    out.bits, out.shape = r.bits, r.shape
  end
  return out
end

local function check_routes(st, decls, upstreams, listens, default_listen, limits)
  local out, buckets, names = {}, {}, {}
  for _, d in ipairs(decls) do
    if d.kind == "route" then
      local r = check_route(st, d, upstreams, listens, default_listen)
      r.max_body = r.max_body or limits.body_bytes
      if r.shape then
        local hosts = {}
        for i, h in ipairs(r.hosts) do hosts[i] = h end
        sort(hosts)
        local key = (r.listen or "") .. "\0" .. concat(hosts, ",") .. "\0" .. r.shape
        local bucket = buckets[key]
        if not bucket then bucket = {}; buckets[key] = bucket end
        -- A route for any method is the fallback of those that name methods (the router
        -- prefers the latter), so only two of a kind can clash.
        local any = r.methods == nil
        for _, o in ipairs(bucket) do
          if o.any == any and (any or band(o.bits, r.bits) ~= 0) then
            st:error(d.line, "%s: duplicates route %s declared at line %s",
                     "route " .. quote(r.spec), quote(o.spec), tostring(o.line))
            break
          end
        end
        bucket[#bucket + 1] = { any = any, bits = r.bits, spec = r.spec, line = r.line }
      end
      if r.explicit_name then
        if names[r.name] then
          st:error(d.line, "%s: name %s is already used by the route at line %s",
                   "route " .. quote(r.spec), quote(r.name), tostring(names[r.name].line))
        else
          names[r.name] = r
        end
      end
      r.bits, r.shape, r.explicit_name = nil, nil, nil
      out[#out + 1] = r
    end
  end
  return out
end

---------------------------------------------------------------------------------------------
-- Loading
---------------------------------------------------------------------------------------------

local function read_source(st, path)
  local src, err, unreadable = read_lua(st, path)
  if not src then
    st:error(nil, unreadable and "cannot open the config file: %s" or "%s", err)
    return nil
  end
  return src
end

-- Records an error raised while the file loads or runs: Lua puts "<st.short>:LINE: " in front
-- of messages that come with a position; others get the line the file was running.
local function runtime_error(st, e)
  local line, msg
  if e.msg:sub(1, #st.short + 1) == st.short .. ":" then
    line, msg = e.msg:sub(#st.short + 2):match("^(%d+): (.*)$")
  end
  if line then
    st:error(tonumber(line), "%s", msg)
  else
    st:error(e.line, "%s", e.msg)
  end
end

local function run(st, src)
  local env = make_env(st)
  st.env = env
  local fn, perr = load(src, st.chunk, "t", env)
  if not fn then
    runtime_error(st, { msg = perr })
    return false
  end
  local steps = 0
  local function on_count()
    steps = steps + 1
    if steps > MAX_STEPS then
      error(format("%s:%d: the config file ran too long (an endless loop?)", st.short,
                   st:user_line() or 0), 0)
    end
  end
  local function on_error(e)
    local msg = type(e) == "string" and e or "error object is " .. describe(e)
    return { msg = msg, line = st:user_line() }
  end
  -- An endless loop is stopped by the VM's CPU budget (the VM runs without the JIT, so its
  -- count hook always fires); on_count is kept for a host without one.
  local ok, e
  if st.host.budgeted then
    ok, e = xpcall(fn, on_error)
  else
    debug.sethook(on_count, "", STEP_EVERY)
    ok, e = xpcall(fn, on_error)
    debug.sethook()
  end
  if not ok then
    -- Out of memory (lua.memory), the error handler itself may have failed: a bare message.
    if type(e) ~= "table" then e = { msg = tostring(e) } end
    if e.msg == "not enough memory" then
      e.msg = "not enough memory while loading (more than lua.memory allows)"
    end
    runtime_error(st, e)
    return false
  end
  return true
end

-- Evaluates and checks the config file. DISPLAY is the path shown in messages, ABS the path
-- read and recorded. Returns the normalised config, or nil and the errors' text.
function M.load(display, abs, host)
  abs = abs or display
  local st = new_state(display, abs)
  st.short = chunk_name(display)
  st.chunk = "=" .. st.short
  st.host = host
  host.sandbox = host.sandbox or sandbox  -- the trusted environment's view of the sandbox
  st.dir = abs:match("^(.*)/[^/]*$") or "."
  st.files, st.scripts, st.envs = { abs }, {}, {}
  local src = read_source(st, abs)
  if not src then return nil, st:text() end
  local ran = run(st, src)
  if ran then
    for _, p in ipairs(st.pending) do
      if not p.done then
        st:error(p.line, "%s %s: missing its { ... } table", p.kind, quote(p.name))
      end
    end
  end

  -- A file that stopped halfway would report every name declared after the stop as
  -- unknown: references are only checked when the whole file ran.
  st.partial = not ran
  local decls = st.decls
  local gw = check_gateway(st, decls)
  local limits = singleton(st, decls, "limits", LIMITS)
  local listens, listen_names, default_listen = check_listens(st, decls)
  local upstreams, upstream_names = check_upstreams(st, decls)
  st.global_hooks = check_global_hooks(st, decls)
  local shared = check_shared(st, decls)
  local admin = check_admin(st, decls, listens)
  local lua = singleton(st, decls, "lua", LUA)
  st.nlistens = 0
  for _, d in ipairs(decls) do
    if d.kind == "listen" then st.nlistens = st.nlistens + 1 end
  end
  if ran and st.nlistens == 0 then
    st:error(nil, "no listener is declared (add one, e.g. listen { port = 8080 })")
  end
  local routes = check_routes(st, decls, upstream_names, listen_names, default_listen, limits)

  if #st.errors > 0 then return nil, st:text() end

  for _, l in ipairs(listens) do l.line = nil end
  lock_env(st.env)
  for _, env in ipairs(st.envs) do lock_env(env) end
  local route_hooks = {}
  for i, r in ipairs(routes) do route_hooks[i] = r.hooks; r.hooks = nil end
  return {
    file = abs,
    workers = gw.workers,
    pid_file = gw.pid_file,
    drain_timeout = gw.drain_timeout,
    access_log = gw.access_log,
    error_log = gw.error_log,
    log_level = gw.log_level,
    redact_query = gw.redact_query,
    limits = limits,
    listens = listens,
    upstreams = upstreams,
    routes = routes,
    shared = shared,
    admin = admin,
    lua = lua,
    files = st.files,
    hooks = { request = st.global_hooks.request, routes = route_hooks },
  }
end

return M
