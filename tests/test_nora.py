"""NORA exactly (issue 21, parts 2-5): prompt, labels, loss, greedy decoding, folder, gripper.

A tiny random Qwen2.5-VL (tests/hf_fixtures.py) gets `<robot_action_0..V-1>` added first, so
they sit at its base vocabulary + k, as NORA's sit at 151665 + k; V = 64 with a FAST tokenizer
fitted on random chunks with that vocabulary. Expected sequences are written out from NORA's
rules (declare-lab/nora `training/train.py`, `inference/nora.py`), not from vlatune's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_fixtures import QWEN_TEMPLATE, tiny_qwen2_5_vl
from vlatune.policies.nora import processor as P
from vlatune.policies.nora.configuration import NoraConfig, horizon_for
from vlatune.policies.nora.convert import is_released_folder, load_released
from vlatune.policies.tokenizers.fast import FastTokenizer

H, D, V = 5, 7, 64
INSTRUCTION = "pick up the cream cheese and place it in the basket"
Q01 = [-0.9, -0.8, -0.9, -0.1, -0.2, -0.3, 0.0]
Q99 = [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0]
NORM_STATS = {
    "libero_object_no_noops": {
        "action": {"q01": Q01, "q99": Q99, "mask": [True] * 6 + [False]},
    }
}


def _chunk(rng) -> np.ndarray:
    c = np.clip(rng.normal(0, 0.3, (H, D)), -1, 1)
    c[:, -1] = [1, 1, -1, -1, -1]  # normalised gripper: open, open, close, close, close
    return c


@pytest.fixture(scope="module")
def nora_folder(tmp_path_factory):
    """(folder in NORA's layout, FAST folder, base vocabulary size)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("nora")
    folder = tiny_qwen2_5_vl(root / "nora-long", with_template=False)
    tok = AutoTokenizer.from_pretrained(folder)
    base = len(tok)
    tok.add_tokens([f"<robot_action_{k}>" for k in range(V)], special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "norm_stats.json").write_text(json.dumps(NORM_STATS))
    rng = np.random.default_rng(0)
    fast = FastTokenizer.fit([_chunk(rng) for _ in range(60)], scale=4, vocab_size=V)
    assert fast.bpe.get_vocab_size() == V
    fast.save(root / "fast")
    return folder, root / "fast", base


@pytest.fixture(scope="module")
def policy(nora_folder):
    folder, fast_dir, _ = nora_folder
    torch.manual_seed(0)
    return load_released(folder, fast_tokenizer=fast_dir, max_new_tokens=40)


def _image(seed=1, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_constants_and_id_mapping():
    assert NoraConfig.for_checkpoint("declare-lab/nora").horizon == 1
    assert NoraConfig.for_checkpoint("declare-lab/nora-long").horizon == 5
    assert horizon_for("declare-lab/nora-long-finetuned-libero-object") == 5
    assert horizon_for("declare-lab/nora-finetuned-libero-goal") == 1
    cfg = NoraConfig()
    assert P.action_ids_to_token_ids([0, 5, 2047], cfg) == [151665, 151670, 153712]
    # NORA's decoding: every id in [151665, 153712], in order, minus 151665
    assert P.token_ids_to_action_ids([151644, 151665, 198, 153712, 151645, 153713], cfg) == [
        0,
        2047,
    ]
    with pytest.raises(ValueError, match="outside NORA's action vocabulary"):
        P.action_ids_to_token_ids([2048], cfg)


def test_gripper_and_statistics():
    env = np.array([-1.0, 1.0, 1.0, -1.0])
    nora = P.env_gripper_to_nora(env)
    assert nora.tolist() == [1.0, 0.0, 0.0, 1.0]  # NORA: 0 = close, 1 = open
    assert np.array_equal(P.nora_gripper_to_env(nora), env)
    # NORA's LIBERO rule: sign(2g - 1), flipped, 0 -> +1 (close)
    assert P.nora_gripper_to_env([0.0, 0.3, 0.5, 0.51, 1.0]).tolist() == [1, 1, 1, -1, -1]
    st = NORM_STATS["libero_object_no_noops"]["action"]
    x = np.array([[0.3, -0.2, 0.0, 0.05, -0.1, 0.2, 1.0]])
    y = P.normalize(x, st)
    assert y[0, -1] == 1.0  # masked gripper passes through OpenVLA's normalisation
    back = P.unnormalize(y, st)  # NORA ignores the mask when unnormalising
    assert np.allclose(back[0, :6], x[0, :6])
    assert back[0, -1] == pytest.approx(0.5 * (1.0 + 1) * (1.0 - 0.0) + 0.0)


def test_prompt_uses_the_folder_chat_template(policy):
    tok = policy.tokenizer
    written = P.build_prompt(tok, "go", None, image_tokens=2)
    assert written == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>go<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok.chat_template = QWEN_TEMPLATE  # the tiny fixture's template (no system turn)
    try:
        text = P.build_prompt(tok, "go", [3, 1], image_tokens=1)
    finally:
        tok.chat_template = None
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>go<|im_end|>\n"
        "<|im_start|>assistant\n<robot_action_3><robot_action_1><|im_end|>\n"
    )


def test_sample_ids_labels_and_loss(policy, nora_folder):
    _, _, base = nora_folder
    tok = policy.tokenizer
    chunk = _chunk(np.random.default_rng(5))
    fast_ids = policy.fast.encode(chunk)
    sample = P.encode_sample(
        tok, _image(), INSTRUCTION, fast_ids, policy.cfg, image_processor=policy.image_processor
    )

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    sp = tok.convert_tokens_to_ids
    # 224 x 224 through the tiny processor (max 56*56*4 pixels) -> 112 x 112 -> 8 x 8 patches
    # -> 16 image tokens after the 2 x 2 merge
    assert sample["image_grid_thw"].tolist() == [[1, 8, 8]]
    prompt = (
        [sp("<|im_start|>")] + enc("system\nYou are a helpful assistant.") + [sp("<|im_end|>")]
        + enc("\n") + [sp("<|im_start|>")] + enc("user\n") + [sp("<|vision_start|>")]
        + [sp("<|image_pad|>")] * 16 + [sp("<|vision_end|>")] + enc(INSTRUCTION)
        + [sp("<|im_end|>")] + enc("\n") + [sp("<|im_start|>")] + enc("assistant\n")
    )  # fmt: skip
    target = [base + k for k in fast_ids] + [sp("<|im_end|>")] + enc("\n")
    assert sample["input_ids"].tolist() == prompt + target
    assert sample["labels"].tolist() == [-100] * len(prompt) + target
    assert sample["attention_mask"].tolist() == [1] * len(prompt + target)

    # a batch of two: left padding, pads masked in the labels and the attention
    other = P.encode_sample(
        tok, _image(2), "go", [fast_ids[0]], policy.cfg, image_processor=policy.image_processor
    )
    batch = P.collate([sample, other], P.pad_id_of(tok))
    n = len(sample["input_ids"]) - len(other["input_ids"])
    assert batch["input_ids"][1, :n].tolist() == [tok.pad_token_id] * n
    assert batch["labels"][1, :n].tolist() == [-100] * n
    assert batch["attention_mask"][1].tolist() == [0] * n + [1] * len(other["input_ids"])
    assert batch["labels"][0].tolist() == sample["labels"].tolist()

    # the loss: mean next-token cross-entropy over the labelled positions
    loss, metrics = policy.compute_loss(batch)
    with torch.no_grad():
        logits = policy.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
    terms = []
    for b in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            y = int(batch["labels"][b, t + 1])
            if y != -100:
                terms.append(-torch.log_softmax(logits[b, t].double(), -1)[y])
    assert len(terms) == len(target) + 3
    assert float(loss.detach()) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-4)
    assert set(metrics) >= {"loss", "action_token_accuracy"}


def test_greedy_decoding_returns_the_env_chunk(nora_folder, tmp_path):
    folder, fast_dir, _ = nora_folder
    torch.manual_seed(0)
    policy = load_released(folder, fast_tokenizer=fast_dir, max_new_tokens=40)
    assert policy.cfg.horizon == 5  # from the folder's name, nora-long
    chunk = _chunk(np.random.default_rng(7))
    frame = _image(3)
    raw = {"images": {"agentview": torch.from_numpy(frame)[None]}, "instruction": [INSTRUCTION]}
    train = {**raw, "actions": torch.from_numpy(chunk)[None]}
    opt = torch.optim.AdamW(policy.param_groups(type("O", (), {"lr": 3e-3})()))
    enc = policy.encode(train, with_actions=True)
    for _ in range(80):
        loss, _ = policy.compute_loss(enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    got = policy.predict_action(raw)
    assert policy.last_action_ids == [policy.fast.encode(chunk)]
    assert policy.fallbacks() == {"undecodable_tokens": 0}
    # expected from NORA's rules: FAST decode, 0.5 (a + 1)(q99 - q01) + q01, gripper rule
    dec = policy.fast.decode(policy.fast.encode(chunk), H, D).actions
    want = 0.5 * (dec + 1) * (np.array(Q99) - np.array(Q01)) + np.array(Q01)
    want[:, -1] = [-1, -1, 1, 1, 1]  # open, open, close, close, close in env units
    assert got.shape == (1, H, D)
    assert np.allclose(got[0, :, :6], want[:, :6], atol=1e-6)
    assert got[0, :, -1].tolist() == want[:, -1].tolist()
    bound = policy.fast.quantization_bound(H) * 0.5 * (np.array(Q99) - np.array(Q01))
    true_env = 0.5 * (chunk + 1) * (np.array(Q99) - np.array(Q01)) + np.array(Q01)
    assert (np.abs(got[0, :, :6] - true_env[:, :6]) <= bound[:6] + 1e-9).all()

    # in a left-padded batch (a longer instruction beside it) the sample decodes the same
    longer = {
        "images": {"agentview": torch.from_numpy(np.stack([frame, frame]))},
        "instruction": [INSTRUCTION, INSTRUCTION + " and then pick up the alphabet soup"],
    }
    policy.predict_chunk(longer)
    assert policy.last_action_ids[0] == policy.fast.encode(chunk)
    policy.decode_failures = 0

    # a truncated generation does not decode: counted, answered with the safe action
    policy.cfg = NoraConfig(**{**policy.cfg.to_json(), "max_new_tokens": 2})
    safe = policy.predict_action(raw)
    assert policy.fallbacks() == {"undecodable_tokens": 1}
    assert np.allclose(safe[0], np.tile([0, 0, 0, 0, 0, 0, -1.0], (H, 1)))


def test_released_folder_detected_and_loaded_unresized(nora_folder, policy, tmp_path):
    from safetensors.torch import load_file

    folder, fast_dir, base = nora_folder
    assert is_released_folder(folder)
    plain = tiny_qwen2_5_vl(tmp_path / "plain")
    (plain / "norm_stats.json").write_text(json.dumps(NORM_STATS))
    assert not is_released_folder(plain)  # no <robot_action_k> tokens
    assert not is_released_folder(tmp_path)
    rows = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    assert rows == base + V
    assert len(policy.tokenizer) == base + V
    emb = policy.model.get_input_embeddings().weight
    assert emb.shape[0] == rows
    saved = load_file(folder / "model.safetensors")
    key = next(k for k in saved if k.endswith("embed_tokens.weight"))
    assert torch.equal(saved[key], emb.detach())
    assert policy.cfg.action_base == base and policy.cfg.action_vocab == V

    # LoRA, save (NORA's layout + norm_stats + FAST + nora_config), reload: same vocabulary
    lora = load_released(folder, fast_tokenizer=fast_dir)
    n = lora.apply_lora(r=4, alpha=8, dropout=0.0)
    assert 0 < n < sum(p.numel() for p in lora.model.parameters())
    out = lora.save(tmp_path / "saved")
    assert is_released_folder(out) and (out / "fast_tokenizer" / "tokenizer.json").is_file()
    again = load_released(out)
    assert again.cfg == lora.cfg
    assert len(again.tokenizer) == base + V
    assert again.model.get_input_embeddings().weight.shape[0] == rows
    with pytest.raises(FileNotFoundError, match="physical-intelligence/fast"):
        load_released(folder)


def test_registry_entry_detects_and_loads(nora_folder, policy, tmp_path, monkeypatch):
    """The registry entry proposed for the coordinator: `vlatune.policies.load` finds NORA."""
    from vlatune.policies import io, registry

    entry = registry.Family(
        "nora",
        "NORA / NORA-Long (Qwen2.5-VL-3B + FAST+ action tokens at 151665 + k)",
        "vlatune.policies.nora",
        "a Hugging Face Qwen2.5-VL folder (config.json with model_type 'qwen2_5_vl', weights, "
        "a tokenizer with <robot_action_k> at consecutive ids) and norm_stats.json "
        "(+ fast_tokenizer/ once saved by vlatune)",
        load="vlatune.policies.nora.convert:load_released",
        detect="vlatune.policies.nora.convert:is_released_folder",
    )
    monkeypatch.setitem(registry.FAMILIES, "nora", entry)
    folder, _, _ = nora_folder
    assert io.detect(folder) == "nora"
    saved = policy.save(tmp_path / "nora-long-ft")
    loaded = io.load(saved)
    assert type(loaded).__name__ == "NoraPolicy" and loaded.cfg.horizon == 5
