"""Paper reproductions, one module per table or figure (`python -m experiments.<name>`)."""
