"""kubetune.finetune: pure FineTuneJob logic shared by the operator and the local runtime.

``builders``: ``build_validate_job``, ``build_train_job``, ``build_train_service``,
``build_trainer_rbac`` (whole manifests as dicts). ``reconcile``: ``observe_job`` and ``plan``
(observations -> complete status + actions). See docs/contracts.md, "Shared Python interfaces".
"""
