import sys

from vizer.cli import main

sys.exit(main())
