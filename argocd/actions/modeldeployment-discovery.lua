-- Which custom actions Argo CD offers on a ModelDeployment (buttons in the UI, `argocd app actions run`).
local actions = {}
local canary = obj.status ~= nil and obj.status.canary ~= nil
local paused = obj.metadata.annotations ~= nil and obj.metadata.annotations["kubetune.io/pause"] == "true"
actions["promote"] = {["disabled"] = not canary}
actions["abort"] = {["disabled"] = not canary}
actions["pause"] = {["disabled"] = paused}
actions["resume"] = {["disabled"] = not paused}
return actions
