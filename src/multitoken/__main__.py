"""`python -m multitoken` runs the CLI."""

import sys

from multitoken.cli.main import main

sys.exit(main())
