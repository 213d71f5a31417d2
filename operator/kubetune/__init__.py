"""kubetune: a Kubernetes operator for self-service LLM fine-tuning and canary model rollout.

Layers (enforced by import-linter, see pyproject.toml):
``handlers``/``cli`` -> ``local`` -> ``k8s``/``storage`` (I/O) -> ``finetune``/``rollout`` (pure)
-> ``api`` (the single source of truth for both custom resources).
"""

__version__ = "0.1.0"
