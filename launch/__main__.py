"""`python -m launch run|slurm ...`; see launch.main."""
import sys

from launch.main import main

sys.exit(main())
