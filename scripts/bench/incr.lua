-- Counter increment on one of 100,000 random keys.
function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
  body = '{"counter":{"incr":1}}'
  headers = { ["Content-Type"] = "application/json" }
end
function request()
  return wrk.format("POST", "/v1/kv/c/" .. math.random(0, 99999), headers, body)
end
