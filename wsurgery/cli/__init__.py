"""The command line: a thin typer layer over the library. The only place that prints."""
