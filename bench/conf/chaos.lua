-- wrk script for bench/chaos.sh: counts every response that is not 2xx (wrk's own
-- "status" error only counts > 399) and prints one machine-readable summary line, plus one
-- line per non-2xx status seen.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
  codes = {}
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    codes[status] = (codes[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local bad, by_code = 0, {}
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
    for k, v in pairs(t:get("codes")) do
      by_code[k] = (by_code[k] or 0) + v
    end
  end
  local e = summary.errors
  io.write(string.format(
    "MESHGATE_CHAOS requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d p50_us=%.0f p99_us=%.0f max_us=%.0f\n",
    summary.requests, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
  for k, v in pairs(by_code) do
    io.write(string.format("MESHGATE_CHAOS_STATUS %d %d\n", k, v))
  end
end
