import sys

from pretrace.cli import main

sys.exit(main())
