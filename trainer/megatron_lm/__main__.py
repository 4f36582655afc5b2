"""`python -m trainer.megatron_lm SCRIPT ARGS...`: Megatron-LM's loop as a supervised rank (wrapper.py)."""

import sys

from trainer.megatron_lm.wrapper import main

sys.exit(main(sys.argv[1:]))
