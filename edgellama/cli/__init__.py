"""The `edgellama` command: one module per subcommand, whose docstring is its help text."""
