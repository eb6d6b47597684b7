import sys

from eurotrain.cli import main

sys.exit(main())
