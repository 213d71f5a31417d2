-- Which custom actions Argo CD offers on a FineTuneJob.
local actions = {}
local phase = obj.status ~= nil and obj.status.phase or nil
local finished = phase == "Succeeded" or phase == "Failed"
local suspended = obj.spec ~= nil and obj.spec.suspend == true
actions["suspend"] = {["disabled"] = finished or suspended}
actions["resume"] = {["disabled"] = finished or not suspended}
return actions
