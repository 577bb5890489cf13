"""`python -m kvc.cli`: the `kvc` command."""
import sys

from kvc.cli import main

sys.exit(main())
