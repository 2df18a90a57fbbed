"""``python -m peft_kernels ...``: the ``peft-kernels`` command line (see :mod:`peft_kernels.cli`)."""
from .cli import main

raise SystemExit(main())
