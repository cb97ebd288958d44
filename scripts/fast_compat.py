"""Does vlatune's FAST tokenizer agree with the reference code, both ways?

The reference is `UniversalActionProcessor` (physical-intelligence/fast's
`processing_action_tokenizer.py`) as lerobot 0.6.1 ships it
(`lerobot/policies/molmoact2/molmoact2_hf_model/action_tokenizer.py`, the copy the
`shared/reference/fast` fixture was made with). Its only imports are numpy, scipy,
`tokenizers` and `transformers`, plus lerobot's `_hf_token` helper (a hub credential lookup,
called only when downloading): the script loads that one file from the lerobot wheel into this
interpreter and supplies `_hf_token` as a function that raises if called (no hub here). No
torch or torchvision needed, so no side environment.

For three settings (the fixture's H 8 / D 7 / vocab 512; FAST+-sized coefficients, min_token
about -354, H 10, vocab 2048; NORA's H 1) it checks:
- `fit`: the reference's and vlatune's fit on the same chunks give the same min_token,
  vocabulary and merges;
- folders: the reference loads vlatune's saved folder (`from_pretrained_local`, and
  transformers' `ProcessorMixin.from_pretrained`), vlatune loads the reference's
  `save_pretrained` folder; which files are byte-identical;
- held-out chunks (in range and wider): ids identical, decoded chunks identical (max abs diff),
  both directions through the loaded copies;
- invalid id sequences (truncated, extra ids, empty, an id past the vocabulary, a negative id,
  one id per byte with the last byte removed: a 2-byte character cut in two where the chunk
  has such characters): the same chunk, and vlatune's `reference_ok` equal to "the reference
  logged no error";
- how many held-out chunks the pre-fix decoder (`id_to_token` + `ord`) got right.

    pip download --no-deps --python-version 3.12 --only-binary=:all: lerobot==0.6.1 -d /tmp/lr
    .venv/bin/python scripts/fast_compat.py --wheel /tmp/lr/lerobot-0.6.1-py3-none-any.whl

Prints one line per check, writes benchmarks/results/fast_compat.json, exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import tokenizers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vlatune.policies.tokenizers import FastTokenizer  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

MEMBER = "lerobot/policies/molmoact2/molmoact2_hf_model/action_tokenizer.py"


def load_reference(wheel: Path):
    """The reference module from the wheel, in a package of its own."""
    source = zipfile.ZipFile(wheel).read(MEMBER).decode()
    root, sub = "fast_reference", "fast_reference.molmoact2_hf_model"
    for name in (root, sub):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        sys.modules[name] = pkg

    def _hf_token():
        raise RuntimeError("the reference tried to reach the hub; this check is offline")

    helper = types.ModuleType(f"{root}.modeling_molmoact2")
    helper._hf_token = _hf_token
    sys.modules[helper.__name__] = helper
    tmp = Path(tempfile.mkdtemp(prefix="fast-ref-")) / "action_tokenizer.py"
    tmp.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{sub}.action_tokenizer", tmp)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "Error decoding" in record.getMessage():
            self.count += 1


def walks(rng, n, H, D, step, clip):
    return np.clip(np.cumsum(rng.normal(0, step, (n, H, D)), axis=1), -clip, clip)


def settings():
    rng = np.random.default_rng(0)
    plus_amp = 35.0 / np.sqrt(10)
    plus = walks(rng, 1200, 10, 7, 0.3 * plus_amp, plus_amp)
    plus[0] = -35.4 / np.sqrt(10)  # pins min_token at -354, FAST+'s value
    return [
        ("fixture_like_h8", 10, 512, walks(rng, 1000, 8, 7, 0.3, 1.0),
         np.concatenate([walks(rng, 45, 8, 7, 0.3, 1.0), walks(rng, 5, 8, 7, 1.2, 3.0)])),
        ("fast_plus_like_h10", 10, 2048, plus,
         np.concatenate([walks(rng, 45, 10, 7, 0.3 * plus_amp, plus_amp),
                         walks(rng, 5, 10, 7, plus_amp, 2 * plus_amp)])),
        ("nora_h1", 10, 256, walks(rng, 2000, 1, 7, 0.5, 1.0),
         np.concatenate([walks(rng, 45, 1, 7, 0.5, 1.0), walks(rng, 5, 1, 7, 3.0, 3.0)])),
    ]  # fmt: skip


def byte_ids(tok: FastTokenizer, chunk) -> list[int]:
    """One id per UTF-8 byte (unmerged byte-level tokens): a valid sequence to cut."""
    pieces = tok.bpe.pre_tokenizer.pre_tokenize_str(tok._to_text(tok.quantize(chunk)))
    return [tok.bpe.token_to_id(c) for p, _ in pieces for c in p]


def check_setting(ref_mod, name, scale, vocab, train, held, work: Path) -> dict:
    UAP = ref_mod.UniversalActionProcessor
    H, D = train.shape[1:]
    log = ErrorLog()
    ref_mod.logger.addHandler(log)
    ref_mod.logger.setLevel(logging.WARNING)
    ref_mod.logger.propagate = False  # counted here, not printed
    out: dict = {"setting": name, "time_horizon": H, "action_dim": D, "vocab_size": vocab}
    ref = UAP.fit(list(train), scale=scale, vocab_size=vocab, time_horizon=H, action_dim=D)
    ours = FastTokenizer.fit(list(train), scale=scale, vocab_size=vocab)
    out["min_token"] = {"reference": ref.min_token, "vlatune": ours.min_token}
    ref_model = json.loads(ref.bpe_tokenizer.backend_tokenizer.to_str())["model"]
    our_model = json.loads(ours.bpe.to_str())["model"]
    out["fit_same_vocab_and_merges"] = (
        ref_model["vocab"] == our_model["vocab"] and ref_model["merges"] == our_model["merges"]
    )

    ours.save(work / f"{name}-vlatune")
    ref.save_pretrained(str(work / f"{name}-reference"))
    ref_loaded = UAP.from_pretrained_local(str(work / f"{name}-vlatune"))
    try:
        UAP.from_pretrained(str(work / f"{name}-vlatune"))
        out["reference_processor_mixin_from_pretrained"] = "ok"
    except Exception as e:  # reported, not hidden
        out["reference_processor_mixin_from_pretrained"] = f"{type(e).__name__}: {e}"
    ours_loaded = FastTokenizer.from_pretrained(work / f"{name}-reference")
    out["files_identical"] = {
        f: (work / f"{name}-vlatune" / f).read_bytes()
        == (work / f"{name}-reference" / f).read_bytes()
        for f in ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
    }

    ours_cfg, ref_cfg = (
        json.loads((work / f"{name}-{who}" / "tokenizer_config.json").read_text())
        for who in ("vlatune", "reference")
    )
    out["tokenizer_config_differences"] = {
        k: {"vlatune": ours_cfg.get(k), "reference": ref_cfg.get(k)}
        for k in sorted(set(ours_cfg) | set(ref_cfg))
        if ours_cfg.get(k) != ref_cfg.get(k)
    }

    ref_ids = ref(held)
    ids_equal = all(
        ref_ids == [t.encode(c) for c in held] for t in (ours, ours_loaded)
    ) and ref_ids == ref_loaded(held)
    out["held_out_chunks"] = len(held)
    out["ids_equal"] = ids_equal
    ref_dec = ref.decode(ref_ids, time_horizon=H, action_dim=D)
    diffs = [
        float(np.abs(np.stack([t.decode(i, H, D).actions for i in ref_ids]) - ref_dec).max())
        for t in (ours, ours_loaded)
    ]
    out["decoded_max_abs_diff"] = max(diffs)
    out["reference_decode_failures"] = int(sum(not d.any() for d in ref_dec))
    out["vlatune_not_ok"] = sum(not ours.decode(i, H, D).ok for i in ref_ids)
    out["roundtrip_max_error_in_range"] = float(np.abs(ref_dec[:45] - held[:45]).max())
    out["tokens_per_chunk_in_range"] = float(np.mean([len(i) for i in ref_ids[:45]]))
    naive_right = 0
    for i, c in zip(ref_ids, held, strict=True):
        naive = "".join(ours.bpe.id_to_token(t) for t in i)
        naive_right += naive == ours._to_text(ours.quantize(c))
    out["pre_fix_decoder_right"] = naive_right

    v = ref_ids[0]
    cut = byte_ids(ours, held[int(np.argmax([abs(x).max() for x in held[:45]]))])
    invalid = {
        "truncated": v[:-2],
        "extra_ids": v + v[:3],
        "empty": [],
        "out_of_vocab_id": v[:1] + [ours.bpe.get_vocab_size() + 7] + v[1:],
        "negative_id": [-1, *v],
        "cut_last_byte": cut[:-1],
    }
    inv = {}
    for key, seq in invalid.items():
        before = log.count
        ref_out = ref.decode([seq], time_horizon=H, action_dim=D)[0]
        logged = log.count > before
        res = ours.decode(seq, H, D)
        inv[key] = {
            "reference_logged_error": logged,
            "vlatune_reference_ok": res.reference_ok,
            "vlatune_ok": res.ok,
            "max_abs_diff": float(np.abs(res.actions - ref_out).max()),
            "agree": bool(
                res.reference_ok == (not logged) and np.array_equal(res.actions, ref_out)
            ),
        }
    out["invalid"] = inv
    ref_mod.logger.removeHandler(log)
    out["ok"] = bool(
        out["min_token"]["reference"] == out["min_token"]["vlatune"]
        and out["fit_same_vocab_and_merges"]
        and ids_equal
        and out["decoded_max_abs_diff"] == 0.0
        and all(r["agree"] for r in inv.values())
        and out["files_identical"]["processor_config.json"]
        and out["files_identical"]["tokenizer.json"]
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", type=Path, required=True, help="lerobot-0.6.1-py3-none-any.whl")
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "fast_compat.json"
    )
    args = ap.parse_args()
    if not args.wheel.is_file():
        sys.exit(f"{args.wheel} does not exist: download it first (see the docstring)")
    ref_mod = load_reference(args.wheel)
    logging.getLogger("vlatune").setLevel(logging.ERROR)  # our decode warnings: expected here
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, scale, vocab, train, held in settings():
            row = check_setting(ref_mod, name, scale, vocab, train, held, Path(work))
            rows.append(row)
            print(
                f"{name:20} ok={row['ok']} fit_same={row['fit_same_vocab_and_merges']} "
                f"ids_equal={row['ids_equal']} decoded_diff={row['decoded_max_abs_diff']:.1e} "
                f"invalid_agree={sum(r['agree'] for r in row['invalid'].values())}/"
                f"{len(row['invalid'])} ref_loads_ours=ok "
                f"mixin={row['reference_processor_mixin_from_pretrained'][:40]} "
                f"pre_fix_right={row['pre_fix_decoder_right']}/{row['held_out_chunks']}"
            )
    result = {
        "reference": f"lerobot 0.6.1 {MEMBER}",
        "versions": {**version_block(), "tokenizers": tokenizers.__version__},
        "settings": rows,
        "ok": all(r["ok"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
