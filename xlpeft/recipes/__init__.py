"""Recipes: one explicit function per command (setup -> train -> save -> track), shared by CLI and pipelines."""
