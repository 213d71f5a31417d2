"""kubetune_server: the OpenAI-compatible inference server in ModelDeployment pods."""
