-- Argo CD health check for kubetune.io FineTuneJob and ModelDeployment.
--
-- Installed once per kind in argocd-cm (see argocd-cm.yaml, which embeds this file verbatim):
--   resource.customizations.health.kubetune.io_FineTuneJob
--   resource.customizations.health.kubetune.io_ModelDeployment
-- Argo CD runs it with the live object in the global `obj` (gopher-lua, Lua 5.1) and expects a
-- table {status = Healthy|Progressing|Degraded|Suspended|Missing|Unknown, message = "..."}.
--
-- Rules, in order:
--   1. No status yet, or status.observedGeneration behind metadata.generation: the operator has
--      not looked at this spec yet -> Progressing (never report an old verdict for a new spec).
--   2. status.phase decides (the operator owns it); the conditions refine the message and catch
--      a Ready=False under a Healthy phase.
--   3. A phase this script does not know -> Unknown (a newer operator; fail visible, not green).

local hs = {}

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function message_of(status, fallback)
  if status ~= nil and status.message ~= nil and status.message ~= "" then
    return status.message
  end
  return fallback
end

local function stale(o)
  local status = o.status
  if status == nil then
    return "Waiting for the kubetune operator to pick up this object"
  end
  local generation = o.metadata and o.metadata.generation
  if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
    return "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  end
  return nil
end

local function finetunejob(o)
  local status = o.status
  local phase = status.phase
  if phase == "Succeeded" then
    local msg = "Training succeeded"
    if status.artifact ~= nil and status.artifact.uri ~= nil then
      msg = msg .. "; artifact " .. status.artifact.uri
    end
    return "Healthy", message_of(status, msg)
  end
  if phase == "Failed" then
    local failed = condition(status, "Failed")
    local reason = (failed and failed.reason) or status.lastFailureReason or "Failed"
    return "Degraded", reason .. ": " .. message_of(status, (failed and failed.message) or "training failed")
  end
  if phase == "Suspended" or (o.spec ~= nil and o.spec.suspend == true) then
    return "Suspended", message_of(status, "Suspended: pods stopped, checkpoints kept")
  end
  if phase == "Pending" or phase == "Validating" or phase == "Running" or phase == nil then
    local msg = phase or "Pending"
    if status.progress ~= nil and status.progress.percent ~= nil then
      msg = msg .. " (" .. tostring(status.progress.percent) .. "%)"
    end
    return "Progressing", message_of(status, msg)
  end
  return "Unknown", "Unknown FineTuneJob phase " .. tostring(phase)
end

local function modeldeployment(o)
  local status = o.status
  local phase = status.phase
  local resolved = condition(status, "ModelResolved")
  if resolved ~= nil and resolved.status == "False" and resolved.reason == "FineTuneJobNotFound" then
    return "Missing", resolved.message or "The referenced FineTuneJob does not exist"
  end
  if phase == "Healthy" then
    local ready = condition(status, "Ready")
    if ready ~= nil and ready.status == "False" then
      return "Progressing", "Ready=False: " .. (ready.message or ready.reason or "")
    end
    return "Healthy", message_of(status, "Serving the stable revision")
  end
  if phase == "Degraded" or phase == "RolledBack" then
    local degraded = condition(status, "Degraded")
    local reason = (degraded and degraded.reason) or phase
    return "Degraded", reason .. ": " .. message_of(status, (degraded and degraded.message) or "rollout failed")
  end
  if phase == "ScaledToZero" then
    -- spec.replicas 0 is a state someone chose (kubectl scale, KEDA): Healthy, as Argo CD shows
    -- a Deployment scaled to 0; a new revision held until replicas come back is Suspended.
    local progressing = condition(status, "Progressing")
    if progressing ~= nil and progressing.reason == "RolloutNeedsReplicas" then
      return "Suspended", message_of(status, "Scaled to zero; the new revision waits for replicas")
    end
    return "Healthy", message_of(status, "Scaled to zero")
  end
  if phase == "Paused" or status.paused == true then
    return "Suspended", message_of(status, "Rollout paused; annotate kubetune.io/promote=true to continue")
  end
  if phase == "Progressing" or phase == "Pending" or phase == nil then
    local msg = phase or "Pending"
    if status.weights ~= nil and status.weights.canary ~= nil and status.canary ~= nil then
      msg = "Canary " .. tostring(status.canary.name) .. " at " .. tostring(status.weights.canary) .. "%"
    end
    return "Progressing", message_of(status, msg)
  end
  return "Unknown", "Unknown ModelDeployment phase " .. tostring(phase)
end

local waiting = stale(obj)
if waiting ~= nil then
  hs.status = "Progressing"
  hs.message = waiting
elseif obj.kind == "FineTuneJob" then
  hs.status, hs.message = finetunejob(obj)
elseif obj.kind == "ModelDeployment" then
  hs.status, hs.message = modeldeployment(obj)
else
  hs.status = "Unknown"
  hs.message = "Not a kubetune kind: " .. tostring(obj.kind)
end
return hs
