-- Roll the canary back now; the revision is recorded as rejected until the spec changes.
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["kubetune.io/abort"] = "true"
return obj
