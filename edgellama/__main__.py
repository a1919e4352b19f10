"""`python -m edgellama` is the `edgellama` command."""

import sys

from edgellama.cli.main import main

sys.exit(main())
