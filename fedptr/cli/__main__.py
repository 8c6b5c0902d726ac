"""``python -m fedptr.cli``: the ``fedptr`` command."""

import sys

from fedptr.cli import main

sys.exit(main())
