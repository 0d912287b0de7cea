"""The bottom layer every package may use: standard-library helpers that import nothing from the project."""
