"""`python -m launch run|slurm|plan ...`; see launch.main."""
import sys

from launch.main import main

sys.exit(main())
