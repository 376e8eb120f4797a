-- Argo CD health check for kiri.dev/ModelDeployment (resource.customizations.health.kiri.dev_ModelDeployment).
-- Reads the kstatus conditions the operator writes (Reconciling, Stalled, Ready) and falls back on
-- status.phase for objects written by an operator older than those conditions.
--   Healthy      Ready=True, nothing reconciling, the generation observed
--   Progressing  the operator has not seen this generation yet, or Reconciling=True (compressing, a wave)
--   Suspended    a rollout paused by spec.rollout.paused or a stage pause (waits for `kiri promote`)
--   Degraded     Stalled=True: rolled back, compression failed, a fault, an invalid spec
-- Lua 5.1 (Argo CD runs gopher-lua): no goto, no integer division, no bitwise operators.
local hs = {}

local function find(conditions, type_)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function say(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiri operator"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiri operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = status.conditions
local stalled = find(conditions, "Stalled")
local reconciling = find(conditions, "Reconciling")
local ready = find(conditions, "Ready")
local rolledBack = find(conditions, "RolledBack")
local phase = status.phase

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  if rolledBack ~= nil and rolledBack.status == "True" then
    hs.message = "Rolled back to " .. tostring(status.currentRevision) .. ": " .. say(rolledBack)
  else
    hs.message = say(stalled)
  end
  return hs
end

if phase == "Paused" then
  hs.status = "Suspended"
  local progressing = find(conditions, "EdgeProgressing")
  if progressing ~= nil then
    hs.message = say(progressing)
  else
    hs.message = "Rollout paused"
  end
  return hs
end

if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = say(reconciling)
  return hs
end

-- An operator older than the kstatus conditions: the phase says as much.
if stalled == nil and (phase == "RolledBack" or phase == "Failed" or phase == "Degraded") then
  hs.status = "Degraded"
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    hs.message = phase .. ": " .. ready.message
  else
    hs.message = phase
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Revision " .. tostring(status.currentRevision) .. " serving everywhere"
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = say(ready)
else
  hs.message = "Waiting for the Kiri operator"
end
return hs
