-- Resume from the newest complete checkpoint (spec.suspend: false).
obj.spec.suspend = false
return obj
