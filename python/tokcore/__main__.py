"""``python -m tokcore`` runs the ``tokcore`` command line."""

from .cli import main

raise SystemExit(main())
