"""`python -m lab.report`: see lab/report/__init__.py."""

import sys

from results import ResultsFileError

from lab.report import main

try:
    main()
except ResultsFileError as err:
    sys.exit(f"error: {err}")
