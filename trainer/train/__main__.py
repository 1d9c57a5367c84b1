"""``python -m trainer.train --config <run>/config.toml``: the entry point ``accelerate launch`` runs."""

import sys

from .loop import main

sys.exit(main())
