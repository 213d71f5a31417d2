"""kubetune.storage."""
