"""kubetune.k8s."""
