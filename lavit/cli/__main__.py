"""`python -m lavit.cli ...` (what launchers such as `accelerate launch -m lavit.cli` run on every rank)."""

import sys

from lavit.cli import main

sys.exit(main())
