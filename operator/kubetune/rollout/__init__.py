"""kubetune.rollout."""
