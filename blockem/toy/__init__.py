"""The embedded default: a synthetic world in which emergent misalignment emerges."""
