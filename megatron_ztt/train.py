"""Entry point: ``torchrun --nproc-per-node N -m megatron_ztt.train --config FILE key=value ...``"""

import sys

from megatron_ztt.training.train import main

if __name__ == "__main__":
    sys.exit(main())
