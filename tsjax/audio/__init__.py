"""Audio in: audio files decoded to 16 kHz mono (`tsjax.audio.waveform`), their log-mel
features (`tsjax.audio.features`) and the audio encoders of mmproj files (Gemma 4's
`gemma4a` conformer, `tsjax.audio.gemma4a`), loaded beside the vision encoder of the same file
(`tsjax.vision.Projector.audio`, `tsjax.audio.encoder`)."""

from tsjax.audio.encoder import AUDIO_ENCODERS, AudioEncoder, has_audio, load_audio_encoder
from tsjax.audio.waveform import (
    AudioError,
    AudioLimits,
    PreparedAudio,
    decode_audio,
    prepare_audio,
    resample,
)

__all__ = [
    "AUDIO_ENCODERS",
    "AudioEncoder",
    "AudioError",
    "AudioLimits",
    "PreparedAudio",
    "decode_audio",
    "has_audio",
    "load_audio_encoder",
    "prepare_audio",
    "resample",
]
