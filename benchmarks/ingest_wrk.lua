-- One single-trace POST per request, each with its own external_id: run id, wrk thread, counter.
-- Settings come from the environment (benchmarks/ingest.py sets them).
local key = os.getenv("WRK_KEY")
local policy = os.getenv("WRK_POLICY")
local run = os.getenv("WRK_RUN")
local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local counter = 0
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}

function request()
  counter = counter + 1
  local body = string.format(
    '{"external_id":"%s-%d-%d","policy":"%s","messages":[{"role":"user","content":' ..
    '"64-year-old, ECOG 1, case %d"}],"response":"Overall favourable. ANSWER: YES"}',
    run, tid, counter, policy, counter)
  return wrk.format("POST", nil, headers, body)
end
