"""`python -m aptp VERB ...` runs the `aptp` command."""

import sys

from aptp.cli import main

sys.exit(main())
