"""`python -m kubetune_operator`: see main.py."""

from kubetune_operator.main import main

raise SystemExit(main())
