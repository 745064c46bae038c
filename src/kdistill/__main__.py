"""`python -m kdistill ...`: the same command line as `kdistill ...`."""

import os
import sys

from kdistill.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
