"""The composed rdt-style backbone and the `rdt` family share one T5 embedding cache
implementation (`vlatune.policies.rdt.language.LanguageEmbeddings`): the same file names
(sha256(encoder, max tokens, text)[:32], as before, so existing caches still work), the same
per-text files and the same `language_embeddings.safetensors` saved with a policy."""

from __future__ import annotations

import hashlib

import torch

from test_rdt import encoders, make  # noqa: F401  (the module fixture)
from vlatune.policies.rdt.language import LanguageEmbeddings


def test_one_cache_for_both_rdt_backbones(encoders, tmp_path):  # noqa: F811
    cache = tmp_path / "lang"
    policy = make(encoders, cache)
    bb = policy.backbone
    texts = ["put the bowl on the plate", "open the drawer"]
    assert bb.encode_texts(texts) == 2
    t5 = str(encoders[1])
    names = {
        hashlib.sha256(f"{t5}\n{bb.r.max_text_tokens}\n{t}".encode()).hexdigest()[:32]
        + ".safetensors"
        for t in texts
    }
    assert {f.name for f in cache.glob("*.safetensors")} == names  # the keys as before
    # the rdt family's reader finds them without an encoder ...
    family = LanguageEmbeddings(t5, bb.r.max_text_tokens, cache)  # T5 never loads: on disk
    assert family.encode(texts) == 0 and not family.encoder_loaded
    for t in texts:
        assert torch.equal(family.known[t], bb.language[t])
    # ... and reads the file a composed policy saves, and the other way round
    policy.save(tmp_path / "p")
    again = LanguageEmbeddings(None, bb.r.max_text_tokens, tmp_path / "nothing")
    again.load(tmp_path / "p" / "language_embeddings.safetensors")
    assert set(again.known) == set(texts)
    family.save(tmp_path / "family.safetensors")
    other = make(encoders, tmp_path / "empty")
    other.backbone.load_language(tmp_path / "family.safetensors")
    assert other.backbone.encode_texts(texts) == 0 and other.backbone._text_encoder is None
    # padded batches: zeros after each text, padding marked
    emb, pad = bb._language_tokens(texts, "cpu")
    n = [bb.language[t].shape[0] for t in texts]
    assert pad.sum(1).tolist() == [max(n) - k for k in n]
    assert torch.equal(emb[0, : n[0]], bb.language[texts[0]]) and not emb[pad].any()


def test_language_embeddings_come_from_the_processor(encoders, tmp_path):  # noqa: F811
    """The composed.language step looks the cached embedding up per sample (in the loader
    workers: it pickles with the cache), the collate pads it, and the backbone uses those
    tensors: the same loss as its own lookup, no T5 once the instructions are precomputed."""
    import pickle

    import numpy as np

    from test_policies import observation
    from vlatune.policies.composed.processor import LanguageLookup, load_processor

    policy = make(encoders, tmp_path / "lang")
    texts = ["put the bowl on the plate", "open the drawer"]
    policy.backbone.encode_texts(texts)
    policy.backbone.release_text_encoder()
    proc = pickle.loads(pickle.dumps(policy.processor))  # as a forkserver worker gets it
    assert isinstance(proc.steps[-1], LanguageLookup)
    frames = []
    for i, text in enumerate(texts):
        obs = observation(i)
        obs["images"] = {c: v[:32, :32] for c, v in obs["images"].items()}
        frames.append({**obs, "instruction": text, "actions": np.zeros((4, 7))})
    batch = proc.collate([proc(f) for f in frames])
    n = [policy.backbone.language[t].shape[0] for t in texts]
    assert batch["language_mask"].sum(1).tolist() == n
    for b, t in enumerate(texts):
        assert torch.equal(batch["language"][b, : n[b]], policy.backbone.language[t])
    torch.manual_seed(0)
    with_tensors = policy(batch)["loss"]
    looked_up = {k: v for k, v in batch.items() if k not in ("language", "language_mask")}
    torch.manual_seed(0)
    assert torch.equal(policy(looked_up)["loss"], with_tensors)
    torch.manual_seed(0)  # and the backbone reads the batch's tensors, not its own cache
    assert not torch.equal(
        policy(dict(batch, language=batch["language"] + 1))["loss"], with_tensors
    )
    assert policy.backbone._text_encoder is None
    policy.save(tmp_path / "p")
    again = load_processor(tmp_path / "p")
    assert (
        isinstance(again.steps[-1], LanguageLookup) and not again.steps[-1].language.encoder_loaded
    )
    other = again.collate([again(f) for f in frames])
    assert torch.equal(other["language"], batch["language"])
