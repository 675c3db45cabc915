"""Spoken digit words from a real speech synthesizer: eSpeak NG through ctypes.

PyPI's ``espeakng-loader`` ships ``libespeak-ng`` and its data, so a fresh machine synthesizes the
audio bank without apt-get or a network. We drive the C API directly (``speak_lib.h``):
``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS)`` then ``espeak_Synth`` with a callback that
collects the int16 samples at eSpeak's native rate (22,050 Hz).

Determinism. eSpeak keeps synthesis state in C statics that its API never resets (the pitch
"flutter" phase, the automatic gain control, the echo buffer), so a clip depends on every clip
synthesized before it in the process. We therefore load a fresh copy of the library for every
:class:`Session` (``dlopen`` ... ``dlclose``; loading a voice costs ~5 ms, a word ~1.5 ms) and seed
its noise generator with ``espeak_ng_SetRandSeed``: a session's clips are then a pure function of
its voice and the sequence of (text, rate, pitch, range) it is asked to say.

Voices are eSpeak *language voices* combined with *voice variants* (``de+f3``, ``fr+klatt``...):
the variant changes the speaker (formants, pitch, breathiness, synthesis method), the language
changes the pronunciation. The benchmark splits audio by variant so that test speakers are never
heard in training.
"""

from __future__ import annotations

import _ctypes
import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

# eSpeak NG constants (speak_lib.h)
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4

# Our language code -> eSpeak language voice. Extend together with workbench.modalities.LANGUAGES.
ESPEAK_VOICES = {"en": "en", "de": "de", "fr": "fr", "es": "es", "it": "it"}

# Speaker variants (espeak-ng-data/voices/!v) with the gender their pitch settings suggest; novelty
# effects (whisper, croak, robots, "Demonic") are left out so every clip is an intelligible word.
_FEMALE = [
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "Alicia",
    "Andrea",
    "Annie",
    "anika",
    "aunty",
    "belinda",
    "linda",
    "steph",
    "shelby",
    "zac",
]
_MALE = "m1 m2 m3 m4 m5 m6 m7 m8 Alex Andy Denis Gene Jacky Lee Mario Michael Mike ed iven john norbert paul robert klatt david"
VOICE_VARIANTS: tuple[tuple[str, str], ...] = (
    *((name, "female") for name in _FEMALE),
    *((name, "male") for name in _MALE.split()),
)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@lru_cache(maxsize=1)
def _paths() -> tuple[str, bytes]:
    import espeakng_loader

    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path().encode()


_unload = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary  # POSIX | Windows


def _bind(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip


class Session:
    """One fresh copy of libespeak-ng with one voice: ``with Session("de+f3") as tts: tts.say("sieben")``.

    Clips said in one session depend on the clips said before them in it (eSpeak's C statics), so
    callers keep the sequence of a session fixed; a new session starts from a clean library.
    """

    def __init__(self, voice: str, seed: int = 0):
        self.voice, self.seed = voice, seed
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib: ctypes.CDLL | None = None
        self.sample_rate = 0

    def _collect(self, wav, n, _events) -> int:  # called by eSpeak with each block of samples
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0

    def __enter__(self) -> Session:
        library, data = _paths()
        variant = self.voice.partition("+")[2]
        if variant and not (Path(data.decode()) / "voices" / "!v" / variant).is_file():
            raise RuntimeError(
                f"eSpeak NG has no voice variant {variant!r} (it would silently use the default)"
            )
        self._lib = lib = ctypes.CDLL(library)
        _bind(lib)
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        try:
            if self.sample_rate <= 0:
                raise RuntimeError(f"eSpeak NG failed to initialise with data at {data.decode()}")
            lib.espeak_SetSynthCallback(self._callback)
            lib.espeak_ng_SetRandSeed(self.seed)
            if lib.espeak_SetVoiceByName(self.voice.encode()) != 0:
                raise RuntimeError(f"eSpeak NG has no voice {self.voice!r}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def say(self, text: str, *, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
        """int16 samples of ``text`` at :attr:`sample_rate`. ``rate`` is words per minute (80-450);
        ``pitch`` and ``pitch_range`` are eSpeak's 0-99 scales."""
        lib = self._lib
        assert lib is not None, "use Session as a context manager"
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, pitch_range)):
            lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        buf = text.encode() + b"\0"
        if lib.espeak_Synth(buf, len(buf), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"eSpeak NG could not synthesize {text!r} with {self.voice!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def __exit__(self, *exc) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            lib.espeak_Terminate()
            handle = lib._handle
            del lib
            _unload(handle)  # the next session gets a freshly initialised copy


def synthesize(text: str, voice: str, *, rate: int = 175, pitch: int = 50, pitch_range: int = 50,
               seed: int = 0) -> tuple[np.ndarray, int]:  # fmt: skip
    """Speak ``text`` with eSpeak voice ``voice`` (e.g. ``"de+f3"``) in a fresh session.

    Returns (int16 samples, sample rate). Deterministic: equal arguments give equal samples.
    """
    with Session(voice, seed) as tts:
        return tts.say(text, rate=rate, pitch=pitch, pitch_range=pitch_range), tts.sample_rate


def voice_name(language: str, variant: str) -> str:
    """``("de", "f3") -> "de+f3"``."""
    return f"{ESPEAK_VOICES[language]}+{variant}"
