import sys

from sdswarm.cli import main

sys.exit(main())
