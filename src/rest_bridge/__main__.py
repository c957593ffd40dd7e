import sys

from rest_bridge.cli import main

sys.exit(main())
