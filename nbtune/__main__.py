"""`python -m nbtune ...` is the `nbtune` command."""

import sys

from nbtune.cli import main

sys.exit(main())
