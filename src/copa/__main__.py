import sys

from copa.cli import main

sys.exit(main())
