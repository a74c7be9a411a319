-- Request generator for bench/disk-vs-nginx.sh (wrk 4.x, LuaJIT).
--
-- Chosen by environment variables, so one script serves every row:
--   BENCH_MODE=full   GET the URL given on wrk's command line (no request() function, so wrk
--                     keeps its static-request fast path).
--   BENCH_MODE=range  GET BENCH_PATH with "Range: bytes=S-E", a BENCH_RANGE_SIZE-byte range at a
--                     random BENCH_RANGE_SIZE-aligned offset inside a BENCH_OBJECT_SIZE-byte object
--                     (and "If-Match: BENCH_IF_MATCH" when that is set).
--   BENCH_MODE=small  GET BENCH_PREFIX1 .. BENCH_PREFIX<BENCH_COUNT> in rotation (each thread
--                     starts at its own offset); the requests are formatted once, in init().
--
-- No response() function is defined on purpose: with one, wrk buffers every body in Lua, which
-- for a 1 GiB object would measure wrk, not the server. done() prints one machine-readable line
-- ("WRKRESULT key=value ...") that the shell script parses instead of wrk's rounded summary.

local mode = os.getenv("BENCH_MODE") or "full"

local next_id = 1
function setup(thread)
   thread:set("thread_id", next_id)
   next_id = next_id + 1
end

if mode == "range" then
   local path = assert(os.getenv("BENCH_PATH"), "BENCH_PATH")
   local size = assert(tonumber(os.getenv("BENCH_RANGE_SIZE")), "BENCH_RANGE_SIZE")
   local total = assert(tonumber(os.getenv("BENCH_OBJECT_SIZE")), "BENCH_OBJECT_SIZE")
   local slots = math.floor(total / size)
   local requests = {}

   function init(args)
      math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
      for s = 0, slots - 1 do
         local first = s * size
         local headers = { ["Range"] = string.format("bytes=%.0f-%.0f", first, first + size - 1) }
         -- BENCH_IF_MATCH pins every range to one revision, as the larder client does.
         local pin = os.getenv("BENCH_IF_MATCH")
         if pin then headers["If-Match"] = pin end
         requests[s + 1] = wrk.format("GET", path, headers)
      end
   end

   function request()
      return requests[math.random(1, slots)]
   end
elseif mode == "small" then
   local prefix = assert(os.getenv("BENCH_PREFIX"), "BENCH_PREFIX")
   local count = assert(tonumber(os.getenv("BENCH_COUNT")), "BENCH_COUNT")
   local requests = {}
   local i = 0

   function init(args)
      for n = 1, count do
         requests[n] = wrk.format("GET", prefix .. n)
      end
      i = ((thread_id or 1) * 37) % count
   end

   function request()
      i = i % count + 1
      return requests[i]
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRKRESULT bytes=%.0f requests=%.0f duration_us=%.0f err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d p50_us=%.0f p99_us=%.0f\n",
      summary.bytes, summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99)))
end
