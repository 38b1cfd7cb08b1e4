"""The typed parameter tree: ``params.yaml`` is loaded once, validated once, then passed around.

One section per stage (data, augment, model, pretrain/train phases, evaluate, export, publish).
Every model forbids unknown keys, so a typo stops the run before any work starts, with a
one-line error that names the key and the bad value (:class:`ParamsError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from vaeft.errors import VaeftError

DEFAULT_PARAMS_FILE = Path("params.yaml")


def _betas_in_range(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError("betas must each be in [0, 1)")
    return v


# Adam's (beta1, beta2), each in [0, 1): one type for every optimiser's betas.
Betas = Annotated[tuple[float, float], AfterValidator(_betas_in_range)]


class ParamsError(VaeftError, ValueError):
    """A params file that cannot be used; ``str()`` is one line naming the key and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------- data / augment


class SourceParams(_Strict):
    """One image source, mixed with the others in proportion to ``weight``.

    ``embedded``: the photos that installed packages ship. ``folder``: a directory tree.
    ``tar``: a WebDataset-style shard, or a folder / glob of ``.tar`` shards. ``table``: a
    parquet, CSV or JSONL file with a path or URL column (relative paths are relative to the
    table's folder) and optional LAION columns. ``img2dataset``: the output folder of an
    img2dataset download in webdataset format (``00000.tar`` + ``00000.parquet`` per shard; its
    status, caption and LAION columns are read). ``s3``: ``s3://bucket/prefix``.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["embedded", "folder", "tar", "img2dataset", "table", "s3"] = "folder"
    path: str | None = None
    weight: PositiveFloat = 1.0
    # table: the column holding the path or URL; None picks the first of url, path, file, filepath.
    column: str | None = None
    # s3: endpoint of an S3-compatible store (MinIO, moto, ...); None means AWS.
    endpoint_url: str | None = None

    @model_validator(mode="after")
    def _path_matches_kind(self) -> SourceParams:
        if self.kind != "embedded" and not self.path:
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs a 'path'")
        if self.kind == "embedded" and self.path:
            raise ValueError(f"source {self.name!r} of kind 'embedded' takes no 'path'")
        if self.kind == "s3" and not str(self.path).startswith("s3://"):
            raise ValueError(f"source {self.name!r}: an s3 path looks like s3://bucket/prefix, got {self.path!r}")
        if self.column is not None and self.kind != "table":
            raise ValueError(f"source {self.name!r}: 'column' applies to kind 'table' only")
        if self.endpoint_url is not None and self.kind != "s3":
            raise ValueError(f"source {self.name!r}: 'endpoint_url' applies to kind 's3' only")
        return self


class DataParams(_Strict):
    sources: list[SourceParams] = Field(
        default_factory=lambda: [SourceParams(name="embedded", kind="embedded")], min_length=1
    )
    min_side: PositiveInt = 64
    max_aspect: float = Field(default=4.0, ge=1.0)
    # Pixel count refused before decoding (decompression bombs).
    max_pixels: PositiveInt = 89_478_485
    # Fraction of images held out for evaluation: exactly round(fraction x n) of them (at least one
    # of each split), the smallest content-hash keys, so adding images moves few across the split.
    eval_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    # Files larger than this are refused unread (reason file_too_large).
    max_bytes: PositiveInt = 256 * 1024 * 1024
    # LAION metadata filters, applied only where the column (or .json sidecar key) exists.
    min_aesthetic: float | None = None
    max_pwatermark: float | None = Field(default=None, ge=0.0, le=1.0)
    max_punsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    # Near duplicates: perceptual hashes at most this many bits apart (of 64); -1 disables.
    phash_distance: int = Field(default=4, ge=-1, le=16)
    # Subsample the larger sources so kept images follow the sources' weights.
    balance: bool = True
    # URL fetches: seconds per attempt, and extra attempts after a timeout or 5xx.
    fetch_timeout: PositiveFloat = 10.0
    fetch_retries: NonNegativeInt = 2
    # Process-pool size (0: all CPU cores; 1: in-process) and items per work unit.
    workers: NonNegativeInt = 0
    # Where work shards run: "local" (a process pool) or "dask" (dask.distributed). The manifest
    # is byte-identical on either. dask_address: a running scheduler (tcp://HOST:8786); None
    # starts a local cluster of `workers` processes. A remote cluster's workers must see
    # work_dir and the sources at the same paths (shared storage). `vaeft curate --engine/
    # --dask-address` (or VAEFT_CURATE_ENGINE / VAEFT_DASK_ADDRESS) override both per run.
    engine: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    # De-duplication holds its records in memory up to this budget, else in an on-disk index
    # (same verdicts, bounded memory, slower).
    dedup_memory_mb: NonNegativeInt = 2048
    shard_size: PositiveInt = 256
    # The curated dataset's tar shards (not the work units above), closed at whichever limit comes
    # first: 100k web JPEGs of ~300 KB are ~30 shards of 1 GiB (DVC tracks tens of files, not
    # 100k), and one shard still reaches a training node's cache in seconds.
    shard_max_bytes: PositiveInt = 1 << 30
    # Images per curated tar shard at most (the embedded default uses a few, so the demo has several).
    shard_max_images: PositiveInt = 4096
    # Per-shard partial results for resuming, kept outside the (atomically replaced) output.
    work_dir: str = ".vaeft/curate-work"

    @model_validator(mode="after")
    def _address_needs_dask(self) -> DataParams:
        if self.dask_address is not None and self.engine != "dask":
            raise ValueError("data.dask_address is set but data.engine is 'local' (set engine: dask)")
        return self

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceParams]) -> list[SourceParams]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return v


# Augment options at the values that behave as before they existed (issue 16's loader options).
_AUGMENT_BEFORE_OPTIONS: dict[str, Any] = {"jpeg_draft_oversample": 2.0, "crops_per_image": 1, "shuffle": "global",
                                           "resampler": "pillow"}


class AugmentParams(_Strict):
    """Random square crops at several Lanczos downscales, rotated and flipped (Furception's recipe)."""

    crop_size: PositiveInt = 64
    # How the downscale factor s is drawn from [crop_size / shorter side, 1] (never upscaled):
    # "none" keeps s = 1 (plain crops), "uniform" / "log_uniform" draw it continuously,
    # "levels" picks one of `scale_levels` that fits (falling back to the smallest feasible s).
    scale_mode: Literal["none", "uniform", "log_uniform", "levels"] = "log_uniform"
    scale_levels: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25])
    # Multiples of 90 degrees are lossless pixel permutations; `max_angle` > 0 adds an arbitrary
    # rotation in [-max_angle, max_angle] degrees, with the crop taken inside the valid region.
    rot90: bool = True
    max_angle: float = Field(default=0.0, ge=0.0, le=45.0)
    hflip: bool = True
    vflip: bool = False
    # JPEG fast path: decode at reduced DCT scale (draft mode) to >= `jpeg_draft_oversample` x the
    # needed size, and only down to the lowest row the crop reads (exact: the same rows as a full
    # decode). Oversample 2 keeps crops >= ~50 dB from the full-resolution decode; 1 takes the
    # largest power-of-two reduction the downscale allows (more crops per core, lower PSNR:
    # BENCHMARKS.md, issue 16).
    jpeg_draft: bool = True
    jpeg_draft_oversample: float = Field(default=2.0, ge=1.0)
    # Crops drawn from one decoded image (consecutive samples of a batch share it): k > 1 divides
    # the decode cost by ~k but a batch of B then holds B / k distinct images and an epoch is
    # k crops of every image. 1 keeps the previous sample sequence exactly.
    crops_per_image: PositiveInt = 1
    # Sample order. "global": one permutation of all training images per epoch (every rank reads
    # from every shard). "shards": each epoch shuffles the shard order and deals shards to ranks
    # (disjoint sets), and a rank permutes its images within windows of `shuffle_window` shards,
    # so it holds only a window's shards at a time (staging / shard cache at 10 M images).
    shuffle: Literal["global", "shards"] = "global"
    shuffle_window: PositiveInt = 4
    # Pillow's reducing_gap for the Lanczos downscale: box-reduce by an integer factor first while
    # the rest of the downscale stays >= this gap. None: exact Lanczos. Measured on 256 crops of
    # 2 MP images (BENCHMARKS.md): 2.0 ~10% more crops per core at >= 52 dB from the exact crop,
    # 1.5 ~40% more at >= 49.5 dB (but ~41 dB for 64 crops of 0.6 MP images).
    reducing_gap: float | None = Field(default=None, ge=1.0)
    # Downscale filter. "pillow": Pillow's Lanczos (the exact path). "torch": torch's antialiased
    # bicubic on uint8 (SIMD, no extra dependency; ~7x faster resampling), a different filter:
    # 96 crops of 256 from 2 MP JPEGs are min 44.8 / median 53.4 dB from the Lanczos ones, lowest along
    # the top and left edges (BENCHMARKS.md, issue 16). JPEGs are then decoded at full
    # resolution (top rows only): torch's kernel has no sub-pixel origin for a DCT-scaled image.
    # Crops repeat exactly on one machine kind; a CPU without AVX2 may round them differently.
    resampler: Literal["pillow", "torch"] = "pillow"
    # Keep decoded images in worker memory (small datasets such as the embedded default).
    cache_images: bool = False
    # The `augment` stage decodes every training image once into an uncompressed, memory-mapped
    # array (3 bytes per pixel on disk, ~2-3x the PNGs); the loader then reads only each crop's
    # region instead of decoding a whole PNG per crop (BENCHMARKS.md: ~10x more crops per core).
    # Crops are identical either way.
    pixel_store: bool = False
    # Crops per training image written ahead of training by the `augment` stage (0: crops are
    # drawn online in the loader, endless variety). Materialised crops version a run's exact
    # inputs and are what posterior-moment caching needs.
    materialize: NonNegativeInt = 0
    shard_size: PositiveInt = 1024

    def resume_key(self) -> dict[str, Any]:
        """The fields a run's batches depend on, for its resume fingerprint.

        Options added after runs were saved are left out at the value that reproduces those runs'
        batches (the window too while the order is global: it plays no part), so their state
        still resumes.
        """
        drop = {k for k, v in _AUGMENT_BEFORE_OPTIONS.items() if getattr(self, k) == v}
        if self.shuffle == "global":
            drop.add("shuffle_window")
        return self.model_dump(mode="json", exclude=drop)

    @field_validator("scale_levels")
    @classmethod
    def _levels_in_range(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 < x <= 1.0 for x in v):
            raise ValueError("scale_levels must be a non-empty list of factors in (0, 1]")
        return sorted(set(v), reverse=True)


# --------------------------------------------------------------------------- model


class ArchitectureParams(_Strict):
    """diffusers ``AutoencoderKL`` config of a kl-f8-shaped autoencoder."""

    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    latent_channels: PositiveInt = 4
    block_out_channels: list[PositiveInt] = Field(default_factory=lambda: [128, 256, 512, 512], min_length=1)
    layers_per_block: PositiveInt = 2
    norm_num_groups: PositiveInt = 32
    sample_size: PositiveInt = 256
    scaling_factor: PositiveFloat = 0.18215

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ArchitectureParams:
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels entry {c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class ModelParams(_Strict):
    # Pretrained weights to start from (diffusers folder or LDM file). None: the embedded
    # default, which pretrains a tiny autoencoder from scratch in the `pretrain` stage.
    base: str | None = None
    architecture: ArchitectureParams = Field(default_factory=ArchitectureParams)


# --------------------------------------------------------------------------- training


class LossParams(_Strict):
    """Weights of the reconstruction loss terms (0 switches a term off) and how they are reduced."""

    l1: NonNegativeFloat = 0.0
    mse: NonNegativeFloat = 0.0
    # Furception: L1 / MSE after sRGB -> linear -> Oklab.
    oklab_l1: NonNegativeFloat = 0.0
    oklab_mse: NonNegativeFloat = 0.0
    # LPIPS needs its ImageNet backbone in the weight store (`vaeft weights pull lpips-vgg`).
    lpips: NonNegativeFloat = 0.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    # KL to N(0, I); only meaningful when the encoder trains (pretrain).
    kl: NonNegativeFloat = 0.0
    # "sum": LDM's nll summed over C x H x W and divided by the batch; "mean": averaged.
    reduction: Literal["mean", "sum"] = "mean"
    # nll = rec / exp(logvar) + logvar. LDM initialises logvar to 0 and never optimises it.
    logvar_init: float = 0.0
    learn_logvar: bool = False

    @model_validator(mode="after")
    def _some_term(self) -> LossParams:
        if not any((self.l1, self.mse, self.oklab_l1, self.oklab_mse, self.lpips)):
            raise ValueError("at least one of l1, mse, oklab_l1, oklab_mse, lpips must be > 0")
        return self


class GanParams(_Strict):
    """The adversarial term: LDM's hinge PatchGAN or Furception's WGAN-GP LayerNorm critic."""

    kind: Literal["patchgan", "wgan-gp"] = "patchgan"
    # The GAN (generator term and D steps) is off before this step (LDM's config: 50,001).
    disc_start: NonNegativeInt = 0
    disc_weight: NonNegativeFloat = 0.5
    disc_factor: NonNegativeFloat = 1.0
    # d_w = ||grad nll|| / (||grad g|| + 1e-4) at decoder.conv_out.weight; off: d_w = 1.
    adaptive_weight: bool = True
    ndf: PositiveInt = 64
    n_layers: PositiveInt = 3
    # None: the generator's lr and betas.
    lr: PositiveFloat | None = None
    betas: Betas | None = None
    gp_weight: NonNegativeFloat = 10.0  # wgan-gp only
    # Where D starts. "fresh": N(0, 0.02) as taming. "from-base": D (and its Adam moments, where
    # kept) from --init: a phase output's discriminator.safetensors, or an LDM training
    # checkpoint's loss.discriminator.*; loaded strictly, an error when the base has none.
    init: Literal["fresh", "from-base"] = "fresh"

    @property
    def norm(self) -> Literal["batch", "layer"]:
        return "batch" if self.kind == "patchgan" else "layer"


class TrainPhaseParams(_Strict):
    steps: PositiveInt
    # Per process and micro-batch: global batch = batch_size x accumulate x world size.
    batch_size: PositiveInt = 8
    accumulate: PositiveInt = 1
    lr: PositiveFloat = 1e-4
    betas: Betas = (0.5, 0.9)
    weight_decay: NonNegativeFloat = 0.0
    # Max L2 norm of the generator's gradient; None: no clipping (LDM's trainer never clips, so the
    # LDM-faithful recipes set null). The default 1.0 stays a guard for from-scratch pretraining
    # and mean-reduced losses (the embedded default), where an early spike can wreck a tiny model;
    # with LDM's summed nll the norm is ~1e4 and a clip at 1.0 rescales every update.
    grad_clip: PositiveFloat | None = 1.0
    loss: LossParams
    gan: GanParams | None = None
    # What trains: the decoder side only (decoder + post_quant_conv), or everything (pretrain).
    trainable: Literal["decoder", "all"] = "decoder"
    # Autocast dtype; weights, optimizer state and EMA stay fp32. fp16 adds a GradScaler.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    # torch.compile the decoder block by block (conv_out stays eager for the adaptive weight) and,
    # when only the decoder trains, the frozen encoder; "cuda": only when training on a GPU (the
    # recipes: on CPU compiling costs more than it saves at test scale).
    compile: bool | Literal["cuda"] = False
    channels_last: bool = False
    # Adam's implementation (the same maths, different rounding): "fused" runs one kernel over all
    # parameters; torch's own default is "foreach" on CUDA and "for-loop" on CPU. fused: 97 ms
    # vs 340 ms per update of the SD decoder on one CPU core (BENCHMARKS.md).
    adam_impl: Literal["fused", "foreach", "for-loop"] = "fused"
    # GPU runs: deterministic kernels only, cuDNN autotuning off, a fixed cuBLAS workspace, so the
    # same GPU type rebuilds the same bits (`vaeft reproduce`); slower. No effect on CPU results.
    deterministic: bool = False
    # Export the EMA of the trained weights (the released ft-EMA/ft-MSE weights are EMA).
    ema: bool = True
    ema_decay: float = Field(default=0.9999, ge=0.0, lt=1.0)
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    # Reconstruction grid of fixed eval images every N steps, beside the log (0: never).
    image_every: NonNegativeInt = 0
    image_count: PositiveInt = 4
    num_workers: NonNegativeInt = 0

    @model_validator(mode="after")
    def _gan_fits(self) -> TrainPhaseParams:
        if self.gan is not None and self.gan.kind == "patchgan" and self.batch_size < 2:
            raise ValueError("gan.kind 'patchgan' uses BatchNorm and needs batch_size >= 2 per process "
                             "(batch statistics of one image are degenerate); use 'wgan-gp' or a larger batch")
        return self


class Fp16PhaseParams(_Strict):
    """The fp16 phase: make the decoder's activations fit float16 while keeping its output.

    First an exact rescaling (GroupNorm-invariant, the fp32 output unchanged) brings every
    stream stage and hidden resnet output measured above ``aim * target`` down to it; then a
    fine-tune of the decoder side against the frozen original (the teacher's fp32
    reconstruction of the same latent, ``loss`` terms) with ``penalty`` x the squared relative
    excess of the largest activations over ``aim * target``, until every block's peak, measured
    on the eval images' latents at ``check_size``, is below ``target``.
    """

    # At most this many fine-tune steps; the phase stops as soon as every peak is below target
    # (0 steps when the rescaling alone did it) and fails, writing nothing, if it never gets there.
    steps: PositiveInt = 200
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 1e-4
    betas: Betas = (0.5, 0.9)
    grad_clip: PositiveFloat | None = 1.0
    # Matching the teacher's reconstruction. LPIPS (loss.lpips > 0) is used when its backbone is in
    # the weight store and skipped with a warning when not: the pixel terms alone already pin the
    # output to the teacher's.
    loss: LossParams = Field(default_factory=lambda: LossParams(mse=1.0))
    # Every block's peak |activation| must end below this (fp16's max is 65504: 16384 keeps 4x).
    target: float = Field(default=16384.0, gt=0.0, le=65504.0)
    # Rescaling and the penalty aim at aim x target, leaving room for inputs bigger than the probes.
    aim: float = Field(default=0.5, gt=0.0, le=1.0)
    penalty: NonNegativeFloat = 1.0
    rescale: bool = True
    # The largest decode size asked for (image side, pixels) and how many eval images measure it.
    check_size: PositiveInt = 256
    check_images: PositiveInt = 2
    check_every: PositiveInt = 10
    # Fail (no model written) if the fp32 reconstructions drift further than this from the
    # teacher's (PSNR in dB on the check images): an fp16-safe decoder that got worse is no fix.
    min_teacher_psnr: NonNegativeFloat = 35.0
    log_every: PositiveInt = 10

    @model_validator(mode="after")
    def _decoder_terms_only(self) -> Fp16PhaseParams:
        if self.loss.kl > 0 or self.loss.learn_logvar:
            raise ValueError("the fp16 phase trains the decoder side only: loss.kl and loss.learn_logvar must be off")
        return self


def _default_pretrain() -> TrainPhaseParams:
    return TrainPhaseParams(steps=250, lr=1e-3, loss=LossParams(l1=1.0, kl=1e-6), trainable="all", ema=False)


class TrainParams(_Strict):
    pretrain: TrainPhaseParams = Field(default_factory=_default_pretrain)
    ema: TrainPhaseParams = Field(default_factory=lambda: TrainPhaseParams(steps=100, loss=LossParams(l1=1.0)))
    mse: TrainPhaseParams = Field(default_factory=lambda: TrainPhaseParams(steps=100, loss=LossParams(mse=1.0)))
    fp16: Fp16PhaseParams = Field(default_factory=Fp16PhaseParams)

    @model_validator(mode="after")
    def _finetunes_are_decoder_only(self) -> TrainParams:
        for name in ("ema", "mse"):
            if getattr(self, name).trainable != "decoder":
                raise ValueError(f"train.{name}.trainable must be 'decoder': fine-tunes keep the latent space")
        return self


# --------------------------------------------------------------------------- evaluate / export / publish


class EvaluateParams(_Strict):
    image_size: PositiveInt = 64
    batch_size: PositiveInt = 8
    # Metrics that need weights from the weight store; missing weights make them "n/a (reason)"
    # unless require_weights is set (release evaluations should set it).
    lpips_nets: list[Literal["vgg", "alex"]] = Field(default_factory=lambda: ["vgg", "alex"])
    psim: bool = True  # the PSIM *candidate* (REFERENCE §4), on the LPIPS-VGG backbone
    fid: bool = True
    require_weights: bool = False
    grid_rows: NonNegativeInt = 4
    # Decode under bf16 autocast on CUDA only (the CPU path stays fp32); metrics are always fp32.
    bf16_autocast: bool = True


class ExportParams(_Strict):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class S3PublishParams(_Strict):
    # Opt-in S3 (or S3-compatible) target; credentials come only from the AWS chain, never here.
    bucket: str = Field(min_length=3)
    prefix: str = "vaeft"
    endpoint_url: str | None = None  # MinIO, R2, moto...; null: AWS
    region: str | None = None
    multipart_threshold_mb: PositiveInt = 64


class HubPublishParams(_Strict):
    # Optional Hugging Face Hub push (token from the HF chain: HF_TOKEN or `huggingface-cli login`).
    enabled: bool = False
    repo_prefix: str = ""  # "org/vae-" -> org/vae-ft-mse, org/vae-ft-ema
    private: bool = True


class PublishParams(_Strict):
    # Local directory that receives published releases (always; S3/Hub are opt-in extras).
    target: str = "artifacts/published"
    s3: S3PublishParams | None = None
    hub: HubPublishParams = Field(default_factory=HubPublishParams)


# --------------------------------------------------------------------------- root


class Params(_Strict):
    seed: NonNegativeInt = 0
    data: DataParams = Field(default_factory=DataParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    publish: PublishParams = Field(default_factory=PublishParams)

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        crop, min_side = self.augment.crop_size, self.data.min_side
        if crop > min_side:
            raise _KeyedError("augment.crop_size", crop, f"larger than data.min_side={min_side}")
        factor = self.model.architecture.downsample_factor
        if crop % factor:
            raise _KeyedError("augment.crop_size", crop, f"not a multiple of the model's downsampling factor {factor}")
        size = self.evaluate.image_size
        if size % factor:
            raise _KeyedError("evaluate.image_size", size, f"not a multiple of the model's downsampling factor {factor}")
        if size > min_side:
            raise _KeyedError("evaluate.image_size", size, f"larger than data.min_side={min_side}")
        check = self.train.fp16.check_size
        if check % factor:
            raise _KeyedError("train.fp16.check_size", check, f"not a multiple of the model's downsampling factor {factor}")
        return self


class _KeyedError(ValueError):
    """A cross-section check failure that knows which key it is about."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.key, self.value, self.reason = key, value, reason


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _format_error(source: str, err: ValidationError, raw: Any) -> str:
    problems = []
    for e in err.errors():
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyedError):
            problems.append(f"{ctx_err.key} = {ctx_err.value!r}: {ctx_err.reason}")
            continue
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        value = e.get("input") if e["type"] != "missing" else None
        if e["type"] == "extra_forbidden":
            parent = _allowed_keys(loc[:-1])
            hint = f" (allowed: {', '.join(parent)})" if parent else ""
            problems.append(f"{key} = {_short(value)}: unknown key{hint}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key} = {_short(value)}: {msg}")
    head = problems[0]
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    return f"{source}: {head}{more}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raises :class:`ParamsError` with a one-line message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(source, err, raw)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse_params(raw, source=str(path))


def params_as_dict(params: BaseModel) -> dict[str, Any]:
    """The resolved (defaults filled in) params as plain JSON-able data."""
    return params.model_dump(mode="json")
