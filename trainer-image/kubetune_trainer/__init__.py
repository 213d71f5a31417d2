"""kubetune_trainer: the program in FineTuneJob pods (python -m kubetune_trainer validate|train)."""
