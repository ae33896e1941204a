"""safeclip's library: one module per pipeline stage (see DESIGN.md)."""

__version__ = "0.1.0"
