"""Command-line entry points; each parses flags and calls the binax library."""
