"""Audio: waveform <-> mel spectrogram, vocoders, synthesised music data."""
