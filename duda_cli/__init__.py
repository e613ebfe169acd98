"""The `duda` command line: option parsing, console output and exit codes only."""
