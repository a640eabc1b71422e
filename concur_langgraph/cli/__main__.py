"""``python -m concur_langgraph.cli``: the ``concur`` command."""

import sys

from concur_langgraph.cli import main

sys.exit(main())
