"""Scripts that run in other interpreters (vLLM's venv); nothing here is imported by harness."""
