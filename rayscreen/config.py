"""One YAML per screen, parsed once at the edge into frozen dataclasses.

Every stage (``rayscreen train CONFIG``, ``jobs/train.py --config CONFIG``, the
pipeline) reads the same :class:`Config`. Parsing is strict: an unknown key or a
value of the wrong type fails naming the dotted key and its line in the file, before
any Ray worker starts. Sections:

- ``plates``: URIs or local globs of OME-Zarr HCS plates; ``storage_options``: fsspec
  options (an S3 ``endpoint_url``; credentials come from the environment, never here)
- ``platemap``: optional per-well annotations overriding the plates'
- ``stream``: what ``read_plates`` streams (channels, level, tiles, corrections)
- ``label``, ``model``, ``train``, ``infer``, ``profile``, ``analysis``, ``report``
- ``output``: the run's output URI (local path or ``s3://``); stages write under it

Each section owns its dataclass here; a stage adds the keys it needs to its own
section only.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from .store.errors import RayscreenError

log = logging.getLogger(__name__)


class ConfigError(RayscreenError):
    """A config key is unknown, missing or of the wrong type; the message names it."""


class _InvalidValue(ConfigError):
    """Raised by a section's ``__post_init__``: ``field`` holds a value of the right type that the
    section cannot use. :func:`_build` re-raises it naming the key's line in the file (or its
    ``--set``); a section built in code gets it as a plain ConfigError naming the dotted key."""

    def __init__(self, section: str, field: str, problem: str):
        super().__init__(f"{section}.{field}: {problem}")
        self.field, self.problem = field, problem


def _shown(key: str, value: Any) -> str:
    """``value`` for an error message, except under ``storage_options`` (it may hold credentials)."""
    if key.split(".")[0].split("[")[0] == "storage_options":
        return "(value not shown: storage_options may hold credentials)"
    return repr(value)


def _positive(section: str, values: Any, *names: str) -> None:
    """A section's counts and sizes that must be above 0 (None: the default, allowed)."""
    for name in names:
        value = getattr(values, name)
        if value is not None and value <= 0:
            raise _InvalidValue(section, name, f"expected a number above 0, found {value}")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class StreamConfig:
    channels: list[str] | None = None  # names; None = all channels of the plates
    level: int = 0  # pyramid level (0 = full resolution); `illum` fits the normaliser at this level
    # training only (infer scores whole fields; profile tiles with profile.tiles):
    tile: int | None = None  # square tiles of this size, px (None = whole fields)
    stride: int | None = None  # step between tiles, px, at most `tile` (None: the tile size, no overlap)
    illumination: bool = False  # apply the per-plate illumination function (`rayscreen illum`)
    # intensity scaling per plate and channel, fitted by `rayscreen illum` and stored with the plate:
    # percentile (1-99.8 %), meanstd (z-score), control (fitted on control wells only)
    normalize: Literal["none", "percentile", "meanstd", "control"] = "percentile"
    # skip: an unreadable field (or a well an unfinished ingest has not written) is left out and
    # reported; a rerun tries its well again
    on_error: Literal["raise", "skip"] = "raise"
    override_num_blocks: int | None = None  # Ray Data read tasks (None: from the screen's size)
    # fields each read task reads at once, ahead of the one it hands on (at most 256 MB of raw
    # pixels): on S3 a field is a few requests of tens of ms each, so one at a time mostly waits
    read_threads: int = 8

    def __post_init__(self):
        # values the types allow but the stream cannot use fail here, when the config is parsed,
        # not as a bare ValueError inside a Ray read task minutes later
        if self.level < 0:
            raise _InvalidValue("stream", "level", f"expected a pyramid level >= 0 (0 = full resolution), "
                                                   f"found {self.level}")
        if self.read_threads < 1:
            raise _InvalidValue("stream", "read_threads", f"expected at least 1 field read at a time (1 = one "
                                                          f"after another), found {self.read_threads}")
        if self.tile is not None and self.tile <= 0:
            raise _InvalidValue("stream", "tile", f"expected a positive tile size in pixels, or null for whole "
                                                  f"fields, found {self.tile}")
        if self.stride is None:
            return
        if self.tile is None:
            raise _InvalidValue("stream", "stride", f"{self.stride} is the step between tiles, but stream.tile "
                                                    "is not set: set stream.tile too, or remove stream.stride")
        if self.stride <= 0:
            raise _InvalidValue("stream", "stride", f"expected a positive step in pixels, found {self.stride}")
        if self.stride > self.tile:
            # the tiling rule (stream/tiling.py) keeps every pixel in some tile only while
            # tiles touch or overlap: a longer step leaves a gap between neighbours
            raise _InvalidValue("stream", "stride", f"expected at most stream.tile ({self.tile}) so that no pixel "
                                                    f"falls between tiles, found {self.stride}")


@dataclass(frozen=True)
class LabelConfig:
    column: str | None = None  # annotation column holding the label, e.g. Metadata_Label
    positive: list[Any] | None = None  # binary: values of `column` that are class 1
    negative: list[Any] | None = None  # binary: values that are class 0
    classes: list[Any] | None = None  # multiclass: these values, in this order


@dataclass(frozen=True)
class ModelConfig:
    """The network `rayscreen train` trains: `wscnn` (the WSCNN paper's, global pooling over
    class maps), `wscnn6` (six convolutions), `wscnn_cell` (7x7 second convolution) or `milnet`
    (Kraus et al.'s class-map net on a small or torchvision trunk). rayscreen sets
    `in_channels` and `num_classes` from the plates and labels. `kwargs` of all four:
    `pooling` (a MIL pooling: max, mean, lse, gm, noisy_or, isr, noisy_and, attention, or fc
    for the WSCNN-FC head; default max for wscnn*, noisy_and for milnet), `pooling_kwargs`
    (e.g. {r: 10} for lse), `width` (a filter multiplier, e.g. 0.25, or explicit counts),
    `fc_head` (a fully connected layer over the pooled scores, Kraus' joint loss),
    `feature_pool` (mean, max, or meanstd: each trunk map's mean and spread as the features
    infer writes); milnet only: `trunk` (small, resnet18, resnet50, vgg16, convnext_tiny) and
    `trunk_weights` (a local path/URI of that torchvision trunk's state dict, e.g. ImageNet)."""

    name: str = "wscnn"  # wscnn, wscnn6, wscnn_cell or milnet (or a model registered in code)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model (see above)


@dataclass(frozen=True)
class SplitConfig:
    by: Literal["well", "plate", "column"] = "well"  # unit kept whole in one split (stratified by label)
    column: str | None = None  # for by: column (e.g. held-out compounds)
    val: float = 0.2  # fraction of the units
    test: float = 0.2  # fraction of the units
    seed: int = 0
    column_values: dict[str, list[Any]] | None = None  # explicit {train/val/test: [values]} for by: column/plate


@dataclass(frozen=True)
class AugmentSection:
    enabled: bool = True  # random geometric augmentation of the training fields
    flips: bool = True  # horizontal and vertical
    rot90: bool = True  # turns by multiples of 90 degrees
    rotate: bool = True  # +-20 and 160-200 degree rotations (the WSCNN paper's)
    translate: float = 40.0  # largest shift, px
    scale: list[float] | None = None  # [low, high], e.g. [0.9, 1.1]
    mosaic: bool = False  # WSCNN cell-data mosaics (2x2 fields of one class)
    intensity: float = 0.0  # log-gain sd of a random gain per image and channel (0: off)
    noise: float = 0.0  # largest sd of additive Gaussian noise, drawn per image (0: off)


@dataclass(frozen=True)
class DistillSection:
    """WS-DINO (Cross-Zamirski et al. 2022): DINO self-distillation (Caron et al. 2021) whose
    views come from different fields that share a weak label. See rayscreen.train.distill."""

    enabled: bool = False  # WS-DINO on (beside or instead of the weak-label loss)
    pair_by: Literal["label", "image"] = "label"  # label: views of other fields of the label (WS-DINO); image: DINO
    weight: float = 1.0  # of the self-distillation loss
    classify: float = 1.0  # of the weak-label cross-entropy on the global views (0: self-distillation only)
    out_dim: int = 256  # prototypes of the projection head
    hidden: int = 512  # projection head MLP width
    bottleneck: int = 128  # projection head bottleneck (L2-normalised before the prototypes)
    bank: int = 8  # fields of each label kept from earlier batches as partners (0: partners from the batch only)
    local_crops: int = 4  # small views per field (multi-crop); 0: the two global views only
    local_crop: int = 24  # side of the small views, px (the global views are train.crop, or whole fields)
    student_temp: float = 0.1  # softmax temperature of the student's outputs
    teacher_temp: float = 0.01  # DINO: 0.04 (ViT, 65536 prototypes); ours went uniform at 0.04 and 0.02
    momentum: float = 0.99  # of the teacher's exponential moving average of the student
    center_momentum: float = 0.9  # of the running centre subtracted from the teacher's output
    export: Literal["teacher", "student"] = "teacher"  # which network is validated, checkpointed and exported
    sync_batchnorm: bool = True  # DINO: BatchNorm statistics over all GPU workers (CUDA and >= 2 workers only)


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 1  # Ray Train workers (DDP); one GPU each when GPUs are used
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    epochs: int = 10  # total: a resumed run trains up to this many
    batch_size: int = 32  # fields per step on each worker
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    # plateau: lr x0.1 once `metric` has not improved for 4 epochs in a row (patience 3)
    schedule: Literal["none", "plateau", "cosine"] = "plateau"
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    balanced: bool = False  # class-balanced sampling (rare positives)
    grad_clip: float | None = None  # largest gradient norm (None: no clipping)
    seed: int = 0  # weights, shuffling and augmentation
    crop: int | None = None  # random crops of this size for training
    # where the crops are: anywhere in the field (random), or centred on a nucleus found by
    # Otsu on train.nucleus_channel, a different nucleus each time (single-cell crops, DeepProfiler)
    crop_centre: Literal["random", "nuclei"] = "random"
    nucleus_channel: str | None = None  # the DNA channel's name for crop_centre nuclei (default: the first)
    # regularisers for noisy weak labels (a low-dose well may look like the control):
    mixup: float = 0.0  # Beta(a, a) of mixup (Zhang et al. 2018) between images of a batch; 0: off
    label_smoothing: float = 0.0  # of the training cross-entropy (validation loss stays plain)
    # BatchNorm statistics recomputed before each validation from this many training fields
    # of the epoch (un-augmented, final weights: PreciseBN, Wu & Johnson 2021) instead of the
    # running averages, which lag weights that move fast; each worker draws its own over the
    # whole epoch, holds them until validation (on its GPU when it has one), and the workers'
    # statistics are averaged; 0: the running averages
    precise_bn: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    run_name: str = "train"  # a rerun with the same name resumes from its last checkpoint
    max_failures: int = 1  # restarts from the last checkpoint after a worker failure (a non-finite loss ends the run)
    metric: Literal["train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_precision", "val_recall",
                    "val_f1", "val_roc_auc"] = "val_balanced_accuracy"  # picks the best epoch
    cpus_per_worker: float = 1.0  # CPUs each training worker reserves (leave some for the Ray Data read)
    # torch intra-op threads of a CPU worker; 0: its cpus_per_worker rounded up (Ray's default).
    # More than it reserves pays when train.cache_mb holds the training set and the machine has
    # idle cores: from epoch 2 on the reads are done and the worker is the only thing computing
    torch_threads: int = 0
    keep_checkpoints: int | None = 3  # best checkpoints kept by `metric` (the latest is always kept)
    # rows of the streaming shuffle of the training data (default max(4 x batch_size, 64)); wells
    # stream in plate order, so batches mix plates only as far as this buffer reaches
    shuffle_buffer: int | None = None
    # MB of a worker's training fields held in memory (on its GPU when it has one) after the
    # first epoch, later epochs reshuffled from there instead of read again (a training set
    # larger than this, on any worker, streams every epoch); twice this is needed for a moment
    # when epoch 2 starts. A resumed run streams its first epoch again and replays that one,
    # so it does not repeat an uninterrupted run batch for batch; 0: stream every epoch
    cache_mb: int = 0
    # same batches every run (Ray Data keeps read order; streams a little slower); on a GPU
    # also deterministic cuDNN/cuBLAS kernels (slower convolutions)
    deterministic: bool = False


@dataclass(frozen=True)
class InferConfig:
    checkpoint: str | None = None  # model artefact URI; default: <output>/train/model
    batch_size: int = 16  # fields per forward pass
    concurrency: int = 1  # actors in the pool
    aggregate: Literal["max", "mean", "model"] = "max"  # fields -> well scores
    # per-field saliency map: jacobian (WSCNN), jacobian_relu (Kraus et al.), cam (the class map upsampled)
    saliency: Literal["jacobian", "jacobian_relu", "cam", "none"] = "jacobian"
    saliency_downsample: int = 4  # saliency tiles stored at 1/this of the field's size
    saliency_sigma: float = 2.0  # Gaussian smoothing of the saliency before masking, in field pixels
    mask_threshold: float = 0.5  # of each map's maximum
    mask_nms_size: int = 21  # local non-maximum suppression window (about the object size, px)
    split: Literal["all", "test", "val"] = "all"  # which wells of the train split to score
    # also write each field's mask as an NGFF label image of this name into the input
    # plates (<well>/<field>/labels/<name>), for napari & co.; needs write access to them
    labels: str | None = None
    overwrite: bool = False  # start the results store afresh instead of resuming it
    num_cpus: float = 1.0  # CPUs per actor (its torch threads)
    # one GPU per actor; None: when the cluster has GPUs at the start. On an autoscaling cluster
    # whose GPU nodes start at 0 set true, or the actors run on CPU nodes
    use_gpu: bool | None = None

    def __post_init__(self):
        _positive("infer", self, "batch_size", "concurrency", "saliency_downsample", "mask_nms_size")
        if self.num_cpus < 0:  # 0 is Ray's "reserve none"
            raise _InvalidValue("infer", "num_cpus", f"expected CPUs per actor >= 0, found {self.num_cpus}")
        if self.saliency_sigma < 0:
            raise _InvalidValue("infer", "saliency_sigma", f"expected a smoothing width >= 0 pixels (0: none), "
                                                           f"found {self.saliency_sigma}")
        if not 0 <= self.mask_threshold <= 1:
            raise _InvalidValue("infer", "mask_threshold", "expected a fraction of each map's maximum, 0 to 1, "
                                                           f"found {self.mask_threshold}")


@dataclass(frozen=True)
class ProfileConfig:
    backbone: str = "resnet18"  # resnet18, resnet50, vgg16, inception_v3, convnext_tiny, vit_b_16
    # local path/URI of backbone weights (no hub downloads);
    weights: str | None = None  # null: a random init, seeded: one network in every actor and (resumed) run
    channel_mode: Literal["concat", "rgb"] = "concat"  # concat: each channel as greyscale, features concatenated
    rgb: list[str] | None = None  # channel names mapped to R, G, B for channel_mode: rgb
    input_size: int | None = None  # None: the backbone's default
    tiles: bool = False  # full-resolution tiles averaged instead of a downsampled field
    batch_size: int = 16  # fields per forward pass
    concurrency: int = 1  # actors in the pool
    classical: bool = True  # also compute the classical baseline features
    overwrite: bool = False  # start the profiles store afresh instead of resuming it
    # one GPU per actor; None: when the cluster has GPUs at the start. On an autoscaling cluster
    # whose GPU nodes start at 0 set true, or the actors run on CPU nodes
    use_gpu: bool | None = None

    def __post_init__(self):
        _positive("profile", self, "batch_size", "concurrency", "input_size")


@dataclass(frozen=True)
class QCConfig:
    annotations: str | None = None  # CSV: Metadata_Plate, Metadata_Well, field, label (normal/abnormal)
    # artefact classifier on the field embeddings. linear (logistic regression) by default: with
    # 50 annotated fields of QC metrics its held-out F1 was mean 0.995 / min 0.952 over 10 draws
    # on a second synthetic screen, kNN's 0.917 / 0.706 (docs/results.md, QC artefact classifier)
    method: Literal["knn", "linear"] = "linear"
    k: int = 5  # neighbours of method: knn
    exclude: bool = True  # drop flagged fields before aggregation
    # field embeddings: image QC metrics work without pretrained weights; "deep" is the paper's (ImageNet weights)
    features: Literal["deep", "classical", "qc"] = "qc"
    # annotation CSV column: abnormal (abnormal/artefact/true/1) or normal (normal/false/0);
    label: str = "label"  # a blank label leaves the row out, any other value is an error

    def __post_init__(self):
        if self.method == "knn":  # the linear probe has no k
            _positive("analysis.qc", self, "k")


@dataclass(frozen=True)
class AnalysisConfig:
    source: Literal["profiles", "results"] = "profiles"  # which store to aggregate
    features: Literal["deep", "classical"] = "deep"  # feature set in the store (classical: profiles stores only)
    aggregate: Literal["mean", "median"] = "mean"  # field -> well -> treatment
    normalize: Literal["none", "standardize", "mad"] = "mad"  # per plate, on its control wells (mad: robust z)
    whiten: bool = False  # ZCA sphering on the control wells, per plate, after `normalize` and feature selection
    whiten_shrinkage: Literal["ledoit_wolf", "oas", "none"] = "ledoit_wolf"  # its covariance estimate
    # any of drop_na, variance (near-constant), correlation (one of each pair highly correlated)
    feature_select: list[str] = field(default_factory=lambda: ["variance", "correlation"])
    min_variance: float = 0.0  # `variance` drops features whose variance over the wells is at most this
    corr_threshold: float = 0.9  # `correlation` drops one feature of each pair with |Pearson r| above this
    # annotation marking the negative control wells (normalisation, whitening, hits) ...
    control_column: str = "Metadata_Control"
    # ... by this value ("negative" also matches neg, negcon, true, 1); "positive", "pos" or
    # "poscon" in the column marks positive controls (Z'-factor)
    control_value: Any = "negative"
    # the columns that make a treatment
    treatment: list[str] = field(default_factory=lambda: ["Metadata_Compound", "Metadata_Concentration"])
    compound: str = "Metadata_Compound"  # NSC leaves out the other treatments of the query's compound
    moa: str = "Metadata_MOA"  # mechanism of action: what retrieval must match
    batch: str = "Metadata_Batch"  # NSCB also leaves out the query's batch (when the column exists)
    qc: QCConfig = field(default_factory=QCConfig)
    by_batch: bool = True  # treatment profiles per batch (NSCB can then leave the query's batch out)
    # a hit: z >= this, of a well's profile distance to its plate's controls (one-sided: farther)
    hits_threshold: float = 3.0

    def __post_init__(self):
        if not (math.isfinite(self.min_variance) and self.min_variance >= 0):
            raise _InvalidValue("analysis", "min_variance", f"expected a finite variance >= 0, found {self.min_variance}")
        if not (math.isfinite(self.corr_threshold) and 0 < self.corr_threshold <= 1):
            raise _InvalidValue("analysis", "corr_threshold", f"expected |r| in (0, 1] (at 1 no pair is above it), "
                                                              f"found {self.corr_threshold}")


@dataclass(frozen=True)
class ReportConfig:
    top_fields: int = 8  # highest-scoring fields shown with their saliency
    title: str | None = None  # page title (None: "rayscreen report")


@dataclass(frozen=True)
class Config:
    plates: list[str]  # OME-Zarr HCS plate URIs or globs (local, s3://)
    output: str  # the run's output URI; every stage writes under it
    storage_options: dict[str, Any] | None = None  # fsspec options, e.g. an S3 endpoint_url; no credentials
    platemap: str | None = None  # CSV/TSV/parquet of Metadata_* annotations per well, overriding the plates'
    stream: StreamConfig = field(default_factory=StreamConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    stages: list[str] | None = None  # pipeline: which stages to run (None: all that apply)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-safe) that :func:`config_from_dict` reads back to an equal Config."""
        return dataclasses.asdict(self)

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` with the secrets in ``storage_options`` masked (``***``): what rayscreen
        writes beside its outputs (``config.yaml``, store attributes, checkpoints, the exported
        model), which get shared and archived. Credentials come from the standard places and
        are never written out."""
        from .store.uri import redact

        record = self.to_dict()
        if record["storage_options"]:
            record["storage_options"] = redact(record["storage_options"])
        return mask_record(record)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- parsing


def load_config(path_or_text: str, *, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config file (or YAML text containing a newline); strict, safe_load only.

    ``overrides`` maps dotted keys to values (``{"train.epochs": 2}``), applied before
    validation, as ``--set train.epochs=2`` on the command line does.
    """
    if "\n" in path_or_text:
        text, source = path_or_text, "<config>"
    else:
        try:
            with open(path_or_text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read config {path_or_text}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {path_or_text}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                              "save it as UTF-8") from None
        source = path_or_text
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), source)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top, found {type(data).__name__}")
    return config_from_dict(data, source=source, lines=lines, overrides=overrides)


def config_from_dict(data: dict[str, Any], *, source: str = "<config>", lines: dict[str, int] | None = None,
                     overrides: dict[str, Any] | None = None) -> Config:
    """Validate a plain dict into a :class:`Config`; errors name ``source:line: key``, or
    ``--set key`` for a key that ``overrides`` (dotted keys, as in :func:`load_config`) set.
    The overrides are applied to a copy of ``data``."""
    if overrides:
        data = copy.deepcopy(data)
        for key, value in overrides.items():
            _set_dotted(data, key, value)
    config = _absolute_paths(_build(Config, data, "", _Where(source, lines or {}, tuple(overrides or ()))))
    from .store.uri import drop_masked

    options, dropped = drop_masked(config.storage_options)
    if dropped:
        log.warning("%s: %s masked (***) when the config was recorded: left out, so credentials come from "
                    "the standard places (environment, AWS profile, instance role) or --storage-options",
                    source, ", ".join(dropped))
        config = dataclasses.replace(config, storage_options=options)
    return config


def _absolute_paths(config: Config) -> Config:
    """Local paths of a config made absolute, relative to the directory the command runs in:
    Ray's workers may run elsewhere (Ray Train's own directory, a cluster started in another
    one). Plates too (globs stay globs, expanded by ``expand_uris``), so that ``rayscreen
    config`` and the recorded config say where the plates were, as they say where the output
    went."""
    from .store.uri import absolute

    def fix(value):
        return absolute(value) if value else value

    kwargs = dict(config.model.kwargs)
    if isinstance(kwargs.get("trunk_weights"), str):  # milnet's torchvision trunk, loaded in Ray Train's workers
        kwargs["trunk_weights"] = fix(kwargs["trunk_weights"])
    return dataclasses.replace(
        config, plates=[fix(p) for p in config.plates], output=fix(config.output), platemap=fix(config.platemap),
        model=dataclasses.replace(config.model, kwargs=kwargs),
        infer=dataclasses.replace(config.infer, checkpoint=fix(config.infer.checkpoint)),
        profile=dataclasses.replace(config.profile, weights=fix(config.profile.weights)),
        analysis=dataclasses.replace(config.analysis, qc=dataclasses.replace(
            config.analysis.qc, annotations=fix(config.analysis.qc.annotations))))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2", "infer.batch_size=8"]`` -> ``{"train.epochs": 2, ...}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            # the value is not repeated: --set storage_options=... may carry credentials
            mark = getattr(e, "problem_mark", None)
            where = f", column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--set {key.strip()}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or type(e).__name__}{where})") from None
    return out


def dump_config(config: Config) -> str:
    """The config as YAML, secrets masked (:meth:`Config.to_record`)."""
    return yaml.safe_dump(config.to_record(), sort_keys=False)


def write_config(config: Config) -> str:
    """Write ``<output>/config.yaml``, the resolved config a stage ran with (secrets masked:
    :func:`dump_config`); returns its URI. Every stage writes it, so an output says how it
    was made whichever command made it."""
    from .store.uri import filesystem, join

    uri = join(config.output, "config.yaml")
    fs, path = filesystem(uri, config.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(dump_config(config))
    return uri


@dataclass(frozen=True)
class _Where:
    source: str
    lines: dict[str, int]
    overrides: tuple[str, ...] = ()  # dotted keys set by --set: their values are not on any line of the file

    def at(self, key: str) -> str:
        for o in self.overrides:
            if key == o or key.startswith((o + ".", o + "[")):
                return f"--set {key}"
            if o.startswith(key + ".") and key not in self.lines:  # a section that only --set names
                return f"--set {o}: {key}"
        line = self.lines.get(key)
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"


def _key_lines(node, source: str, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text. A key written twice in one
    mapping is an error naming both lines: safe_load would keep the last one silently (two
    ``train:`` blocks would lose the first block's settings)."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            line = k.start_mark.line + 1
            if key in seen and k.value != "<<":  # "<<" merges a mapping in; not a key of the config
                raise ConfigError(f"{source}:{line}: {key}: written twice (lines {seen[key]} and {line}); "
                                  "expected it once (merge the two)")
            seen[key] = out[key] = line
            out.update(_key_lines(v, source, key + "."))
    return out


def mask_record(value: Any) -> Any:
    """``value`` (a config record: dicts, lists, scalars) with the password of every URL in
    its strings masked (plates, platemap, weights...): what :meth:`Config.to_record` writes."""
    from .store.uri import mask_url_passwords

    if isinstance(value, str):
        return mask_url_passwords(value)
    if isinstance(value, dict):
        return {k: mask_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_record(v) for v in value]
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or written empty (`stream:` alone): a section of defaults
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str, where: _Where):
    name = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.at(name)}: expected a mapping, found {type(data).__name__} {_shown(name, data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{where.at(key)}: unknown key; expected one of: {', '.join(known)}")
    values = {}
    for fname, f in known.items():
        key = f"{prefix}{fname}"
        if fname not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where.source}: {key}: required key missing")
            continue
        values[fname] = _coerce(hints[fname], data[fname], key, where)
    try:
        return cls(**values)
    except _InvalidValue as e:  # a section's own check (__post_init__): name the key's line
        raise ConfigError(f"{where.at(prefix + e.field)}: {e.problem}") from None


def _coerce(tp, value: Any, key: str, where: _Where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{where.at(key)}: expected {_describe(tp)}, found {type(value).__name__} {_shown(key, value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where.at(key)}: expected one of {list(choices)}, found {_shown(key, value)}")
        return value
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and item in (str, Any):
            value = [value]  # a single URI/value where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where.at(key)}: expected a list, found {type(value).__name__} {_shown(key, value)}")
        return [_coerce(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where.at(key)}: expected a mapping, found {type(value).__name__} {_shown(key, value)}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(vt, v, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where.at(key)}: expected true or false, found {_shown(key, value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where.at(key)}: expected an integer, found {_shown(key, value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string, not a float
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where.at(key)}: expected a number, found {_shown(key, value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads 123, 2026-11-27 and yes as a number, a date and true: quoting keeps text
            hint = ("; quote it to keep it text (in YAML \"...\"; with --set, e.g. --set 'key=\"...\"')"
                    if isinstance(value, (int, float, bool, _dt.date)) and key.split(".")[0] != "storage_options"
                    else "")
            raise ConfigError(f"{where.at(key)}: expected a string, found {type(value).__name__} "
                              f"{_shown(key, value)}{hint}")
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in this module, not the user's


# a decimal number in the notation of YAML 1.2 and JSON (1e-3, -2.5E+4, .5); not nan/inf words
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
