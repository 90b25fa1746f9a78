"""Fine-tune a BERT classifier: `python train.py [--config configs/NAME.yaml] [key=value ...]`.

Intentionally thin: the logic lives in flaxclf (flaxclf.cli, flaxclf.training.loop). Equivalent to `flaxclf train`.
"""

import sys

from flaxclf.cli import console

if __name__ == "__main__":
    sys.exit(console(["train", *sys.argv[1:]]))
