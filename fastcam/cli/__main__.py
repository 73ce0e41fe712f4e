import sys

from fastcam.cli import main

sys.exit(main())
