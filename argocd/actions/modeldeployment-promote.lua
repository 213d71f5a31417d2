-- Promote the canary now (skips the remaining steps, including an indefinite pause).
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["kubetune.io/promote"] = "true"
return obj
