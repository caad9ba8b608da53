"""The package's own error types (a leaf module: imports nothing from blockem), so that any module
can raise them without importing the module whose checks raise them most.

- `ConfigError`: a configuration problem (raised by `blockem.config`, `blockem.data`, and
  `blockem.runtime` for a bad environment switch);
- `EmptyIntervention`: an intervention that would do nothing (raised by selection, joint
  steering, evaluation of a steered cell and blocking, unless `allow_empty_interventions`).
"""


class ConfigError(ValueError):
    """A configuration problem, with the file and the key path in the message."""


class EmptyIntervention(ValueError):
    """An intervention that would do nothing (empty set, factor 0, target without latents)."""
