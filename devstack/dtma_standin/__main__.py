"""``python -m devstack.dtma_standin``: see :mod:`devstack.dtma_standin.cli`."""

from devstack.dtma_standin.cli import main

raise SystemExit(main())
