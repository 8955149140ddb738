"""Lowering targets. Each has an op-rule registry (`registry.OpRegistry`): its capabilities."""
