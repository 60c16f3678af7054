"""`python -m onepeace_hf.cli ...`, the same as the `onepeace-hf` console script."""

import sys

from . import main


sys.exit(main())
