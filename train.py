"""Fine-tune a BERT classifier: `python train.py [--config configs/NAME.yaml] [key=value ...]`.

Intentionally thin: the logic lives in flaxclf (flaxclf.cli, flaxclf.train). Equivalent to `flaxclf train`.
"""

import sys

from flaxclf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
