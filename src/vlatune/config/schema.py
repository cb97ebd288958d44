"""Typed run configuration: one pydantic model per section, validated when loaded.

A recipe YAML holds the sections `data`, `policy`, `optim`, `train` and `eval`; every key has a
type and a default, and an unknown key is an error (see `vlatune.config.loader` for the
messages). The LIBERO conventions a dataset declares (`data.image_orientation`, `data.gripper`)
are fields here so that they are saved with every checkpoint.

`policy.type` selects the policy family (`vlatune.policies.registry`): `composed` (vlatune's
backbone x head composition, `PolicyConfig`), `pi0` (pi0 / pi0.5, `Pi0FamilyConfig`) or `rdt`
(the released RDT-1B, `RDTFamilyConfig`); a pydantic discriminated union on `type`. A config
without `policy.type` (every recipe written before families existed) is a `composed` policy:
that is the default, not a fallback, so it is not warned about. An unknown type is refused
with the closest known name.

    >>> from vlatune.config import Config
    >>> Config().optim.lr
    0.0001
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from vlatune.conventions import GripperConvention, ImageOrientation, resolve_suite


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    """Train-time image augmentation (never applied at evaluation)."""

    enabled: bool = True
    crop_area: float = Field(
        0.9, gt=0.0, le=1.0, description="random crop keeping this area fraction (OFT: 0.9)"
    )
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)


class DataConfig(Strict):
    path: str | None = Field(None, description="dataset folder or file")
    format: Literal["auto", "libero_hdf5", "hdf5", "lerobot_v21", "lerobot_v30"] = "auto"
    subset: Literal["spatial", "object", "goal", "long"] | None = None
    cameras: list[str] = Field(default_factory=lambda: ["agentview", "wrist"])
    image_size: int = Field(224, gt=0)
    action_horizon: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    num_workers: int = Field(0, ge=0)
    normalization: Literal["q99", "mean_std", "none"] = "q99"
    image_orientation: Literal["auto"] | ImageOrientation = Field(
        "auto",
        description="orientation of the stored frames (auto: as the dataset declares); training sees them upright",
    )
    gripper: Literal["auto"] | GripperConvention = Field(
        "auto",
        description="gripper convention of the stored actions (auto: as the dataset declares)",
    )
    gripper_dim: int | None = Field(
        -1,
        description="action dimension of the gripper (None: no gripper); kept binary, not normalised",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    camera_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="drop each camera with this probability"
    )
    min_cameras: int = Field(1, ge=1, description="never drop below this many cameras")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    annotations: str | list[str] | None = Field(
        None,
        description="per-frame reasoning / flow-token file(s) (vlatune annotate), merged per "
        "(episode, frame), for the tokens head",
    )
    cache_images: bool = Field(
        False, description="keep decoded frames in memory after first use (small datasets)"
    )
    skip_bad_episodes: bool = Field(
        False,
        description="leave out episodes that fail validation (listed in the log and split.json) "
        "instead of refusing to train",
    )

    @field_validator("cameras")
    @classmethod
    def _cameras_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one camera is needed")
        return v


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TinyConfig(Strict):
    """The from-scratch CPU backbone: a conv net per camera, hashed word embeddings, a
    transformer over image, word, state and query tokens."""

    dim: int = Field(128, gt=0)
    layers: int = Field(3, gt=0)
    heads: int = Field(4, gt=0)
    tokens_per_side: int = Field(4, gt=0, description="image tokens per camera: this squared")
    width: int = Field(32, gt=0, description="channels of the first conv layer (then x2, x4)")
    keypoints: int = Field(0, ge=0, description="spatial-softmax keypoints per camera (0: none)")
    film: bool = Field(False, description="FiLM the image features on the instruction")
    vocab: int = Field(4096, gt=0, description="hashed word buckets")
    max_words: int = Field(24, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class HeadConfig(Strict):
    """Settings of the action heads (each head reads the ones it needs)."""

    mlp_dim: int = Field(256, gt=0, description="l1: MLP-ResNet width")
    mlp_blocks: int = Field(2, gt=0)
    queries: Literal["per_dim", "per_step"] = Field(
        "per_dim",
        description="l1: one learned query per action value (H x A, OpenVLA-OFT) or one per "
        "timestep (H, A values each: A times fewer tokens in the backbone's sequence)",
    )
    expert: Literal["joint", "cross_attention"] = Field(
        "cross_attention",
        description="diffusion / flow: action tokens attend jointly with the context (pi0-style "
        "action expert) or through cross-attention (DiT / GR00T-style)",
    )
    expert_dim: int = Field(128, gt=0)
    expert_layers: int = Field(2, gt=0)
    train_steps: int = Field(100, gt=0, description="diffusion: training timesteps (OFT: 50)")
    inference_steps: int = Field(10, gt=0, description="diffusion: sampling steps")
    sampler: Literal["ddim", "dpm++"] = "ddim"
    flow_steps: int = Field(10, gt=0, description="flow: Euler steps (pi0 10, GR00T 4)")


class EnergyConfig(Strict):
    """OFT-style energy model E(context, action chunk), trained with in-batch InfoNCE."""

    enabled: bool = False
    hidden: int = Field(256, gt=0)
    tau: float = Field(1.0, gt=0.0)
    lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight: float = Field(1.0, ge=0.0)
    correction_alpha: float = Field(
        0.0, ge=0.0, description="inference: a <- a - alpha * grad_a E (0: off)"
    )
    correction_steps: int = Field(1, gt=0)
    correction_max_step: float = Field(0.1, gt=0.0, description="clip of each correction step")


class ReasoningConfig(Strict):
    """Reasoning targets of the `tokens` head (ECoT text, flow tokens) before the actions."""

    enabled: bool = Field(False, description="train on batch['reasoning'] text before the actions")
    dropout: float = Field(0.5, ge=0.0, le=1.0, description="drop the whole reasoning (NORA: 0.5)")
    tag_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="drop each tagged line independently"
    )
    loss_weight: float = Field(0.5, ge=0.0, description="CoT token loss weight")
    flow_tokens: int = Field(0, ge=0, description="VQ codebook size of flow tokens (0: none)")
    inference: Literal["skip", "generate"] = Field(
        "skip", description="skip: decode actions directly; generate: reasoning, then actions"
    )
    max_new_tokens: int = Field(256, gt=0, description="with inference=generate")


class RDTConfig(Strict):
    """The `rdt` backbone: SigLIP image tokens (policy.model_id) + T5 instruction tokens."""

    text_model_id: str = Field("google/t5-v1_1-xxl", description="T5 encoder: hub id or folder")
    max_text_tokens: int = Field(32, gt=0)
    dim: int = Field(256, gt=0, description="width of the projected condition tokens")
    precompute_language: bool = Field(
        True, description="encode each instruction once before training; train without T5"
    )
    language_cache: str | None = Field(
        None, description="on-disk embedding cache (None: ~/.cache/vlatune/language)"
    )


class PolicyConfig(Strict):
    """The `composed` family: a backbone (tiny / hf-vlm / rdt-style) with an action head."""

    type: Literal["composed"] = "composed"
    backbone: Literal["tiny", "hf-vlm", "rdt"] = "tiny"
    model_id: str | None = Field(
        None, description="hub id or local folder for hf-vlm / rdt backbones"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="hf-vlm weights: auto = bfloat16 on a GPU that supports it, else float32",
    )
    head: Literal["l1", "tokens", "diffusion", "flow"] = "l1"
    action_tokenizer: Literal["fast", "bins"] | None = None
    action_tokenizer_path: str | None = Field(
        None, description="a fitted FAST folder (e.g. FAST+); None: fit on the training chunks"
    )
    fast_vocab: int = Field(1024, gt=0, description="BPE vocabulary when FAST is fitted here")
    fast_scale: float = Field(10.0, gt=0.0)
    max_new_tokens: int = Field(64, gt=0, description="tokens head: action tokens at most")
    safe_action: list[float] | None = Field(
        None,
        description="tokens head: env-unit action used when a generated sequence does not decode "
        "(None: zeros, i.e. no motion for delta actions, gripper open)",
    )
    film: bool = Field(
        False,
        description="hf-vlm: FiLM every vision block on the mean instruction embedding (OFT); "
        "the tiny backbone has its own tiny.film",
    )
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    rdt: RDTConfig = Field(default_factory=RDTConfig)
    use_proprio: bool = True
    lora: LoraConfig | None = None
    freeze: list[str] = Field(default_factory=list, description="parameter-name patterns to freeze")
    tiny: TinyConfig = Field(default_factory=TinyConfig)
    heads: HeadConfig = Field(default_factory=HeadConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)

    @model_validator(mode="after")
    def _tokens_need_tokenizer(self) -> PolicyConfig:
        if self.head == "tokens" and self.action_tokenizer is None:
            raise ValueError(
                "policy.head 'tokens' needs policy.action_tokenizer ('fast' or 'bins')"
            )
        if self.head == "tokens" and self.backbone != "hf-vlm":
            raise ValueError(
                "policy.head 'tokens' decodes with a language model head: use backbone 'hf-vlm'"
            )
        if self.backbone in ("hf-vlm", "rdt") and not self.model_id:
            raise ValueError(
                f"policy.backbone '{self.backbone}' needs policy.model_id (hub id or folder)"
            )
        if self.reasoning.enabled and self.head != "tokens":
            raise ValueError("policy.reasoning needs policy.head 'tokens'")
        return self


class Pi0FamilyConfig(Strict):
    """The `pi0` family (`vlatune.policies.pi0`): pi0 or pi0.5 in LeRobot's layout. The
    architecture comes from the pretrained folder's own config.json (LeRobot's), never from
    here: this section says which checkpoint to start from and what trains."""

    type: Literal["pi0"]
    variant: Literal["pi0", "pi05"] = Field(
        "pi0", description="pi0 (state token, action-time MLP) or pi05 (adaRMS time)"
    )
    pretrained: str | None = Field(
        None,
        description="a local LeRobot pi0 / pi0.5 folder (config.json + model.safetensors); "
        "hub ids are not downloaded: `huggingface-cli download lerobot/pi05_base --local-dir "
        "DIR` first. Needed by `vlatune train` (no random-weight start)",
    )
    tokenizer: str = Field(
        "google/paligemma-3b-pt-224",
        description="the PaliGemma tokenizer: a local folder, or a hub id already in the local "
        "Hugging Face cache (never downloaded); saved with the policy",
    )
    empty_cameras: int = Field(
        0,
        ge=0,
        description="absent camera slots appended after data.cameras (image -1, mask False), "
        "LeRobot's empty_cameras: 1 gives openpi's 3 slots on LIBERO's 2 cameras",
    )
    freeze_vision: bool = Field(False, description="LeRobot's freeze_vision_encoder")
    train_expert_only: bool = Field(False, description="LeRobot's train_expert_only")
    lora: LoraConfig | None = Field(
        None,
        description="adapters (r, alpha, dropout) on q/k/v/o of both Gemma stacks and the "
        "state / action / time projections, everything else frozen; target_modules is not "
        "read (the targets are fixed: vlatune.policies.pi0.policy.lora_targets)",
    )


class RDTFamilyConfig(Strict):
    """The `rdt` family (`vlatune.policies.rdt`): the released RDT-1B, loaded bit for bit.
    Not the composed family's `backbone: rdt` (an RDT-style backbone under a vlatune head)."""

    type: Literal["rdt"]
    pretrained: str | None = Field(
        None,
        description="an RDT folder: config.json (RDTRunner init arguments) + model.safetensors "
        "or pytorch_model.bin (rdt-1b: robotics-diffusion-transformer/rdt-1b; a hub id is "
        "downloaded with huggingface_hub); required to build a policy",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the released config does not say; upstream trains in bfloat16"
    )
    vision_encoder: str | None = Field(
        None,
        description="the SigLIP vision tower giving the image tokens (the released RDT folder "
        "has none; rdt-1b used google/siglip-so400m-patch14-384): a folder or hub id with a "
        "SigLIP (vision) config, weights and image processor; frozen, as upstream",
    )
    text_encoder: str | None = Field(
        None,
        description="the T5 encoder of the instructions (rdt-1b: google/t5-v1_1-xxl): a folder "
        "or hub id with config, weights and tokenizer; used only by `prepare` (every training "
        "instruction encoded once, then released) and for an instruction unseen at evaluation",
    )
    max_text_tokens: int = Field(
        1024, gt=0, description="T5 tokens kept per instruction (<= the model's max_lang_cond_len)"
    )
    language_cache: str | None = Field(
        None,
        description="folder of cached T5 embeddings (default ~/.cache/vlatune/language), keyed "
        "by sha256(encoder, max tokens, text) as the composed rdt-style backbone",
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA on the diffusion transformer's attention and MLP linears (target "
        "'all-linear' = attn.qkv, attn.proj, cross_attn.q/kv/proj, ffn.fc1/fc2 of every block); "
        "the adaptors stay fully trained, everything else frozen; None: full fine-tuning",
    )
    unified: dict[str, Any] = Field(
        default_factory=dict,
        description="LIBERO's 7-d action / 8-d state in RDT's 128-d unified vector, the "
        "control frequency (ctrl_freq, 20 Hz) and the camera slots: the fields of "
        "vlatune.policies.rdt.unified.LiberoUnified (absent ones keep its defaults)",
    )

    @field_validator("unified")
    @classmethod
    def _unified_mapping(cls, v: dict[str, Any]) -> dict[str, Any]:
        from vlatune.policies.rdt.unified import LiberoUnified

        return LiberoUnified.model_validate(v).model_dump()


class GrootFamilyConfig(Strict):
    """The `groot` family (`vlatune.policies.groot`): GR00T N1.5 in NVIDIA's layout. The
    architecture comes from the pretrained folder's config.json + eagle_config.json."""

    type: Literal["groot"]
    pretrained: str | None = Field(
        None,
        description="an NVIDIA GR00T N1.5 folder (config.json, model.safetensors, eagle_config.json)",
    )
    tokenizer: str | None = Field(
        None,
        description="the Eagle 2.5 processor folder holding the Qwen3 tokenizer with <IMG_CONTEXT> "
        "(lerobot/eagle2hg-processor-groot-n1p5); None: the pretrained folder's tokenizer/ "
        "subfolder, else the pretrained folder itself",
    )
    embodiment_id: int = Field(
        31,
        ge=0,
        description="row of the embodiment-specific encoders / decoder (31: new_embodiment)",
    )
    tune_llm: bool = Field(False, description="train the Qwen3 layers (GR00T's tune_llm)")
    tune_visual: bool = Field(True, description="train SigLIP + the mlp1 connector (tune_visual)")
    tune_projector: bool = Field(
        True,
        description="train the state / action encoders and the action decoder (tune_projector)",
    )
    tune_diffusion_model: bool = Field(True, description="train the DiT (tune_diffusion_model)")
    lora: LoraConfig | None = Field(
        None,
        description="adapters on DiT linears; target_modules are name suffixes inside the DiT "
        "('all-linear': every attention and feed-forward linear of its blocks)",
    )
    num_inference_steps: int = Field(4, gt=0, description="Euler steps when sampling a chunk")


class OpenVLAFamilyConfig(Strict):
    """The `openvla` family (`vlatune.policies.openvla`): OpenVLA-7B and OpenVLA-OFT in the
    HF remote-code layout (+ OFT's side files)."""

    type: Literal["openvla"]
    pretrained: str | None = Field(
        None,
        description="an OpenVLA / OFT folder (config.json, model.safetensors, dataset_statistics.json)",
    )
    variant: Literal["openvla", "oft"] = Field(
        "oft",
        description="openvla: next-token prediction of 256-bin action tokens (one step); oft: "
        "parallel decoding of a chunk through an action head",
    )
    head: Literal["l1", "diffusion"] = Field(
        "l1", description="oft: L1RegressionActionHead or the DDIM DiffusionActionHead"
    )
    num_images: int = Field(
        2, gt=0, description="oft: images per sample (the first data.cameras), 6 channels each"
    )
    use_proprio: bool = Field(True, description="oft: the proprio projector token (8-d state)")
    film: bool = Field(False, description="oft: FiLM on the vision blocks (OFT's wrapper)")
    attention: Literal["bidirectional", "action_span"] = Field(
        "bidirectional", description="oft: the 4D attention mask of the parallel-decoding pass"
    )
    diffusion_steps_train: int = Field(50, gt=0, description="oft diffusion: DDIM train steps")
    diffusion_steps_inference: int = Field(50, gt=0, description="oft diffusion: DDIM steps")
    platform: Literal["libero", "aloha", "bridge"] = Field(
        "libero", description="OFT's constants (proprio dim, normalisation type)"
    )
    unnorm_key: str = Field(
        "vlatune",
        description="the key of the training statistics in the saved dataset_statistics.json",
    )
    tokenizer: str | None = Field(
        None,
        description="a folder with the Llama tokenizer.json (None: the pretrained folder's own)",
    )
    max_prompt_tokens: int = Field(48, gt=0, description="prompt ids are right-padded to this")
    lora: LoraConfig | None = Field(
        None,
        description="adapters on every linear of the VLA but lm_head (OFT: r32, alpha 16, "
        "dropout 0); the action head, proprio projector and FiLM train fully",
    )
    merge_lora_on_save: bool = Field(
        True,
        description="OFT's merge_lora_during_training: model.safetensors holds the merged VLA "
        "(adapters beside it); false: the frozen base (bit-exact resume)",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="VLA weights")
    energy: EnergyConfig = Field(default_factory=EnergyConfig)


class NoraFamilyConfig(Strict):
    """The `nora` family (`vlatune.policies.nora`): NORA / NORA-Long exactly (Qwen2.5-VL-3B,
    `<robot_action_k>` at 151665 + k, FAST+). The ECoT / flow reasoning phases are composed
    recipes (configs/nora/)."""

    type: Literal["nora"]
    pretrained: str | None = Field(
        None, description="a NORA folder (HF Qwen2.5-VL + norm_stats.json)"
    )
    fast_tokenizer: str | None = Field(
        None,
        description="folder of the FAST+ tokenizer (physical-intelligence/fast, downloaded); "
        "default: <pretrained>/fast_tokenizer (a folder saved by vlatune holds it)",
    )
    lora: LoraConfig | None = Field(
        default_factory=LoraConfig,
        description="LoRA on every linear layer (NORA's recipe: r 16, alpha 32, dropout 0.05); "
        "null: full fine-tuning",
    )
    keep_norm_stats: bool = Field(
        False,
        description="normalise with NORA's norm_stats.json (q01 / q99 of `unnorm_key`) instead "
        "of the dataset's statistics",
    )
    unnorm_key: str | None = Field(
        None,
        description="the norm_stats.json dataset key (keep_norm_stats; may be omitted when the "
        "file holds one); the key the dataset's statistics are saved under otherwise",
    )
    camera: str | None = Field(
        None, description="the camera NORA sees (default: the first of data.cameras)"
    )
    max_prompt_tokens: int = Field(
        256, gt=0, description="prompts are left-padded to this length in the loader"
    )
    max_new_tokens: int = Field(
        64, gt=2, description="greedy decoding budget (and the longest training target)"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"


POLICY_TYPES = ("composed", "pi0", "rdt", "groot", "openvla", "nora")


def _policy_type(value: Any) -> Any:
    """No `type`: a `composed` policy (configs written before families). An unknown type is
    refused naming the closest family."""
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is None:
            return {**value, "type": "composed"}
        if kind not in POLICY_TYPES:
            close = difflib.get_close_matches(str(kind), POLICY_TYPES, n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"unknown policy family '{kind}'.{hint} Known: {', '.join(POLICY_TYPES)}"
            )
    return value


AnyPolicyConfig = Annotated[
    Union[  # noqa: UP007 (a discriminated union)
        PolicyConfig,
        Pi0FamilyConfig,
        RDTFamilyConfig,
        GrootFamilyConfig,
        OpenVLAFamilyConfig,
        NoraFamilyConfig,
    ],
    Field(discriminator="type"),
    BeforeValidator(_policy_type),
]


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "linear", "multistep"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    decay_steps: list[int] = Field(
        default_factory=list, description="multistep: steps where lr *= decay_factor"
    )
    decay_factor: float = Field(0.1, gt=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)


class TrainConfig(Strict):
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = Field(1000, gt=0)
    max_epochs: float | None = Field(
        None,
        gt=0.0,
        description="train this many passes over the training frames: max_steps becomes "
        "ceil(epochs x frames / global batch) (an explicit max_steps that is smaller wins)",
    )
    max_minutes: float | None = Field(None, gt=0.0, description="stop after this wall time")
    grad_accum_steps: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    save_every: int = Field(500, gt=0)
    keep_last: int = Field(2, gt=0)
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="0: off; else checkpoints' policy/ holds this moving average of the weights",
    )
    log_every: int = Field(10, gt=0)
    val_every: int | None = Field(None, gt=0)
    val_batches: int = Field(20, gt=0, description="validation batches per evaluation at most")
    val_max_seconds: float = Field(60.0, gt=0.0, description="wall-time limit of one validation")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):  # YAML 1.1 reads a bare `no` as false
        return "no" if v is False else v

    trackers: list[Literal["wandb", "tensorboard", "trackio"]] = Field(
        default_factory=list, description="besides metrics.jsonl, through accelerate"
    )
    resume: str = Field("auto", description="'auto', 'never', or a checkpoint folder")


class EvalConfig(Strict):
    suite: str = "libero_object"
    tasks: list[int] | None = None
    trials: int = Field(50, gt=0)
    seed: int = 7
    max_steps: int | None = Field(
        None, gt=0, description="None: the suite's standard episode length"
    )
    replan: int = Field(8, gt=0, description="execute this many actions of a chunk, then re-query")
    workers: int = Field(1, gt=0)
    resolution: int = Field(256, gt=0)
    video: Literal["none", "failures", "all"] = "failures"
    video_trials: int | None = Field(
        None,
        ge=0,
        description="videos of the first N trials per task only; the others render just the "
        "frames the policy sees (much faster on CPU). None: every trial",
    )

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, v: str) -> str:
        return resolve_suite(v)


class Config(Strict):
    """A whole run: what data, which policy, how to optimise, train and evaluate."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    policy: AnyPolicyConfig = Field(default_factory=PolicyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _apply_subset(self) -> Config:
        """`data.subset` (spatial, object, goal, long) names the LIBERO suite of the run: it
        sets `eval.suite`, and `{subset}` / `{suite}` in `data.path`, `data.annotations` and
        `train.output_dir` are filled in, so one recipe serves the four suites
        (`data.subset=goal`)."""
        if self.data.subset is None:
            return self
        suite = resolve_suite(self.data.subset)
        if self.eval.suite != suite:
            self.eval.suite = suite
        fill = {"subset": self.data.subset, "suite": suite}
        for section, key in (("data", "path"), ("data", "annotations"), ("train", "output_dir")):
            obj = getattr(self, section)
            value = getattr(obj, key)
            try:
                if isinstance(value, str) and "{" in value:
                    setattr(obj, key, value.format(**fill))
                elif isinstance(value, list) and any("{" in v for v in value):
                    setattr(obj, key, [v.format(**fill) for v in value])
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"{section}.{key} '{value}': only {{subset}} and {{suite}} can be filled "
                    f"in ({e})"
                ) from None
        return self


def config_warnings(cfg: Config) -> list[str]:
    """Settings that validate but probably do not do what was meant (said, not refused)."""
    out = []
    o, t = cfg.optim, cfg.train
    if o.warmup_steps > t.max_steps:
        out.append(
            f"optim.warmup_steps ({o.warmup_steps}) is longer than train.max_steps "
            f"({t.max_steps}): the run ends during the warm-up, its learning rate never above "
            f"{t.max_steps / o.warmup_steps:.0%} of optim.lr. Lower optim.warmup_steps (e.g. "
            f"optim.warmup_steps={max(t.max_steps // 10, 0)})."
        )
    late = [s for s in o.decay_steps if s >= t.max_steps]
    if o.schedule == "multistep" and late:
        out.append(
            f"optim.decay_steps {late} at or beyond train.max_steps ({t.max_steps}): the run "
            f"ends before the learning rate is lowered there. Scale optim.decay_steps with "
            f"train.max_steps (e.g. optim.decay_steps=[{max(t.max_steps // 2, 1)}])."
        )
    horizon = cfg.data.action_horizon
    if cfg.eval.replan > horizon:
        out.append(
            f"eval.replan ({cfg.eval.replan}) is longer than data.action_horizon ({horizon}): "
            f"each chunk is executed whole ({horizon} actions) before the next query. Set "
            f"eval.replan={horizon} to say so, or lengthen data.action_horizon."
        )
    e = getattr(cfg.policy, "energy", None)  # the composed family's energy model
    if e is not None and e.enabled and e.warmup_steps > t.max_steps:
        out.append(
            f"policy.energy.warmup_steps ({e.warmup_steps}) is longer than train.max_steps "
            f"({t.max_steps}): the energy model never reaches its learning rate."
        )
    return out
