"""Long documents: test accuracy of data.long_text=truncate, head_tail and chunks, side by side, from one run.

The documents are made from the packaged Rotten Tomatoes snippets (flaxclf.assets' rt-snippets-4way): each
holds 9 to 15 snippets drawn at random from one split's pool, and its label is the polarity most of them have
(negative: "very negative" or "negative"; positive: the other two). The evidence is spread over the whole
document, a few hundred tokens, so a model that reads the first 128 tokens sees only some of it. Train,
validation and test documents draw on the packaged splits' own snippets, so no test snippet is seen in training.

Each mode runs the real command (`python -m flaxclf.cli train`, MiniLM-L6, the default settings otherwise) on
the same CSV files, one after the other; the table gives the test accuracy and macro-F1 of the exported model,
counted per document, and each run's wall time.

    .venv/bin/python bench/long_text.py --out /tmp/long_text
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402

NEGATIVE = ("very negative", "negative")


def make_documents(n: int, pool: tuple[list[str], list[str]], rng: np.random.Generator) -> tuple[list, list]:
    """n documents of 9-15 snippets from the pool; the label is the majority polarity of its snippets."""
    texts, labels = pool
    negative = np.array([label in NEGATIVE for label in labels])
    docs, doc_labels = [], []
    for _ in range(n):
        pick = rng.choice(len(texts), size=int(rng.choice([9, 11, 13, 15])), replace=False)
        docs.append(" ".join(texts[i] for i in pick))
        doc_labels.append("negative" if negative[pick].sum() * 2 > len(pick) else "positive")
    return docs, doc_labels


def write_data(out: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    import pandas as pd

    tables = runs.rt_tables()
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in sizes.items():
        cols = tables[split].columns
        docs, labels = make_documents(n, (cols["text"], cols["label"]), rng)
        files[split] = out / f"{split}.csv"
        pd.DataFrame({"text": docs, "label": labels}).to_csv(files[split], index=False)
    return files


def token_lengths(files: dict[str, Path]) -> dict[str, float]:
    import pandas as pd

    from flaxclf import assets
    from flaxclf.data import tokens

    tok = tokens.load_tokenizer(assets.resolve_model("minilm-l6"), 100_000)
    lengths = [len(e.ids) for e in tok.encode_batch(pd.read_csv(files["test"])["text"].tolist())]
    return {"median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "over_128": float(np.mean(np.array(lengths) > 128))}


def run_mode(mode: str, files: dict[str, Path], out: Path, extra: list[str]) -> dict:
    r = runs.train(out / f"run-{mode}", files, [f"data.long_text={mode}", *extra])
    report = [line for line in r["stdout"].splitlines() if "test:" in line and "longer than" in line]
    return {"mode": mode, "wall_s": r["wall_s"], "test": r["test"], "report": report[0] if report else ""}


def main() -> None:
    p = runs.parser(__doc__, "/tmp/flaxclf-long-text", 1600)
    p.add_argument("--modes", default="truncate,head_tail,chunks")
    args = p.parse_args()
    files = write_data(args.out, runs.sizes(args), args.seed)
    lengths = token_lengths(files)
    print(f"documents: {args.train} train, {args.validation} validation, {args.test} test; test length in tokens: "
          f"median {lengths['median']:.0f}, p95 {lengths['p95']:.0f}; {lengths['over_128']:.0%} over 128", flush=True)
    results = []
    for mode in args.modes.split(","):
        results.append(run_mode(mode, files, args.out, args.overrides))
        r = results[-1]
        print(f"  {mode}: test accuracy {r['test']['accuracy']:.4f}, macro-F1 {r['test']['macro_f1']:.4f}, "
              f"{r['wall_s']:.0f} s", flush=True)
    print("\n| data.long_text | test accuracy | test macro-F1 | wall |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} | {r['wall_s']:.0f} s |")
    print("\n" + "\n".join(r["report"] for r in results if r["report"]))


if __name__ == "__main__":
    main()
