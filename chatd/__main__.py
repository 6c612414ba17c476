"""``python -m chatd`` is ``chatd``."""

from chatd.cli.chatd import main

raise SystemExit(main())
