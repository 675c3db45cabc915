"""Typed configuration: dataclasses, YAML files and ``key=value`` dotted overrides.

Resolution order (later wins)::

    dataclass defaults  <-  model preset (``model.preset``)  <-  YAML file(s)  <-  ``key=value`` overrides

OmegaConf structured configs do the merging and the type checks; this module adds what OmegaConf
leaves out: a message that names the closest valid key, range/choice checks (``__post_init__`` runs
when :func:`OmegaConf.to_object` builds the dataclasses), and model presets. The resolved config is
written beside every result with :func:`save_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from workbench.errors import ConfigError
from workbench.modalities import IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE

MODALITIES = ("image", "audio", "text", "video")
SIGNALS = ("image", "audio", "video")  # the numeric modalities: patches, masked by dropping, stems


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}{hint}")


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"{name}={value!r} is outside {bounds}")


# --------------------------------------------------------------------------------------------- data
@dataclass
class LimitsConfig:
    """Caps on user media, shared by the CLI, the data loaders and the app."""

    max_upload_mb: float = 50.0  # any uploaded file
    max_image_pixels: int = 25_000_000  # width x height before decoding pixels
    max_audio_seconds: float = 30.0  # after decoding, before trimming silence
    max_video_frames: int = 600  # frames decoded from one clip
    max_text_chars: int = 2_000  # characters of one text input

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range(f"data.limits.{f.name}", getattr(self, f.name), lo=1e-9)


@dataclass
class DataConfig:
    """Where the examples come from and how they are split and paired."""

    source: str = "digits"  # digits (embedded benchmark) | folders (a user's own directories)
    cache_dir: str = ""  # "" -> $WORKBENCH_CACHE or ~/.cache/workbench
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # streams in use
    audio_source: str = "synth"  # synth (espeak-ng clips) | fsdd (Free Spoken Digit recordings)
    fsdd_dir: str = ""  # an FSDD `recordings/` directory (or its parent) when audio_source=fsdd
    fsdd_holdout_speakers: list[str] = field(default_factory=list)  # speakers kept out of training
    folders: dict[str, str] = field(default_factory=dict)  # modality -> directory, for source=folders
    pairing: str = "unpaired"  # unpaired (OmniVec2 default) | aligned (both streams show one digit)
    scale: float = (
        1.0  # size of the embedded benchmark, (0, 1]; tests build ~0.05 (every split still present)
    )
    num_workers: int = 0  # DataLoader workers; 0 is fastest for these small in-memory tensors
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("digits", "folders"))
        _check_choice("data.audio_source", self.audio_source, ("synth", "fsdd"))
        _check_choice("data.pairing", self.pairing, ("unpaired", "aligned"))
        for m in self.modalities:
            _check_choice("data.modalities[]", m, MODALITIES)
        if not self.modalities:
            raise ConfigError("data.modalities is empty; name at least one of " + ", ".join(MODALITIES))
        if self.audio_source == "fsdd" and not self.fsdd_dir:
            raise ConfigError("data.audio_source=fsdd needs data.fsdd_dir=DIR (an FSDD recordings/ folder)")
        _check_range("data.num_workers", self.num_workers, lo=0)
        _check_range("data.scale", self.scale, lo=1e-6, hi=1.0)


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Widths and depths of the OmniVec2 network (METHOD.md section 1) and its ablation switches.

    ``preset`` fills every other field first (see :data:`MODEL_PRESETS`); explicit keys then win.
    """

    preset: str = (
        "small"  # tiny (tests) | small (CPU default) | base (ViT-Base widths, GPUs) | seed-system presets
    )
    dim: int = 192  # token width inside f (tokenizer output)
    depth_f: int = 4  # transformer blocks in f
    fc_dims: list[int] = field(
        default_factory=lambda: [192, 160, 128]
    )  # f's three FC layers (ReLU between) reducing dim -> fc_dims[-1], the width of A, g, heads' input
    depth_g: int = 2  # transformer blocks in g (at width fc_dims[-1])
    heads: int = 4  # attention heads in f, A and g
    mlp_ratio: float = 4.0  # hidden width of the GELU MLP, as a multiple of the width
    head_dim: int = 96  # width of each task head (ViT-Tiny style)
    head_depth: int = 1  # transformer blocks in each task head
    head_pool: str = "mean"  # classification read-out of a task head: mean (of its tokens) | cls (ViT CLS)
    head_heads: int = 3  # attention heads in each task head
    decoder_dim: int = 96  # masked-prediction decoders (stage 1 and 2) and autoencoder heads
    decoder_depth: int = 1  # transformer blocks in each decoder
    decoder_heads: int = 3  # attention heads in each decoder
    # How the specific tokenizers embed each signal's patches (unified ignores it), merged per key over
    # the preset's: linear (the paper) | conv (a convolutional stem) | both (the stem and the linear
    # projection, summed). Unlisted signals are linear. `small` sets {image: both, audio: both, video: conv}.
    stem: dict[str, str] = field(default_factory=lambda: {"image": "both"})
    # The stem: strided (Xiao et al. 2021; 3x3 stride-2 convolutions) | pooled (a small CNN, frame by
    # frame, max-pooled onto the token grid; tokenizers.PooledStem). `small` uses pooled (RECIPE.md).
    stem_trunk: str = "strided"
    # Width of the input-guided refiner on image dense outputs (heads.DenseRefiner; 0 = off: the head's
    # per-token pixels are the prediction). `small` sets it (RECIPE.md).
    dense_refine: int = 0
    dense_refine_depth: int = 3  # the refiner's 3x3 convolutions (>= 2): it reads 2*depth+1 pixels across
    init: str = "trunc_normal"  # transformer Linear weights: trunc_normal (std 0.02, timm ViT) | xavier (MAE)
    zero_fusion: bool = False  # zero-initialise A's output projections: fusion starts as the identity
    dropout: float = 0.0  # dropout on attention weights and MLP/projection outputs
    drop_path: float = 0.0  # stochastic depth (max rate, linear over f's and g's blocks)
    # `small` sets patch_size=7 (4x4 = 16 image tokens) and video_patch=16 (4x2x2 = 16 video tokens)
    patch_size: int = 4  # image patches (pixels): 28x28 -> 7x7 = 49 tokens
    video_patch: int = 8  # spatial side of a video tubelet: 32x32 frames -> 4x4 tubelets per time step
    tubelet_frames: int = 2  # frames per video tubelet: 8 frames -> 4 time steps (4x4x4 = 64 tokens)
    n_mels: int = 64  # audio log-mel bins
    audio_n_fft: int = 512  # STFT size (Hann window of the same length) at 16 kHz: 32 ms
    audio_hop: int = 320  # STFT hop at 16 kHz: 20 ms, 101 frames for a 2 s clip
    audio_patch: list[int] = field(
        default_factory=lambda: [8, 16]
    )  # (time frames, mel bins) per audio patch: 2 s -> 13 x 4 = 52 tokens
    # log-mel normalisation per clip: utterance (one mean and scale) | bin_mean (each mel bin's own mean
    # subtracted first: cepstral mean normalisation, a fixed filter on the waveform cancels; audio.py).
    # bin_mean won audio alone from scratch on 3 seeds, tied on the full profile and lost the val mean of 7
    # over 3 seeds of the default run: off (RECIPE.md).
    audio_norm: str = "utterance"
    max_audio_seconds: float = 2.0  # longer waveforms are rejected (MediaError), never truncated
    image_norm: list[float] = field(
        default_factory=lambda: [0.131, 0.308]
    )  # (mean, std) of image pixels in [0, 1], subtracted/divided before patching (MNIST's)
    video_norm: list[float] = field(
        default_factory=lambda: [0.033, 0.133]
    )  # (mean, std) of video pixels (the embedded moving digits: mostly black frames)
    text_vocab: str = (
        "word"  # text tokenizer: word (unseen words -> [UNK]) | bpe (sub-words); text_tokenizer.py
    )
    text_vocab_size: int = 2000  # rows of the text embedding; the trained vocabulary must fit
    text_unk: float = 0.1  # training only: share of words hidden behind [UNK] (word dropout; off: 0)
    # training only, classification batches: share of phrases given one [UNK] at a random gap (off: 0)
    text_unk_insert: float = 0.0
    max_text_tokens: int = 64  # longer text is rejected, never silently truncated
    text_shift: int = 8  # each phrase's positions start at a random offset in [0, K] in training, at K // 2 in eval (off: 0)
    # Training only, on the batches of classification tasks (dense targets would move with their
    # inputs): augmentation per sample by the patchers (ImagePatcher / AudioPatcher.augment). Off: 0.
    # The full profile sets spec_warp=0.2 (audio alone, 600 updates: audio digit 89.2% vs 87.0%); the
    # masks, tilt, shift and echo lost in the same probe (RECIPE.md).
    image_shift: int = 0  # images moved by up to this many pixels along each axis
    spec_warp: float = 0.0  # mel axis stretched by a factor in [1 - w, 1 + w] (a voice's formants move)
    spec_warp_ends: bool = False  # the warp's factor drawn apart at the lowest and highest bin, blended
    spec_tilt: float = (
        0.0  # a ramp across the mel bins, its end-to-end rise drawn in [-t, t] (normalised units)
    )
    spec_freq_mask: int = 0  # two bands of up to this many mel bins zeroed (SpecAugment)
    spec_time_mask: int = 0  # two spans of up to this many STFT frames zeroed (SpecAugment)
    wave_echo: float = 0.0  # waveform echo, 3 taps: amplitude drawn in [0, e], its powers for taps 2, 3
    wave_echo_ms: list[float] = field(default_factory=lambda: [20.0, 150.0])  # its delay drawn in [lo, hi] ms
    tokenizer: str = "specific"  # specific (one per modality) | unified (Meta-Transformer Data2Seq)
    task_head: str = "specific"  # specific (one per modality/task) | unified (Uni-Perceiver) | autoencoder
    fusion: str = "hybrid"  # hybrid (OmniVec2 cross-attention) | early (one joint sequence) | late (none)
    moe_experts: int = 0  # experts per mixture-of-experts feed-forward layer (IMP); 0 = dense MLPs everywhere
    moe_top_k: int = 2  # experts each token is routed to (Switch/GShard top-k, gates renormalised)
    moe_every: int = 2  # every n-th block of the f+g stack (counted from 1 across f then g) is MoE
    moe_aux_weight: float = 0.01  # weight of the Switch load-balancing loss E * sum_e f_e * P_e

    def __post_init__(self) -> None:
        _check_choice("model.preset", self.preset, tuple(MODEL_PRESETS))
        _check_choice("model.tokenizer", self.tokenizer, ("specific", "unified"))
        _check_choice("model.task_head", self.task_head, ("specific", "unified", "autoencoder"))
        _check_choice("model.fusion", self.fusion, ("hybrid", "early", "late"))
        _check_choice("model.head_pool", self.head_pool, ("mean", "cls"))
        _check_choice("model.init", self.init, ("xavier", "trunc_normal"))
        _check_choice("model.audio_norm", self.audio_norm, ("utterance", "bin_mean"))
        for m, kind in self.stem.items():
            _check_choice("model.stem key", m, SIGNALS)
            _check_choice(f"model.stem.{m}", kind, ("linear", "conv", "both"))
        for m in SIGNALS:  # saved configs name every signal: a reload cannot gain a stem
            self.stem.setdefault(m, "linear")
        _check_choice("model.stem_trunk", self.stem_trunk, ("strided", "pooled"))
        _check_range("model.moe_experts", self.moe_experts, lo=0)
        _check_range("model.moe_every", self.moe_every, lo=1)
        _check_range("model.moe_aux_weight", self.moe_aux_weight, lo=0.0)
        if self.moe_experts:
            _check_range("model.moe_top_k", self.moe_top_k, 1, self.moe_experts)
        for name in (
            "dim",
            "depth_f",
            "depth_g",
            "heads",
            "head_dim",
            "head_depth",
            "head_heads",
            "decoder_dim",
            "decoder_depth",
            "decoder_heads",
            "patch_size",
            "video_patch",
            "tubelet_frames",
            "n_mels",
            "audio_n_fft",
            "audio_hop",
            "max_text_tokens",
        ):
            _check_range(f"model.{name}", getattr(self, name), lo=1)
        _check_range("model.dense_refine", self.dense_refine, lo=0)
        _check_range("model.dense_refine_depth", self.dense_refine_depth, lo=2)
        _check_range("model.mlp_ratio", self.mlp_ratio, lo=0.01)
        _check_range("model.max_audio_seconds", self.max_audio_seconds, lo=0.01)
        _check_range("model.text_vocab_size", self.text_vocab_size, lo=5)  # 4 special ids + one piece
        for name in ("image_norm", "video_norm"):
            value = getattr(self, name)
            if len(value) != 2 or value[1] <= 0:
                raise ConfigError(f"model.{name}={value} must be [mean, std] with std > 0")
        if len(self.fc_dims) != 3 or min(self.fc_dims) < 1:
            raise ConfigError(
                f"model.fc_dims={self.fc_dims} must be three positive widths (f's three FC layers)"
            )
        for name, width, heads in (
            ("dim", self.dim, self.heads),
            ("fc_dims[-1]", self.fc_dims[-1], self.heads),
            ("head_dim", self.head_dim, self.head_heads),
            ("decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            if width % heads:
                raise ConfigError(f"model.{name}={width} is not divisible by its number of heads ({heads})")
        for name, width in (
            ("dim", self.dim),
            ("head_dim", self.head_dim),
            ("decoder_dim", self.decoder_dim),
        ):
            if width % 2:  # fixed sin-cos positions pair every sine with a cosine
                raise ConfigError(f"model.{name}={width} must be even (sin-cos positional embeddings)")
        _check_range("model.dropout", self.dropout, 0.0, 1.0)
        _check_range("model.drop_path", self.drop_path, 0.0, 1.0)
        _check_range("model.text_shift", self.text_shift, 0, 256)
        _check_range("model.image_shift", self.image_shift, 0, IMAGE_SIZE // 2)
        _check_range("model.spec_warp", self.spec_warp, 0.0, 0.5)
        _check_range("model.spec_tilt", self.spec_tilt, 0.0, 10.0)
        _check_range("model.spec_freq_mask", self.spec_freq_mask, 0, self.n_mels)
        _check_range("model.spec_time_mask", self.spec_time_mask, lo=0)
        _check_range("model.wave_echo", self.wave_echo, 0.0, 0.95)
        if len(self.wave_echo_ms) != 2 or not 0.0 < self.wave_echo_ms[0] <= self.wave_echo_ms[1] <= 500.0:
            raise ConfigError(
                f"model.wave_echo_ms={self.wave_echo_ms} must be [lo, hi] ms with 0 < lo <= hi <= 500"
            )
        _check_choice("model.text_vocab", self.text_vocab, ("word", "bpe"))
        _check_range("model.text_unk", self.text_unk, 0.0, 0.9)
        _check_range("model.text_unk_insert", self.text_unk_insert, 0.0, 1.0)
        if IMAGE_SIZE % self.patch_size:
            raise ConfigError(f"model.patch_size={self.patch_size} must divide the {IMAGE_SIZE}-pixel images")
        if VIDEO_SIZE % self.video_patch:
            raise ConfigError(
                f"model.video_patch={self.video_patch} must divide the {VIDEO_SIZE}-pixel frames"
            )
        if VIDEO_FRAMES % self.tubelet_frames:
            raise ConfigError(
                f"model.tubelet_frames={self.tubelet_frames} must divide the {VIDEO_FRAMES} video frames"
            )
        if len(self.audio_patch) != 2 or min(self.audio_patch) < 1:
            raise ConfigError(f"model.audio_patch={self.audio_patch} must be two positive sizes (time, mel)")
        if self.n_mels % self.audio_patch[1]:
            raise ConfigError(
                f"model.n_mels={self.n_mels} must be a multiple of the audio patch's mel size "
                f"({self.audio_patch[1]})"
            )
        if self.audio_hop > self.audio_n_fft:
            raise ConfigError(f"model.audio_hop={self.audio_hop} must not exceed model.audio_n_fft")


# Presets are plain data so that config resolution never imports torch. `small` is the CPU default:
# three stages train in minutes on two cores. `base` follows ViT-Base widths for GPU runs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        dim=32,
        depth_f=1,
        fc_dims=[32, 32, 32],
        depth_g=1,
        heads=2,
        head_dim=32,
        head_depth=1,
        head_heads=2,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        n_mels=32,
        audio_patch=[8, 8],
        text_vocab_size=300,
    ),
    # The CPU default: the dataclass widths (~5 M parameters) with 16 tokens per image and per clip,
    # each made by a small CNN (tokenizers.PooledStem). Default chain (600/600/1,000), seed 0:
    # image/digit 80.6% vs 56.6%, video/digit 44.4% vs 31.6%, mean of 7 70.9% vs 63.5%, in 12 min 8 s vs
    # 14 min 31 s; denoise (+0.5 vs +1.9 dB) and video/motion (95.8% vs 99.2%) lost (RECIPE.md).
    # The refiner's nine convolutions (19x19 pixels: the occluder needs context) gave denoise +5.63 vs
    # +3.67 dB over its input in the full profile's stage 3 (RECIPE.md and RESULTS.md).
    # The audio stem beside the linear projection: audio digit 90.5% vs 80.5% in the full profile, seed 0.
    "small": dict(
        patch_size=7,
        video_patch=16,
        stem={"image": "both", "audio": "both", "video": "conv"},
        stem_trunk="pooled",
        dense_refine=32,
        dense_refine_depth=9,
    ),
    "base": dict(  # ViT-Base f (768 wide, 12 blocks, 12 heads); A and g at 576 = 12 heads x 48
        dim=768,
        depth_f=12,
        fc_dims=[768, 672, 576],
        depth_g=4,
        heads=12,
        head_dim=192,  # ViT-Tiny width and heads
        head_depth=2,
        head_heads=3,
        decoder_dim=256,
        decoder_depth=2,
        decoder_heads=8,
        mlp_ratio=4.0,
        drop_path=0.1,
    ),
    # IMP (Akbari et al. 2023): one modality-agnostic encoder with mixture-of-experts feed-forward
    # layers. `small` widths; the shared (unified) tokenizer and no fusion layers leave the task heads
    # (one block each) as the only modality-specific parts. Train it with train.schedule=alternating
    # (configs/imp.yaml): one (modality, task) per update, input resolution varied between updates.
    "imp": dict(
        tokenizer="unified",
        task_head="specific",
        head_depth=1,
        fusion="late",
        moe_experts=4,
        moe_top_k=2,
        moe_every=2,
        moe_aux_weight=0.01,
    ),
}


# ----------------------------------------------------------------------------------------- training
# The default run's updates per stage (`train.steps=0`): 600, 600, 1,200 fit the 15-minute budget on
# 2 CPU cores (13 min 14 s with the denoise refiner). Stage 3 gets the most because its budget moves
# accuracy most: from one stage-2 checkpoint (lr 6e-4, seed 0), the mean test accuracy of the 7
# classification tasks was 57% after 1,000 updates and 54% after 800, while 600/600/1,000 tied the
# former 1,000/1,000/1,000 at lr 3e-4 (53.5% both) in three quarters of the time. The pooled stems (16 image and video tokens) made
# stage 3 a third cheaper, and the time went to 1,200 updates: mean 74.6% vs 70.9% at 1,000, from one
# stage-2 checkpoint. RESULTS.md has the tables.
STAGE_STEPS = {1: 600, 2: 600, 3: 1200}
# The default peak learning rate per stage (`train.lr=0`). Masked pre-training keeps 3e-4; stage 3
# learns faster at 6e-4 (from one stage-2 checkpoint, mean accuracy 57% vs 53.5% after 1,000 updates);
# pre-training at 6e-4 too cost audio/digit 10 points in two runs. Stage 3 at 1e-3 on the current default
# (1,200 updates from its stage-2 checkpoint): mean 74.9% vs 77.7%, all classification tasks lower but
# video digit.
STAGE_LR = {1: 3e-4, 2: 3e-4, 3: 6e-4}
# The default `train.batch_scale` per stage. Stage 3 reads text in batches three times the stream
# batch: a phrase is 2-10 tokens against 49-64 for a signal, and text/digit is short of samples, not
# of updates. From the default stage-2 checkpoint, seed 0, both cores: text/digit test 38.2% vs 28.5%
# (47.5% at x4), its training phrases fitted 60% vs 37%, for 10.6% more stage-3 time (RECIPE.md).
STAGE_BATCH_SCALE: dict[int, dict[str, float]] = {1: {}, 2: {}, 3: {"text": 3.0}}


@dataclass
class TrainConfig:
    """The one Accelerate training loop and the stage objective plugged into it (METHOD.md section 2)."""

    stage: int = 3  # 1 unimodal masked | 2 pairwise masked | 3 multitask supervised
    steps: int = 0  # optimiser updates; 0 = the stage's share of the default run (STAGE_STEPS)
    batch_size: int = 64  # samples per update per process (split over the two streams in stages 2-3)
    grad_accum: int = 1  # micro-batches per optimiser update
    lr: float = 0.0  # peak AdamW rate; 0 = the stage's default (STAGE_LR); 1e-3 is unstable for `small`
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT/MAE): each layer below the heads at d x its rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping
    mixed_precision: str = "auto"  # auto (bf16 where the hardware has native bf16, else no) | no | bf16
    checkpoint_every: int = 0  # save Accelerate state every N updates (0: only at the end)
    keep_checkpoints: int = 2  # most recent states kept under RUN/state/
    eval_every: int = 0  # also validate every N updates (history.jsonl and tracker: val/...); 0: at the end
    log_every: int = 10
    mask_ratio: dict[str, float] = field(
        # Paper: 0.95 for image, video, audio and text. On 28x28 digits with 49 patches, 0.75 keeps
        # enough visible tokens to learn from in minutes; the paper's values are one override away.
        default_factory=lambda: {"image": 0.75, "audio": 0.75, "video": 0.85, "text": 0.15}
    )
    # Masked-LM (text) also scores the kept tokens, each at this weight relative to a masked one (0:
    # BERT, masked tokens only). Text-only stage 1 (400 updates) then stage 3 (1,500), seed 0: text/digit
    # test 49.8% vs 23.8% with BERT's loss and 42.0% from scratch; BERT's loss lets f overwrite which word
    # a token is with what its context predicts, and the digit is then slow to learn (RECIPE.md).
    mlm_visible_weight: float = 1.0
    balancer: str = "dwa"  # dwa (Dynamic Weight Average) | uncertainty | equal
    schedule: str = "pairs"  # stage 3: pairs (OmniVec2: two streams per update) | alternating (IMP: one)
    # pairs: share of updates whose two batches run h(g(f(x))) alone, as inference does (0: the paper's
    # pure pair updates). From the default stage-2 checkpoint, seed 0, one thread: mean test accuracy of
    # the 7 classification tasks 60.0% vs 55.0% with 0, no task more than 1 point worse (RECIPE.md).
    single_stream: float = 0.5
    # Stage 3: relative chance of drawing each task, by key ("text/digit"); unlisted tasks weigh 1. A
    # modality is drawn in proportion to the sum of its tasks' weights (pairs: two different ones),
    # then one of its tasks in proportion to its weight; keys of tasks a run lacks are ignored. The
    # default moves text's draws from language (solved early) to digit (the slowest task): from the
    # default stage-2 checkpoint, seed 0, one thread, text/digit test 32.2% vs 18.5% uniform, mean of
    # the 7 classification tasks 62.2% vs 60.0% (RECIPE.md). Text/digit at 4 rather than 2 (text is then
    # drawn in ~43% of the stream slots): from the default stage-2 checkpoint, seed 0, both cores,
    # text/digit 78.8% vs 48.2%, mean of 7 77.7% vs 74.7%, audio 5-7 points lower, 26 s more stage 3.
    # All weights 1: uniform, the paper's sampling.
    task_sampling: dict[str, float] = field(default_factory=lambda: {"text/digit": 4.0, "text/language": 0.5})
    # Per modality: its streams' batch is this many times the stream batch (unlisted: 1); a pair
    # update fuses the rows both streams have and runs a larger stream's others single-stream. null =
    # the stage's default (STAGE_BATCH_SCALE: text x3 in stage 3); a given mapping replaces it.
    batch_scale: dict[str, float] | None = None
    vary_resolution: bool = True  # alternating: image grid, video frames, audio length drawn per update
    dwa_temperature: float = 2.0  # T in DWA's softmax over loss-descent rates (Liu et al. 2019)
    balance_window: int = 20  # optimiser steps per DWA "epoch" (losses are averaged over a window)
    # Exponential moving average of the weights (workbench/train/averaging.py): 0 = off; d in (0, 1): the
    # run validates, evaluates and saves the average, with decay min(d, (1 + n) / (10 + n)) at update n.
    ema_decay: float = 0.0
    # Stage 3: the share of each classification target spread evenly over the classes (label smoothing,
    # Szegedy et al. 2016; the ViT/DeiT recipes use 0.1). The losses logged and balanced are these.
    label_smoothing: float = 0.0
    # Stage 3: mixup (Zhang et al. 2018) per signal modality, {modality: alpha}: each classification
    # batch of a listed modality becomes lam * x + (1 - lam) * x[perm] with lam ~ Beta(alpha, alpha)
    # drawn per batch, and its loss lam * CE(y) + (1 - lam) * CE(y[perm]). Empty: off.
    mixup: dict[str, float] = field(default_factory=dict)
    tracker: str = "tensorboard"  # tensorboard | trackio | mlflow | wandb | none
    out: str = ""  # run directory ("" -> runs/<stage>-<timestamp>)

    def __post_init__(self) -> None:
        _check_choice("train.stage", self.stage, (1, 2, 3))
        _check_choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _check_choice("train.balancer", self.balancer, ("dwa", "uncertainty", "equal"))
        _check_choice("train.schedule", self.schedule, ("pairs", "alternating"))
        _check_choice("train.tracker", self.tracker, ("tensorboard", "trackio", "mlflow", "wandb", "none"))
        for name in ("batch_size", "grad_accum", "log_every", "balance_window"):
            _check_range(f"train.{name}", getattr(self, name), lo=1)
        for name in ("steps", "warmup_steps", "checkpoint_every", "eval_every", "clip_grad", "weight_decay"):
            _check_range(f"train.{name}", getattr(self, name), lo=0)
        _check_range("train.lr", self.lr, lo=0.0, hi=10.0)  # 0: the stage's default, resolved on load
        _check_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("train.layer_decay", self.layer_decay, 0.01, 1.0)
        _check_range("train.mlm_visible_weight", self.mlm_visible_weight, 0.0, 100.0)
        _check_range("train.single_stream", self.single_stream, 0.0, 1.0)
        _check_range("train.ema_decay", self.ema_decay, 0.0, 0.99999)
        _check_range("train.label_smoothing", self.label_smoothing, 0.0, 0.99)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, lo=1)
        for key, w in self.task_sampling.items():
            _check_range(f"train.task_sampling.{key}", w, lo=0.0)
        for m, r in self.mask_ratio.items():
            _check_choice("train.mask_ratio key", m, MODALITIES)
            _check_range(f"train.mask_ratio.{m}", r, 0.0, 0.99)
        for m, a in self.mixup.items():
            _check_choice("train.mixup key", m, SIGNALS)
            _check_range(f"train.mixup.{m}", a, lo=0.0, hi=100.0)
        for m, r in (self.batch_scale or {}).items():
            _check_choice("train.batch_scale key", m, MODALITIES)
            _check_range(f"train.batch_scale.{m}", r, 0.01, 64.0)


# ------------------------------------------------------------------------------------- seed systems
DEEPSENSE_PAIR_SEP = "->"  # a DeepSense pair is written "query->gallery", e.g. "text->image"
DEEPSENSE_MASKED = ("image", "audio")  # modalities whose DeepSense objective is masked reconstruction
DEEPSENSE_LOSSES = ("contrastive", "image", "audio", "text")  # weight keys: alignment + each generative loss


@dataclass
class DeepSenseConfig:
    """DeepSense-v2 (METHOD.md section 4; ``workbench/deepsense.py``): pairs, encoders, objectives, retrieval.

    Widths come from ``model.*`` (so ``model.preset`` sizes the encoders): every encoder is ``model.dim``
    wide (the image ViT's first stage; later stages double it), ``model.depth_f`` blocks per encoder (per
    stage for images), ``model.heads`` heads, ``model.depth_g`` fusion layers, and ``model.fc_dims[-1]``
    is the width of the fusion tokens and of the shared contrastive embedding.
    """

    pairs: list[str] = field(
        default_factory=lambda: ["text->image", "audio->image", "text->video"]
    )  # label-aligned training pairs, written query->gallery: also the retrieval directions scored
    image_stages: int = 2  # hierarchical ViT stages; each after the first merges 2x2 tokens, doubles width
    conv_kernel: int = 15  # Conformer depthwise kernel in audio tokens (15 x 80 ms; paper: 32 x 40 ms)
    conv_norm: str = "batch"  # Conformer conv-module norm: batch (the paper's; valid frames only) | layer
    audio_stride: int = 4  # log-mel frames stacked into one audio token (Conformer's 4x subsampling)
    mask_ratio: dict[str, float] = field(
        default_factory=lambda: {"image": 0.6, "audio": 0.5}
    )  # share of image units (SimMIM's 0.6) and audio tokens replaced by a mask token
    temperature: float = 0.07  # initial InfoNCE temperature (CLIP); learned as a log-scale
    max_logit_scale: float = 100.0  # the learned 1 / temperature is clamped to [1, this] (CLIP)
    positives: str = "label"  # label (every same-digit item of the batch) | pair (the aligned partner only)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(DEEPSENSE_LOSSES, 1.0)
    )  # contrastive | image (masked patches) | audio (log-mel reconstruction) | text (next-token LM)
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])  # K of the Recall@K retrieval scores

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("deepsense.pairs is empty; name at least one pair such as 'text->image'")
        seen: set[frozenset[str]] = set()
        for pair in self.pairs:
            parts = pair.split(DEEPSENSE_PAIR_SEP)
            if len(parts) != 2 or parts[0] == parts[1]:
                raise ConfigError(
                    f"deepsense.pairs entry {pair!r} must be two different modalities as 'query->gallery'"
                )
            for m in parts:
                _check_choice("deepsense.pairs modality", m, MODALITIES)
            if frozenset(parts) in seen:
                raise ConfigError(f"deepsense.pairs names the pair {pair!r} twice (either direction)")
            seen.add(frozenset(parts))
        _check_range("deepsense.image_stages", self.image_stages, 1, 4)
        _check_range("deepsense.conv_kernel", self.conv_kernel, lo=1)
        if self.conv_kernel % 2 == 0:
            raise ConfigError(
                f"deepsense.conv_kernel={self.conv_kernel} must be odd (same-length convolution)"
            )
        _check_choice("deepsense.conv_norm", self.conv_norm, ("batch", "layer"))
        _check_range("deepsense.audio_stride", self.audio_stride, lo=1)
        for m, r in self.mask_ratio.items():
            _check_choice("deepsense.mask_ratio key", m, DEEPSENSE_MASKED)
            _check_range(f"deepsense.mask_ratio.{m}", r, 0.05, 0.95)
        _check_range("deepsense.temperature", self.temperature, 1e-3, 1.0)
        if 1.0 / self.temperature > self.max_logit_scale:
            raise ConfigError(
                f"deepsense.temperature={self.temperature} starts beyond the clamp: 1 / temperature must not "
                f"exceed deepsense.max_logit_scale={self.max_logit_scale}"
            )
        _check_choice("deepsense.positives", self.positives, ("label", "pair"))
        for k, w in self.loss_weights.items():
            _check_choice("deepsense.loss_weights key", k, DEEPSENSE_LOSSES)
            _check_range(f"deepsense.loss_weights.{k}", w, lo=0.0)
        if not self.recall_at or min(self.recall_at) < 1:
            raise ConfigError(f"deepsense.recall_at={self.recall_at} must be positive ranks, e.g. [1, 5, 10]")


# ---------------------------------------------------------------------------------------------- app
@dataclass
class AppConfig:
    """The Gradio attention explorer."""

    checkpoint: str = ""  # "" -> the newest runs/*/checkpoint
    host: str = "127.0.0.1"  # loopback unless asked; never a share link unless share=true
    port: int = 7860
    share: bool = False
    concurrency_limit: int = 4  # simultaneous model calls (Gradio queue)
    top_k: int = 3

    def __post_init__(self) -> None:
        _check_range("app.port", self.port, 1, 65535)
        _check_range("app.concurrency_limit", self.concurrency_limit, lo=1)
        _check_range("app.top_k", self.top_k, lo=1)


# --------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    """Everything a run needs. ``seed`` drives Python, NumPy and torch (see :mod:`workbench.seeding`)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    app: AppConfig = field(default_factory=AppConfig)
    deepsense: DeepSenseConfig = field(default_factory=DeepSenseConfig)  # the DeepSense-v2 seed system


# ------------------------------------------------------------------------------------------ loading
def valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (``train.steps``, ``data.limits.max_text_chars``...)."""
    keys: list[str] = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(valid_keys(type(default), key + "."))
    return keys


def _closest_key(key: str) -> str:
    """Always name one valid key: a close whole-key match, else a close leaf match, else the nearest."""
    keys = valid_keys()
    leaf = {k.rsplit(".", 1)[-1]: k for k in keys}  # so `steps=3` suggests `train.steps`
    hit = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not hit:
        leaf_hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaf), n=1, cutoff=0.5)
        hit = [leaf[leaf_hit[0]]] if leaf_hit else difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    return f"; the closest valid key is {hit[0]!r}" if hit else ""


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or ("Key '" in msg and "not in" in msg):
        return ConfigError(f"unknown config key {key!r} in {source}{_closest_key(key)}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for {key!r} in {source}: {msg.splitlines()[0]}")
    return ConfigError(f"invalid config in {source}: {msg.splitlines()[0]}")


def _mapping_keys(node: Any = Config, prefix: str = "") -> set[str]:
    """Keys of dict-typed fields (``train.mask_ratio``, ``data.folders``): any sub-key is allowed."""
    out: set[str] = set()
    for f in dataclasses.fields(node):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out |= _mapping_keys(type(default), f"{prefix}{f.name}.")
        elif isinstance(default, dict) or str(f.type).startswith("dict["):  # a mapping (or None)
            out.add(f"{prefix}{f.name}")
    return out


def _check_keys(layer: DictConfig, source: str) -> None:
    """Reject unknown dotted keys up front, naming the full key as written (OmegaConf names only a prefix)."""
    valid, mappings = set(valid_keys()), _mapping_keys()

    def leaves(node: Any, prefix: str = "") -> Iterable[str]:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v and key not in mappings:
                yield from leaves(v, key + ".")
            else:
                yield key

    for key in leaves(OmegaConf.to_container(layer)):
        under_mapping = any(key.startswith(m + ".") for m in mappings)
        if key not in valid and key not in mappings and not under_mapping:
            raise ConfigError(f"unknown config key {key!r} in {source}{_closest_key(key)}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    """``other`` merged into ``base`` in place (``base`` is always load_config's own copy)."""
    try:
        return OmegaConf.unsafe_merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _wrap(err, source) from None


@functools.cache
def _schema() -> DictConfig:
    """The typed tree of :class:`Config` with its defaults, built once (~60 ms); every load merges into
    a copy of it."""
    return OmegaConf.structured(Config)


def _layer_preset(layer: Any) -> str | None:
    """``model.preset`` as a layer sets it (a string, as the typed merge makes it), or None."""
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    preset = model.get("preset") if isinstance(model, DictConfig) else None
    return None if preset is None else str(preset)


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=200)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {items}: {str(err).splitlines()[0]}") from None


def _read_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: the file is not valid YAML
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}"
        ) from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not a list")
    return loaded


def load_config(
    files: Iterable[str | Path] = (), overrides: Iterable[str] = (), base: dict[str, Any] | None = None
) -> Config:
    """Resolve a :class:`Config` from YAML files and ``key=value`` overrides; raise ConfigError on anything bad.

    ``base`` is an optional mapping applied before the files (used by notebooks for their parameters).

    Every call returns a new Config. The same inputs resolve once per process: OmegaConf's typed merge
    takes 50-120 ms a load on this CPU, and one training run loads several (its own settings, the
    checkpoint it starts from), an ablation notebook ~25. A file is the same input while its bytes are;
    a ``base`` that JSON cannot write is always resolved afresh.
    """
    files, overrides = list(files), tuple(overrides)
    key = _load_key(files, overrides, base)
    if key is None:
        return _resolve(files, overrides, base)
    cfg = _LOADS.get(key)
    if cfg is None:
        cfg = _resolve(files, overrides, base)
        if len(_LOADS) >= 256:
            _LOADS.pop(next(iter(_LOADS), None), None)  # the oldest
        _LOADS[key] = cfg
    return copy.deepcopy(cfg)  # callers may change theirs


_LOADS: dict[tuple, Config] = {}  # load_config's inputs -> what they resolved to


def _load_key(files: list, overrides: tuple[str, ...], base: dict[str, Any] | None) -> tuple | None:
    try:
        contents = tuple((str(f), hashlib.sha1(Path(f).read_bytes()).hexdigest()) for f in files)
        key = contents, overrides, json.dumps(base, sort_keys=True) if base else ""
        hash(key)
        return key
    except (OSError, TypeError, ValueError):  # a missing file (its error comes from the load) or odd base
        return None


def _resolve(files: list[str | Path], overrides: tuple[str, ...], base: dict[str, Any] | None) -> Config:
    layers: list[tuple[Any, str]] = []
    if base:
        layers.append((OmegaConf.create(base), "parameters"))
    layers += [(_read_yaml(f), str(f)) for f in files]
    layers.append((_parse_overrides(overrides), "overrides"))

    preset = _schema().model.preset
    for layer, source in layers:
        _check_keys(layer, source)
        named = _layer_preset(layer)
        preset = preset if named is None else named  # the last layer that names one wins, as in a merge
    if preset not in MODEL_PRESETS:
        _check_choice("model.preset", preset, tuple(MODEL_PRESETS))
    # The preset's values underneath the user's layers, so explicit keys still win. One copy of the
    # schema, every layer merged into it in place: a merge per layer that copied the tree again, and
    # building the schema per load, made a load take 3x as long (load_config 121 ms, from_dict 209 ms).
    merged = copy.deepcopy(_schema())
    merged = _merge(merged, {"model": MODEL_PRESETS[preset]}, f"model preset {preset!r}")
    for layer, source in layers:
        merged = _merge(merged, layer, source)
    stage = merged.train.stage
    if merged.train.steps == 0 and stage in STAGE_STEPS:  # the stage's default budget
        merged.train.steps = STAGE_STEPS[stage]
    if merged.train.lr == 0 and stage in STAGE_LR:  # and its default learning rate
        merged.train.lr = STAGE_LR[stage]
    if merged.train.batch_scale is None:  # and its default batch sizes per modality
        merged.train.batch_scale = STAGE_BATCH_SCALE.get(stage, {})
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # runs every __post_init__
    except OmegaConfBaseException as err:
        raise _wrap(err, "config") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved dict (e.g. a checkpoint's config.json), validating every key."""
    return load_config(base=data)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(to_dict(cfg))  # the same text as through OmegaConf.structured, in half the time


def save_config(cfg: Config, directory: str | Path) -> None:
    """Write the resolved config as ``config.yaml`` and ``config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    (directory / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def upgrade_model_keys(model: dict[str, Any]) -> None:
    """In place: give a saved ``model`` section written before a key existed what it was built with, so
    a preset that later changed a default cannot change an older network on reload."""
    model.setdefault("head_pool", "cls")  # before model.head_pool: heads read the CLS token
    model.setdefault("stem_trunk", "strided")  # before model.stem_trunk: the strided stem
    model.setdefault("dense_refine", 0)  # before model.dense_refine: no refiner
    model.setdefault("dense_refine_depth", 3)  # before model.dense_refine_depth: three convolutions
    model.setdefault("audio_norm", "utterance")  # before model.audio_norm: one mean and scale per clip
    stem = model.get("stem", "linear")  # before model.stem: linear patch projections
    if isinstance(stem, str):  # before the per-signal mapping: one kind for model.stem_modalities
        # (before model.stem_modalities: a conv stem embedded every signal)
        chosen = model.pop("stem_modalities", SIGNALS)
        model["stem"] = {m: stem if m in chosen else "linear" for m in SIGNALS}


def read_saved_config(path: str | Path) -> dict[str, Any]:
    """The config part of a saved ``config.json`` (a checkpoint's also holds ``tasks`` and a format
    version), its model keys upgraded (:func:`upgrade_model_keys`)."""
    saved = json.loads(Path(path).read_text())
    out = {f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved}
    if isinstance(out.get("model"), dict):
        upgrade_model_keys(out["model"])
    return out
