"""Graph passes: each file holds one `verb_object(gm, cfg) -> PassResult` function."""

from graphopt.passes.base import PassResult

__all__ = ["PassResult"]
