-- Request generator for bench/build-caches.sh (wrk 4.x, LuaJIT): GETs the paths listed one per
-- line in the file BENCH_PATHS, in rotation, each thread from its own offset; the requests are
-- formatted once, in init(). BENCH_AUTH, when set, is sent as the Authorization header.
--
-- As in wrk-bench.lua, there is no response() function (wrk would buffer every body in Lua),
-- and done() prints one machine-readable line ("WRKRESULT key=value ...") for the script.

local next_id = 1
function setup(thread)
   thread:set("thread_id", next_id)
   next_id = next_id + 1
end

local requests = {}
local count = 0
local i = 0

function init(args)
   local file = assert(io.open(assert(os.getenv("BENCH_PATHS"), "BENCH_PATHS"), "r"))
   local headers = {}
   local auth = os.getenv("BENCH_AUTH")
   if auth and auth ~= "" then headers["Authorization"] = auth end
   for path in file:lines() do
      if path ~= "" then
         count = count + 1
         requests[count] = wrk.format("GET", path, headers)
      end
   end
   file:close()
   assert(count > 0, "no paths in BENCH_PATHS")
   i = ((thread_id or 1) * 37) % count
end

function request()
   i = i % count + 1
   return requests[i]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRKRESULT bytes=%.0f requests=%.0f duration_us=%.0f err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d p50_us=%.0f p99_us=%.0f\n",
      summary.bytes, summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99)))
end
