"""FID and KID for `ditk evaluate-fid`, built on clean-fid.

- `fid`: features, statistics, Fréchet distance and KID (clean-fid's arithmetic), the evaluation itself
- `inputs`: GEN/REF as folders, `.npz` batches or statistics files, checked up front
- `stats`: statistics files (`--save-stats`) and the reference-statistics cache
- `extractors`: the FEATURE_EXTRACTORS registry (`inception`, weights by path; `digits`, shipped);
  `photos_extractor`: `photos`, shipped (ditk's own network for the 32x32 photos crops)
- `offline`: weight files by path and sha256, never downloaded
- `from_run`: `--run`: samples from a trained run, its data set as the reference
"""
