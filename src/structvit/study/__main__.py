"""``python -m structvit.study``: the ``structvit study`` command."""
import sys

from .cli import main

sys.exit(main())
