"""`python -m vggattn.study`."""

from . import main

raise SystemExit(main())
