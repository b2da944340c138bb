"""Training EAGLE heads: the prompt corpus and `spec-harness train-head`."""
