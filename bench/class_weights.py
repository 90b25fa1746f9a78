"""An imbalanced task: macro-F1 with loss.class_weights=none and =balanced, side by side, from one run each.

The data set is a small 3-class one with a 64/27/9 class split, made from the packaged Rotten Tomatoes snippets
(rt-snippets-4way): "positive" 64%, "negative" 27%, "very negative" 9% of every split, rows drawn at random
from the packaged split of the same name. Both runs are the real command (`python -m flaxclf.cli train`,
MiniLM-L6, the default settings otherwise) on the same CSV files; the table gives the test macro-F1, accuracy and
per-class recall of the exported model, and the learns-nothing warning where the run printed one.

    .venv/bin/python bench/class_weights.py --out /tmp/class_weights
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402

SHARES = {"positive": 0.64, "negative": 0.27, "very negative": 0.09}


def write_data(out: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    import pandas as pd

    tables, rng, files = runs.rt_tables(), np.random.default_rng(seed), {}
    for split, n in sizes.items():
        cols = tables[split].columns
        labels = np.array(cols["label"])
        rows = np.concatenate([rng.choice(np.flatnonzero(labels == name), size=round(share * n), replace=False)
                               for name, share in SHARES.items()])
        rng.shuffle(rows)
        files[split] = out / f"{split}.csv"
        pd.DataFrame({"text": [cols["text"][i] for i in rows], "label": labels[rows]}).to_csv(files[split],
                                                                                              index=False)
    return files


def test_recalls(run_dir: str) -> str:
    """Each class's recall on the test split, from the run's last test record in metrics.jsonl."""
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    per_class = [r for r in records if r["split"].startswith("test_")][-1]["per_class"]
    return ", ".join(f"{name} {c['recall']:.2f}" for name, c in per_class.items())


def main() -> None:
    args = runs.parser(__doc__, "/tmp/flaxclf-class-weights", 600).parse_args()
    files = write_data(args.out, runs.sizes(args), args.seed)
    print(f"rows: {args.train} train, {args.validation} validation, {args.test} test; classes "
          + ", ".join(f"{k} {v:.0%}" for k, v in SHARES.items()), flush=True)
    results = {}
    for weights in ("none", "balanced"):
        r = runs.train(args.out / f"run-{weights}", files, [f"loss.class_weights={weights}", *args.overrides])
        results[weights] = r
        print(f"  class_weights={weights}: test macro-F1 {r['test']['macro_f1']:.4f}, accuracy "
              f"{r['test']['accuracy']:.4f}, {r['wall_s']:.0f} s", flush=True)
    print("\n| loss.class_weights | test macro-F1 | test accuracy | test recall per class | learns-nothing warning |\n"
          "|---|---|---|---|---|")
    for weights, r in results.items():
        warned = "; ".join(w for w in r["warnings"] if w.startswith("test")) or "none"
        print(f"| {weights} | {r['test']['macro_f1']:.4f} | {r['test']['accuracy']:.4f} | "
              f"{test_recalls(r['run_dir'])} | {warned} |")
    for weights, r in results.items():
        print(f"\n{weights}: " + "; ".join(line.strip() for line in r["stdout"].splitlines()
                                          if line.strip().startswith(("loss:", "test (", "warning:"))))


if __name__ == "__main__":
    main()
