"""`python -m edgellama` is the `edgellama` command."""

from edgellama.cli.main import entry

entry()
