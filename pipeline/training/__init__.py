"""Training the transformer: objective, optimiser, a plain PyTorch loop, and the Ray Train adapter."""
