"""`python -m pyfastscan ...`: the same as the `pyfastscan` command."""
from .cli import main

raise SystemExit(main())
