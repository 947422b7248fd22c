import sys

from mcsproxy.cli import main

sys.exit(main())
