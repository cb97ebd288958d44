"""(Named action_tokenizers.py: a script called tokenizers.py would shadow the `tokenizers` package.)

Action tokenizers on real LIBERO-like actions: tokens per chunk, compression vs naive
per-dimension binning (H x D tokens), max reconstruction error, encode / decode chunks/s, for
H = 1, 5, 8, 10.

Actions come from a dataset vlatune reads (default: the demo's scripted LIBERO demonstrations),
normalised with q01/q99 to [-1, 1] as training does; FAST is fitted on 80% of the episodes and
measured on the other 20%.

    $ .venv/bin/python benchmarks/action_tokenizers.py [--data outputs/demo/data/libero_hdf5]

Prints a table and writes benchmarks/results/action_tokenizers.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlatune.data import open_dataset  # noqa: E402
from vlatune.data.transforms import Normalizer  # noqa: E402
from vlatune.policies.tokenizers import BinTokenizer, FastTokenizer  # noqa: E402
from vlatune.versions import version_block  # noqa: E402


def chunks_of(episodes: list[np.ndarray], H: int) -> list[np.ndarray]:
    return [ep[t : t + H] for ep in episodes for t in range(0, len(ep) - H + 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("outputs/demo/data/libero_hdf5"))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "action_tokenizers.json"
    )
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(
            f"{args.data} does not exist: run `vlatune demo` (or sim synth) first, or pass --data"
        )
    with open_dataset(args.data) as reader:
        episodes = [
            np.asarray(reader.load_episode(i, cameras=[]).actions) for i in range(len(reader))
        ]
    all_actions = np.concatenate(episodes)
    stats = {"q01": np.quantile(all_actions, 0.01, 0), "q99": np.quantile(all_actions, 0.99, 0)}
    norm = Normalizer.from_stats(stats, "q99", keep_dims=[-1])
    episodes = [norm(ep) for ep in episodes]
    n_fit = max(1, int(0.8 * len(episodes)))
    rows = []
    for H in (1, 5, 8, 10):
        fit, test = chunks_of(episodes[:n_fit], H), chunks_of(episodes[n_fit:], H)
        if not test:
            test = fit
        D = fit[0].shape[1]
        fast = FastTokenizer.fit(fit, scale=10, vocab_size=args.vocab)
        bins = BinTokenizer()
        for name, tok in (("fast", fast), ("bins", bins)):
            t0 = time.perf_counter()
            encoded = [tok.encode(c) for c in test]
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            decoded = [tok.decode(ids, H, D) for ids in encoded]
            t_dec = time.perf_counter() - t0
            ok = [d for d in decoded if d.ok]
            err = max(
                float(np.abs(d.actions - c).max())
                for d, c in zip(decoded, test, strict=True)
                if d.ok
            )
            tokens = float(np.mean([len(e) for e in encoded]))
            rows.append(
                {
                    "tokenizer": name,
                    "horizon": H,
                    "action_dim": D,
                    "chunks": len(test),
                    "tokens_per_chunk": round(tokens, 2),
                    "compression_vs_naive": round(H * D / tokens, 2),
                    "max_abs_error": round(err, 4),
                    "decode_failures": len(test) - len(ok),
                    "encode_chunks_per_s": round(len(test) / t_enc, 1),
                    "decode_chunks_per_s": round(len(test) / t_dec, 1),
                }
            )
    print(
        f"{'tok':5} {'H':>3} {'tokens':>7} {'x naive':>8} {'max err':>8} {'enc/s':>9} {'dec/s':>9}"
    )
    for r in rows:
        print(
            f"{r['tokenizer']:5} {r['horizon']:3d} {r['tokens_per_chunk']:7.2f} {r['compression_vs_naive']:8.2f} "
            f"{r['max_abs_error']:8.4f} {r['encode_chunks_per_s']:9.0f} {r['decode_chunks_per_s']:9.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "versions": version_block(),
        "data": str(args.data),
        "episodes": len(episodes),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
