"""`python -m refimpl ...`"""

from .cli import main

raise SystemExit(main())
