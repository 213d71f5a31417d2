-- Hold the rollout at its current step (traffic weights stay as they are).
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["kubetune.io/pause"] = "true"
return obj
