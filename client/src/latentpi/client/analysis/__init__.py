"""Analysis of recorded latents: metrics on arrays (`metrics`), cross-validated probes (`probes`).
Needs numpy, scipy, scikit-learn, h5py and matplotlib only (never JAX). Definitions: docs/analysis.md."""
