-- PUT with a new key per request: /v1/kv/b/<thread>-<n>, a 100-byte value.
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  body = string.rep("v", 100)
end
function request()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/b/" .. tid .. "-" .. counter, nil, body)
end
