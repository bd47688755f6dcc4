-- GET of keys the PUT run wrote (its first 1,000 per thread).
function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
end
function request()
  return wrk.format("GET", "/v1/kv/b/" .. math.random(1, 2) .. "-" .. math.random(1, 1000))
end
