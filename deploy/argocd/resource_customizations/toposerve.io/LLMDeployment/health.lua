-- Argo CD health of a toposerve.io LLMDeployment, from the conditions the operator writes
-- (docs/gitops.md). Lua 5.1 as Argo CD runs it (gopher-lua): `obj` is the object, return a table.
local hs = {}
local generation = obj.metadata.generation or 0

local function stale(observed)
  return observed == nil or observed < generation
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile"
  return hs
end
if stale(obj.status.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
for _, c in ipairs(obj.status.conditions) do
  conditions[c.type] = c
end
local ready = conditions["Ready"]
local degraded = conditions["Degraded"]
local progressing = conditions["Progressing"]

for _, c in pairs({ready, degraded, progressing}) do
  if c ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return hs
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local function text(c)
  local reason = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    return reason .. ": " .. c.message
  end
  return reason
end

-- A spec that cannot be served (InvalidSpec, DoesNotFit, LeaderWorkerSetRequired) or a pool
-- running on a fallback GPU type (FallbackActive): the operator itself calls it degraded.
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = text(degraded)
  if ready.status ~= "True" and ready.reason ~= degraded.reason then
    hs.message = hs.message .. " (" .. text(ready) .. ")"
  end
  return hs
end
if ready.status == "True" and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = "Scaled to zero replicas"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready)
  -- Serving, but the builtin autoscaler cannot read its metrics (it holds spec.replicas): say so.
  local scaling = conditions["ScalingActive"]
  if scaling ~= nil and scaling.status == "False" then
    hs.message = hs.message .. "; autoscaling: " .. text(scaling)
  end
  return hs
end
hs.status = "Progressing"
hs.message = text(ready)
if progressing ~= nil and progressing.status == "True" then
  hs.message = text(progressing)
end
if progressing ~= nil and progressing.status == "False" and progressing.reason == "Unschedulable" then
  hs.message = hs.message .. "; " .. text(progressing)
end
return hs
