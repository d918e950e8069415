"""``python -m gist_index`` (also what ``torchrun -m gist_index build ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
