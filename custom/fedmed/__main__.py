import sys

from fedmed.cli import main

sys.exit(main())
