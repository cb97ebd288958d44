"""NORA's FAST round trip on LIBERO chunks: env actions -> NORA's normalisation -> FAST ids ->
decode -> NORA's unnormalisation and gripper rule -> env actions; the error in env units and
the tokens per chunk, for NORA's two horizons (1: declare-lab/nora, 5: declare-lab/nora-long).

The actions come from a LIBERO-format dataset vlatune reads (`--data`, in LIBERO's env
convention: gripper -1 open / +1 close), normalised as the nora family trains
(`vlatune.policies.nora.processor`: the dataset's q01 / q99, the gripper in NORA's [0, 1]
passed through). The FAST tokenizer is `--fast` (a folder, e.g. FAST+
`physical-intelligence/fast`, when one is available), else one fitted here with FAST+'s
settings (scale 10, vocabulary 2048) on the chunks of 80% of the episodes; every measurement
is on the chunks of the other 20% (all episodes when `--fast` is given).

Errors are reported two ways: `fast_*` against the normalised-then-unnormalised chunk (what
FAST alone loses: DCT rounding, bounded by `bound`), and `total_*` against the recorded env
actions (adds the q01 / q99 clipping of normalisation). Dimensions 0-5 are the continuous ones;
the gripper (dim 6) is compared exactly: `gripper_mismatches` with the gripper statistics the
nora family writes for a dataset (-1 / 1: unnormalisation is the identity on it), and
`gripper_mismatches_nora_stats` with NORA's own (0 / 1, which puts a predicted close at exactly
the 0.5 threshold of NORA's gripper rule).

    $ .venv/bin/python benchmarks/fast_roundtrip.py --data DIR [--fast FAST_DIR]

Prints a table and writes benchmarks/results/fast_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlatune.data import open_dataset  # noqa: E402
from vlatune.policies.nora import processor as P  # noqa: E402
from vlatune.policies.tokenizers.fast import FastTokenizer  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

HORIZONS = (1, 5)
OUT = Path(__file__).parent / "results" / "fast_roundtrip.json"


def chunks_of(episodes: list[np.ndarray], H: int) -> list[np.ndarray]:
    return [ep[t : t + H] for ep in episodes for t in range(0, len(ep) - H + 1)]


def read_actions(data: Path) -> list[np.ndarray]:
    with open_dataset(data) as reader:
        return [
            np.asarray(reader.load_episode(i, cameras=[]).actions, dtype=np.float64)
            for i in range(len(reader))
        ]


def measure(
    data: Path,
    fast_dir: Path | None = None,
    horizons=HORIZONS,
    scale: float = 10,
    vocab: int = 2048,
) -> dict[str, Any]:
    episodes = read_actions(data)
    if len(episodes) < 2 and fast_dir is None:
        raise SystemExit(f"{data}: {len(episodes)} episode(s); fitting FAST needs at least 2")
    acts = np.concatenate(episodes)
    stats = {
        "action": {"q01": np.quantile(acts, 0.01, 0), "q99": np.quantile(acts, 0.99, 0)},
    }
    entry = P.stats_entry(stats, -1)
    grip = P.GripperStep(-1)
    normed = [P.normalize(grip({"actions": ep}, None)["actions"], entry) for ep in episodes]
    n_fit = len(episodes) if fast_dir is not None else max(1, int(0.8 * len(episodes)))
    held = slice(0, len(episodes)) if fast_dir is not None else slice(n_fit, None)
    if fast_dir is not None:
        fast = FastTokenizer.from_pretrained(fast_dir)
        source = f"loaded from {fast_dir}"
    else:
        fit = [c for H in horizons for c in chunks_of(normed[:n_fit], H)]
        fast = FastTokenizer.fit(fit, scale=scale, vocab_size=vocab)
        source = (
            f"fitted here (scale {scale}, vocabulary {vocab}) on {len(fit)} chunks of "
            f"{n_fit} episodes"
        )
    rows = []
    for H in horizons:
        env = chunks_of(episodes[held], H)
        norm = chunks_of(normed[held], H)
        t0 = time.perf_counter()
        ids = [fast.encode(c) for c in norm]
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = [fast.decode(i, H, 7) for i in ids]
        t_dec = time.perf_counter() - t0
        bad = sum(not d.ok for d in dec)
        back = np.stack([grip.inverse(P.unnormalize(d.actions, entry)) for d in dec])
        clipped = np.stack([grip.inverse(P.unnormalize(c, entry)) for c in norm])
        env = np.stack(env)
        nora_entry = {**entry, "q01": [*entry["q01"][:6], 0.0], "q99": [*entry["q99"][:6], 1.0]}
        nora_back = np.stack([grip.inverse(P.unnormalize(d.actions, nora_entry)) for d in dec])
        fast_err = np.abs(back[..., :6] - clipped[..., :6])
        total_err = np.abs(back[..., :6] - env[..., :6])
        half = 0.5 * (np.asarray(entry["q99"]) - np.asarray(entry["q01"]))[:6]
        lengths = np.array([len(i) for i in ids])
        rows.append(
            {
                "horizon": H,
                "checkpoint": "declare-lab/nora-long" if H == 5 else "declare-lab/nora",
                "chunks": len(norm),
                "tokens_mean": float(lengths.mean()),
                "tokens_max": int(lengths.max()),
                "tokens_per_value": float(lengths.mean() / (H * 7)),
                "undecodable": int(bad),
                "lossy_encodes": int(fast.lossy_encodes),
                "fast_max_abs": float(fast_err.max()),
                "fast_mean_abs": float(fast_err.mean()),
                "fast_max_abs_per_dim": fast_err.reshape(-1, 6).max(0).tolist(),
                "bound_per_dim": (fast.quantization_bound(H) * half).tolist(),
                "total_max_abs": float(total_err.max()),
                "total_mean_abs": float(total_err.mean()),
                "gripper_mismatches": int((back[..., 6] != env[..., 6]).sum()),
                "gripper_mismatches_nora_stats": int((nora_back[..., 6] != env[..., 6]).sum()),
                "gripper_values": int(env[..., 6].size),
                "encode_chunks_per_s": len(norm) / max(t_enc, 1e-9),
                "decode_chunks_per_s": len(norm) / max(t_dec, 1e-9),
            }
        )
    return {
        "benchmark": "fast_roundtrip",
        "data": str(data),
        "episodes": len(episodes),
        "held_out_episodes": len(episodes[held]),
        "fast": source,
        "normalisation": "dataset q01 / q99 (NORA's rule; gripper in [0, 1], passed through)",
        "units": "env units (LIBERO delta actions); dims 0-5",
        "rows": rows,
        "versions": version_block(),
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'H':>2} {'chunks':>7} {'tok mean':>8} {'tok max':>7} {'undec':>5} "
        f"{'FAST max':>9} {'FAST mean':>9} {'total max':>9} {'grip x':>6} {'grip x NORA':>11}"
    )
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f"{r['horizon']:>2} {r['chunks']:>7} {r['tokens_mean']:>8.2f} {r['tokens_max']:>7} "
            f"{r['undecodable']:>5} {r['fast_max_abs']:>9.5f} {r['fast_mean_abs']:>9.5f} "
            f"{r['total_max_abs']:>9.5f} {r['gripper_mismatches']:>6} "
            f"{r['gripper_mismatches_nora_stats']:>11}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a LIBERO-format dataset")
    ap.add_argument("--fast", type=Path, default=None, help="a FAST tokenizer folder")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--scale", type=float, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(
            f"{args.data} does not exist: record demos with `vlatune sim synth --out DIR` first"
        )
    result = measure(args.data, args.fast, scale=args.scale, vocab=args.vocab)
    print(f"data: {args.data} ({result['episodes']} episodes); FAST {result['fast']}")
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
