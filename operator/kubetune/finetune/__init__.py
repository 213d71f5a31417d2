"""kubetune.finetune."""
