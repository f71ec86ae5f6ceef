"""`python -m splicerelay` is the `splicerelay` command."""

import sys

from .cli import main

sys.exit(main())
