"""Small, pure ``nn.Module``s the architectures are built from (configured by constructor arguments;
shapes in the docstrings)."""
