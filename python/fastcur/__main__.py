"""`python -m fastcur ...`: the `fastcur` command line (fastcur.cli)."""
from .cli import main

raise SystemExit(main())
