"""``python -m usersim_ui.batch``: the batch-run command line (see :mod:`usersim_ui.batch.cli`)."""

import sys

from usersim_ui.batch.cli import main

sys.exit(main())
