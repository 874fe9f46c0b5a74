"""`python -m simulation.deploy ...`: `oppu-deploy` as a module, as the tests start it in its own process."""

import sys

from simulation.deploy.cli import main

sys.exit(main())
