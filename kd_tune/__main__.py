import sys

from kd_tune.cli import main

sys.exit(main())
