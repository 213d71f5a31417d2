-- Continue a rollout paused with the pause action.
if obj.metadata.annotations ~= nil then
  obj.metadata.annotations["kubetune.io/pause"] = nil
end
return obj
