"""`python -m lmserve` runs the CLI."""

import sys

from lmserve.cli.main import main

sys.exit(main())
