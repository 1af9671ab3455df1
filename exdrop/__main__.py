import sys

from exdrop.cli import main

sys.exit(main())
