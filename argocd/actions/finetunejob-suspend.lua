-- Stop the trainer pods and keep the checkpoints (spec.suspend: true).
obj.spec.suspend = true
return obj
