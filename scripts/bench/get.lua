-- GET of keys the PUT run wrote: numbers 2..1001 of each thread (wrk builds,
-- and drops, one request per thread before the run, so a thread may skip 1).
function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
end
function request()
  return wrk.format("GET", "/v1/kv/b/" .. math.random(1, 2) .. "-" .. math.random(2, 1001))
end
