"""Measurement: EViT against the plain ViT of the same weights, timed interleaved; keep-rate
sweeps; end-to-end time from image files; the plain-ViT exports and engines they compare with."""
