"""Lowering targets. Each has an op-rule registry (`registry.OpRegistry`) that is its capability list."""
