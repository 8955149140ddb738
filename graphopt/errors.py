"""Errors graphopt raises on purpose (everything else is a bug)."""

from __future__ import annotations

from collections.abc import Sequence


class UnsupportedOpError(RuntimeError):
    """Raised with `fallback="error"` (and by `export`, whose artifacts cannot run PyTorch)
    when some nodes have no lowering rule for the target.

    Lists every unsupported node at once, each with its op and the reason.
    """

    def __init__(
        self,
        target: str,
        nodes: Sequence[tuple[str, str, str]],
        why: str = "fallback='error' forbids running them in PyTorch",
    ):
        self.target = target
        self.nodes = list(nodes)
        lines = "\n".join(f"  {name}: {op} ({reason})" for name, op, reason in self.nodes)
        super().__init__(
            f"{len(self.nodes)} node(s) have no lowering for target={target!r} and {why}:\n{lines}"
        )


class VerificationError(AssertionError):
    """Raised with `verify=True` when a stage changes the numbers versus eager."""

    def __init__(self, stage: str, detail: str):
        self.stage = stage
        super().__init__(f"graphopt verify: {stage!r} changed the outputs versus eager: {detail}")
