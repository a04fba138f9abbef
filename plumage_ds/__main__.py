"""``python -m plumage_ds ...`` is the ``plumage-ds`` command."""

import sys

from plumage_ds.cli import main

sys.exit(main())
