"""safeclip's library: role subpackages io, attacks, models, train, defenses, stages and
evaluation; docs/design.md is the map."""

__version__ = "0.1.0"
