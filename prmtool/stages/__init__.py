"""One module per pipeline stage: a pure core (rows in, rows out) and a thin typer command."""
