import sys

from avatarbooth.cli import main

sys.exit(main())
