"""safeclip's command line: a thin Typer layer over `sanitize`."""
