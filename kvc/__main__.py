"""`python -m kvc` (and `torchrun --nproc-per-node N -m kvc run ART ...`): the `kvc` command."""
import sys

from kvc.cli import main

sys.exit(main())
