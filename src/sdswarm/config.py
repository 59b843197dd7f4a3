"""The training config: YAML in, a typed and validated `Config` out.

The how-to's 17 keys stay flat at the top level with their names and meaning, so its
`configs/sd_1-5.yaml` loads unchanged. What this project adds lives in sections (`data`,
`train`, `output`, `swarm`), each with defaults here, in one visible place.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
Precision = Literal["fp16", "bf16", "no"]


class ConfigError(ValueError):
    """A config (or node settings) that cannot be used; the message names the key, the value and what is
    allowed, and `keys` lists the dotted keys at fault (for a form to mark)."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class CrossKeyError(ValueError):
    """A rule over several keys, raised by a model validator; `keys` are the ones it concerns."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = Field("builtin:demo", description="builtin:demo, a folder of {post_id}.{ext} + .json pairs, or "
                        "an http(s) URL of the images: a base, or a template with {post_id} and {ext} "
                        "(the how-to's {image_ext} works too)")
    json_source: str | None = Field(None, description="where the .json halves are (folder or URL template); "
                                    "default: beside the images")
    index: str | None = Field(None, description="SQLite index of posts (file or http(s) URL): this project's, "
                              "or the how-to's posts(post_id, ext, rating) db; default: built from a source "
                              "folder; required for a URL source. A joiner without one downloads the swarm's")
    index_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="the sha256 of the index file "
                                     "the swarm trains on: a relay sends it, a joiner's index must match it")
    workdir: Path | None = Field(None, description="where pairs land as image + .txt; default OUTPUT/workdir")
    images_per_chunk: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        1000, description="pairs trained per chunk before the next is drawn")
    caption_categories: list[Literal["character", "copyright", "general", "artist", "meta"]] = Field(
        default_factory=lambda: ["character", "copyright", "general"]
    )
    bucket_step: Literal[8, 16, 32, 64] = Field(64, description="bucket sides are multiples of this (pixels)")
    bucket_max_ratio: Annotated[float, Field(ge=1, le=4)] = 2.0
    loader_workers: Annotated[int, Field(ge=0, le=32)] = Field(2, description="threads decoding batches ahead")
    shards: Annotated[int, Field(ge=1, le=65536)] = Field(
        32, description="disjoint data slots per round: up to this many peers never train the same post")
    workdir_max_gb: Annotated[float, Field(gt=0)] = Field(20.0, description="work dir bound; oldest pairs evicted")
    fetch_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(16, description="pairs downloading at once")
    fetch_timeout: Annotated[float, Field(gt=0, le=3600)] = Field(30.0, description="seconds of silence per request")
    fetch_retries: Annotated[int, Field(ge=0, le=10)] = Field(3, description="retries on timeouts and 5xx, not 404")
    max_file_mb: Annotated[float, Field(gt=0, le=1024)] = Field(100.0, description="larger image files are discarded")
    max_image_pixels: Annotated[int, Field(ge=1, le=250_000_000)] = Field(
        50_000_000, description="larger images are refused before decoding (at most 250 million: 750 MB decoded)")
    caption_separator: str = Field(", ", min_length=1)
    caption_shuffle: bool = Field(False, description="shuffle the tags each time a caption is used")
    caption_keep_first: Annotated[int, Field(ge=0)] = Field(0, description="tags left in place by the shuffle")
    caption_escape_parentheses: bool = Field(False, description="write \\( \\) for emphasis-syntax front ends")


# kohya's LoRA targets for SD 1.x: the UNet's transformer blocks (attention, feed-forward, the 1x1 projections in and
# out) and, when the text encoder is trained, its attention and MLP layers
LORA_UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
LORA_TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class LoraConfig(Section):
    """Train LoRA adapters on a frozen base instead of the whole model: megabytes on the wire, not gigabytes."""

    rank: Annotated[int, Field(ge=1, le=1024)] = 32
    alpha: Annotated[float, Field(gt=0)] | None = Field(
        None, description="the adapters' output is scaled by alpha / rank; none: alpha = rank (scale 1)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_UNET_MODULES), min_length=1,
                                      description="UNet modules that get adapters (names or name suffixes)")
    text_encoder: list[str] = Field(default_factory=lambda: list(LORA_TEXT_MODULES), min_length=1,
                                    description="text encoder modules that get adapters when train_text_encoder")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


class TrainConfig(Section):
    batch_size: Annotated[int, Field(gt=0, le=1024)] = Field(1, description="samples per local step")
    max_steps: PositiveInt | None = Field(None, description="stop after this many local steps; none: run on")
    max_swarm_steps: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("max_swarm_steps", "max_epochs"),  # its old name still reads
        description="stop when the swarm has made this many swarm steps (optimizer steps of the whole swarm): "
        "every peer stops at the same point with the same weights; none: run on",
    )
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.9999
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # options users of kohya/diffusers trainers expect; all off by default
    mixed_precision: Precision | None = Field(
        None, description="none: follow the top-level fp16 key; bf16 needs fp16: False and a GPU that supports it"
    )
    min_snr_gamma: Annotated[float, Field(gt=0)] | None = Field(
        None, description="min-SNR loss weighting (Hang et al. 2023), e.g. 5; none: plain MSE"
    )
    noise_offset: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="noise += offset * randn(b, c, 1, 1)")
    gradient_checkpointing: bool = Field(False, description="UNet and a trained text encoder: less memory, ~30% slower")
    attention: Literal["default", "sdpa", "xformers"] = Field(
        "default", description="default: as diffusers loads it (PyTorch SDPA on torch 2); xformers if installed"
    )
    optimizer_8bit: bool = Field(False, description="bitsandbytes AdamW8bit (CUDA) instead of torch AdamW")
    cache_latents: bool = Field(False, description="keep each image's VAE posterior: one encode per image per chunk")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters on a frozen base (`lora: {}` for the "
                                    "defaults: rank 32, kohya's targets); none: a full fine-tune")


class OutputConfig(Section):
    dir: Path = Path("output")
    checkpoint_every: PositiveInt = Field(1000, description="local steps between checkpoints")
    keep_checkpoints: Annotated[int, Field(ge=1)] = 3
    sample_every: PositiveInt = Field(500, description="local steps between sample grids")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["1girl, solo, smile", "landscape, sky, cloud", "cat, animal focus", "no humans"],
        min_length=1,
    )
    sample_steps: Annotated[int, Field(ge=1, le=200)] = 25
    sample_guidance: Annotated[float, Field(ge=1, le=30)] = 7.0
    log_every: PositiveInt = 10
    log_with: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also send the metrics to TensorBoard (OUTPUT/tensorboard) and/or Weights "
        "& Biases; needs the extra: pip install 'sdswarm[tensorboard]' / 'sdswarm[wandb]'")


class SwarmConfig(Section):
    run_id: str = Field("testrun", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # the upper bounds below are far beyond any real swarm: a larger value could only stall one (e.g. a relay's)
    target_batch_size: Annotated[int, Field(ge=1, le=10**9)] = 75000
    matchmaking_time: Seconds = 260.0
    averaging_timeout: Seconds = 1200.0
    allreduce_timeout: Seconds = 1200.0
    load_state_timeout: Seconds = Field(1200.0, description="the least time a state download may take; "
                                        "more when the state is large at swarm.min_link_mbit")
    sync: Literal["every_step", "local_steps"] = Field(
        "every_step", description="every_step: one AdamW step on the swarm-averaged gradient per swarm step; "
        "local_steps (DiLoCo): each peer takes swarm.local_steps AdamW steps alone, then the swarm averages what "
        "the peers learned and takes one outer step (far fewer bytes: for home links)")
    local_steps: Annotated[int, Field(ge=1, le=100_000)] = Field(
        50, description="local_steps mode: AdamW steps each peer takes between swarm steps (about: fast peers take "
        "more, slow ones fewer)")
    outer_lr: Annotated[float, Field(gt=0, le=2)] = Field(0.7, description="local_steps mode: the outer step's lr")
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.9, description="local_steps mode: the outer step's Nesterov momentum")
    compression: Literal["auto", "none", "fp16", "scaled_fp16", "uniform8bit", "blockwise8bit"] = Field(
        "auto", description="what averaging sends: auto = scaled_fp16 gradients (every_step), uniform8bit "
        "pseudo-gradients (local_steps); blockwise8bit needs bitsandbytes on every peer")
    uplink_mbit: Annotated[float, Field(ge=0.1, le=1e6)] = Field(
        20.0, description="this peer's upload speed, for the start-up estimate of a swarm step's network time")
    min_link_mbit: Annotated[float, Field(ge=0.1, le=1e6)] = Field(
        10.0, description="the slowest link a state download must finish on (sets its timeout)")
    average_state_every: Annotated[int, Field(ge=1, le=10_000)] = 1
    after_failed_round: Literal["resync", "local"] = Field(
        "resync", description="every_step mode, a gradient round that failed or came back incomplete while other "
        "peers trained: resync = load the swarm's state after the step (one state download, the peer stays one "
        "model with the others); local = keep the step made with this peer's own gradient (hivemind's way)")
    request_timeout: Seconds | None = Field(
        None, description="seconds a peer waits for each answer while forming an averaging group; must be below "
        "matchmaking_time (else groups deadlock); none: a third of matchmaking_time, at most 3 (hivemind's default)")
    min_peers: Annotated[int, Field(ge=1, le=1000)] = Field(
        1, description="start-up barrier: peers to wait for before the first step")
    startup_timeout: Seconds = Field(600.0, description="how long the barrier waits before training anyway")
    access: Literal["invite", "open"] = Field(
        "invite", description="invite: only peers with an invite from the mother (sdswarm invite) join; open: any "
        "peer that reaches a relay joins")

    @model_validator(mode="after")
    def _check_request_timeout(self) -> SwarmConfig:
        if self.request_timeout is not None and self.request_timeout >= self.matchmaking_time:
            raise ValueError(
                f"swarm.request_timeout ({self.request_timeout:g}) must be below swarm.matchmaking_time "
                f"({self.matchmaking_time:g}): a peer that waits longer for one answer than matchmaking lasts cannot "
                "form a group; lower it, or leave it unset (a third of matchmaking_time)")
        return self

    @property
    def matchmaking_request_timeout(self) -> float:
        """The request_timeout hivemind's averagers get."""
        return self.request_timeout if self.request_timeout is not None else min(3.0, self.matchmaking_time / 3)


class Config(Section):
    # --- the how-to's keys ---
    model: str = Field(min_length=1, description="hub id, local diffusers folder, or builtin:tiny")
    extended_chunks: Annotated[int, Field(ge=1, le=8)] = 1
    clip_penultimate: bool = False
    fp16: bool = False
    resolution: Annotated[int, Field(ge=32, le=4096, multiple_of=8)] = 512
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    train_text_encoder: bool = False
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4
    ucg: Annotated[float, Field(ge=0, le=1)] = 0.1
    use_ema: bool = False
    opt_betas_one: Annotated[float, Field(ge=0, lt=1)] = 0.9
    opt_betas_two: Annotated[float, Field(ge=0, lt=1)] = 0.999
    opt_epsilon: Annotated[float, Field(gt=0, le=1)] = 1e-8
    opt_weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-2
    buckets_shuffle: bool = True
    buckets_side_min: Annotated[int, Field(ge=8, le=4096)] = 256
    buckets_side_max: Annotated[int, Field(ge=8, le=4096)] = 512
    # --- this project's sections ---
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)

    @model_validator(mode="after")
    def _check_buckets(self) -> Config:
        step = self.data.bucket_step
        if self.buckets_side_min > self.buckets_side_max:
            raise CrossKeyError(
                f"buckets_side_min ({self.buckets_side_min}) must not exceed "
                f"buckets_side_max ({self.buckets_side_max})", "buckets_side_min", "buckets_side_max",
            )
        for key in ("buckets_side_min", "buckets_side_max", "resolution"):
            if getattr(self, key) % step:
                raise CrossKeyError(f"{key} ({getattr(self, key)}) must be a multiple of data.bucket_step ({step})",
                                    key, "data.bucket_step")
        if self.buckets_side_min > self.resolution:
            raise CrossKeyError(
                f"buckets_side_min ({self.buckets_side_min}) must not exceed resolution ({self.resolution})",
                "buckets_side_min", "resolution",
            )
        return self

    @model_validator(mode="after")
    def _check_precision(self) -> Config:
        # the how-to's fp16: True always means fp16; a different train.mixed_precision would be silently ignored
        if self.fp16 and self.train.mixed_precision not in (None, "fp16"):
            raise CrossKeyError(
                f"fp16: True conflicts with train.mixed_precision: {self.train.mixed_precision}; "
                "set fp16: False to use it", "fp16", "train.mixed_precision",
            )
        return self

    @model_validator(mode="after")
    def _check_demo_model(self) -> Config:
        # the demo's 48-160 px coloured shapes would only ruin a real model
        if self.data.source == "builtin:demo" and self.model != "builtin:tiny":
            raise CrossKeyError(
                f"data.source is builtin:demo (coloured shapes for the tiny model) but model is {self.model!r}: "
                "point data at real data, e.g. data.source: https://.../danbooru/{post_id}.{image_ext} with "
                "data.index: posts.db (build one with: sdswarm index build --from-dump DUMP --out posts.db), or "
                "a folder of {post_id}.{ext} + .json pairs; or train model: builtin:tiny on the demo",
                "data.source", "model")
        return self

    @property
    def precision(self) -> Precision:
        """Mixed precision on CUDA: the how-to's fp16 key wins; else train.mixed_precision (default no)."""
        return "fp16" if self.fp16 else (self.train.mixed_precision or "no")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a mapping (e.g. parsed YAML) into a Config, or raise ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = describe_errors(exc, Config)
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines),
                          error_keys(exc)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config file; `overrides` (dotted keys, e.g. {"train.max_steps": 10}) win over the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = {} if data is None else data
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            set_dotted(data, dotted, value)
    return parse_config(data, source=str(path))


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for "a.b", making the sections on the way."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem of a `model` (Config, NodeSettings): the key, the value and what is allowed."""
    return [_describe(err, model) for err in exc.errors()]


def error_keys(exc: ValidationError) -> list[str]:
    """The dotted keys the problems are about, each once: a value's own key, or those a cross-key rule names."""
    keys: list[str] = []
    for err in exc.errors():
        cause = err.get("ctx", {}).get("error")
        found = [".".join(str(part) for part in err["loc"])] if err["loc"] else list(getattr(cause, "keys", ()))
        keys += [key for key in found if key not in keys]
    return keys


def _describe(err: Any, model: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'{_suggest(err['loc'], model)}"
    if err["type"] == "missing":
        return f"key '{key}' is required"
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a cross-key rule; its message names the keys
        return message
    return f"key '{key}': value {err['input']!r} is not allowed: {message}"


def _suggest(loc: tuple, model: type[BaseModel]) -> str:
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (known keys here: {', '.join(known)})"
