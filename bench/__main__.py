"""`python -m refimpl.bench worker KIND ...`: one measurement in a fresh process."""

from .suite import worker_main

raise SystemExit(worker_main())
