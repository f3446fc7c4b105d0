"""The `zoo` command line (typer). It parses and prints; the work happens in `zoo`."""
