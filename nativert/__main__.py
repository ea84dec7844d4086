import sys

from nativert.cli import main

sys.exit(main())
