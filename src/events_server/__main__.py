import sys

from events_server.cli import main

sys.exit(main())
