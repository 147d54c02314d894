"""`python -m vggattn.app`."""

from . import main

raise SystemExit(main())
