"""kubetune.local: the local runtime -- the same manifests, builders and decisions, no cluster.

DESIGN.md "Running without a cluster"; the user's guide is docs/local.md. Modules:

- ``commands``: ``kubetune local apply|status|annotate|traffic|delete`` and ``kubetune demo``.
- ``runtime``: the level-triggered controller loop over the objects in the store (one per folder).
- ``jobs``: FineTuneJobs -- ``finetune.reconcile.plan`` decides, Jobs run as processes.
- ``deployments``: ModelDeployments -- ``rollout.machine.step`` decides, replicas run as
  server processes behind the weighted ``router``; ``/metrics`` scraped for analysis.
- ``containers``: a built pod template's container -> a local process (command, env, volumes).
- ``processes``: the supervisor (process groups, PDEATHSIG, the registry: no orphans).
- ``store``: objects and status on disk, in the cluster's shape; ``loading``: validated manifests.
- ``progress`` / ``tables``: progress bars and ``kubectl get``-shaped tables.
- ``demo``: the README's main story (``make demo``).
"""
