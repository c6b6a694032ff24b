"""``python -m diffquant ...`` runs the command line (the same as the ``diffquant`` script)."""

from .cli import main

raise SystemExit(main())
