"""graphopt's version (pyproject.toml says the same; artifacts and the TVM cache record it)."""

__version__ = "0.1.0"
