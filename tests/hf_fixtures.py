"""Tiny random-weight Hugging Face VLMs built from their configs (no download): the real
architectures, small enough for CPU tests."""

from __future__ import annotations

from pathlib import Path

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "TASK: PLAN: SUBTASK: MOVE: GRIPPER POSITION: VISIBLE OBJECTS: move forward left up down",
    "user assistant system You are a helpful assistant. 0 1 2 3 4 5 6 7 8 9 [ ] ,",
]


def _bpe_tokenizer(specials: list[str], **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def tiny_paligemma(folder: Path, seed: int = 0) -> Path:
    """A 2-layer PaliGemma (Gemma text, SigLIP vision on 32 px: 16 image tokens)."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = Path(folder)
    tokenizer = _bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<image>"],
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    ids = tokenizer.convert_tokens_to_ids
    config = PaliGemmaConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 64,
        },
        text_config={
            "model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 16, "pad_token_id": ids("<pad>"),
            "bos_token_id": ids("<bos>"), "eos_token_id": ids("<eos>"),
        },
        image_token_index=ids("<image>"),
        projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    ip.save_pretrained(folder)
    return folder


def tiny_smolvlm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer SmolVLM (Llama text, SigLIP vision on 32 px, pixel shuffle 2: 4 image tokens)."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    folder = Path(folder)
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<global-img>",
        "<image>",
    ]
    tokenizer = _bpe_tokenizer(specials, pad_token="<|endoftext|>", eos_token="<end_of_utterance>")
    ids = tokenizer.convert_tokens_to_ids
    config = SmolVLMConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
        },
        text_config={
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "pad_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<end_of_utterance>"), "bos_token_id": ids("<|im_start|>"),
        },
        image_token_id=ids("<image>"),
        scale_factor=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    ).save_pretrained(folder)
    return folder


def tiny_qwen2_5_vl(
    folder: Path, seed: int = 0, with_template: bool = True, hidden: int = 64, layers: int = 2
) -> Path:
    """A 2-layer Qwen2.5-VL (hidden 64, vision depth 2) with a small byte-level BPE tokenizer
    and the PIL image processor, saved like a hub folder."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    folder = Path(folder)
    tokenizer = _bpe_tokenizer(
        QWEN_SPECIALS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_TEMPLATE if with_template else None,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14, merge_size=2
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # M-RoPE sections (t, h, w) sum to half the head dim (hidden / 4 heads)
            "rope_scaling": {
                "type": "mrope",
                "mrope_section": [hidden // 32, 3 * hidden // 64, 3 * hidden // 64],
            },
            "tie_word_embeddings": True,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": layers,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def _word_tokenizer(extra_specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in line.lower().split()} | set("0123456789"))
    vocab = {t: i for i, t in enumerate([*extra_specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def tiny_t5_encoder(folder: Path, seed: int = 0, d_model: int = 32, layers: int = 1) -> Path:
    """A 1-layer T5 encoder (d_model 32) with a word-level tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = _word_tokenizer(["<pad>", "</s>", "<unk>"])
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
        num_layers=layers, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_siglip_vision(
    folder: Path, seed: int = 0, hidden: int = 32, layers: int = 1, image_size: int = 32
) -> Path:
    """A 1-layer SigLIP vision tower on 32 px images (patch 8: 16 tokens) and its PIL processor."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = Path(folder)
    config = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, image_size=image_size, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(seed)
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(
        folder
    )
    return folder


def train_tiny_nora(recipe: Path, data: Path, qwen: Path, run_dir: Path, *extra: str) -> list[dict]:
    """Train a NORA recipe 2 steps on a tiny Qwen2.5-VL; returns the metrics.jsonl rows."""
    import json

    from vlatune.config import load_config
    from vlatune.train.trainer import train

    cfg = load_config(
        recipe,
        [
            f"data.path={data}", "data.format=auto", "data.image_size=56", "data.batch_size=2",
            "data.num_workers=0", "policy.reasoning.dropout=0.0", f"policy.model_id={qwen}",
            "policy.dtype=float32", "policy.action_tokenizer_path=null", "policy.fast_vocab=64",
            f"train.output_dir={run_dir}", "train.max_steps=2", "train.val_every=null",
            "train.mixed_precision=no", "train.gradient_checkpointing=false", *extra,
        ],
    )  # fmt: skip
    train(cfg, progress=False)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
