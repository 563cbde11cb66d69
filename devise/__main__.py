"""`python -m devise` is the `devise` command."""

import sys

from devise.cli import main

sys.exit(main())
