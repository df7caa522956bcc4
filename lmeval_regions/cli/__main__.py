import sys

from lmeval_regions.cli.main import main

sys.exit(main())
