"""The command line: a thin layer over the library (typer for help and usage errors). The only place that prints."""
