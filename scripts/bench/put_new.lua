-- PUT with a new key per request: /v1/kv/<prefix>/<thread>-<n>, a 100-byte
-- value. The prefix is the script's argument (`b` unless given): the warm-up
-- run writes other keys than the measured one, so no key is written twice.
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  prefix = args[1] or "b"
  body = string.rep("v", 100)
end
function request()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/" .. prefix .. "/" .. tid .. "-" .. counter, nil, body)
end
