import os

# Before torch is imported: with 2 threads, libgomp's spin-wait costs milliseconds per op otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

raise SystemExit(main())
