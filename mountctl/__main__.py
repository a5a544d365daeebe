import sys

from mountctl.cli import main

sys.exit(main())
