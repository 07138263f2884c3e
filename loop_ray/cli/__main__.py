import sys

from loop_ray.cli.main import main

sys.exit(main())
